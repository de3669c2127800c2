"""On-device random images for benchmarks: no decode, no host copy, no data-loading cost."""

from __future__ import annotations

import torch


class SyntheticLoader:
    name = "synthetic"

    def __init__(self, img_size, batch_size, seed, device, in_chans=3, pool=4, dtype=torch.float32):
        self.device = torch.device(device)
        g = torch.Generator(device=self.device).manual_seed(seed)
        # a small pool of distinct batches, cycled: generating fresh noise every step would be timed too
        self.pool = [torch.randn(batch_size, in_chans, img_size, img_size, generator=g, device=self.device,
                                 dtype=dtype) for _ in range(pool)]
        self.batches_per_epoch = pool
        self.num_samples = pool * batch_size

    def close(self) -> None:  # no workers, no pipeline
        pass

    def stream(self, start: int = 0):
        i = start
        while True:
            yield self.pool[i % len(self.pool)]
            i += 1

"""PIL + torchvision backend: the paper's augmentation (RandomResizedCrop(scale 0.2-1, bicubic), flip,
normalise) in DataLoader workers, for machines without DALI. Deterministic per (seed, epoch, sample),
so a resumed run sees exactly the batches the uninterrupted run would have seen."""

from __future__ import annotations

import sys

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .common import EpochPlan, sample_crop, sample_rng

MAX_FALLBACKS = 16
CACHE_MAX_FILES = 32


class ImageFiles(torch.utils.data.Dataset):
    """Indexed by (epoch, sample); sample i reads files[i % len(files)]."""

    def __init__(self, files, img_size, scale, ratio, hflip, mean, std, seed, deterministic=False):
        self.files, self.img_size = list(files), img_size
        self.scale, self.ratio, self.hflip, self.mean, self.std = scale, ratio, hflip, list(mean), list(std)
        self.seed, self.deterministic = seed, deterministic
        self._warned: set[str] = set()
        # a handful of files (the embedded photographs) are decoded once per worker and kept
        self._cache: dict[str, Image.Image] | None = {} if len(self.files) <= CACHE_MAX_FILES else None

    def __len__(self):
        return len(self.files)

    def load(self, path: str) -> Image.Image:
        if self._cache is not None and path in self._cache:
            return self._cache[path]
        with Image.open(path) as im:
            img = im.convert("RGB")
        if self._cache is not None:
            self._cache[path] = img
        return img

    def transform(self, img: Image.Image, rng) -> torch.Tensor:
        size = [self.img_size, self.img_size]
        if self.deterministic:  # full image, plain resize, no flip (parity tests)
            img = TF.resize(img, size, InterpolationMode.BICUBIC, antialias=True)
        else:
            top, left, h, w = sample_crop(img.width, img.height, self.scale, self.ratio, rng)
            img = TF.resized_crop(img, top, left, h, w, size, InterpolationMode.BICUBIC, antialias=True)
            if rng.random() < self.hflip:
                img = TF.hflip(img)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def __getitem__(self, key):
        epoch, index = key
        rng = sample_rng(self.seed, epoch, index)
        n = len(self.files)
        for k in range(MAX_FALLBACKS):
            path = self.files[(index + k) % n]
            try:
                img = self.load(path)
            except Exception as e:  # unreadable file: skip it with one warning naming it
                if path not in self._warned:
                    self._warned.add(path)
                    print(f"warning: skipping unreadable image {path}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            return self.transform(img, rng)
        raise RuntimeError(f"{MAX_FALLBACKS} consecutive unreadable images from {self.files[index % n]}; "
                           "run `mae data check DIR` to list and quarantine them")


class TorchvisionLoader:
    name = "torchvision"

    def __init__(self, files, repeat, img_size, batch_size, data_cfg, seed, device, rank=0, world=1,
                 deterministic=False):
        self.dataset = ImageFiles(files, img_size, data_cfg.scale, data_cfg.ratio, data_cfg.hflip,
                                  data_cfg.mean, data_cfg.std, seed, deterministic)
        self.num_samples = len(files) * repeat
        self.plan = EpochPlan(self.num_samples, batch_size, seed, rank, world)
        self.batches_per_epoch = self.plan.batches_per_epoch
        self.device = torch.device(device)
        self.num_workers = data_cfg.workers()
        self.dtype = getattr(torch, data_cfg.dtype)

    def stream(self, start: int = 0):
        """Batches [B, C, H, W] fp32 on the device, forever, from global micro-batch `start`."""
        dl = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.plan.batches(start), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None)
        for imgs in dl:
            yield imgs.to(self.dtype).to(self.device, non_blocking=True)  # cast first: a bf16 copy is half

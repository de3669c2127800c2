"""PIL + torchvision backend: the paper's augmentation (RandomResizedCrop(scale 0.2-1, bicubic), flip,
normalise) in DataLoader workers, for machines without DALI. Deterministic per (seed, epoch, sample),
so a resumed run sees exactly the batches the uninterrupted run would have seen.

Workers ignore SIGTERM, SIGINT and SIGUSR1: a scheduler's pre-emption (sent to the whole process group) or a
Ctrl-C reaches the main process, which writes its checkpoint while the workers keep serving batches. An
unreadable image is skipped (the next file stands in); the main process names each one once, whichever worker
met it."""

from __future__ import annotations

import signal
import sys
import weakref

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .common import DataError, EpochPlan, close_streams, sample_crop, sample_rng, stop_workers, to_rgb, tracked


def worker_context():
    """How DataLoader workers start: forked (the default, fastest) unless this process has used DALI, whose
    threads a forked child inherits in an unknown state (workers died of SIGSEGV); then by forkserver."""
    dali = sys.modules.get("pipelines.dali")
    if dali is None or not getattr(dali, "USED", False):
        return None
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "pipelines.torchvision"])  # imported once, not per worker
    return ctx

MAX_FALLBACKS = 16
CACHE_MAX_FILES = 32


class ImageFiles(torch.utils.data.Dataset):
    """Indexed by (epoch, sample); sample i reads files[i % len(files)] (with `shards` set, a packed set's sample
    numbers, read from their shard: ShardImages). img_size: a side, or (height, width)."""

    def __init__(self, files, img_size, scale, ratio, hflip, mean, std, seed, deterministic=False):
        self.files, self.img_size = list(files), img_size
        self.scale, self.ratio, self.hflip, self.mean, self.std = scale, ratio, hflip, list(mean), list(std)
        self.seed, self.deterministic = seed, deterministic
        self.uint8 = False  # hand over decoded uint8 pixels; the loader normalises them on the device (Normalize)
        self._warned: set[str] = set()
        # the embedded photographs (a handful) are decoded once per worker and kept (TorchvisionLoader turns it
        # on for them only: a user's small folder is decoded every time, as a large one is)
        self._cache: dict[str, Image.Image] | None = None
        self.shards = None  # a packed set (pipelines/shards.py ShardSet): samples read by offset, one seek each

    def __len__(self):
        return len(self.files)

    def load(self, path) -> Image.Image:
        if self.shards is not None:  # a sample number of a packed set
            import io

            with Image.open(io.BytesIO(self.shards.read(path))) as im:
                return to_rgb(im)
        if self._cache is not None and path in self._cache:
            return self._cache[path]
        with Image.open(path) as im:
            img = to_rgb(im)
        if self._cache is not None:
            self._cache[path] = img
        return img

    def transform(self, img: Image.Image, rng) -> torch.Tensor:
        size = list(self.img_size) if isinstance(self.img_size, tuple) else [self.img_size, self.img_size]
        if self.deterministic:  # full image, plain resize, no flip (parity tests)
            img = TF.resize(img, size, InterpolationMode.BICUBIC, antialias=True)
        else:
            top, left, h, w = sample_crop(img.width, img.height, self.scale, self.ratio, rng)
            img = TF.resized_crop(img, top, left, h, w, size, InterpolationMode.BICUBIC, antialias=True)
            if rng.random() < self.hflip:
                img = TF.hflip(img)
        if self.uint8:
            return TF.pil_to_tensor(img)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def __getitem__(self, key):
        """The sample's tensor; get_with_skips also says which unreadable files it skipped."""
        x, skipped = self.get_with_skips(key)
        if x is None:
            raise DataError(too_many_unreadable(skipped))
        return x

    def describe(self, path) -> str:
        """How a warning names a sample's source (a file; a shard and its member for packed data)."""
        return f"{self.shards.name(path)} (shard:member)" if self.shards is not None else str(path)

    def get_with_skips(self, key):
        epoch, index = key
        rng = sample_rng(self.seed, epoch, index)
        n = len(self.files)
        skipped = []
        for k in range(MAX_FALLBACKS):
            path = self.files[(index + k) % n]
            try:
                img = self.load(path)
            except Exception as e:  # unreadable file: the next one stands in; the main process names it once
                skipped.append((self.describe(path), f"{type(e).__name__}: {e}"))
                continue
            return self.transform(img, rng), skipped
        return None, skipped  # the main process raises (an exception in a worker would carry its traceback)


class ShardImages(ImageFiles):
    """The samples of a packed dataset (pipelines/shards.py) through the same augmentation: sample i is read from
    its shard by offset (one seek) and decoded with PIL; a damaged member is named with its shard and skipped."""

    def __init__(self, shards, img_size, scale, ratio, hflip, mean, std, seed, deterministic=False):
        super().__init__(list(range(len(shards))), img_size, scale, ratio, hflip, mean, std, seed, deterministic)
        self.shards = shards  # packed data is large: no decoded cache


class Normalize:
    """uint8 [B, C, H, W] pixels to normalised floats on the device: to_tensor's x / 255 then normalize's
    (x - mean) / std, the same float32 operations in the same order as in the workers, so the same values."""

    def __init__(self, mean, std, device):
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)


def too_many_unreadable(skipped) -> str:
    return (f"{MAX_FALLBACKS} consecutive unreadable images from {skipped[0][0]} on ({skipped[0][1]}); run "
            "`mae data check DIR` to list and quarantine them; checkpoints already written are intact")


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: leave SIGTERM / SIGINT / SIGUSR1 to the main process (it checkpoints, then
    shuts the workers down itself)."""
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class _WithSkips(torch.utils.data.Dataset):
    """The dataset's samples with the files each skipped, so the main process can warn once per file."""

    def __init__(self, ds: ImageFiles):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        return self.ds.get_with_skips(key)


def _collate_with_skips(items):
    skipped = [s for _, sk in items for s in sk]
    failed = next((sk for x, sk in items if x is None), None)
    if failed is not None:
        return None, failed
    return torch.stack([x for x, _ in items]), skipped


class TorchvisionLoader:
    name = "torchvision"

    def __init__(self, files, repeat, img_size, batch_size, data_cfg, seed, device, rank=0, world=1,
                 deterministic=False, shards=None):
        args = (img_size, data_cfg.scale, data_cfg.ratio, data_cfg.hflip, data_cfg.mean, data_cfg.std, seed,
                deterministic)
        self.dataset = ShardImages(shards, *args) if shards is not None else ImageFiles(files, *args)
        if shards is None and not data_cfg.path and len(files) <= CACHE_MAX_FILES:
            self.dataset._cache = {}  # the embedded photographs: decoded once per worker
        self.num_samples = len(self.dataset.files) * repeat
        self.plan = EpochPlan(self.num_samples, batch_size, seed, rank, world)
        self.batches_per_epoch = self.plan.batches_per_epoch
        self.device = torch.device(device)
        self.num_workers = data_cfg.workers()
        self.dtype = getattr(torch, data_cfg.dtype)
        self.dataset.uint8 = data_cfg.transfer == "uint8"
        self.normalize = Normalize(data_cfg.mean, data_cfg.std, self.device) if self.dataset.uint8 else None
        self._streams = weakref.WeakSet()  # held weakly: see pipelines.common.tracked

    def stream(self, start: int = 0):
        """Batches [B, C, H, W] fp32 on the device, forever, from global micro-batch `start`; `close()` (or the
        generator's own close) stops its workers."""
        return tracked(self._stream(start), self._streams)

    def close(self) -> None:
        """Stop the workers of every stream this loader handed out (the loader can stream again afterwards)."""
        close_streams(self._streams)

    def _stream(self, start: int):
        dl = torch.utils.data.DataLoader(
            _WithSkips(self.dataset), batch_sampler=self.plan.batches(start), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False, collate_fn=_collate_with_skips,
            worker_init_fn=ignore_stop_signals if self.num_workers else None,
            prefetch_factor=4 if self.num_workers else None,
            multiprocessing_context=worker_context() if self.num_workers else None)
        warned = self.dataset._warned
        it = iter(dl)
        try:
            for imgs, skipped in it:
                if imgs is None:
                    raise DataError(too_many_unreadable(skipped))
                for path, why in skipped:
                    if path not in warned:  # once per file, whichever worker met it
                        warned.add(path)
                        print(f"warning: skipping unreadable image {path}: {why}", file=sys.stderr)
                if self.normalize is not None:  # uint8 over the bus, normalised where the model is
                    yield self.normalize(imgs.to(self.device, non_blocking=True)).to(self.dtype)
                else:
                    yield imgs.to(self.dtype).to(self.device, non_blocking=True)  # cast first: a bf16 copy is half
        finally:
            stop_workers(it)

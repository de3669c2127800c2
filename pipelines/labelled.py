"""Labelled image folders (one subfolder per class), or sets packed with `mae data pack --labels` (pipelines/shards.py),
for fine-tuning, probing and evaluation, through the torchvision pipeline:
training batches with RandomResizedCrop + flip (the probe's and fine-tuning's augmentation), evaluation
batches with a resize of the shorter side to img_size / crop_pct and a center crop.

`export_digits` writes scikit-learn's handwritten digits (1,797 8x8 images shipped inside the package, no
download), upscaled, as such a folder with a deterministic train/val split: a real labelled dataset that a
CPU can pretrain on and probe in minutes.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from .common import IMAGE_EXTS, DataError, EpochPlan, close_streams, sample_rng, stop_workers, tracked, walk_files
from .torchvision import ImageFiles, ignore_stop_signals, too_many_unreadable, worker_context


def list_labelled(path: str) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, class names) of a folder whose subfolders are the classes (sorted by name)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"labelled data directory {root} does not exist" if not root.exists()
                        else f"labelled data path {root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root} needs one subfolder per class (at least two); found {len(classes)}")
    files, labels = [], []
    for k, c in enumerate(classes):
        imgs = [f for f in walk_files(root / c) if f.lower().endswith(IMAGE_EXTS)]
        files += imgs
        labels += [k] * len(imgs)
    if not files:
        raise DataError(f"no images found under the class folders of {root}")
    return files, labels, classes


class ShardLabels:
    """The labels of a packed set as a sequence, each read from its shard when asked for (a worker reads the labels
    of its own samples only)."""

    def __init__(self, shards):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> int:
        return self.shards.label(i)


def open_labelled(path: str):
    """(files, labels, class names, shards) of a labelled folder, or of a set packed with `mae data pack --labels`
    (files are then the sample numbers, labels read lazily, shards the ShardSet; None for a folder)."""
    from .shards import find_manifest, open_shards

    if find_manifest(path) is None:
        return (*list_labelled(path), None)
    shards = open_shards(path)
    if len(shards.classes) < 2 or not shards.samples or shards.samples[0].label_at is None:
        raise DataError(f"{path} is a packed set without labels; pack the class folders again with "
                        "`mae data pack SRC OUT --labels`")
    return list(range(len(shards))), ShardLabels(shards), shards.classes, shards


class LabelledFiles(ImageFiles):
    """(image, label) by (epoch, sample). Training: the probe's RandomResizedCrop + flip, or with `auto_augment`
    timm's create_transform (bicubic RandomResizedCrop, flip, RandAugment, random erasing: the fine-tuning recipe),
    seeded per sample so that a resumed run draws the same augmentation. Evaluation: resize + center crop."""

    def __init__(self, files, labels, img_size, data_cfg, seed, train: bool, crop_pct: float = 0.875,
                 auto_augment: str = "", reprob: float = 0.0):
        super().__init__(files, img_size, data_cfg.scale, data_cfg.ratio, data_cfg.hflip if train else 0.0,
                         data_cfg.mean, data_cfg.std, seed, deterministic=not train)
        self.labels = labels if isinstance(labels, ShardLabels) else list(labels)
        self.train, self.crop_pct = train, crop_pct
        self.timm_transform = None
        if train and auto_augment:
            from timm.data import create_transform

            self.timm_transform = create_transform(
                (3, *img_size) if isinstance(img_size, tuple) else img_size, is_training=True, scale=tuple(data_cfg.scale), ratio=tuple(data_cfg.ratio),
                hflip=data_cfg.hflip, auto_augment=auto_augment, interpolation="bicubic", re_prob=reprob,
                re_mode="pixel", re_count=1, mean=tuple(data_cfg.mean), std=tuple(data_cfg.std))
            _posterize_to_zero_bits(self.timm_transform)

    def with_shards(self, shards) -> "LabelledFiles":
        self.shards = shards
        return self

    def transform(self, img, rng):
        if self.timm_transform is not None:
            return seeded(self.timm_transform, img, rng.getrandbits(63))
        if self.train:
            return super().transform(img, rng)
        if isinstance(self.img_size, tuple):  # (height, width): timm's eval transform, both sides scaled
            h, w = self.img_size
            img = TF.resize(img, [int(h / self.crop_pct), int(w / self.crop_pct)], InterpolationMode.BICUBIC,
                            antialias=True)
            img = TF.center_crop(img, [h, w])
            return TF.normalize(TF.to_tensor(img), self.mean, self.std)
        size = int(round(self.img_size / self.crop_pct))
        img = TF.resize(img, size, InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [self.img_size, self.img_size])
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def __getitem__(self, key):
        """(image, label); an unreadable file is replaced by the next readable one, with that file's label."""
        epoch, index = key
        if index < 0:  # padding of a rank's validation share (see LabelledLoader.val_batches): weight 0
            x, _ = self.get_with_skips((epoch, 0))
            return x, -1
        x, skipped = self.get_with_skips(key)
        if x is None:
            raise DataError(too_many_unreadable(skipped))
        return x, self.labels[(index + len(skipped)) % len(self.labels)]


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, also at 0 bits (a black image, as Pillow before 11 gave; RandAugment's increasing
    posterize reaches 0 at magnitude 10, which Pillow 11+ refuses)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_to_zero_bits(transform) -> None:
    """Give the posterize ops of a timm RandAugment inside `transform` the 0-bit-safe version."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize


def seeded(transform, img, seed: int):
    """`transform(img)` with Python's, NumPy's and torch's global generators seeded from `seed` (timm's transforms
    draw from all three) and restored afterwards: the sample's augmentation is a function of the seed alone."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            return transform(img)
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def shard_for_eval(n: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s share of n evaluation samples: every world-th sample from `rank`, padded with -1 to the same
    length on every rank (ceil(n / world)), so that every rank runs the same number of forwards (FSDP's
    collectives) and the shares together hold each sample exactly once."""
    share = list(range(rank, n, world))
    return share + [-1] * (-(-n // world) - len(share))


class LabelledLoader:
    """Batches (images [B, C, H, W] on the device, labels [B]). Training: this rank's rows of each global batch
    (pipelines.common.EpochPlan), reshuffled per epoch, from any global micro-batch (`stream(start)`: a resumed
    run continues where it stopped). Evaluation: every sample once over the ranks (`epoch()` on one process,
    `val_batches()` padded for several)."""

    def __init__(self, path: str, img_size: int, batch_size: int, data_cfg, seed: int, device, train: bool,
                 num_workers: int | None = None, *, rank: int = 0, world: int = 1, crop_pct: float = 0.875,
                 auto_augment: str = "", reprob: float = 0.0):
        self.files, self.labels, self.classes, shards = open_labelled(path)
        self.path = path
        self.dataset = LabelledFiles(self.files, self.labels, img_size, data_cfg, seed, train, crop_pct,
                                     auto_augment, reprob).with_shards(shards)
        self.train, self.batch_size, self.seed, self.rank, self.world = train, batch_size, seed, rank, world
        self.device = torch.device(device)
        self.num_workers = data_cfg.workers() if num_workers is None else num_workers
        if train:
            self.plan = EpochPlan(len(self.files), batch_size, seed, rank, world)
        self._passes = weakref.WeakSet()  # held weakly: see pipelines.common.tracked

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    def epoch(self, epoch: int = 0):
        """One pass: shuffled full batches when training, every sample in order otherwise. Leaving the pass early
        stops its workers when the generator is closed (`close()`, or the end of the run)."""
        if self.train:
            plan = self.plan.batches(epoch * self.plan.batches_per_epoch)
            return self._pass([next(plan) for _ in range(self.plan.batches_per_epoch)])
        idx = list(range(len(self.files)))
        return self._pass([[(0, i) for i in idx[j:j + self.batch_size]] for j in range(0, len(idx), self.batch_size)])

    def stream(self, start: int = 0):
        """Training batches forever from global micro-batch `start` (epoch = start // batches_per_epoch)."""
        def gen():
            epoch, b = divmod(start, self.plan.batches_per_epoch)
            while True:
                plan = self.plan.batches(epoch * self.plan.batches_per_epoch + b)
                yield from self._pass([next(plan) for _ in range(self.plan.batches_per_epoch - b)])
                epoch, b = epoch + 1, 0
        return tracked(gen(), self._passes)

    def val_batches(self):
        """This rank's share of the evaluation set (shard_for_eval) in batches of (images, labels); padding
        carries label -1 (not counted)."""
        share = shard_for_eval(len(self.files), self.rank, self.world)
        return self._pass([[(0, i) for i in share[j:j + self.batch_size]] for j in range(0, len(share), self.batch_size)])

    def close(self) -> None:
        close_streams(self._passes)

    def _pass(self, sampler):
        return tracked(self._batches(sampler), self._passes)

    def _batches(self, sampler):
        dl = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                         pin_memory=self.device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals if self.num_workers else None,
                                         multiprocessing_context=worker_context() if self.num_workers else None)
        it = iter(dl)
        try:
            for imgs, labels in it:
                yield imgs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        finally:
            stop_workers(it)


def export_digits(out: str, img_size: int = 32, val_fraction: float = 0.3, seed: int = 0) -> tuple[int, int]:
    """Write sklearn's digits as out/train/<digit>/*.png and out/val/<digit>/*.png (RGB, upscaled)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(d.images))
    n_val = int(len(order) * val_fraction)
    counts = [0, 0]
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        img = (d.images[i] / 16.0 * 255).astype(np.uint8)
        pil = Image.fromarray(img, mode="L").resize((img_size, img_size), Image.BICUBIC).convert("RGB")
        folder = Path(out) / split / str(int(d.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        pil.save(folder / f"{i:04d}.png")
        counts[split == "val"] += 1
    return counts[0], counts[1]


__all__ = ["list_labelled", "LabelledLoader", "export_digits", "sample_rng"]

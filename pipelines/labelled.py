"""Labelled image folders (one subfolder per class) for evaluation, through the torchvision pipeline:
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
from .torchvision import ImageFiles, ignore_stop_signals, worker_context


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


class LabelledFiles(ImageFiles):
    def __init__(self, files, labels, img_size, data_cfg, seed, train: bool, crop_pct: float = 0.875):
        super().__init__(files, img_size, data_cfg.scale, data_cfg.ratio, data_cfg.hflip if train else 0.0,
                         data_cfg.mean, data_cfg.std, seed, deterministic=not train)
        self.labels, self.train, self.crop_pct = list(labels), train, crop_pct

    def transform(self, img, rng):
        if self.train:
            return super().transform(img, rng)
        size = int(round(self.img_size / self.crop_pct))
        img = TF.resize(img, size, InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [self.img_size, self.img_size])
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def __getitem__(self, key):
        epoch, index = key
        return super().__getitem__(key), self.labels[index % len(self.labels)]


class LabelledLoader:
    """Batches (images [B, C, H, W] on the device, labels [B]); training order reshuffled per epoch."""

    def __init__(self, path: str, img_size: int, batch_size: int, data_cfg, seed: int, device, train: bool,
                 num_workers: int | None = None):
        self.files, self.labels, self.classes = list_labelled(path)
        self.dataset = LabelledFiles(self.files, self.labels, img_size, data_cfg, seed, train)
        self.train, self.batch_size, self.seed = train, batch_size, seed
        self.device = torch.device(device)
        self.num_workers = data_cfg.workers() if num_workers is None else num_workers
        if train:
            self.plan = EpochPlan(len(self.files), batch_size, seed)
        self._passes = weakref.WeakSet()  # held weakly: see pipelines.common.tracked

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def epoch(self, epoch: int = 0):
        """One pass: shuffled full batches when training, every sample in order otherwise. Leaving the pass early
        stops its workers when the generator is closed (`close()`, or the end of the run)."""
        return tracked(self._epoch(epoch), self._passes)

    def close(self) -> None:
        close_streams(self._passes)

    def _epoch(self, epoch: int):
        if self.train:
            plan = self.plan.batches(epoch * self.plan.batches_per_epoch)
            sampler = [next(plan) for _ in range(self.plan.batches_per_epoch)]
        else:
            idx = list(range(len(self.files)))
            sampler = [[(0, i) for i in idx[j:j + self.batch_size]] for j in range(0, len(idx), self.batch_size)]
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

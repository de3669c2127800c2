"""Data pipelines: produce [N, C, H, W] normalised images on the training device.

Backends: `dali` (GPU decode and augmentation; CPU-only mode without a GPU), `torchvision` (PIL in
DataLoader workers), `synthetic` (on-device random images). All share one interface:
`loader.stream(start_batch)` yields batches forever from a global micro-batch index, and
`loader.batches_per_epoch` says how many micro-batches one epoch has on this rank.
"""

from __future__ import annotations

import sys

from .common import DataError, embedded_images, list_images, resolve_files

__all__ = ["build_loader", "DataError", "embedded_images", "list_images", "dali_available"]
MAE_ENGINE_PIPELINES = True  # marker: tests check that `import pipelines` resolves to this project


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def build_loader(data_cfg, img_size: int, batch_size: int, device, seed: int, rank: int = 0, world: int = 1,
                 in_chans: int = 3, quiet: bool = False):
    """Pick and build the backend named by data_cfg.backend."""
    backend = data_cfg.backend
    if backend == "synthetic":
        from .synthetic import SyntheticLoader

        import torch

        return SyntheticLoader(img_size, batch_size, seed + rank, device, in_chans, dtype=getattr(torch, data_cfg.dtype))
    from .shards import find_manifest, open_shards

    shards = None
    if data_cfg.path and find_manifest(data_cfg.path) is not None:  # a packed dataset (`mae data pack`)
        shards = open_shards(data_cfg.path)
        files, repeat, skipped = [], data_cfg.repeat or 1, []
    else:
        files, repeat, skipped = resolve_files(data_cfg)
    if skipped and not quiet:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"warning: skipping {len(skipped)} non-image file(s) in {data_cfg.path}: {shown}", file=sys.stderr)
    if backend == "dali" and not (dali_available() and _dali_implemented()):
        raise DataError("data.backend=dali but DALI is not importable here; install nvidia-dali-cuda130 "
                        "(pip install 'mae-engine[dali]') or use --data.backend torchvision")
    if backend == "dali" or (backend == "auto" and dali_available() and _dali_implemented()):
        from .dali import DaliLoader

        return DaliLoader(files, repeat, img_size, batch_size, data_cfg, seed, device, rank, world,
                          out_dtype=data_cfg.dtype, shards=shards)
    from .torchvision import TorchvisionLoader

    return TorchvisionLoader(files, repeat, img_size, batch_size, data_cfg, seed, device, rank, world, shards=shards)


def _dali_implemented() -> bool:
    import importlib.util

    return importlib.util.find_spec("pipelines.dali") is not None

"""Which device and which compute dtype a run uses (`train.device`, `train.precision`): resolved in one place
for the trainer, the parallel set-up, the training step and the evaluation commands."""

from __future__ import annotations

import contextlib

import torch

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; an explicit cuda device where there is none is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available here; use --train.device cpu")
    return dev


def autocast(device: torch.device | str, dtype: torch.dtype | None, cache: bool = True):
    """torch's autocast to `dtype` on `device`'s type, or no autocast for dtype None (fp32, bf16-pure). A captured
    step turns the weight-cast cache off (cached casts do not survive a capture)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.precision` on `device`, or None for plain fp32 (and for bf16-pure, which
    computes on bf16 copies of the weights without autocast)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16":  # with dynamic loss scaling (engine.mixed.LossScaler)
        return torch.float16
    return torch.bfloat16 if precision in ("bf16", "fp8") else None

"""Checkpoints: atomic single-file save, keep-last-K, resume lookup, weights-only loading, timm export.

A checkpoint is a plain dict of tensors and Python primitives, written to a temporary file in the run
directory, fsynced and renamed into place, so a kill during a save leaves the previous checkpoint intact.
Everything is loaded with `torch.load(weights_only=True)`: a checkpoint never executes code.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")
DECODER_PREFIXES = ("decoder_", "mask_token", "encoder_mask_token")
ARCH_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
               "decoder_depth", "decoder_num_heads", "mlp_ratio", "encoder_mask_tokens")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model; the message names the file."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temp file beside `path`, fsync, rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    d = Path(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if CKPT_RE.match(p.name))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep_last: int = 3) -> Path:
    path = atomic_torch_save(state, checkpoint_path(run_dir, step))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load with weights_only=True onto the CPU; a clear CheckpointError for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {path} (weights-only loading refused or the file is "
                              f"damaged): {first}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def model_state_from(obj: dict, path: str | os.PathLike = "checkpoint") -> dict:
    """The model state dict in an engine checkpoint, a reference-implementation one ({'model': ...}) or a bare one."""
    sd = obj.get("model", obj)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no model state dict")
    return sd


def check_architecture(saved_cfg: dict | None, model_cfg, path: str | os.PathLike) -> None:
    """Raise when the checkpoint's model config differs from ours in an architecture field."""
    if not saved_cfg or "model" not in saved_cfg:
        return
    saved = saved_cfg["model"]
    diffs = [f"{k}: checkpoint {saved[k]!r} vs config {getattr(model_cfg, k)!r}"
             for k in ARCH_FIELDS if k in saved and saved[k] != getattr(model_cfg, k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is of another architecture ({'; '.join(diffs)}); use the preset "
                              "and overrides it was trained with, or another run directory")


def load_model_state(model: torch.nn.Module, sd: dict, path: str | os.PathLike = "checkpoint") -> None:
    """Strict load with one readable error listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise CheckpointError(f"checkpoint {path} does not fit this model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def encoder_state_dict(sd: dict) -> dict:
    """The encoder part of an MAE state dict, with timm VisionTransformer key names (they are the same)."""
    return {k: v for k, v in sd.items() if not k.startswith(DECODER_PREFIXES)}


def capture_rng(extra_generators: dict[str, torch.Generator] | None = None) -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, g in (extra_generators or {}).items():
        state[name] = g.get_state()
    return state


def restore_rng(state: dict, extra_generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    for name, g in (extra_generators or {}).items():
        if name in state:
            g.set_state(state[name])

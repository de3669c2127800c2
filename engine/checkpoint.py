"""Checkpoints: atomic save, keep-last-K, resume lookup, weights-only loading, timm export.

Two on-disk forms of one logical content {model, optim (keyed by parameter name), step, data position,
schedule, RNG, config}:
- `ckpt_XXXXXXXX.pt`: one file, from a single-process run; a plain dict of tensors and primitives, loaded
  with `torch.load(weights_only=True)` (a checkpoint never executes code).
- `ckpt_XXXXXXXX.dcp/`: a torch.distributed.checkpoint directory written by every rank of a torchrun job
  (sharded: no rank gathers the full model), with `meta.pt` beside the shards. DCP's own metadata file is
  a pickle, so this form is for a run's own resumable checkpoints; weights from elsewhere come in as .pt
  files (weights-only). Both forms resume on any world size: the optimizer state is keyed by parameter name.
Both are written under a temporary name, fsynced and renamed into place, so a kill during a save leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.(pt|dcp)$")
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


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(binary_file) on a temp file beside `path`, fsync, rename over `path`: a kill leaves
    either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temp file beside `path`, fsync, rename over `path`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_path(run_dir: str | os.PathLike, step: int, sharded: bool = False) -> Path:
    return Path(run_dir) / f"ckpt_{step:08d}.{'dcp' if sharded else 'pt'}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints, oldest first (by step, then .dcp before .pt)."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: (int(CKPT_RE.match(p.name).group(1)), p.suffix))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    import shutil

    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep_last: int = 3) -> Path:
    path = atomic_torch_save(state, checkpoint_path(run_dir, step))
    prune(run_dir, keep_last)
    return path


# ----------------------------------------------------------------------------------------------------------
# Training state (model + optimizer keyed by name + meta), in either form


def _sd_api():
    from torch.distributed.checkpoint import state_dict as sdapi

    return sdapi


def training_state(model, optimizer) -> dict:
    """{"model", "optim"} with the optimizer state keyed by parameter name (sharded DTensors under FSDP)."""
    sdapi = _sd_api()
    return {"model": sdapi.get_model_state_dict(model), "optim": sdapi.get_optimizer_state_dict(model, optimizer)}


def save_training_checkpoint(run_dir, step: int, model, optimizer, meta: dict, keep_last: int,
                             sharded: bool, is_main: bool = True) -> Path:
    """Write model + optimizer + meta atomically; sharded=True: every rank calls this (DCP)."""
    run_dir = Path(run_dir)
    if not sharded:
        state = training_state(model, optimizer)
        return save_checkpoint(run_dir, step, {**state, **meta}, keep_last)
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = checkpoint_path(run_dir, step, sharded=True)
    tmp = run_dir / f".{final.name}.tmp"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(training_state(model, optimizer), checkpoint_id=str(tmp))
    dist.barrier()
    if is_main:
        atomic_torch_save(meta, tmp / "meta.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
        prune(run_dir, keep_last)
    dist.barrier()
    return final


def read_meta(path: str | os.PathLike) -> dict:
    """step, data position, schedule, RNG and config of a checkpoint of either form."""
    path = Path(path)
    if path.is_dir():
        return load_checkpoint(path / "meta.pt")
    obj = load_checkpoint(path)
    return {k: v for k, v in obj.items() if k not in ("model", "optim", "optimizer")}


def load_training_checkpoint(path: str | os.PathLike, model, optimizer, model_cfg=None) -> dict:
    """Restore model and optimizer (any world size, either form); returns the meta dict."""
    sdapi = _sd_api()
    path = Path(path)
    meta = read_meta(path)
    if model_cfg is not None:
        check_architecture(meta.get("config"), model_cfg, path)
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        state = training_state(model, optimizer)
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot load sharded checkpoint {path}: {first}") from None
        sdapi.set_model_state_dict(model, state["model"])
        sdapi.set_optimizer_state_dict(model, optimizer, state["optim"])
        return meta
    obj = load_checkpoint(path)
    if "optim" not in obj:
        raise CheckpointError(f"{path} is not a training checkpoint (no optimizer state); "
                              "to start from weights only, use a new run directory")
    opts = sdapi.StateDictOptions(full_state_dict=True)
    _check_keys(model, model_state_from(obj, path), path)
    sdapi.set_model_state_dict(model, obj["model"], options=opts)
    sdapi.set_optimizer_state_dict(model, optimizer, obj["optim"], options=opts)
    return meta


def _check_keys(model, sd: dict, path) -> None:
    """One CheckpointError listing missing, unexpected and mis-shaped keys (shapes as the model sees them)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {own[k]}" for k in own if k in sd
              and tuple(sd[k].shape) != own[k]]
    if missing or unexpected or shapes:
        raise CheckpointError(_mismatch_message(path, missing, unexpected, shapes))


def full_model_state(path: str | os.PathLike) -> dict:
    """The full (consolidated) model state dict of a checkpoint of either form, or of a bare/reference one."""
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{path} is not a checkpoint (no .pt file, no DCP .metadata)")
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        fd, tmp = tempfile.mkstemp(suffix=".pt")
        os.close(fd)
        try:
            dcp_to_torch_save(str(path), tmp)
            obj = load_checkpoint(tmp)
        finally:
            os.unlink(tmp)
        return model_state_from(obj, path)
    return model_state_from(load_checkpoint(path), path)


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
    _check_keys(model, sd, path)
    model.load_state_dict(sd, strict=True)


def _mismatch_message(path, missing, unexpected, shapes) -> str:
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            parts.append(f"{label} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
    return f"checkpoint {path} does not fit this model: " + "; ".join(parts)


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


# ----------------------------------------------------------------------------------------------------------
# Weights from elsewhere: the paper's pretraining and fine-tuned checkpoints, timm ViT weights


def _load_any(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    return load_checkpoint(path)


def detect_format(sd: dict) -> str:
    """'mae' (encoder + decoder: ours or the paper's pretraining), 'finetuned' (the paper's fine-tuned ViT,
    with head / fc_norm), 'timm' (a timm VisionTransformer) or 'unknown'."""
    keys = set(sd)
    if any(k.startswith("decoder_") for k in keys) and "mask_token" in keys:
        return "mae"
    if "cls_token" in keys and any(k.startswith("blocks.") for k in keys):
        if any(k.startswith("fc_norm.") for k in keys) and "norm.weight" not in keys:
            return "finetuned"
        return "timm"
    return "unknown"


def import_weights(model, path: str | os.PathLike) -> dict:
    """Load weights of any supported origin into an MAE model.

    mae: every key (strict). finetuned / timm: the encoder only (head and fc_norm dropped; the decoder
    keeps its fresh initialisation; a fine-tuned checkpoint has no final `norm`, which keeps its init).
    Mismatched keys or shapes: one CheckpointError listing them. Returns {"format", "loaded", "kept_init"}.
    """
    path = Path(path)
    sd = full_model_state(path) if path.is_dir() else model_state_from(_load_any(path), path)
    fmt = detect_format(sd)
    own = model.state_dict()
    if fmt == "mae":
        load_model_state(model, sd, path)
        return {"format": fmt, "loaded": len(sd), "kept_init": []}
    if fmt == "unknown":
        raise CheckpointError(f"{path}: not an MAE, MAE fine-tuned or timm ViT state dict (keys such as "
                              f"{', '.join(list(sd)[:5])})")
    dropped = ("head.", "fc_norm.", "head_drop.")
    enc = {k: v for k, v in sd.items() if not k.startswith(dropped)}
    enc_keys = [k for k in own if not k.startswith(DECODER_PREFIXES)]
    allowed_missing = {"norm.weight", "norm.bias"} if fmt == "finetuned" else set()
    missing = [k for k in enc_keys if k not in enc and k not in allowed_missing]
    unexpected = [k for k in enc if k not in own]
    shapes = [f"{k}: checkpoint {tuple(enc[k].shape)} vs model {tuple(own[k].shape)}" for k in enc
              if k in own and tuple(enc[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(_mismatch_message(path, missing, unexpected, shapes))
    with torch.no_grad():
        for k, v in enc.items():
            own[k].copy_(v)
    kept = [k for k in own if k not in enc]
    return {"format": fmt, "loaded": len(enc), "kept_init": kept}


def to_reference_format(sd: dict) -> dict:
    """Our full model state dict in the paper's release format: {'model': state_dict} (same key names)."""
    return {"model": {k: v.detach().clone() for k, v in sd.items()}}

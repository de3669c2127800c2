"""Checkpoints: atomic save, keep-last-K, resume lookup, weights-only loading, timm export.

Two on-disk forms of one logical content {model, optim (keyed by parameter name), step, data position,
schedule, RNG, config}:
- `ckpt_XXXXXXXX.pt`: one file, from a single-process run; a plain dict of tensors and primitives, loaded
  with `torch.load(weights_only=True)` (a checkpoint never executes code).
- `ckpt_XXXXXXXX.dcp/`: a torch.distributed.checkpoint directory written by every rank of a torchrun job
  (sharded: no rank gathers the full model), with `meta.pt` beside the shards. Both forms resume on any world
  size: the optimizer state is keyed by parameter name.
Neither form runs code when read. DCP's own reader unpickles `.metadata` with plain pickle and its non-tensor
values with torch.load(weights_only=False); every DCP read here goes through `load_sharded()`, whose reader admits in
`.metadata` exactly the (module, name) pairs of DCP_METADATA_GLOBALS and whose planner loads the values
weights-only (DCP's modules are not patched). A refused file gets one message naming it and what it asked for.
Both are written under a temporary name, fsynced and renamed into place, so a kill during a save leaves
the previous checkpoint intact; temporary files left by a killed writer are removed when a run starts
(`remove_stale_temp_files`), never those of a writer that is still alive. A full disk or a read-only run
directory ends the save with a CheckpointError naming the directory and the cause, the earlier checkpoints
untouched. Files get the permissions the umask gives any new file (teammates on a shared file system can read
them when the umask lets them).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import socket
import time
from pathlib import Path

import torch

from .atomic import CheckpointError, _fsync_dir, _writer_tag, atomic_write, io_error

CKPT_RE = re.compile(r"^ckpt_(\d{8}|[1-9]\d{8,})\.(pt|dcp)$")  # checkpoint_path's names: 8 digits, more past 10^8
DECODER_PREFIXES = ("decoder_", "mask_token", "encoder_mask_token")
ARCH_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
               "decoder_depth", "decoder_num_heads", "mlp_ratio", "encoder_mask_tokens")


def ensure_writable(run_dir: str | os.PathLike) -> Path:
    """Create the run directory and prove a file can be written in it, before a run spends any time: a read-only
    directory, a full disk or a path through a regular file is one CheckpointError naming the directory."""
    d = Path(run_dir)
    probe = d / f".mae_write_probe.{_writer_tag()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise io_error(e, "the run's files", d) from None
    return d


TEMP_RE = re.compile(r"^\.(.+)\.([A-Za-z0-9-]+)-(\d+)\.[^.]+\.tmp$")  # .<name>.<host>-<pid>.<random>.tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temp_files(run_dir: str | os.PathLike, min_age_s: float = 3600.0) -> list[Path]:
    """Delete the temporary files and sharded-save directories that killed writers left in `run_dir`: those of a
    process of this host that is gone, and (another host's, or untagged) those untouched for `min_age_s`. A live
    writer's files are never touched. Returns what was removed."""
    import shutil

    d = Path(run_dir)
    if not d.is_dir():
        return []
    host = socket.gethostname().replace(".", "-")
    removed = []
    for p in d.iterdir():
        if not p.name.startswith(".") or not p.name.endswith(".tmp"):
            continue
        m = TEMP_RE.match(p.name)
        writer = None
        if m:
            writer = (m.group(2), int(m.group(3)))
        elif p.is_dir() and (p / ".writer").is_file():  # a sharded save in progress: .ckpt_X.dcp.tmp/.writer
            try:
                h, pid = (p / ".writer").read_text().split()
                writer = (h, int(pid))
            except ValueError:
                writer = None
        try:
            age = time.time() - p.stat().st_mtime
        except OSError:
            continue
        if writer is not None and writer[0] == host:
            stale = not _pid_alive(writer[1])
        else:
            stale = age > min_age_s
        if stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


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
    failure = None
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            (tmp / ".writer").write_text(f"{socket.gethostname().replace('.', '-')} {os.getpid()}\n")
        except OSError as e:
            failure = io_error(e, final.name, run_dir)
    _raise_together(failure, final, run_dir)
    try:
        dcp.save(training_state(model, optimizer), checkpoint_id=str(tmp))
    except BaseException as e:  # noqa: BLE001 - CheckpointException derives from BaseException
        cause = _first_os_error(e)
        if cause is None:
            raise
        raise io_error(cause, final.name, run_dir) from None
    dist.barrier()
    if is_main:
        try:
            atomic_torch_save(meta, tmp / "meta.pt")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            (final / ".writer").unlink(missing_ok=True)  # kept until the rename: a kill before it leaves a stale,
            # recognisable temp directory
            _fsync_dir(run_dir)
            prune(run_dir, keep_last)
        except OSError as e:
            failure = io_error(e, final.name, run_dir)
        except CheckpointError as e:
            failure = e
    _raise_together(failure, final, run_dir)
    return final


def _raise_together(failure: "CheckpointError | None", final: Path, run_dir: Path) -> None:
    """Every rank learns whether rank 0's part of a sharded save failed, and all raise together (no rank is left
    waiting in the next collective)."""
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([float(failure is not None)], device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        raise failure if failure is not None else CheckpointError(
            f"cannot write {final.name} in {run_dir}: rank 0 could not (see its message); the checkpoints already "
            "there are intact")


def _first_os_error(e: BaseException) -> OSError | None:
    """The OSError behind a DCP failure (it wraps each rank's exception), if any."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return x
        stack += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            stack += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
    return None


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
        state = load_sharded(path, training_state(model, optimizer))
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
        from .hf import import_hf, is_hf_dir

        if is_hf_dir(path):  # a Hugging Face ViTMAEForPreTraining directory (safetensors only)
            return import_hf(path)[1]
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{path} is not a checkpoint (no .pt file, no DCP .metadata, no Hugging Face "
                                  "config.json)")
        return model_state_from(load_sharded(path), path)
    return model_state_from(load_checkpoint(path), path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load with weights_only=True onto the CPU; a clear CheckpointError for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise refusal(path, e) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def refusal(path, e: BaseException) -> CheckpointError:
    """What a file that is not a checkpoint is, in one line: code it would run, or not a checkpoint at all. Never
    the advice to load it without weights_only (that would run the code)."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    name = m.group(1) if m else None
    if isinstance(e, pickle.UnpicklingError) or name:
        name = name or next(iter(_foreign_globals(path)), None)
        asked = text.split(" is not checkpoint metadata")[0] if "is not checkpoint metadata" in text else None
        what = (f"it asks to call or build {name}" if name else f"it asks for {asked}" if asked else
                "it holds objects other than tensors and plain values")
        return CheckpointError(f"refused {path}: {what}, which a checkpoint never needs; checkpoints are loaded as "
                               "tensors and plain values and nothing in them is run")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln),
                 type(e).__name__)
    return CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint, or damaged "
                           f"({type(e).__name__}: {first[:160]})")


def _foreign_globals(path, limit: int = 64 * 2**20) -> list[str]:
    """The callables and classes a pickle (or a torch zip's data.pkl) names outside torch and the containers,
    read from its opcodes without running anything: what a refusal can name."""
    import pickletools
    import zipfile

    try:
        p = Path(path)
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name)[:limit] if name else b""
        else:
            data = p.read_bytes()[:limit]
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name in ("GLOBAL", "INST"):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - a file too damaged to parse names nothing
        return []
    ok = ("torch.", "collections.", "_codecs.", "builtins.set", "builtins.frozenset", "builtins.slice",
          "__builtin__.set", "__builtin__.frozenset", "__builtin__.slice",  # protocol 2's names for the same
          "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray")
    return [g for g in dict.fromkeys(found) if not g.startswith(ok)]


# ----------------------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint) read without running code

_DCP_MD = "torch.distributed.checkpoint.metadata"
DCP_METADATA_GLOBALS = frozenset({
    *((_DCP_MD, n) for n in ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
                             "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                             "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *((m, n) for m in ("pathlib", "pathlib._local") for n in ("PosixPath", "WindowsPath", "PurePosixPath",
                                                               "PureWindowsPath")),
    *(("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)),
})
"""Every (module, qualified name) a DCP `.metadata` may name, exactly: no other name of these modules (DCP's
metadata module imports `os`), no dotted name, nothing reached by attribute."""


class MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's `.metadata` holds: its metadata dataclasses, torch sizes, dtypes and layouts, paths and
    plain containers.

    Every opcode that calls or builds gets its callable from `find_class`, which admits exactly the pairs of
    DCP_METADATA_GLOBALS: GLOBAL and STACK_GLOBAL (any protocol, dotted names included: no attribute walk), INST and
    EXT1/2/4 (the C unpickler resolves both through find_class), so REDUCE, OBJ, NEWOBJ, NEWOBJ_EX and BUILD /
    `__setstate__` can only reach the classes listed; persistent ids are refused."""

    def find_class(self, module, name):
        if (module, name) not in DCP_METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not checkpoint metadata")
        import importlib

        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"a persistent id ({str(pid)[:60]!r}) is not checkpoint metadata")


def read_dcp_metadata(path: str | os.PathLike):
    """The `.metadata` of a sharded checkpoint directory, read with MetadataUnpickler; anything after the pickle's
    end is read the same way (so a payload there is named too) and refused. A CheckpointError names the file and
    what it asked for."""
    from torch.distributed.checkpoint.metadata import Metadata

    f_path = Path(path) / ".metadata"
    try:
        with open(f_path, "rb") as f:
            md = MetadataUnpickler(f).load()
            if f.read(1):
                f.seek(-1, os.SEEK_CUR)
                MetadataUnpickler(f).load()
                raise CheckpointError(f"refused {path}: {f_path.name} has data after its end, which DCP never "
                                      "writes; checkpoints are loaded as tensors and plain values and nothing in "
                                      "them is run")
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise refusal(path, e) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {f_path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - a truncated or garbage pickle
        raise CheckpointError(f"cannot load sharded checkpoint {path}: damaged or incomplete metadata "
                              f"({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"cannot load sharded checkpoint {path}: its .metadata holds a {type(md).__name__}, "
                              "not DCP metadata")
    for info in (getattr(md, "storage_data", None) or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        if not rel or os.path.basename(rel) != rel or rel in (".", ".."):
            raise CheckpointError(f"refused {path}: its .metadata names a shard file outside the checkpoint "
                                  f"({rel[:80]!r})")
    return md


def safe_dcp_reader(path: str | os.PathLike, metadata=None):
    """A DCP FileSystemReader whose `read_metadata` is read_dcp_metadata, or `metadata` already read with it (no
    module of DCP is patched: a read in another thread keeps DCP's own behaviour, and this reader's reads stay safe
    whatever other threads do)."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = metadata if metadata is not None else read_dcp_metadata(path)
            try:
                from torch.distributed.checkpoint.metadata import StorageMeta

                if getattr(md, "storage_meta", None) is None:
                    md.storage_meta = StorageMeta()
                md.storage_meta.load_id = self.load_id
            except (ImportError, AttributeError):  # older DCP: no storage meta
                pass
            return md

    return SafeFileSystemReader(str(path))


def _weights_only_bytes(planner_cls):
    """`planner_cls` with its non-tensor values (DCP's BYTE_IO entries, loaded by DCP with weights_only=False)
    loaded weights-only: a value that asks to call anything is refused, what passes is handed on re-serialised."""
    import io

    class WeightsOnlyBytes(planner_cls):
        def load_bytes(self, read_item, value):
            obj = torch.load(value, map_location="cpu", weights_only=True)
            clean = io.BytesIO()
            torch.save(obj, clean)  # plain values only: what DCP's own load of it rebuilds is this
            clean.seek(0)
            super().load_bytes(read_item, clean)

    return WeightsOnlyBytes


def load_sharded(path: str | os.PathLike, state: dict | None = None) -> dict:
    """Read a sharded checkpoint without running code: into `state` (dcp.load's in-place form, any world size), or,
    with state None, the whole checkpoint as one nested dict in this process. Refusals and damage are one
    CheckpointError naming the directory."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    path = Path(path)
    md = read_dcp_metadata(path)  # refused here, before DCP runs (and logs) anything; read once
    with dcp_errors(path):
        if state is not None:
            import torch.distributed.checkpoint as dcp

            dcp.load(state, storage_reader=safe_dcp_reader(path, md),
                     planner=_weights_only_bytes(DefaultLoadPlanner)())
            return state
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        sd: dict = {}
        _load_state_dict(sd, storage_reader=safe_dcp_reader(path, md),
                         planner=_weights_only_bytes(_EmptyStateDictLoadPlanner)(), no_dist=True)
        return sd


@contextlib.contextmanager
def dcp_errors(path):
    """Any failure reading a sharded checkpoint (DCP's CheckpointException derives from BaseException and would
    escape `except Exception`) becomes one CheckpointError naming the directory."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001
        inner = _root_cause(e)
        if isinstance(inner, pickle.UnpicklingError) or "not checkpoint metadata" in str(inner) or re.search(
                r"GLOBAL [\w.]+", str(inner)):
            raise refusal(path, inner) from None
        first = next((ln.strip() for ln in str(inner).splitlines() if ln.strip()), type(inner).__name__)
        raise CheckpointError(f"cannot load sharded checkpoint {path}: damaged or incomplete "
                              f"({type(inner).__name__}: {first[:200]})") from None


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a DCP failure (it wraps each rank's error in a CheckpointException)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        v = next(iter(failures.values()))
        e = v[0] if isinstance(v, tuple) else v
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    return e


def model_state_from(obj: dict, path: str | os.PathLike) -> dict:
    """The model state dict in an engine checkpoint, a reference-implementation one ({'model': ...}) or a bare one."""
    sd = obj.get("model", obj)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no model state dict")
    return sd


def check_architecture(saved_cfg: dict | None, model_cfg, path: str | os.PathLike) -> None:
    """Raise when the checkpoint's model config differs from ours in an architecture field."""
    if not isinstance(saved_cfg, dict) or not isinstance(saved_cfg.get("model"), dict):
        return
    saved = saved_cfg["model"]
    diffs = [f"{k}: checkpoint {saved[k]!r} vs config {getattr(model_cfg, k)!r}"
             for k in ARCH_FIELDS if k in saved and saved[k] != getattr(model_cfg, k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is of another architecture ({'; '.join(diffs)}); use the preset "
                              "and overrides it was trained with, or another run directory")


def load_model_state(model: torch.nn.Module, sd: dict, path: str | os.PathLike) -> None:
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


def check_training_meta(meta: dict, path) -> None:
    """The fields a resume reads, with the types it needs: one CheckpointError naming the field and what it holds
    (a checkpoint edited by hand or damaged), never a traceback later."""

    def bad(field, value, want):
        shown = repr(value)
        return CheckpointError(f"{path} is not a usable training checkpoint: {field} is {shown[:60]}"
                               f"{'...' if len(shown) > 60 else ''} ({type(value).__name__}), expected {want}")

    def count(field, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(field, value, "a whole number >= 0")

    for key in ("step", "data", "rng"):
        if key not in meta:
            raise CheckpointError(f"{path} is not a training checkpoint (no {key!r}); "
                                  "to start from weights only, use a new run directory")
    count("step", meta["step"])
    data = meta["data"]
    if not isinstance(data, dict) or "micro_batch" not in data:
        raise bad("data", data, "a table with micro_batch")
    for k in ("micro_batch", "samples_seen", "epoch"):
        if k in data:
            count(f"data.{k}", data[k])
    rng = meta["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise bad("rng", rng, "a table of generator states (uint8 tensors)")
    for k, v in rng.items():
        if k != "cuda" and (not isinstance(v, torch.Tensor) or v.dtype != torch.uint8):
            raise bad(f"rng.{k}", v, "a generator state (uint8 tensor)")
    if "world" in meta and (isinstance(meta["world"], bool) or not isinstance(meta["world"], int) or meta["world"] < 1):
        raise bad("world", meta["world"], "a whole number >= 1")
    if meta.get("loader") is not None and not isinstance(meta["loader"], list):
        raise bad("loader", meta["loader"], "a list of loader states")
    if meta.get("config") is not None and not isinstance(meta["config"], dict):
        raise bad("config", meta["config"], "a table of settings")


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
    sd, resized = fit_pos_embeds(sd, own, getattr(getattr(model, "patch_embed", None), "grid_size", None))
    if fmt == "mae":
        load_model_state(model, sd, path)
        return {"format": fmt, "loaded": len(sd), "kept_init": [], "resized": resized}
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
    return {"format": fmt, "loaded": len(enc), "kept_init": kept, "resized": resized}


def fit_pos_embeds(sd: dict, own: dict, grid=None) -> tuple[dict, list[str]]:
    """`sd` with its position embeddings (pos_embed, decoder_pos_embed) bicubically resampled to the grid of the
    model's (`own`; `grid` = (rows, columns) when it is not square) where only the number of patches differs:
    weights of another resolution load (224 -> 448, or a non-square input). Returns the state dict and the names
    resampled, as 'name: 14x14 -> 28x28'."""
    from .model import resample_pos_embed

    out, resized = dict(sd), []
    for key in ("pos_embed", "decoder_pos_embed"):
        if key not in sd or key not in own:
            continue
        src, dst = sd[key], own[key]
        if src.shape == dst.shape or src.ndim != 3 or dst.ndim != 3 or src.shape[-1] != dst.shape[-1]:
            continue
        n_src, n_dst = src.shape[1] - 1, dst.shape[1] - 1
        a = int(round(n_src ** 0.5))
        rows, cols = (int(grid[0]), int(grid[1])) if grid is not None else (int(round(n_dst ** 0.5)),) * 2
        if a * a != n_src or rows * cols != n_dst:
            continue  # not a square source, or not the model's grid: left to the shape check, which names both
        out[key] = resample_pos_embed(src, (rows, cols))
        resized.append(f"{key}: {a}x{a} -> {rows}x{cols}")
    return out, resized


def to_reference_format(sd: dict) -> dict:
    """Our full model state dict in the paper's release format: {'model': state_dict} (same key names; the tensors
    themselves, not copies)."""
    return {"model": dict(sd)}

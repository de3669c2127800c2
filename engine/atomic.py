"""Atomic files: write under a temporary name, fsync, rename into place; a failed write is one CheckpointError
naming the directory and the cause. The base of engine.checkpoint and engine.hf (which both write files)."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _writer_tag() -> str:
    """host and pid of this writer, in its temporary files' names (so a later run can tell stale from live)."""
    return f"{socket.gethostname().replace('.', '-')}-{os.getpid()}"


def io_error(e: OSError, what: str, where: Path) -> "CheckpointError":
    """A CheckpointError naming the directory and the cause of a failed write (full disk, read-only, ...)."""
    cause = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a directory",
             errno.EEXIST: "a file of that name is in the way"}.get(e.errno, e.strerror or str(e))
    return CheckpointError(f"cannot write {what} in {where}: {cause}; the checkpoints already there are intact")


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(binary_file) on a temp file beside `path`, fsync, rename over `path`: a kill leaves
    either the old file or the new one, never half of one. The file gets the umask's permissions. A failed
    write (full disk, read-only directory) raises CheckpointError naming the directory, with nothing left."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise io_error(e, path.name, path.parent) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file of the run
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise io_error(e, path.name, path.parent) from None
        if isinstance(e, RuntimeError) and _is_stream_write_failure(str(e)):
            raise CheckpointError(f"cannot write {path.name} in {path.parent}: {_write_failure_cause(path.parent)}; "
                                  "the checkpoints already there are intact") from None
        raise
    _fsync_dir(path.parent)
    return path


def _is_stream_write_failure(text: str) -> bool:
    """torch's zip writer reports a failed write (a full disk, mostly) as a RuntimeError, not an OSError."""
    return any(k in text for k in ("unexpected pos", "file write failed", "PytorchStreamWriter failed"))


def _write_failure_cause(directory: Path) -> str:
    try:
        st = os.statvfs(directory)
        if st.f_bavail * st.f_frsize < 64 * 2**20:
            return "no space left on the device"
    except OSError:
        pass
    return "the file system refused the write (full, or a quota)"

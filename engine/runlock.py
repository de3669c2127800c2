"""One run per run directory: a lock file (`.mae_run.lock`) naming its holder, held with an OS lock for the run.

A second run on the same directory is refused with one line naming the holder (host, pid, start time). A lock left
by a killed run (its OS lock gone with the process, and on this host its pid gone too) is taken over, with a line
saying whose it was. Under torchrun rank 0 takes it for the job.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .atomic import CheckpointError

LOCK_NAME = ".mae_run.lock"


class RunDirectoryBusy(CheckpointError):
    """Another live run holds the run directory."""


def _holder_text(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {when}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


_HELD: dict[str, list] = {}  # lock path -> [descriptor, holders]: the locks this process holds


class RunLock:
    """Held from `acquire()` to `release()` (or the process's end: the OS lock goes with it). Within one process
    the lock is shared (Trainer objects of the Python API built one after another on a directory); other processes
    are refused."""

    def __init__(self, run_dir: str | os.PathLike, command: str = "mae pretrain"):
        self.path = Path(run_dir) / LOCK_NAME
        self.command = command
        self._fd: int | None = None
        self.took_over: dict | None = None
        """The holder named in a stale lock this run took over (None when the directory was free)."""

    def acquire(self) -> RunLock:
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            self._fd = _HELD[key][0]
            return self
        self._acquire()
        _HELD[key] = [self._fd, 1]
        return self

    def _acquire(self) -> None:
        import fcntl

        host = socket.gethostname()
        for _ in range(10):  # a holder that unlinked its file between our open and our lock: open the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                info = self._read(fd)
                os.close(fd)
                raise RunDirectoryBusy(self._busy(info)) from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise RunDirectoryBusy(f"run directory {self.path.parent}: its lock file keeps changing; another run "
                                   "is starting or ending there")
        try:
            info = self._read(fd)
            if info and info.get("pid") != os.getpid() and (
                    info.get("host") == host and _pid_alive(info.get("pid"))):
                # a live process of this host named in the lock, while the OS lock was free: a file system
                # without working locks, or a holder that lost its descriptor; never take a live run's directory
                raise RunDirectoryBusy(self._busy(info) + f" (if that process is not a run, delete {self.path})")
            self.took_over = info or None
            record = {"host": host, "pid": os.getpid(), "started": time.time(), "command": self.command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _busy(self, info: dict) -> str:
        who = _holder_text(info) if info else "a process that has not written its name yet"
        return (f"run directory {self.path.parent} is in use by another run ({who}); wait for it to end, stop it, "
                "or choose another --run-dir")

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            data = os.pread(fd, 4096, 0)
            info = json.loads(data.decode() or "{}")
            return info if isinstance(info, dict) else {}
        except (ValueError, OSError, UnicodeDecodeError):
            return {}

    def describe_takeover(self) -> str | None:
        if not self.took_over:
            return None
        return (f"note: took over the lock of {self.path.parent} left by a run that is gone "
                f"({_holder_text(self.took_over)})")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        key = os.path.realpath(self.path)
        held = _HELD.get(key)
        if held is not None:
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[key]
        try:
            if self._read(fd).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)  # the OS lock goes with the descriptor

    @property
    def held(self) -> bool:
        return self._fd is not None


def claim_run_dir(owner, run_dir, command: str, log) -> RunLock:
    """What rank 0 of every run does first with its run directory: refuse a read-only or full one (one line, before
    any work), take the directory's lock for the whole job (released when `owner` is collected, or by the run's
    close()), and say so when it took over the lock of a run that is gone."""
    import weakref

    from .checkpoint import ensure_writable

    ensure_writable(run_dir)
    lock = RunLock(run_dir, command=command).acquire()
    weakref.finalize(owner, lock.release)
    if lock.describe_takeover():
        log(lock.describe_takeover())
    return lock

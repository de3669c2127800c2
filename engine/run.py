"""What every run (pretraining: engine/trainer.py; fine-tuning and probing: engine/classify.py) has before and
around its loop: the process context, the log, the device and compute dtype, the run directory claimed by rank 0
(one run per directory), the progress bar, and close(), which every way a run ends calls."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .device import resolve_device, resolve_dtype
from .parallel import DistContext
from .runlock import RunLock, claim_run_dir

if TYPE_CHECKING:
    from .health import Health


class Run:
    command = "mae pretrain"
    """How the run is named where it holds its directory's lock (and in its messages)."""

    def __init__(self, cfg, resume: bool = False, ctx: DistContext | None = None, log=None,
                 device: torch.device | None = None):
        self.cfg = cfg
        self.ctx = ctx or DistContext()
        self.rank, self.world, self.is_main = self.ctx.rank, self.ctx.world, self.ctx.is_main
        self.log = log or (lambda msg: print(msg, flush=True))
        t = cfg.train
        self.device = device or resolve_device(t.device)
        self.amp_dtype = resolve_dtype(t.precision, self.device)
        self.run_dir = Path(t.run_dir)
        self.step = 0
        """Optimizer steps done."""
        self._resumed_from: Path | None = None
        """The checkpoint this run resumed from (the last good one until its next save)."""
        self._lock: RunLock | None = None
        if self.is_main:  # one run per directory, checked writable before any work (rank 0 holds it for the job)
            self._lock = claim_run_dir(self, self.run_dir, self.command, self.log)
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: bool) -> None:
        """The run's own set-up (its model, step, loaders; the checks of a resume), after the directory is claimed."""

    def start_health(self, param_norm) -> Health:
        """The health checks' state at the loop's start: the weights' norm as the reference for growth, and the
        checkpoint resumed from as the last good one until the next save."""
        from .health import Health

        health = Health(self.cfg.train.spike_factor, self.cfg.train.grad_spike_factor)
        health.observe_weights(self.step, float(param_norm()))
        if self._resumed_from is not None:
            health.saved(self.step, self._resumed_from)
        return health

    def position_meta(self, batches_per_epoch: int) -> dict:
        """What every run's checkpoint carries to resume: the steps done, the data position (global micro-batches,
        samples seen), the schedule, the world size, the config, and the loop parts' state (`self.parts`)."""
        t = self.cfg.train
        return {
            "step": self.step,
            "data": {"micro_batch": self.micro_batch, "epoch": self.micro_batch // batches_per_epoch,
                     "batches_per_epoch": batches_per_epoch,
                     "samples_seen": self.micro_batch * t.batch_size * self.world},
            "schedule": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "lr": self.lr},
            "world": self.world,
            "config": self.cfg.to_dict(),
            "parts": {name: part.state_dict() for name, part in self.parts.items()},
        }

    def loaders(self) -> list:
        """The loaders whose workers close() stops."""
        return []

    def close(self) -> None:
        """Stop the loaders' workers and pipelines and release the run directory (every way a run ends calls it;
        a second call does nothing)."""
        for loader in self.loaders():
            if loader is not None and hasattr(loader, "close"):
                loader.close()
        if self._lock is not None:
            self._lock.release()

    def progress_bar(self, stop_at: int):
        """tqdm on rank 0 when train.progress and stderr is a terminal, else None (log lines instead)."""
        if self.is_main and self.cfg.train.progress and sys.stderr.isatty():
            from tqdm import tqdm

            return tqdm(total=stop_at, initial=self.step, unit="step", dynamic_ncols=True)
        return None

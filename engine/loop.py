"""The parts of the training loop, each owning its state and its own "is it time" decision (the shape of
torchtitan's loop: `checkpointer.save(step, last_step)`, `metrics_processor.should_log`, `validator.should_validate`).

    meter = StepMeter(...)            # the sums since the last log line and the clock that times them
    guard = Guard(health, ...)        # judges the steps since the last check; rolls back or stops a diverged run
    saver = Checkpointer(...)         # when to save, and never a checkpoint of a run in a bad streak
    evals = Evaluator(...)            # when the reconstruction grids and the kNN monitor run
    val = Validation(...)             # fine-tuning / probing: when the validation runs, and the best so far
    signals = StopSignals(...)        # a scheduler's SIGTERM / SIGUSR1 or a Ctrl-C: save and stop after the step

engine/trainer.py's `fit` (pretraining) and engine/classify.py's (fine-tuning, linear probing) wire them around the
training step; side work (grids, saves, the kNN monitor) runs inside
`meter.paused()`, so the throughput counts training steps only. The parts hold no model: what they do to one is the
trainer's (a save, a rollback, a grid), handed to them as a callable. A part with state a resumed run needs has
state_dict() / load_state_dict(): the run gathers them into its checkpoint's meta ("parts") and hands them back on
--resume.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import parallel
from .errors import DivergenceError
from .health import Health
from .metrics import mfu, peak_allocated_gib


class StepMeter:
    """The loss, gradient norm, good and skipped counts of the steps since the last log line, summed on the device
    (no host sync until a line is written), and the wall clock of those steps with side work left out."""

    def __init__(self, device: torch.device, world: int, global_batch: int, log_every: int, stop_at: int):
        self.device, self.world, self.global_batch = device, world, global_batch  # images per step, every rank
        self.log_every, self.stop_at = log_every, stop_at
        self._zero = torch.zeros((), device=device)
        self.loss_sum, self.good, self.skipped, self.grad_norm_sum = (self._zero.clone() for _ in range(4))
        self.reset()

    def reset(self) -> None:
        """Start a new window: zero sums, the clock from now."""
        for t in (self.loss_sum, self.good, self.skipped, self.grad_norm_sum):
            t.zero_()
        self.started, self.steps = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor) -> None:
        """One step: its loss and gradient norm count when it was applied (finite), the skip count otherwise."""
        self.loss_sum += torch.where(finite, loss, self._zero)
        self.grad_norm_sum += torch.where(finite, grad_norm, self._zero)
        self.good += finite
        self.skipped += ~finite
        self.steps += 1

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.stop_at

    @contextlib.contextmanager
    def paused(self):
        """Side work inside this block is not counted in the window's time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - t0

    def record(self, step: int, steps_per_epoch: int, lr: float, flops_per_image: float, peak) -> dict:
        """The window's log record (a host sync; the sums all-reduced over ranks; the caller starts the next window
        once the line is written). Its loss is NaN and its gradient norm None when every step was skipped."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.started
        stats = torch.stack([self.loss_sum, self.good, self.grad_norm_sum])
        parallel.all_reduce_(stats)  # sums over ranks; skips are global already
        good, skipped = int(stats[1].item()) // self.world, int(self.skipped.item())
        loss = stats[0].item() / (good * self.world) if good else float("nan")
        ips = self.steps * self.global_batch / dt
        rec = dict(epoch=round(step / steps_per_epoch, 3), loss=loss, lr=lr,
                   grad_norm=round(stats[2].item() / (good * self.world), 6) if good else None,
                   img_per_s=round(ips, 2), step_ms=round(1000 * dt / self.steps, 2), skipped=skipped,
                   tflops_per_s=round(flops_per_image * ips / 1e12, 4),
                   mfu=mfu(flops_per_image, ips / self.world, peak), peak_mem_gib=peak_allocated_gib(self.device))
        self.last_dt, self.last_ips = dt, ips
        return rec


class Guard:
    """The health of the run: each step's [loss, gradient norm, finite] kept on the device and judged at a check
    (one host sync for all of them, with the weights' norm); a streak of train.max_bad_steps bad steps rolls back
    to the last good checkpoint (train.on_divergence=rollback, at most max_rollbacks times) or stops the run."""

    def __init__(self, health: Health, param_norm: Callable[[], torch.Tensor], *, max_bad_steps: int,
                 on_divergence: str, max_rollbacks: int, rollback: Callable[[Health, int], None],
                 diverged: Callable[[Health, int], str]):
        self.health, self.param_norm = health, param_norm
        self.max_bad_steps, self.on_divergence, self.max_rollbacks = max_bad_steps, on_divergence, max_rollbacks
        self._rollback, self._diverged = rollback, diverged
        self.pending: list[torch.Tensor] = []
        self.rollbacks = 0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor) -> None:
        self.pending.append(torch.stack([loss.float(), grad_norm.float(), finite.float()]))

    def check(self, step: int) -> bool:
        """Judge the steps since the last check; True when the run was rolled back (the loop goes on from the
        restored step). DivergenceError when the streak is over the limit and no rollback is left."""
        if self.pending:
            first = step - len(self.pending) + 1
            for i, (loss, gn, finite) in enumerate(torch.stack(self.pending).tolist()):
                self.health.observe(first + i, loss, gn, finite > 0)
            self.health.observe_weights(step, float(self.param_norm()))
        self.pending = []
        if self.health.streak < self.max_bad_steps:
            return False
        if self.on_divergence == "rollback" and self.rollbacks < self.max_rollbacks:
            self.rollbacks += 1
            self._rollback(self.health, self.rollbacks)
            return True
        raise DivergenceError(self._diverged(self.health, self.rollbacks))

    def state_dict(self) -> dict:
        """Resume state: the rollbacks spent and the health's reference windows (see Health.state_dict)."""
        return {"rollbacks": self.rollbacks, "health": self.health.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks = int(state.get("rollbacks", 0))
        self.health.load_state_dict(state.get("health") or {})


class Checkpointer:
    """When to save (every train.ckpt_every steps, at the last step, on a stop signal) and the save itself, which a
    run in a bad streak never makes: the last good checkpoint stays the one to resume from."""

    def __init__(self, save: Callable[[], Path], every: int, stop_at: int, health: Health, is_main: bool):
        self._save, self.every, self.stop_at, self.health, self.is_main = save, every, stop_at, health, is_main
        self.last: Path | None = None

    def due(self, step: int, stop_signal) -> bool:
        return bool(step % self.every == 0 or step == self.stop_at or stop_signal)

    def save(self, step: int, say: Callable[[str], None]) -> Path | None:
        h = self.health
        if h.in_streak:  # never a checkpoint of a run in a bad streak
            if self.is_main:
                good = h.last_good_checkpoint()
                say(f"warning: not writing a checkpoint at step {step}: the run has had {h.streak} bad step(s) since "
                    f"step {h.streak_start} ({h.last_reason}); the last good checkpoint is "
                    f"{good[1] if good else 'none yet'}")
            return None
        self.last = self._save()
        h.saved(step, self.last)
        return self.last


class Evaluator:
    """When the reconstruction grids (train.vis_every, and the last step; never on a stop signal; only with images to
    show) and the kNN monitor (train.knn_every epochs) run; what they do is the trainer's."""

    def __init__(self, vis_every: int, knn_every: int, steps_per_epoch: int, stop_at: int, grids: bool = True):
        self.vis_every, self.knn_every, self.steps_per_epoch = vis_every, knn_every, steps_per_epoch
        self.stop_at, self.grids = stop_at, grids

    def grids_due(self, step: int, stop_signal) -> bool:
        return self.grids and not stop_signal and bool((self.vis_every and step % self.vis_every == 0)
                                                       or step == self.stop_at)

    def knn_due(self, step: int) -> bool:
        return bool(self.knn_every and step % (self.knn_every * self.steps_per_epoch) == 0)


class Validation:
    """Fine-tuning and probing: when the validation set is scored (every `every` epochs and at the last step; never
    on a stop signal), and the best top-1 so far with the history of scores (resume state)."""

    def __init__(self, every: int, steps_per_epoch: int, stop_at: int):
        self.every, self.steps_per_epoch, self.stop_at = every, steps_per_epoch, stop_at
        self.best: dict | None = None
        """{"top1", "top5", "epoch", "step"} of the best validation so far."""
        self.history: list[dict] = []

    def due(self, step: int, stop_signal=None) -> bool:
        if stop_signal:
            return False
        return step == self.stop_at or (step % self.steps_per_epoch == 0
                                        and (step // self.steps_per_epoch) % self.every == 0)

    def record(self, step: int, top1: float, top5: float) -> bool:
        """Add a score; True when it is the best so far (strictly better top-1: the first of equals stays)."""
        epoch = round(step / self.steps_per_epoch, 3)
        self.history.append({"epoch": epoch, "step": step, "val_top1": top1, "val_top5": top5})
        if self.best is not None and top1 <= self.best["top1"]:
            return False
        self.best = {"top1": top1, "top5": top5, "epoch": epoch, "step": step}
        return True

    def state_dict(self) -> dict:
        return {"best": self.best, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best") if isinstance(state.get("best"), dict) else None
        self.history = list(state.get("history") or [])


def resume_parts(parts: dict, saved: dict | None) -> dict:
    """Hand each part the state a resumed checkpoint saved of it (its meta's "parts", gathered from each part's
    state_dict() at the save); returns `parts`, the run's parts with resume state from now on."""
    for name, part in parts.items():
        if isinstance(saved, dict) and isinstance(saved.get(name), dict):
            part.load_state_dict(saved[name])
    return parts


@dataclass
class Job:
    """Side work of a run at its own time: `due(step, stop_signal)`, then `run()`, timed out of the throughput
    (meter.paused). `when` places it around the log line and the save: before_log (its result goes into the log
    record), before_save, after_save (never on a stop: the loop has ended). `saves`: its step also writes a
    checkpoint (fine-tuning's validation: best.pt and the resume point agree)."""

    due: Callable[[int, "str | None"], bool]
    run: Callable[[], object]
    when: str = "before_save"
    saves: bool = False


class Loop:
    """The loop every run shares (pretraining, fine-tuning, linear probing; engine/trainer.py, engine/classify.py):

        while step < stop_at:
            one optimizer step
            the meter and the guard take its loss, gradient norm and finite flag
            a stop signal: every rank agrees on the same step
            the guard judges the steps so far (at a log line or a save: the host syncs there anyway);
                a rollback goes on from the restored step
            the jobs due before the log line, the log line, the jobs due before the save, the save
            a stop signal ends the loop (after its checkpoint); the jobs due after the save

    `run` returns the stop signal's name, or None when the run reached stop_at."""

    def __init__(self, *, meter: StepMeter, guard: Guard, saver: Checkpointer, vote, signals: "StopSignals",
                 log_line: Callable[[], None], say: Callable[[str], None], jobs=(), bar=None):
        self.meter, self.guard, self.saver, self.vote, self.signals = meter, guard, saver, vote, signals
        self.log_line, self.say, self.jobs, self.bar = log_line, say, list(jobs), bar

    def run(self, train_step: Callable[[], tuple], step_now: Callable[[], int], stop_at: int) -> str | None:
        """train_step() -> (loss, gradient norm, finite flag), device tensors; step_now() -> the steps done."""
        restore = self.signals.install()
        try:
            while step_now() < stop_at:
                loss, grad_norm, finite = train_step()
                step = step_now()
                self.meter.add(loss, grad_norm, finite)
                self.guard.add(loss, grad_norm, finite)
                if self.bar is not None:
                    self.bar.update(1)
                stop = (self.signals.requested or "a signal on another rank") if self.vote.agree(
                    self.signals.requested is not None) else None
                due = [job for job in self.jobs if job.due(step, stop)]
                log_now = self.meter.due(step)
                save_now = self.saver.due(step, stop) or any(job.saves for job in due)
                if (log_now or save_now) and self.guard.check(step):  # with the log line, the only host sync
                    self.meter.reset()  # rolled back: the loop goes on from the restored step
                    continue
                self._run(due, "before_log")
                if log_now:
                    self.log_line()
                self._run(due, "before_save")
                if save_now:
                    with self.meter.paused():
                        self.saver.save(step, self.say)
                if stop:
                    return stop
                self._run(due, "after_save")
            return None
        finally:
            restore()

    def _run(self, due: list, when: str) -> None:
        for job in due:
            if job.when == when:
                with self.meter.paused():
                    job.run()


class StopSignals:
    """SIGTERM / SIGUSR1 (a scheduler's pre-emption notice) and a first Ctrl-C (SIGINT) ask the loop to write a
    checkpoint and stop after the next step (under torchrun: after the step all ranks agree on, one later): the
    signal's name is in `requested`. A second Ctrl-C, a moment after the first, stops at once without one."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.requested: str | None = None

    def install(self) -> Callable[[], None]:
        """Catch the signals (in the main thread; elsewhere nothing is caught); returns the undo."""
        import signal
        import threading

        self.requested = None
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        names = [n for n in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, n)]
        old = {n: signal.getsignal(getattr(signal, n)) for n in names}
        first_int = [None]

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if name == "SIGINT":
                # a second Ctrl-C aborts; one that comes within a second of the first is the same press relayed
                # (torchrun forwards the terminal's SIGINT to ranks that already received it)
                if first_int[0] is not None and time.monotonic() - first_int[0] > 1.0:
                    raise KeyboardInterrupt
                if first_int[0] is None:
                    first_int[0] = time.monotonic()
                    if self.is_main:
                        print("interrupted: writing a checkpoint after the next step (Ctrl-C again to stop without "
                              "one)", file=sys.stderr, flush=True)
            if self.requested is None:
                self.requested = name

        for n in names:
            signal.signal(getattr(signal, n), handler)

        def restore():
            for n, h in old.items():
                signal.signal(getattr(signal, n), h)

        return restore

"""Is the run healthy, and should it stop? Host-side bookkeeping the trainer consults at its log and checkpoint
points (where it synchronises anyway), and a stop vote that every rank reads at the same step.

Health: a step is bad when its loss or gradient norm is not finite (the step already skipped its update on the
device), when its loss exceeds `spike_factor` x the median of the recent good losses, or when its gradient norm
exceeds `grad_spike_factor` x the median of the recent good norms (those two updated the weights: a diverging
run). At each check the weights' norm is compared with the last check's: weights that are no longer finite, or
that grew more than `weight_growth` times, mark the step bad too (an update with a blown learning rate shows in
the weights a step before it shows in the loss, and a checkpoint of that step must not be written). Consecutive bad steps form a streak; a checkpoint is never written during one, and a stop names the last
checkpoint written before the streak began.

StopVote: a signal reaches the ranks of a job at slightly different moments; each posts its request every step
(a one-element all-reduce, copied to pinned memory behind an event) and reads the previous step's agreed answer,
so all ranks stop after the same step, one step late, without stalling the device.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Health:
    spike_factor: float = 3.0
    grad_spike_factor: float = 10.0
    window: int = 50
    weight_growth: float = 10.0
    weight_norm: float | None = None
    """The weights' norm at the last check."""
    weight_step: int = 0
    losses: deque = field(default_factory=deque)
    norms: deque = field(default_factory=deque)
    streak: int = 0
    """Consecutive bad steps up to the last one observed."""
    streak_start: int | None = None
    """First step of the current bad streak (None when the last step was good)."""
    longest: int = 0
    """Longest streak since reset_longest()."""
    last_reason: str = ""
    good_checkpoints: list = field(default_factory=list)
    """(step, path) of checkpoints written while the run was healthy, oldest first."""

    def observe(self, step: int, loss: float, grad_norm: float, finite: bool) -> str | None:
        """Record one step; the reason it is bad, or None."""
        reason = None
        if not finite or not math.isfinite(loss) or not math.isfinite(grad_norm):
            reason = "a non-finite loss or gradient (update skipped)"
        elif self.losses and loss > self.spike_factor * statistics.median(self.losses):
            reason = (f"loss {loss:.4g} above {self.spike_factor:g} x the recent median "
                      f"{statistics.median(self.losses):.4g}")
        elif self.norms and grad_norm > self.grad_spike_factor * statistics.median(self.norms):
            reason = (f"gradient norm {grad_norm:.4g} above {self.grad_spike_factor:g} x the recent median "
                      f"{statistics.median(self.norms):.4g}")
        if reason is None:
            self.losses.append(loss)
            self.norms.append(grad_norm)
            while len(self.losses) > self.window:
                self.losses.popleft()
                self.norms.popleft()
            self.streak, self.streak_start = 0, None
        else:
            self.streak += 1
            self.streak_start = step if self.streak_start is None else self.streak_start
            self.longest = max(self.longest, self.streak)
            self.last_reason = reason
        return reason

    def observe_weights(self, step: int, norm: float) -> str | None:
        """The weights' norm at a check (after `step`); bad when not finite or grown weight_growth x since the
        last check, which then starts or extends the streak at `step`."""
        reason = None
        if not math.isfinite(norm):
            reason = "non-finite weights"
        elif self.weight_norm and norm > self.weight_growth * self.weight_norm:
            reason = f"the weights' norm grew {norm / self.weight_norm:.3g}x since step {self.weight_step}"
        if reason is None:
            self.weight_norm, self.weight_step = norm, step
            return None
        if self.streak_start is None or self.streak_start > step:
            self.streak_start = step
        self.streak = max(self.streak, 1)
        self.longest = max(self.longest, self.streak)
        self.last_reason = reason
        return reason

    @property
    def in_streak(self) -> bool:
        return self.streak_start is not None

    def reset_longest(self) -> None:
        self.longest = self.streak

    def saved(self, step: int, path: Path) -> None:
        self.good_checkpoints.append((step, path))

    def last_good_checkpoint(self) -> tuple[int, Path] | None:
        """The newest checkpoint written before the current streak began (or the newest, outside a streak) that is
        still on disk."""
        limit = self.streak_start if self.streak_start is not None else float("inf")
        for step, path in reversed(self.good_checkpoints):
            if step < limit and Path(path).exists():
                return step, Path(path)
        return None

    def state_dict(self) -> dict:
        """What a resumed run needs to judge its next steps as this one would: the recent good losses and norms,
        the weights' reference norm and the good checkpoints (a checkpoint is never written inside a streak, so
        there is none to keep)."""
        return {"losses": list(self.losses), "norms": list(self.norms), "weight_norm": self.weight_norm,
                "weight_step": self.weight_step,
                "good_checkpoints": [[step, str(path)] for step, path in self.good_checkpoints]}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(float(x) for x in state.get("losses", [])[-self.window:])
        self.norms = deque(float(x) for x in state.get("norms", [])[-self.window:])
        if state.get("weight_norm") is not None:
            self.weight_norm, self.weight_step = float(state["weight_norm"]), int(state.get("weight_step", 0))
        known = {(s, str(p)) for s, p in self.good_checkpoints}
        older = [(int(s), Path(p)) for s, p in state.get("good_checkpoints", []) if (int(s), str(p)) not in known]
        self.good_checkpoints = sorted(older + list(self.good_checkpoints), key=lambda sp: sp[0])

    def restart(self) -> None:
        """After a rollback: no streak; the good losses and norms stay the reference (the regime that diverged
        must not become the new normal), the weights' reference is taken again from the checkpoint."""
        self.streak, self.streak_start, self.longest = 0, None, 0
        self.weight_norm = None


class StopVote:
    """step(request) -> whether the ranks agreed to stop, one step late, the same answer on every rank; in one
    process the request is the answer, at once."""

    def __init__(self, device: torch.device, distributed: bool):
        import torch.distributed as dist

        self.device = torch.device(device)
        self.distributed = distributed and dist.is_initialized() and dist.get_world_size() > 1
        self._pending = None

    def agree(self, request: bool) -> bool:
        if not self.distributed:
            return request
        from .parallel import all_reduce_

        t = torch.full((1,), float(request), device=self.device)
        all_reduce_(t, "max")
        if self.device.type == "cuda":
            host = torch.empty(1, pin_memory=True)
            host.copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        else:
            host, ev = t, None
        prev, self._pending = self._pending, (host, ev)
        if prev is None:
            return False
        host, ev = prev
        if ev is not None:
            ev.synchronize()  # waits for the previous step's work only: this step is already queued behind it
        return bool(host.item() > 0)

"""engine/loop.py: each part of the training loop alone, with its own "is it time" decision. The loop they make
together is held by the recorded run (tests/test_recorded_run.py), the fault tests and the trainer's tests."""

import math

import pytest
import torch

from engine import loop
from engine.errors import DivergenceError
from engine.health import Health


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(loop.time, "perf_counter", c)
    return c


def _t(x):
    return torch.tensor(x)


def test_the_meter_sums_applied_steps_counts_skipped_ones_and_times_only_training(clock):
    m = loop.StepMeter(torch.device("cpu"), world=1, global_batch=8, log_every=5, stop_at=12)
    m.add(_t(2.0), _t(1.0), _t(True))
    clock.now += 1.0
    m.add(_t(float("nan")), _t(float("inf")), _t(False))
    with m.paused():
        clock.now += 30.0  # a save: not training time
    m.add(_t(4.0), _t(3.0), _t(True))
    clock.now += 1.0
    m.add(_t(6.0), _t(5.0), _t(True))
    clock.now += 2.0
    rec = m.record(step=10, steps_per_epoch=4, lr=0.5, flops_per_image=1e12, peak=None)
    assert rec == {"epoch": 2.5, "loss": 4.0, "lr": 0.5, "grad_norm": 3.0, "img_per_s": 8.0, "step_ms": 1000.0,
                   "skipped": 1, "tflops_per_s": 8.0, "mfu": None, "peak_mem_gib": None}
    assert (m.last_dt, m.last_ips, m.steps) == (4.0, 8.0, 4)  # until the caller starts the next window
    m.reset()
    assert m.steps == 0 and m.started == clock.now and float(m.loss_sum + m.good + m.skipped) == 0.0


def test_a_window_of_skipped_steps_has_no_loss_and_no_gradient_norm(clock):
    m = loop.StepMeter(torch.device("cpu"), world=1, global_batch=2, log_every=1, stop_at=3)
    m.add(_t(float("nan")), _t(1.0), _t(False))
    clock.now += 1.0
    rec = m.record(step=1, steps_per_epoch=1, lr=0.1, flops_per_image=0.0, peak=None)
    assert math.isnan(rec["loss"]) and rec["grad_norm"] is None and rec["skipped"] == 1


def test_a_paused_block_that_raises_is_still_left_out(clock):
    m = loop.StepMeter(torch.device("cpu"), world=1, global_batch=2, log_every=1, stop_at=3)
    start = m.started
    with pytest.raises(OSError):
        with m.paused():
            clock.now += 5.0
            raise OSError("disk")
    assert m.started == start + 5.0


@pytest.mark.parametrize("step, want", [(5, True), (10, True), (7, False), (12, True), (0, True)])
def test_the_meter_is_due_every_log_every_steps_and_at_the_last(step, want):
    assert loop.StepMeter(torch.device("cpu"), 1, 2, log_every=5, stop_at=12).due(step) is want


def _guard(health, calls, **kw):
    opts = dict(max_bad_steps=2, on_divergence="rollback", max_rollbacks=1)
    opts.update(kw)
    return loop.Guard(health, lambda: torch.tensor(1.0), **opts,
                      rollback=lambda h, n: calls.append(("rollback", n)),
                      diverged=lambda h, n: f"diverged after {n} rollback(s), streak {h.streak} from {h.streak_start}")


def test_the_guard_judges_the_pending_steps_with_their_own_step_numbers():
    health, calls = Health(), []
    g = _guard(health, calls)
    health.observe_weights(0, 1.0)
    for loss in (1.0, 1.1, 0.9):
        g.add(_t(loss), _t(1.0), _t(True))
    assert g.check(step=3) is False and health.streak == 0 and g.pending == []
    g.add(_t(float("nan")), _t(1.0), _t(False))
    assert g.check(step=4) is False and (health.streak, health.streak_start) == (1, 4)
    assert calls == []


def test_a_streak_at_the_limit_rolls_back_then_stops_when_no_rollback_is_left():
    health, calls = Health(), []
    g = _guard(health, calls)
    health.observe_weights(0, 1.0)
    for _ in range(2):
        g.add(_t(float("nan")), _t(1.0), _t(False))
    assert g.check(step=2) is True and calls == [("rollback", 1)] and g.rollbacks == 1
    g.add(_t(float("nan")), _t(1.0), _t(False))  # still in the streak (the stand-in rollback restored nothing)
    with pytest.raises(DivergenceError, match=r"^diverged after 1 rollback\(s\), streak 3 from 1$"):
        g.check(step=3)
    stop = _guard(Health(), calls, on_divergence="stop")
    for _ in range(2):
        stop.add(_t(float("inf")), _t(1.0), _t(False))
    with pytest.raises(DivergenceError, match=r"^diverged after 0 rollback\(s\), streak 2 from 1$"):
        stop.check(step=2)


def test_the_guard_with_nothing_pending_checks_the_streak_only():
    health, calls = Health(), []
    g = _guard(health, calls)
    assert g.check(step=5) is False and health.weight_norm is None  # no weights' norm taken without steps


@pytest.mark.parametrize("step, signal, want", [(4, None, True), (5, None, False), (9, None, True),
                                                 (5, "SIGTERM", True), (8, None, True)])
def test_the_checkpointer_is_due_every_ckpt_every_steps_at_the_last_and_on_a_signal(step, signal, want):
    assert loop.Checkpointer(lambda: None, 4, 9, Health(), True).due(step, signal) is want


def test_the_checkpointer_saves_a_healthy_run_and_never_one_in_a_bad_streak(tmp_path):
    health, said, made = Health(), [], []

    def save():
        made.append(tmp_path / f"ckpt_{len(made)}")
        made[-1].write_bytes(b"x")
        return made[-1]

    saver = loop.Checkpointer(save, 4, 9, health, is_main=True)
    assert saver.save(4, said.append) == made[0] and saver.last == made[0]
    assert health.last_good_checkpoint() == (4, made[0])
    health.observe(6, float("nan"), 1.0, False)
    assert saver.save(8, said.append) is None and len(made) == 1 and saver.last == made[0]
    assert said == [f"warning: not writing a checkpoint at step 8: the run has had 1 bad step(s) since step 6 "
                    f"(a non-finite loss or gradient (update skipped)); the last good checkpoint is {made[0]}"]
    quiet = loop.Checkpointer(save, 4, 9, health, is_main=False)
    assert quiet.save(8, said.append) is None and len(said) == 1  # only rank 0 says it
    fresh = Health()
    fresh.observe(1, float("nan"), 1.0, False)
    loop.Checkpointer(save, 4, 9, fresh, is_main=True).save(2, said.append)
    assert said[-1].endswith("the last good checkpoint is none yet")


@pytest.mark.parametrize("step, signal, grids, want", [(5, None, True, True), (6, None, True, False),
                                                        (12, None, True, True), (10, "SIGTERM", True, False),
                                                        (5, None, False, False)])
def test_the_grids_are_due_every_vis_every_steps_and_at_the_last_never_on_a_signal(step, signal, grids, want):
    assert loop.Evaluator(5, 0, 4, 12, grids=grids).grids_due(step, signal) is want


def test_the_grids_off_and_the_knn_monitor_by_epochs():
    e = loop.Evaluator(0, 2, 4, 12)
    assert not e.grids_due(5, None) and e.grids_due(12, None)  # vis_every 0: the last step only
    assert [s for s in range(1, 25) if e.knn_due(s)] == [8, 16, 24]  # every 2 epochs of 4 steps
    assert not any(loop.Evaluator(5, 0, 4, 12).knn_due(s) for s in range(1, 25))


def test_a_resumed_guard_judges_its_first_step_against_the_windows_it_saved(tmp_path):
    """The recent good losses and norms, the weights' reference, the rollbacks spent and the good checkpoints are
    resume state: a spike right after a resume is a bad step, as it would have been without the stop."""
    health, calls = Health(window=4), []
    g = _guard(health, calls)
    health.observe_weights(0, 1.0)
    for loss in (1.0, 1.1, 0.9, 1.0, 1.2):
        g.add(_t(loss), _t(2.0), _t(True))
    g.check(step=5)
    g.rollbacks = 1
    old = tmp_path / "ckpt_00000003.pt"
    old.write_bytes(b"x")
    health.saved(3, old)
    state = g.state_dict()
    assert state["rollbacks"] == 1 and state["health"]["losses"] == pytest.approx([1.1, 0.9, 1.0, 1.2])

    fresh, spike = Health(window=4), _t(10.0)
    again = _guard(fresh, calls)
    again.load_state_dict(state)
    assert again.rollbacks == 1 and list(fresh.norms) == [2.0] * 4 and fresh.weight_norm == health.weight_norm
    assert fresh.last_good_checkpoint() == (3, old)
    again.add(spike, _t(2.0), _t(True))
    again.check(step=6)
    assert (fresh.streak, fresh.streak_start) == (1, 6) and "above 3 x the recent median" in fresh.last_reason
    blank = Health(window=4)  # without the saved windows the same spike passes as the first good step
    blank.observe(6, 10.0, 2.0, True)
    assert blank.streak == 0


def test_validation_is_due_at_its_epochs_and_the_last_step_and_keeps_the_best():
    v = loop.Validation(every=2, steps_per_epoch=10, stop_at=35)
    assert [s for s in range(1, 36) if v.due(s)] == [20, 35] and not v.due(20, "SIGTERM")
    assert v.record(20, 0.5, 0.9) is True and v.record(35, 0.5, 0.95) is False  # equal top-1: the first stays
    assert v.best == {"top1": 0.5, "top5": 0.9, "epoch": 2.0, "step": 20}
    assert [h["epoch"] for h in v.history] == [2.0, 3.5]
    w = loop.Validation(every=2, steps_per_epoch=10, stop_at=35)
    w.load_state_dict(v.state_dict())
    assert w.record(40, 0.4, 0.9) is False and w.best["step"] == 20 and len(w.history) == 3


class _Events:
    """Stand-ins for the loop's parts that write what happens, in order, into one list."""

    def __init__(self, log_every=2, ckpt_every=3, stop_at=6, stop_after=None, rollback_at=None):
        self.events, self.step, self.stop_after, self.rollback_at = [], 0, stop_after, rollback_at
        ev = self

        class Meter:
            def add(self, *a): ev.events.append(("add", ev.step))
            def due(self, step): return step % log_every == 0 or step == stop_at
            def reset(self): ev.events.append(("reset", ev.step))
            paused = loop.StepMeter.paused
            started = 0.0

        class Guard:
            def add(self, *a): pass
            def check(self, step):
                if step == ev.rollback_at:
                    ev.rollback_at, ev.step = None, step - 2
                    ev.events.append(("rollback", step))
                    return True
                return False

        class Saver:
            def due(self, step, stop): return step % ckpt_every == 0 or step == stop_at or bool(stop)
            def save(self, step, say): ev.events.append(("save", step))

        class Vote:
            def agree(self, request): return request

        class Signals:
            requested = None
            def install(self):
                ev.events.append(("install", ev.step))
                return lambda: ev.events.append(("restore", ev.step))

        self.meter, self.guard, self.saver, self.vote, self.signals = Meter(), Guard(), Saver(), Vote(), Signals()
        self.stop_at = stop_at

    def train_step(self):
        self.step += 1
        if self.stop_after is not None and self.step == self.stop_after:
            self.signals.requested = "SIGTERM"
        return _t(1.0), _t(1.0), _t(True)

    def loop(self, jobs):
        return loop.Loop(meter=self.meter, guard=self.guard, saver=self.saver, vote=self.vote, signals=self.signals,
                         jobs=jobs, say=lambda m: None, log_line=lambda: self.events.append(("log", self.step)))


def test_the_shared_loop_runs_each_part_at_its_time_in_order():
    ev = _Events()
    e = ev.events
    jobs = [loop.Job(lambda s, stop: s == 4, lambda: e.append(("grids", ev.step)), "before_log"),
            loop.Job(lambda s, stop: s == 4, lambda: e.append(("validate", ev.step)), "before_save", saves=True),
            loop.Job(lambda s, stop: s == 4, lambda: e.append(("knn", ev.step)), "after_save")]
    assert ev.loop(jobs).run(ev.train_step, lambda: ev.step, ev.stop_at) is None
    assert e == [("install", 0), ("add", 1), ("add", 2), ("log", 2), ("add", 3), ("save", 3), ("add", 4),
                 ("grids", 4), ("log", 4), ("validate", 4), ("save", 4), ("knn", 4), ("add", 5), ("add", 6),
                 ("log", 6), ("save", 6), ("restore", 6)]


def test_the_shared_loop_stops_after_the_signals_checkpoint_and_goes_on_after_a_rollback():
    ev = _Events(stop_after=5)
    after = loop.Job(lambda s, stop: True, lambda: ev.events.append(("after", ev.step)), "after_save")
    assert ev.loop([after]).run(ev.train_step, lambda: ev.step, ev.stop_at) == "SIGTERM"
    assert ev.events[-3:] == [("add", 5), ("save", 5), ("restore", 5)] and ("after", 5) not in ev.events
    ev = _Events(rollback_at=4)
    ev.loop([]).run(ev.train_step, lambda: ev.step, ev.stop_at)
    assert ev.events[6:11] == [("add", 4), ("rollback", 4), ("reset", 2), ("add", 3), ("save", 3)]

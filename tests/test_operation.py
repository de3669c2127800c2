"""What an operator of a week-long run takes for granted: every way a run ends leaves no process behind (even with a
DataLoader worker stuck in a read), one run per run directory, a resume that keeps the truth (a refused one touches
nothing, changes are reported and recorded, the resumed checkpoint is the last good one), a run that ends inside a bad
streak fails, and the guarantees behind two one-line bugs (an Inf applied to the weights, a sharded resume without
its optimizer state)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import debug_cfg, sitecustomize_env, spike_loss

from engine import checkpoint as ckpt
from engine.runlock import LOCK_NAME, RunDirectoryBusy, RunLock
from engine.trainer import DivergenceError, Trainer

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--preset", "debug", "--train.device", "cpu", "--train.vis_every", "0", "--train.log_every", "1",
       "--train.progress", "false"]

# Loaded by every Python process of a test run (PYTHONPATH): a DataLoader worker that has served its first
# MAE_TEST_STUCK_AFTER samples blocks forever in the next read (a hung network file system, say), ignoring stop
# signals as the workers do. Nothing but the loader's own shutdown can end it.
STUCK_WORKER = '''
import os
if os.environ.get("MAE_TEST_STUCK_AFTER"):
    import time
    import torch.utils.data
    import pipelines.torchvision as tv

    _orig, _served = tv.ImageFiles.get_with_skips, [0]

    def _stuck(self, key):
        if torch.utils.data.get_worker_info() is not None:
            _served[0] += 1
            if _served[0] > int(os.environ["MAE_TEST_STUCK_AFTER"]):
                time.sleep(3600)
        return _orig(self, key)

    tv.ImageFiles.get_with_skips = _stuck
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """64 small photographs-like images: two debug micro-batches of 32 per epoch."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return d


def _process_group_alive(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    alive = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(p.name))
    return alive


def run_to_the_end(tmp_path, argv, stuck_after=None, env=None, timeout=180):
    """Run a command in its own session; returns (exit code, output, seconds from its last line until the whole
    process tree was gone). A tree still alive `timeout` s after the start is killed and reported."""
    e = sitecustomize_env(tmp_path, STUCK_WORKER, OMP_NUM_THREADS="1", **(env or {}))
    if stuck_after is not None:
        e["MAE_TEST_STUCK_AFTER"] = str(stuck_after)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e, cwd=ROOT,
                         start_new_session=True)
    lines, last = [], [time.monotonic()]

    def read():
        for line in p.stdout:
            lines.append(line)
            last[0] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (p.poll() is None or _process_group_alive(p.pid)):
        time.sleep(0.1)
    gone = time.monotonic()
    left = _process_group_alive(p.pid)
    if left or p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        reader.join(5)
        raise AssertionError(f"processes {left} still alive {timeout} s after the start, "
                             f"{gone - last[0]:.0f} s after the last line:\n" + "".join(lines)[-3000:])
    reader.join(5)
    return p.returncode, "".join(lines), gone - last[0]


PRETRAIN = [sys.executable, "-m", "engine.pretrain"]


@pytest.mark.parametrize("backend,ending,code", [
    ("torchvision", "max_steps", 0), ("torchvision", "last_epoch", 0), ("torchvision", "divergence", 1),
    ("torchvision", "error", 1), ("dali", "max_steps", 0)])
def test_every_ending_of_a_run_leaves_no_process_behind(tmp_path, folder, backend, ending, code):
    """World 1, workers stuck after serving what the run needs: the run ends (max_steps, its last epoch, a divergence
    stop, an error) with its documented exit code and the whole process tree is gone within 15 s of its last line."""
    argv = [*PRETRAIN, *RUN, "--data", str(folder), "--run-dir", str(tmp_path / "run"), "--data.backend", backend,
            "--data.num_workers", "2", "--train.tensorboard", "true"]
    env, stuck = {}, 32  # each worker serves one micro-batch, then blocks
    if ending == "max_steps":
        argv += ["--train.epochs", "50", "--train.max_steps", "2"]
    elif ending == "last_epoch":
        argv += ["--train.epochs", "1"]
    elif ending == "divergence":
        argv += ["--train.epochs", "50", "--train.max_steps", "40", "--optim.lr", "1e30", "--train.max_bad_steps", "2"]
        stuck = 32 * 10
    else:
        argv += ["--train.epochs", "50", "--train.max_steps", "40"]
        env = {"MAE_FAULT_STEP": "2"}
    rc, out, tail_s = run_to_the_end(tmp_path, argv, stuck_after=stuck if backend == "torchvision" else None, env=env)
    assert rc == code, out[-3000:]
    assert tail_s < 15, f"the process tree outlived its last line by {tail_s:.1f} s:\n{out[-2000:]}"
    if ending in ("max_steps", "last_epoch"):
        assert "done: step 2" in out, out[-2000:]
    elif ending == "divergence":
        assert "the run diverged" in out and "Traceback" not in out, out[-2000:]
    else:
        assert "injected fault" in out, out[-2000:]


def test_a_loader_closes_its_workers_and_streams_again(folder):
    from engine.config import DataConfig
    from pipelines.torchvision import TorchvisionLoader

    cfg = DataConfig(path=str(folder), num_workers=2)
    loader = TorchvisionLoader(sorted(map(str, folder.iterdir())), 1, 32, 16, cfg, 0, "cpu")
    s = loader.stream(0)
    first = next(s)
    workers = list(s.gi_frame.f_locals["it"]._workers)
    assert workers and all(w.is_alive() for w in workers)
    loader.close()
    assert not any(w.is_alive() for w in workers) and s.gi_frame is None
    assert torch.equal(next(loader.stream(0)), first)  # a new stream after close: the same batches
    loader.close()


def test_a_dropped_loader_stops_its_workers_at_once(folder):
    """A loader and its stream dropped without `close()` (a stream used for one batch) stop the workers when the last
    reference goes: the loader holds its streams weakly, so they form no cycle that only the garbage collector frees
    (which finalises the workers' queues first: torch's shutdown then waited 5 s per worker, 20 s for two)."""
    from engine.config import DataConfig
    from pipelines.torchvision import TorchvisionLoader

    loader = TorchvisionLoader(sorted(map(str, folder.iterdir())), 1, 32, 16, DataConfig(path=str(folder),
                                                                                         num_workers=2), 0, "cpu")
    s = loader.stream(0)
    next(s)
    workers = list(s.gi_frame.f_locals["it"]._workers)
    assert workers and all(w.is_alive() for w in workers)
    t0 = time.monotonic()
    del s, loader
    assert not any(w.is_alive() for w in workers), "the workers outlived their dropped loader"
    assert time.monotonic() - t0 < 2.5


# --- one run per run directory --------------------------------------------------------------------------------


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run directory's lock until killed."""
    code = ("import sys, time; from engine.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_on_a_run_directory_is_refused_naming_the_holder(tmp_path, capsys):
    import socket

    from engine.cli import main

    holder = _holder(tmp_path)
    argv = ["pretrain", *RUN, "--run-dir", str(tmp_path), "--data.num_workers", "0", "--train.max_steps", "1",
            "--data.backend", "torchvision", "--train.tensorboard", "false"]
    try:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert f"run directory {tmp_path} is in use by another run" in err and f"pid {holder.pid}" in err, err
        assert socket.gethostname() in err and "started 20" in err and len(err.splitlines()) == 1, err
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing of the refused run
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0  # the holder's end frees the directory (its OS lock went with it)
    assert not (tmp_path / LOCK_NAME).exists()  # and this run released it when it ended


def test_the_lock_of_a_killed_run_is_taken_over_with_a_line(tmp_path):
    p = _holder(tmp_path)
    with pytest.raises(RunDirectoryBusy, match=f"pid {p.pid}"):
        RunLock(tmp_path).acquire()
    p.kill()
    p.wait()
    lines = []
    t = Trainer(debug_cfg(tmp_path, **{"train.max_steps": 1}), log=lines.append)
    assert any(f"took over the lock of {tmp_path} left by a run that is gone" in m and f"pid {p.pid}" in m
               for m in lines), lines
    t2 = Trainer(debug_cfg(tmp_path, **{"train.max_steps": 1}), log=lines.append)  # this process: shared
    t.close()
    assert (tmp_path / LOCK_NAME).exists()
    t2.close()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_naming_a_live_process_of_this_host_is_not_taken(tmp_path):
    """A file system whose locks do not work (the OS lock is free) still never gives a live run's directory away."""
    import socket

    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                                  "started": time.time()}))
    with pytest.raises(RunDirectoryBusy, match=f"pid {os.getppid()}.*delete"):
        RunLock(tmp_path).acquire()


# --- resume and divergence keep the truth ------------------------------------------------------------------------


def _snapshot(d: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in sorted(d.iterdir())}


def test_a_refused_resume_leaves_the_run_directory_as_it_was(tmp_path, capsys):
    from engine.cli import main

    base = ["pretrain", *RUN, "--run-dir", str(tmp_path), "--data.num_workers", "0", "--data.backend",
            "torchvision", "--train.tensorboard", "false"]
    assert main([*base, "--train.max_steps", "2"]) == 0
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main([*base, "--train.max_steps", "4", "--resume", "--model.depth", "3"]) == 2
    assert "of another architecture" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_a_resume_that_changes_the_run_says_so_and_records_it(tmp_path):
    t = Trainer(debug_cfg(tmp_path, **{"train.max_steps": 2}), log=lambda m: None)
    t.fit()
    lines = []
    t2 = Trainer(debug_cfg(tmp_path, **{"train.max_steps": 4, "model.mask_ratio": 0.5, "train.batch_size": 16,
                                        "model.norm_pix_loss": "false", "optim.lr": 1e-3}), resume=True,
                 log=lines.append)
    want = {"model.mask_ratio": [0.75, 0.5], "model.norm_pix_loss": [True, False], "train.batch_size": [32, 16],
            "global_batch": [32, 16], "optim.lr": [0.0, 0.001]}
    assert t2.resume_changes == want
    note = next(m for m in lines if m.startswith("note: this resume changes the run"))
    assert "model.mask_ratio 0.75 -> 0.5" in note and "global_batch 32 -> 16" in note, note
    rec = json.loads((tmp_path / "resumes.jsonl").read_text().splitlines()[-1])
    assert rec["changes"] == want and rec["step"] == 2 and rec["checkpoint"] == "ckpt_00000002.pt"
    t2.fit()
    assert ckpt.read_meta(ckpt.latest_checkpoint(tmp_path))["resumes"][-1]["changes"] == want
    t3 = Trainer(debug_cfg(tmp_path, **{"train.max_steps": 5, "model.mask_ratio": 0.5, "train.batch_size": 16,
                                        "model.norm_pix_loss": "false", "optim.lr": 1e-3}), resume=True,
                 log=lambda m: None)
    assert t3.resume_changes == {} and len(t3._resume_history) == 1  # the history travels with the checkpoints
    t3.close()


def test_a_rollback_after_a_resume_returns_to_the_resumed_checkpoint(tmp_path):
    over = {"train.ckpt_every": 100, "train.log_every": 1, "train.max_bad_steps": 3,
            "train.on_divergence": "rollback"}
    Trainer(debug_cfg(tmp_path, **{**over, "train.max_steps": 6}), log=lambda m: None).fit()
    lines = []
    t = Trainer(debug_cfg(tmp_path, **{**over, "train.max_steps": 14}), resume=True, log=lines.append)
    spike_loss(t, 3, 7)  # steps 9-12 spike: no checkpoint written since the resume
    res = t.fit()
    assert res.rollbacks == 1 and res.step == 14
    assert any("rolling back to" in m and "ckpt_00000006.pt (step 6)" in m for m in lines), lines


def test_a_run_that_ends_inside_a_bad_streak_fails_naming_the_last_good_checkpoint(tmp_path, capsys):
    t = Trainer(debug_cfg(tmp_path, **{"train.ckpt_every": 2, "train.log_every": 1, "train.max_steps": 8,
                                       "train.max_bad_steps": 10}), log=lambda m: None)
    spike_loss(t, 7, 10**9)  # steps 7 and 8 spike: the run ends two steps into a streak its limit would allow
    with pytest.raises(DivergenceError, match=r"ended inside a bad streak: 2 bad step\(s\) since step 7.*"
                                              r"last good checkpoint is .*ckpt_00000006.pt \(step 6\)"):
        t.fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)][-1] == "ckpt_00000006.pt"
    assert not (tmp_path / LOCK_NAME).exists()


# --- guarantees behind one-line bugs -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["loss", "gradient"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
def test_an_infinite_loss_or_gradient_is_never_applied(where, value):
    """A loss of +-Inf whose gradients are finite, and a finite loss whose gradient is Inf: both skipped."""
    from engine.step import TrainStep

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, ratio, noise):
            out = self.lin(x).mean()
            if where == "loss":
                return out + noise[0], None, None  # Inf added: gradients stay finite
            out.register_hook(lambda g: torch.full_like(g, value))  # Inf through backward, finite loss
            return out * noise[0], None, None

    m = M()
    for opt in (torch.optim.AdamW(m.parameters(), lr=0.1, fused=True), torch.optim.SGD(m.parameters(), lr=0.1)):
        step = TrainStep(m, opt, device="cpu")
        before = [p.detach().clone() for p in m.parameters()]
        x = torch.randn(3, 4)
        loss, finite = step([(x, torch.full((3,), value if where == "loss" else 1.0))])
        assert not bool(finite)
        assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_a_sharded_resume_restores_the_optimizer_state_exactly(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sdapi

    t = Trainer(debug_cfg(tmp_path / "a", **{"train.max_steps": 3}), log=lambda m: None)
    t.fit()
    d = tmp_path / "b" / "ckpt_00000003.dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(ckpt.training_state(t.model, t.optimizer), checkpoint_id=str(d))
    ckpt.atomic_torch_save(t.meta(), d / "meta.pt")
    r = Trainer(debug_cfg(tmp_path / "b", **{"train.max_steps": 4}), resume=True, log=lambda m: None)
    want = sdapi.get_optimizer_state_dict(t.model, t.optimizer)["state"]
    got = sdapi.get_optimizer_state_dict(r.model, r.optimizer)["state"]
    assert want.keys() == got.keys() and len(want) > 10
    for name, s in want.items():
        for k, v in s.items():
            assert torch.equal(got[name][k], v), (name, k)
    # the param groups' values too (the lr the schedule had reached, weight decay per group)
    assert [(g["lr"], g["weight_decay"]) for g in r.optimizer.param_groups] == \
        [(g["lr"], g["weight_decay"]) for g in t.optimizer.param_groups]
    r.close()


def test_resume_reads_the_runs_own_config_and_reports_an_override_that_changes_it(tmp_path, capsys):
    from engine.cli import main

    base = ["pretrain", "--train.device", "cpu", "--data.num_workers", "0", "--train.tensorboard", "false",
            "--train.vis_every", "0", "--run-dir", str(tmp_path)]
    assert main([*base, "--preset", "debug", "--model.mask_ratio", "0.5", "--train.max_steps", "2",
                 "--data.backend", "auto"]) == 0
    saved = (tmp_path / "config.toml").read_text()
    assert 'backend = "auto"' not in saved  # what auto resolved to, so that a replay uses the same loader
    capsys.readouterr()
    assert main([*base, "--resume", "--train.max_steps", "3"]) == 0  # no --preset: the run's config.toml
    out = capsys.readouterr().out
    assert f"resuming with the run's own settings ({tmp_path / 'config.toml'})" in out
    assert "changes the run" not in out and "resumed from" in out
    assert main([*base, "--resume", "--train.max_steps", "4", "--model.mask_ratio", "0.6"]) == 0
    assert "model.mask_ratio 0.5 -> 0.6" in capsys.readouterr().out


def test_closing_a_loader_leaves_another_loaders_stream_open(folder):
    from engine.config import DataConfig
    from pipelines.torchvision import TorchvisionLoader

    files = sorted(map(str, folder.iterdir()))
    a = TorchvisionLoader(files, 1, 32, 16, DataConfig(path=str(folder), num_workers=0), 0, "cpu")
    b = TorchvisionLoader(files, 1, 32, 16, DataConfig(path=str(folder), num_workers=0), 0, "cpu")
    sa, sb = a.stream(0), b.stream(0)
    next(sa), next(sb)
    a.close()
    assert sa.gi_frame is None and sb.gi_frame is not None
    next(sb)
    b.close()

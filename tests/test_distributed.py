"""FSDP2 under torchrun on 2 CPU processes (gloo): parity with one process, resume across world sizes,
and a failing rank bringing the job down with its error."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from test_operation import run_to_the_end

from engine import checkpoint as ckpt

COMMON = ["--preset", "debug", "--data.num_workers", "0", "--train.tensorboard", "false", "--train.device", "cpu",
          "--data.backend", "torchvision", "--train.log_every", "1", "--train.vis_every", "0",
          "--train.precision", "fp32"]


def torchrun(nproc, run_dir, *extra, env=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "engine.pretrain", *COMMON, "--run-dir", str(run_dir), *extra]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)


def single(run_dir, *extra):
    from engine.cli import main

    return main(["pretrain", *COMMON, "--run-dir", str(run_dir), *extra])


def losses(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def grad_norms(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in recs if r.get("grad_norm") is not None}


def assert_ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run every parity test here matches or continues: one process, global batch 16, 7 steps, a checkpoint at
    every step (the schedule spans the preset's epochs, so a shorter run's first steps are this run's)."""
    run = tmp_path_factory.mktemp("reference")
    assert single(run, "--train.batch_size", "16", "--train.max_steps", "7", "--train.ckpt_every", "1",
                  "--train.keep_last", "7") == 0
    return run


def reference_checkpoint(run, step: int):
    return run / f"ckpt_{step:08d}.pt"


def assert_same_weights(a_path, b_path):
    a, b = ckpt.full_model_state(a_path), ckpt.full_model_state(b_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def continued(reference, run, step: int):
    """A run directory holding the reference run as it stood at `step`: its config, its metrics and its checkpoints up
    to that step (what a one-process run stopped there leaves behind)."""
    shutil.copytree(reference, run)
    for c in ckpt.list_checkpoints(run):
        if int(ckpt.CKPT_RE.match(c.name).group(1)) > step:
            c.unlink()
    return run


def rel(a: dict, b: dict) -> float:
    """Relative difference over all tensors together: a key bias's gradient is pure rounding noise, which Adam scales
    up to a full step, entry by entry."""
    va = torch.cat([a[k].flatten() for k in a])
    return float((va - torch.cat([b[k].flatten() for k in a])).norm() / va.norm())


def test_two_ranks_continue_a_one_rank_run_and_one_rank_continues_theirs(tmp_path, reference):
    """A one-process run at global batch 16 stopped at step 3 resumes on 2 ranks with the same per-device batch on the
    command line: the global batch is kept (8 per device), and the loss curve and weights are the uninterrupted run's
    (with DataLoader workers here, none in the reference).
    Their sharded checkpoint resumes on one rank with a per-device batch of 8: the global batch of 16 is kept as 2
    accumulation steps, and weights, optimizer state and schedule end equal to the uninterrupted run within fp32
    reduction-order noise."""
    b = continued(reference, tmp_path / "b", 3)
    # the job also ends as an operator expects: torchvision workers (each blocks forever in a read once it has served
    # the two batches the run needs, as on a hung file system) and TensorBoard on, and still, after `done:`, every
    # process of the job is gone within 15 s (the case of a finished torchrun job that never exited)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "engine.pretrain", *COMMON, "--run-dir", str(b), "--train.batch_size", "16", "--train.max_steps", "6",
            "--resume", "--data.num_workers", "2", "--train.tensorboard", "true"]
    code, out, tail_s = run_to_the_end(tmp_path, argv, stuck_after=16)
    assert code == 0 and "done: step 6" in out, out[-3000:]
    assert tail_s < 15, f"the process tree outlived its last line by {tail_s:.1f} s:\n{out[-2000:]}"
    assert "resumed from" in out and "at step 3" in out
    assert "global batch 16 kept as 8 per device x 1 accumulation x 2 rank(s)" in out
    assert "effective batch 16 = 8 per device x 1 accumulation x 2 rank(s) (FSDP2)" in out
    assert list((b / "tb").iterdir())
    assert ckpt.latest_checkpoint(b).name == "ckpt_00000006.dcp"
    assert_same_weights(ckpt.latest_checkpoint(b), reference_checkpoint(reference, 6))
    ref = losses(reference)
    for s in (4, 5, 6):
        assert losses(b)[s] == pytest.approx(ref[s], rel=1e-4), s
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert single(b, "--train.batch_size", "8", "--train.max_steps", "7", "--resume") == 0
    assert ("resumed on 1 rank(s) from a run on 2: global batch 16 kept as 8 per device x 2 accumulation x 1 "
            "rank(s) (was 8 x 1)") in out.getvalue()
    assert "effective batch 16 = 8 per device x 2 accumulation x 1 rank(s)" in out.getvalue()
    assert losses(b)[7] == pytest.approx(ref[7], rel=1e-4)
    assert ckpt.latest_checkpoint(b).name == "ckpt_00000007.pt"
    want = torch.load(reference_checkpoint(reference, 7), weights_only=True)
    got = torch.load(ckpt.latest_checkpoint(b), weights_only=True)
    assert want["model"].keys() == got["model"].keys()
    assert rel(want["model"], got["model"]) < 1e-5  # measured 1.5e-7
    ws, gs = want["optim"]["state"], got["optim"]["state"]
    assert ws.keys() == gs.keys() and ws
    for k in ("exp_avg", "exp_avg_sq"):
        assert rel({n: ws[n][k] for n in ws}, {n: gs[n][k] for n in ws}) < 1e-5, k  # measured < 1e-7
    assert want["schedule"] == got["schedule"]


def test_hybrid_sharding_matches_one_rank_and_resumes_on_one(tmp_path, reference):
    """--parallel.replicate 2 on 4 gloo ranks (2 replicas x 2 shards), from its own initialisation: the loss curve,
    gradient norms and weights of one process with the same global batch; its DCP checkpoint resumes on one process
    (the global batch kept as 4 x 4 accumulation) and continues the uninterrupted run. (A one-process checkpoint
    resuming sharded is held above, on 2 ranks.)"""
    hsdp = tmp_path / "hsdp"
    r = torchrun(4, hsdp, "--train.batch_size", "4", "--train.max_steps", "3", "--parallel.replicate", "2")
    assert_ok(r)
    assert "effective batch 16 = 4 per device x 1 accumulation x 4 rank(s) (HSDP: 2 replicas x 2 shards)" in r.stdout
    ref, ref_gn = losses(reference), grad_norms(reference)
    got, gn = losses(hsdp), grad_norms(hsdp)
    for s in (1, 2, 3):
        assert got[s] == pytest.approx(ref[s], rel=1e-4), s
        assert gn[s] == pytest.approx(ref_gn[s], rel=1e-4), s  # each shard counted once, each replica not twice
    assert_same_weights(ckpt.latest_checkpoint(hsdp), reference_checkpoint(reference, 3))
    assert single(hsdp, "--train.batch_size", "4", "--train.max_steps", "5", "--resume") == 0
    got = losses(hsdp)
    for s in (4, 5):
        assert got[s] == pytest.approx(ref[s], rel=1e-4), s
    assert_same_weights(ckpt.latest_checkpoint(hsdp), reference_checkpoint(reference, 5))


def test_bf16_mixed_precision_knn_monitor_and_export_from_sharded(tmp_path):
    from pipelines.labelled import export_digits

    export_digits(str(tmp_path / "digits"), 32)
    # the embedded set has 256 samples per epoch: 16 steps of 2 x 8, then the kNN monitor runs under FSDP
    r = torchrun(2, tmp_path, "--train.batch_size", "8", "--train.max_steps", "16", "--train.precision", "bf16",
                 "--train.activation_checkpointing", "true", "--train.knn_every", "1",
                 "--data.knn_train", str(tmp_path / "digits" / "train"), "--data.knn_val",
                 str(tmp_path / "digits" / "val"), "--train.log_every", "8")
    assert_ok(r)
    assert all(l == l for l in losses(tmp_path).values())  # finite, not NaN
    assert "kNN monitor at epoch 1: top-1" in r.stdout
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(0 < rec.get("knn_top1", -1) <= 1 for rec in recs)
    from engine.cli import main

    out = tmp_path / "enc.pth"
    assert main(["export", str(ckpt.latest_checkpoint(tmp_path)), "--out", str(out)]) == 0
    enc = torch.load(out, weights_only=True)
    assert "blocks.1.mlp.fc2.weight" in enc and enc["pos_embed"].shape == (1, 65, 64)


def test_failing_rank_brings_job_down_with_its_error(tmp_path):
    t0 = time.time()
    r = torchrun(2, tmp_path, "--train.batch_size", "8", "--train.max_steps", "200",
                 env={"MAE_FAULT_STEP": "3", "MAE_FAULT_RANK": "1"}, timeout=180)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "injected fault (MAE_FAULT_STEP=3) on rank 1 at step 3" in out
    assert "rank      : 1" in out or "rank: 1" in out or "[rank1]" in out
    assert time.time() - t0 < 150


def test_fsdp_always_in_a_single_process_matches_plain(tmp_path, reference, capsys):
    """--train.fsdp always: one process through FSDP2 (sharded checkpoint), same training as plain; the run gives
    back the environment it set for its one-process group, so a later run in this process is no torchrun job."""
    from engine.parallel import launched_by_torchrun

    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    assert not launched_by_torchrun()
    assert single(tmp_path / "f", "--train.batch_size", "16", "--train.max_steps", "3", "--train.fsdp", "always") == 0
    assert "(FSDP2)" in capsys.readouterr().out
    assert ckpt.latest_checkpoint(tmp_path / "f").suffix == ".dcp"
    assert_same_weights(ckpt.latest_checkpoint(tmp_path / "f"), reference_checkpoint(reference, 3))
    assert {k: os.environ.get(k) for k in before} == before and not launched_by_torchrun()


def test_replicate_must_divide_the_world_size():
    from engine.config import ConfigError, debug
    from engine.parallel import DistContext
    from engine.levers import check_levers

    cfg = debug()
    cfg.parallel.replicate = 2
    for ctx in (DistContext(), DistContext(0, 3, 0, True), DistContext(0, 2, 0, True)):
        with pytest.raises(ConfigError, match="parallel.replicate=2 needs a torchrun job"):
            check_levers(cfg, ctx, torch.device("cpu"))
    check_levers(cfg, DistContext(0, 4, 0, True), torch.device("cpu"))

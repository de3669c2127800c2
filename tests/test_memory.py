"""`mae bench memory` (benchmarks/memory.py): the fake-tensor count of a step's memory against the same step run
for real on the CPU, against a hand count of what stays resident, and the command's outputs and errors."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.memory import main
from engine.memory import BLOCK, GIB, AllocTracker, estimate_step
from engine.config import ModelConfig, debug
from engine.model import build_model


def _r(nbytes):  # the caching allocator's rounding
    return -(-nbytes // BLOCK) * BLOCK


def test_tracker_counts_live_storages_once_and_keeps_the_peak():
    with AllocTracker() as t:
        a = torch.empty(1000)  # 4000 B -> 4096
        v = a[10:20].view(2, 5)  # a view: same storage, nothing new
        b = torch.empty(10, dtype=torch.bfloat16)  # 20 B -> 512
        assert t.current == 4096 + 512
        del a
        assert t.current == 4096 + 512  # the view keeps the storage alive
        del v
        assert t.current == 512
        c = torch.ones(3000)  # 12000 B -> 12288
        assert t.current == 512 + 12288
        del b, c
    assert t.current == 0 and t.peak == 512 + 12288


@pytest.mark.parametrize("levers", [{}, {"checkpoint_blocks": 1, "checkpoint_decoder_blocks": 1},
                                    {"precision": "bf16-pure"}, {"attention": "encoder-math"},
                                    {"precision": "fp8"}])
def test_fake_estimate_equals_the_same_step_run_for_real(levers):
    """The estimate runs on fake tensors (no data); the count must be that of the step actually run."""
    m = debug().model
    fake = estimate_step(m, "mae", 8, 0.75, fake=True, **levers)
    real = estimate_step(m, "mae", 8, 0.75, fake=False, **levers)
    for f in ("peak_gib", "resident_gib", "activations_gib", "forward_peak_gib", "backward_peak_gib",
              "optimizer_peak_gib", "peak_phase"):
        assert getattr(fake, f) == getattr(real, f), f


def test_resident_bytes_are_parameters_adam_state_and_the_batch():
    m = debug().model
    est = estimate_step(m, "mae", 8, 0.75)
    model = build_model(m)
    params = sum(_r(p.numel() * 4) for p in model.parameters())
    train = [p for p in model.parameters() if p.requires_grad]
    adam = sum(2 * _r(p.numel() * 4) + _r(4) for p in train)  # exp_avg, exp_avg_sq and a step counter each
    imgs = _r(8 * 3 * 32 * 32 * 4)
    imgs += _r(4)  # and the step's last gradient norm (a 0-d fp32 tensor the trainer reads at its log)
    assert est.resident_gib * GIB == params + adam + imgs
    # bf16-pure adds the bf16 copies of every parameter
    pure = estimate_step(m, "mae", 8, 0.75, precision="bf16-pure")
    assert pure.resident_gib * GIB == params + adam + imgs + sum(_r(p.numel() * 2) for p in model.parameters())


def test_each_recomputed_block_lowers_the_estimate():
    m = ModelConfig(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=32,
                    decoder_depth=4, decoder_num_heads=4)
    peaks = [estimate_step(m, "mae", 16, 0.75, checkpoint_decoder_blocks=n).peak_gib for n in (0, 2, 4)]
    assert peaks[0] > peaks[1] > peaks[2]
    assert estimate_step(m, "mae", 16, 0.75, checkpoint_blocks=4).peak_gib < peaks[0]
    assert estimate_step(m, "mae", 16, 0.75, activation_checkpointing=True).peak_gib < peaks[2]
    # the dense baseline keeps more than the visible-only MAE at the same batch
    assert estimate_step(m, "mae_dense", 16, 0.75).peak_gib > peaks[0]


def test_command_writes_rows_and_sets_measured_ones_beside(tmp_path):
    measured = tmp_path / "speed.jsonl"
    measured.write_text(json.dumps({"environment": {}}) + "\n" + json.dumps(
        {"row": {"model": "debug", "mode": "mae", "mask_ratio": 0.75, "batch": 8, "config": "reference",
                 "status": "ok", "peak_alloc_gib": 0.01}}) + "\n")
    assert main(["--models", "debug", "--batch", "8", "--config", "reference,fast+ckpt6", "--decoder-ckpt", "0,1",
                 "--budget-gib", "0.0036", "--measured", str(measured), "--out", str(tmp_path)]) == 2  # 6 > 2 blocks
    assert not list(tmp_path.glob("memory_estimate_*"))
    assert main(["--models", "debug", "--batch", "8", "--config", "reference", "--encoder-ckpt", "0,2",
                 "--decoder-ckpt", "0,1", "--budget-gib", "0.0036", "--measured", str(measured),
                 "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("memory_estimate_*.json")
    rows = json.loads(js.read_text())["rows"]
    assert [(r["encoder_ckpt"], r["decoder_ckpt"]) for r in rows] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert rows[0]["est_peak_gib"] > rows[1]["est_peak_gib"] > rows[3]["est_peak_gib"]
    assert {r["fits"] for r in rows} == {"yes", "no"}
    # the measured row is set beside the estimate of the same levers (not beside other checkpointing)
    assert rows[0]["measured_peak_gib"] == 0.01 and "measured_peak_gib" not in rows[1]
    md = next(tmp_path.glob("memory_estimate_*.md")).read_text()
    assert "fake tensors" in md and "No GPU" in md and md.count("| debug | mae | 0.75 | 8 | reference |") == 4
    # --append adds to the day's report; a file that is not one is refused and left as it was
    assert main(["--models", "debug", "--batch", "4", "--out", str(tmp_path), "--append"]) == 0
    assert len(json.loads(js.read_text())["rows"]) == 5
    js.write_text("[1, 2]")
    assert main(["--models", "debug", "--batch", "4", "--out", str(tmp_path), "--append"]) == 2
    assert js.read_text() == "[1, 2]"


def test_largest_batch_is_the_last_that_fits():
    """On the real estimate: a budget that 40 fits exactly gives 40 (48 cannot fit)."""
    from benchmarks.memory import largest_batch

    m = debug().model
    budget = estimate_step(m, "mae", 40, 0.75).peak_gib + 1e-9
    b, est = largest_batch(m, "mae", 0.75, budget)
    assert b == 40 and est.peak_gib <= budget


@settings(max_examples=300, deadline=None)
@given(resident=st.floats(0.0, 50.0), per_image=st.floats(1e-4, 1.0), curve=st.floats(0.0, 1e-3),
       budget=st.floats(0.0, 200.0), exact=st.one_of(st.none(), st.integers(1, 400)),
       multiple=st.sampled_from([1, 4, 8, 16]), cap=st.integers(16, 5000))
def test_the_batch_search_finds_the_last_multiple_that_fits_any_increasing_peak(resident, per_image, curve, budget,
                                                                                exact, multiple, cap):
    """The search on a stand-in estimate (resident bytes, a cost per image, a convex term): the answer is the largest
    multiple of `multiple` within `cap` whose peak fits, found by brute force; (0, None) when even one multiple does
    not fit; the estimate returned is the answer's; a budget met exactly fits; an affine peak (what a step's memory
    is, nearly) takes at most 6 estimates (each is a second or more of fake-tensor tracing)."""
    import engine.memory as mem

    def peak(b):
        return resident + per_image * b + curve * b * b

    if exact is not None:
        budget = peak(exact * multiple)
    calls = []

    def fake(m, mode, b, ratio, **levers):
        calls.append(b)
        assert b % multiple == 0 and multiple <= b <= cap, b
        return mem.Estimate(peak(b), "backward", resident, 0.0, 0.0, peak(b), 0.0, 0.0)

    want = max((b for b in range(multiple, cap // multiple * multiple + 1, multiple)
                if peak(b) <= budget), default=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mem, "estimate_step", fake)
        b, est = mem.largest_batch(None, "mae", 0.75, budget, multiple=multiple, cap=cap)
    assert b == want
    assert (est is None) if want == 0 else est.peak_gib == peak(want)
    if curve == 0:
        assert len(set(calls)) <= 6, calls


def test_command_largest_batch(tmp_path):
    assert main(["--models", "debug", "--config", "reference,fast+pure", "--largest-batch", "64", "--budget-gib",
                 "0.01", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("memory_estimate_*.json")).read_text())["rows"]
    assert [r["config"] for r in rows] == ["reference", "fast+pure"]
    assert all(8 <= r["batch"] <= 64 and r["batch"] % 8 == 0 and r["est_peak_gib"] <= 0.01 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--models", "vit-h", "--decoder-ckpt", "9"], "--decoder-ckpt: 9 recomputed decoder blocks is more than"),
    (["--models", "debug", "--config", "fast+ckpt6"], "lever set fast+ckpt6: 6 recomputed encoder blocks"),
    (["--models", "vit-h", "--encoder-ckpt", "x"], "--encoder-ckpt must be a comma list of integers"),
    (["--models", "vit-h", "--config", "turbo"], "unknown lever set ['turbo']"),
    (["--models", "vit-h", "--batch", "0"], "--batch must be >= 1"),
    (["--models", "vit-h", "--largest-batch", "512"], "--largest-batch needs --budget-gib"),
    (["--models", "vit-h", "--ratios", "1.5"], "mask"),
    (["--models", "vit-h", "--measured", "/nonexistent/speed.jsonl"], "--measured /nonexistent/speed.jsonl"),
])
def test_bad_arguments_name_the_problem(argv, message, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mae bench memory: error:") and message in err, err
    assert not list(tmp_path.iterdir())  # nothing written

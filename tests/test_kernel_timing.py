"""The kernel benchmark's timing harness (benchmarks/kernel_timing.py) and its targets table, on the CPU: what can
be held here of GPU-time measurement is the input rotation, the labelling and the verdicts."""

import torch

from benchmarks import kernel_timing as kt
from benchmarks.kernels import target_lines


def test_input_rotation_exceeds_l2_three_times(monkeypatch):
    assert kt.input_sets(2**20, torch.device("cpu")) == 1  # no L2 to outrun on the CPU path
    monkeypatch.setattr(kt, "l2_bytes", lambda device: 50 * 2**20)
    dev = torch.device("cuda")
    assert kt.input_sets(10 * 2**20, dev) == 15  # 3 x 50 MiB / 10 MiB
    assert kt.input_sets(200 * 2**20, dev) == 1  # one set is already past L2
    assert kt.input_sets(2**20, dev) == 16  # capped


def test_cpu_timing_is_labelled_wall_clock_and_cycles_every_input_set():
    seen = []
    calls = [lambda i=i: seen.append(i) for i in range(3)]
    t = kt.gpu_time(calls, torch.device("cpu"), reps=4, warmup=1)
    assert t.method == "cpu wall clock" and t.median_ms >= 0 and t.p20_ms <= t.p80_ms
    assert seen == [0, 1, 2] * 5  # warm-up, then every rep cycles through all sets
    assert kt.host_time(lambda: None, torch.device("cpu"), n=3) >= 0
    assert kt.copy_bandwidth(torch.device("cpu")) is None


def _row(op, mode, impl, ms, pct=None):
    r = {"shape": "vit-l", "op": op, "mode": mode, "impl": impl, "status": "ok", "gpu_ms": ms, "host_ms": 0.2}
    if pct is not None:
        r["pct_of_copy"] = pct
    return r


def test_a_target_needs_the_time_and_the_bandwidth_share():
    rows = [_row("masking", "fwd", "triton", 0.02, 75.0), _row("unshuffle", "fwd", "triton", 0.02, 50.0),
            _row("loss", "fwd+bwd", "triton", 0.2, 80.0), _row("loss", "fwd+bwd", "eager", 0.6)]
    text = "\n".join(target_lines(rows, 3000.0))
    line = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ") and "target" not in ln}
    assert line["masking"].rstrip().endswith("| yes |")
    assert "no (50.0% of copy)" in line["unshuffle"]  # fast enough, but far from the roofline
    assert "no (0.050 ms over)" in line["loss"] and "| 0.6 |" in line["loss"]
    assert "host time included" in text  # the DESIGN.md reference figures are labelled for what they are

"""What every benchmark shares: timing with CUDA events after warm-up (median and 20/80 quantiles), where reports
go, and (re-exported from engine.report, which the engine uses too) the environment a figure was taken in and the
CSV / JSON / markdown writers."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.report import (device_tag, env_block, environment, md_table, read_jsonl, today,  # noqa: F401
                           write_csv, write_json)

# reports go to the working directory (or --out), never into the installed package; the repository's committed
# reports live in benchmarks/results/ and are written there with --out benchmarks/results
RESULTS = Path("bench-results")


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms, "reps": self.reps}


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[1], q[7]


def time_fn(fn, device: torch.device | str, warmup: int = 10, reps: int = 50, min_s: float = 0.0) -> Timing:
    """Median / 20% / 80% time of `fn()` in ms: CUDA events per call on GPU (sync only at the end),
    perf_counter on CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        t_end = time.perf_counter() + min_s
        while len(times) < reps or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    med, p20, p80 = quantiles(times)
    return Timing(med, p20, p80, len(times))


def pick_device(arg: str) -> torch.device:
    """--device: auto (cuda when available, else cpu) or a torch device string."""
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


def parse_choices(text: str, allowed, what: str) -> list[str]:
    """A comma list checked against `allowed`; ValueError naming the unknown entries."""
    items = [x for x in text.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return items


def fresh_peak(device: torch.device) -> None:
    """Free cached blocks and restart the peak-memory counter (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

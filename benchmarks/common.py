"""What every benchmark shares: timing with CUDA events after warm-up (median and 20/80 quantiles),
the environment a figure was taken in, and CSV / JSON / markdown writers for benchmarks/results/."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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


def environment(device: torch.device | str | None = None) -> dict:
    """GPU (or 'CPU'), versions and date: what a reported figure must carry."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env["device"] = torch.cuda.get_device_name(dev)
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    else:
        env["device"] = "CPU"
    return env


def device_tag(env: dict) -> str:
    name = env.get("device", "CPU")
    for key in ("H200", "H100", "A100", "L40S", "B200"):
        if key in name:
            return key.lower()
    return "cpu" if name == "CPU" else name.lower().replace(" ", "-")[:20]


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def read_jsonl(path) -> list[dict]:
    """The records of a .jsonl file (blank lines skipped); ValueError naming the file and line of a bad one."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i}: not JSON ({e.msg})") from None
    return out


def write_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    return path


def md_table(rows: list[dict], cols: list[str], fmt: dict | None = None) -> str:
    fmt = fmt or {}

    def cell(r, c):
        v = r.get(c)
        if v is None or v == "":
            return "-"
        if c in fmt and isinstance(v, (int, float)):
            return fmt[c].format(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def env_block(env: dict) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in env.items() if v is not None)


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


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

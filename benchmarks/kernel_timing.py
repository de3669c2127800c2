"""Kernel timing in GPU time, not host time.

One call of a small op between two CUDA events measures Python, autograd, allocation and launch as much as the
kernels (the H100 report of 2026-11-26 timed identical work 1.45-1.9x apart that way). Here:

- `gpu_time`: many back-to-back calls recorded in one CUDA graph and replayed (no host in the loop), the calls
  cycling through enough input copies that their bytes exceed the L2 cache three times over (an op does not
  run on inputs the previous call left in L2). Where an op cannot be captured, `triton.testing.do_bench`, which
  flushes the L2 before every call. Median and 20/80 quantiles over the replays, per call.
- `host_time`: the eager call as a user makes it (Python, autograd, allocation, launches), per call, with no
  synchronisation in the loop: its own column, never mixed with the GPU time.
- `copy_bandwidth`: a device-to-device copy of a buffer far larger than L2, the roofline every memory-bound op
  is held to (GB/s counting the bytes read and written).

On a CPU every timing is wall clock (perf_counter), labelled so; the harness and the report code still run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from benchmarks.common import quantiles


@dataclass
class GpuTime:
    median_ms: float
    p20_ms: float
    p80_ms: float
    method: str
    """"cuda-graph x{calls} ({sets} input sets)", "do_bench (L2 flush)" or "cpu wall clock"."""

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms, "timing": self.method}


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)


def input_sets(bytes_per_call: int, device: torch.device, cap: int = 16) -> int:
    """How many input copies a timed loop cycles through: enough that their bytes exceed L2 three times."""
    l2 = l2_bytes(device)
    if not l2 or bytes_per_call <= 0:
        return 1
    return max(1, min(cap, math.ceil(3 * l2 / bytes_per_call)))


def gpu_time(calls: list, device: torch.device, reps: int = 20, calls_per_graph: int = 50,
             warmup: int = 3) -> GpuTime:
    """Per-call GPU time of cycling through `calls` (one per input set): CUDA-graph replay of calls_per_graph
    calls, `reps` replays; do_bench where capture fails; wall clock on a CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        for c in calls:
            c()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for c in calls:
                c()
            times.append(1000 * (time.perf_counter() - t0) / len(calls))
        return GpuTime(*quantiles(times), "cpu wall clock")
    per = max(1, calls_per_graph // len(calls)) * len(calls)
    try:
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for c in calls:
                c()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        with torch.cuda.graph(g):
            for i in range(per):
                calls[i % len(calls)]()
        g.replay()
        torch.cuda.synchronize(device)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for a, b in ev:
            a.record()
            g.replay()
            b.record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) / per for a, b in ev]
        del g
        return GpuTime(*quantiles(times), f"cuda-graph x{per} ({len(calls)} input sets)")
    except Exception:  # noqa: BLE001 - an op that cannot be captured: L2-flushing do_bench instead
        torch.cuda.synchronize(device)
        from triton.testing import do_bench

        it = iter(range(10**9))

        def one():
            calls[next(it) % len(calls)]()

        q = do_bench(one, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return GpuTime(q[0], q[1], q[2], "do_bench (L2 flush)")


def host_time(call, device: torch.device, n: int = 20) -> float:
    """Mean host time of one eager call in ms (launch, autograd, allocation; no synchronisation in the loop)."""
    device = torch.device(device)
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    dt = (time.perf_counter() - t0) / n
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * dt


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float | None:
    """GB/s of a device-to-device copy (bytes read + written), the memory roofline; None on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    nbytes = min(nbytes, torch.cuda.mem_get_info(device)[0] // 4)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = gpu_time([lambda: dst.copy_(src)], device, reps=reps, calls_per_graph=5)
    return 2 * nbytes / (t.median_ms / 1000) / 1e9

"""Running the rows of `mae bench speedup`: one StepRunner (the trainer's step) per row, each row a dict appended to
a JSONL file as soon as it is measured; a lever that fails on this machine is a row with its error."""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import torch

from engine.config import get_preset
from engine.metrics import datasheet_peak, device_memory_used, mfu

from .common import fresh_peak
from .levers import CONFIGS, DEVICE_SUITE, SHORT, SPEED_SUITES
from .step_runner import NvmlSampler, StepRunner, flops_for_mode, matmul_ceiling


# A row's timing is trusted for derived claims (speedups, targets) only when it was warmed up for its state, timed
# over enough steps and its steps agree: p80 / p20 of the step times within this bound (a shared 2-core CPU is
# noisier than a GPU). Rows that fail are kept, marked "unstable: ..." with the reason, and left out of claims.
MAX_SPREAD = {"cuda": 1.15, "cpu": 1.5}
MIN_WARMUP = {"compiled": 3, "eager": 2}  # a compiled or captured step: compile + capture + the allocator settling
MIN_REPS = 5


def timing_verdict(warmup: int, reps: int, p20: float, p80: float, compiled: bool, max_spread: float) -> str:
    """"ok", or "unstable: <reasons>" (too few warm-up steps for the compile / capture state, too few timed steps,
    or a spread of step times over the bound)."""
    why = []
    need = MIN_WARMUP["compiled" if compiled else "eager"]
    if warmup < need:
        why.append(f"{warmup} warm-up step(s), {'a compiled or captured' if compiled else 'an eager'} step needs {need}")
    if reps < MIN_REPS:
        why.append(f"{reps} timed step(s), fewer than {MIN_REPS}")
    spread = p80 / p20 if p20 > 0 else float("inf")
    if spread > max_spread:
        why.append(f"p80/p20 {spread:.2f} > {max_spread}")
    return "ok" if not why else "unstable: " + "; ".join(why)


def trusted(r: dict) -> bool:
    """A measured row whose timing may back a derived claim (rows of older reports carry no verdict: trusted)."""
    return r.get("status") == "ok" and r.get("timing", "ok") == "ok"


def measure(m, model_name: str, mode: str, batch: int, ratio: float | None, device, warmup: int, reps: int,
            peak: float | None, ceiling: float | None, compile: bool | str = False, stream=None,
            config: str | None = None, max_spread: float | None = None) -> dict:
    row = {"model": model_name, "mode": mode, "mask_ratio": ratio, "batch": batch}
    levers = {"compile": compile}
    if config is not None:
        row["config"] = config
        levers = CONFIGS[config]
    compiled = levers.get("compile", "none") not in ("none", False) or bool(levers.get("graph"))
    max_spread = max_spread or MAX_SPREAD["cuda" if device.type == "cuda" else "cpu"]
    runner = None
    try:
        fresh_peak(device)
        runner = StepRunner(m, mode, batch, device, mask_ratio=ratio if ratio is not None else 0.0,
                            stream=stream, **levers)
        sampler = NvmlSampler(device.index or 0)
        st = runner.run(warmup=warmup, reps=reps, sampler=sampler)  # utilisation and power over the timed steps
        ips = batch / (st.step_ms / 1000)
        fl = flops_for_mode(m, mode, ratio if ratio is not None else 0.0)
        row.update(status="ok", img_per_s=round(ips, 1), step_ms=round(st.step_ms, 3), fwd_ms=_r(st.fwd_ms, 3),
                   bwd_ms=_r(st.bwd_ms, 3), opt_ms=_r(st.opt_ms, 3), p20_ms=round(st.p20_ms, 3),
                   p80_ms=round(st.p80_ms, 3), reps=st.reps, first_step_s=round(st.first_step_s, 2),
                   gflops_per_img=float(f"{fl / 1e9:.4g}"), tflops_per_s=float(f"{fl * ips / 1e12:.4g}"),
                   mfu_datasheet=_r(mfu(fl, ips, peak)), mfu_measured=_r(mfu(fl, ips, ceiling)),
                   timing=timing_verdict(warmup, st.reps, st.p20_ms, st.p80_ms, compiled, max_spread))
        if device.type == "cuda":
            row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            used = device_memory_used(device.index or 0)
            row["device_used_gib"] = round(used / 2**30, 2) if used is not None else None
            row.update(sampler.summary())
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM")
    except Exception as e:  # a lever that fails on this machine is a row, the sweep goes on
        if config is None:
            raise
        msg = str(e).strip().splitlines()
        row.update(status=f"error: {type(e).__name__}: {msg[0][:200] if msg else ''}")
        import traceback

        traceback.print_exc(limit=3)
    finally:
        del runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _r(x, nd: int = 4):
    return None if x is None else round(x, nd)


def largest_batch(m, name, mode, ratio, device, start: int, cap: int, **kw) -> dict | None:
    """Double the batch from `start` until OOM or `cap`; the last row that fit."""
    best, b = None, start
    while b <= cap:
        row = measure(m, name, mode, b, ratio, device, **kw)
        if row["status"] != "ok":
            break
        best, b = row, b * 2
    if best is not None:
        best = dict(best, batch_kind="largest")
    return best


def run_sweep(plan: list[tuple], device, warmup, reps, compile=False, data=None, max_batch: int = 0,
              jsonl: Path | None = None, max_spread: float | None = None
              ) -> tuple[list[dict], dict, float | None, float | None]:
    """plan: (model preset, mode, ratio, batch, batch_kind[, config]) tuples. Each row is appended to `jsonl`
    (when given) as soon as it is measured, so a run cut short keeps what it measured."""
    peak = datasheet_peak(device) if device.type == "cuda" else None
    ceiling = matmul_ceiling(device)
    models_cfg, rows = {}, []
    compiled_before = False
    measured: set[tuple] = set()
    disk_cache_warm = _inductor_cache_has_entries()
    for item in plan:
        preset, mode, ratio, batch, kind = item[:5]
        config = item[5] if len(item) > 5 else None
        name = SHORT.get(preset, preset)
        if config is not None and config.startswith("else:"):  # only when this model's previous row failed
            if not rows or rows[-1]["model"] != name or rows[-1]["status"] == "ok":
                continue
            config = config[5:]
        if config == "best":  # the fastest lever set that worked for this model so far in this process
            done = [r for r in rows if r["model"] == name and r["mode"] == "mae" and trusted(r) and r.get("config")]
            if not done:
                continue
            config = max(done, key=lambda r: r["img_per_s"] * 1.0)["config"]
        key = (name, mode, ratio, batch, kind, config)
        if config is not None and key in measured:  # a "best" that resolved to a row already measured
            continue
        measured.add(key)
        m = get_preset(preset).model
        models_cfg[name] = m
        stream = None
        if data:
            from pipelines import build_loader

            d = get_preset(preset).data
            d.path = data
            stream = build_loader(d, m.img_size, batch, device, 0).stream(0)
        kw = dict(warmup=warmup, reps=reps, peak=peak, ceiling=ceiling, compile=compile, stream=stream,
                  max_spread=max_spread)
        if config is not None:
            kw["config"] = config
        row = measure(m, name, mode, batch, ratio, device, **kw)
        row["batch_kind"] = kind
        compiles = (CONFIGS[config]["compile"] != "none") if config else bool(compile)
        if compiles:  # the first compiled row of a process pays the compilation (cold unless a disk cache is warm)
            row["compile_cache"] = ("warm" if compiled_before else
                                    "first in process, disk cache warm" if disk_cache_warm else "cold")
            compiled_before = True
        rows.append(row)
        if jsonl is not None:
            with open(jsonl, "a") as f:
                f.write(json.dumps({"row": row, "model_cfg": dataclasses.asdict(m), "peak": peak,
                                    "ceiling": ceiling}) + "\n")
        print(_fmt(row), flush=True)
        if max_batch and device.type == "cuda" and row["status"] == "ok" and kind == "same":
            best = largest_batch(m, name, mode, ratio, device, batch * 2, max_batch, **kw)
            if best is not None:
                rows.append(best)
                print(_fmt(best), flush=True)
    return rows, models_cfg, peak, ceiling


def _inductor_cache_has_entries() -> bool:
    """Whether torch.compile's on-disk cache already holds compiled code (then no row's compile is cold)."""
    import os

    d = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not d:
        try:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            d = cache_dir()
        except (ImportError, OSError):  # a private torch module: absent or moved in another version
            return False
    p = Path(d)
    return p.is_dir() and any(f.is_file() for f in p.rglob("*"))


def _fmt(r: dict) -> str:
    head = f"{r['model']:8s} {r['mode']:9s} r={r['mask_ratio']} batch {r['batch']:5d}" + (
        f" [{r['config']}]" if r.get("config") else "")
    if r.get("status") != "ok":
        return f"{head}: {r.get('status')}"
    phases = (f" (fwd {r['fwd_ms']:.2f} bwd {r['bwd_ms']:.2f} opt {r['opt_ms']:.2f})" if r.get("fwd_ms") is not None
              else " (one graph replay)")
    return (f"{head}: {r['img_per_s']:9.1f} img/s step {r['step_ms']:.2f} ms{phases} first step {r['first_step_s']} s"
            + (f" peak {r['peak_alloc_gib']} GiB" if r.get("peak_alloc_gib") is not None else "")
            + (f" [{r['timing']}]" if r.get("timing", "ok") != "ok" else ""))


def build_plan(models, modes, ratios, batch, device_suite: bool, speed_suite: str | bool = False,
               config: str | None = None) -> list[tuple]:
    plan = []
    if speed_suite:
        suite = SPEED_SUITES["full" if speed_suite is True else speed_suite]
        full = {v: k for k, v in SHORT.items()}
        for preset in models:
            short = SHORT.get(preset, preset)
            for mode, r, b, cfg in suite.get(short, []):
                plan.append((full.get(short, preset), mode, r, b, "same", cfg))
        return plan
    if device_suite:
        for short, same, big in DEVICE_SUITE:
            preset = {v: k for k, v in SHORT.items()}[short]
            for r in ratios:
                plan.append((preset, "mae", r, same, "same"))
            plan.append((preset, "mae_dense", 0.75, same, "same"))  # its cost does not depend on the ratio
            plan.append((preset, "vit", None, same, "same"))
            plan.append((preset, "mae", 0.75, big, "reference-batch"))
        return plan
    for preset in models:
        for mode in modes:
            for r in (ratios if mode != "vit" else [None]):
                plan.append((preset, mode, r, batch, "same") + ((config,) if config else ()))
    return plan

"""`mae profile`: throughput and memory per mask ratio for one config, with an optional torch.profiler
trace and a table of the top kernels by time, to see where a training step goes.

    mae profile --preset vit-b --batch 128 --ratios 0.5,0.75,0.9 --trace runs/prof
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine.cli.options import UserError, build_config
from engine.config import ConfigError
from engine.metrics import datasheet_peak, mfu, train_flops_per_image

from .common import fresh_peak, pick_device, RESULTS, device_tag, env_block, environment, md_table, today, write_csv
from .levers import CONFIGS
from .step_runner import NvmlSampler, StepRunner


def _self_time_us(ev, device: torch.device) -> float:
    """An op's self time on the device (CUDA) or the host (CPU), in us; torch >= 2.4 names it device time."""
    if device.type != "cuda":
        return getattr(ev, "self_cpu_time_total", 0) or 0
    for name in ("self_device_time_total", "self_cuda_time_total"):
        t = getattr(ev, name, None)
        if t:
            return t
    return 0


def top_kernels(prof, device: torch.device, top: int) -> tuple[str, list[dict]]:
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=top)
    except Exception:  # newer torch names it device time
        key = "self_device_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=top)
    rows = []
    for ev in sorted(prof.key_averages(), key=lambda e: _self_time_us(e, device), reverse=True)[:top]:
        rows.append({"name": ev.key[:80], "calls": ev.count, "self_ms_total": round(_self_time_us(ev, device) / 1000, 3)})
    return table, rows


# what a device kernel's name says it is (first match wins); names as cuBLAS / cuDNN / inductor / this project give them
CATEGORIES = (
    ("attention", ("flash", "fmha", "sdpa", "cudnn", "attention", "attn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "triton_tem_", "cublas", "sgemm", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("optimizer", ("multi_tensor", "adam", "_foreach")),
    ("masking / unshuffle / loss (Triton)", ("_masking_", "_unshuffle_", "_norm_pix_mse", "_sorted_ids")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("fused by the compile (Triton)", ("triton_",)),
    ("copy / cast / cat", ("copy", "cat", "memcpy", "memset", "fill", "to_copy", "clone")),
    ("reduction", ("reduce", "sum")),
    ("other elementwise", ("elementwise", "vectorized", "aten::")),
)
# CUPTI's own records (buffer management, overhead markers) appear among the device events; they are not kernel time
# (a 247 ms "Command Buffer Full" record once made up a large share of a step's "kernel" time)
NOT_KERNELS = ("command buffer full", "buffer request", "buffer flush", "cupti", "overhead", "lazy function loading",
               "runtime triggered module loading")


def kernel_category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def category_times(prof, device: torch.device, steps: int) -> list[dict]:
    """Device time per step by kernel category (CUDA: kernel events only, so nothing is counted twice; CPU: the
    ops' self time), largest first, with each category's share of the summed time."""
    from torch.autograd import DeviceType

    evs = list(prof.key_averages())
    if device.type == "cuda":
        evs = [e for e in evs if getattr(e, "device_type", None) == DeviceType.CUDA]
    totals: dict[str, float] = {}
    for e in evs:
        if any(k in e.key.lower() for k in NOT_KERNELS):
            continue
        t = _self_time_us(e, device)
        if t:
            cat = kernel_category(e.key)
            totals[cat] = totals.get(cat, 0.0) + t
    whole = sum(totals.values()) or 1.0
    return [{"category": c, "ms_per_step": round(t / 1000 / steps, 3), "share_pct": round(100 * t / whole, 1)}
            for c, t in sorted(totals.items(), key=lambda kv: -kv[1])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mae profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--ratios", default="0.5,0.75,0.9,0.95")
    ap.add_argument("--batch", type=int, default=0, help="default: the preset's train.batch_size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--trace", default="", help="directory for torch.profiler chrome traces (one per ratio)")
    ap.add_argument("--top", type=int, default=15, help="rows of the top-kernels table")
    ap.add_argument("--compile", action="store_true", help="whole-model torch.compile (see --config for the levers)")
    ap.add_argument("--config", default="", help=f"a lever set of mae bench speedup ({', '.join(CONFIGS)}); "
                    "overrides --compile")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(RESULTS))
    args, extra = ap.parse_known_args(argv)
    try:
        cfg = build_config(args.preset, extra)
        ratios = [float(r) for r in args.ratios.split(",") if r]
        from engine.config import check_mask_ratio

        for r in ratios:
            check_mask_ratio(r, cfg.model.num_patches)
        if args.config and args.config not in CONFIGS:
            raise ValueError(f"--config must be one of {', '.join(CONFIGS)}, got {args.config!r}")
    except (ConfigError, UserError, ValueError) as e:
        print(f"mae profile: error: {e}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    batch = args.batch or cfg.train.batch_size
    peak = datasheet_peak(device) if device.type == "cuda" else None
    env = environment(device)
    rows, sections, cat_rows = [], [], []
    for r in ratios:
        fresh_peak(device)
        levers = CONFIGS[args.config] if args.config else {"compile": args.compile}
        runner = StepRunner(cfg.model, "mae", batch, device, mask_ratio=r, **levers)
        sampler = NvmlSampler(device.index or 0)
        st = runner.run(warmup=args.warmup, reps=args.steps, sampler=sampler)
        ips = batch / (st.step_ms / 1000)
        fl = train_flops_per_image(cfg.model, r)
        def r3(x):  # a captured step (lever sets with graph) has no phase split
            return None if x is None else round(x, 3)

        row = {"config": args.config or ("compile" if args.compile else "eager"), "mask_ratio": r, "batch": batch, "visible": int(cfg.model.num_patches * (1 - r)),
               "img_per_s": round(ips, 1), "step_ms": round(st.step_ms, 3), "fwd_ms": r3(st.fwd_ms),
               "bwd_ms": r3(st.bwd_ms), "opt_ms": r3(st.opt_ms),
               "gflops_per_img": float(f"{fl / 1e9:.4g}"), "mfu_datasheet": mfu(fl, ips, peak)}
        if device.type == "cuda":
            row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            row.update(sampler.summary())
        rows.append(row)
        print(f"r={r}: {ips:.1f} img/s, step {st.step_ms:.2f} ms", flush=True)
        if args.trace:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            n_prof = 3
            with profile(activities=acts, profile_memory=True, record_shapes=False) as prof:
                for _ in range(n_prof):
                    runner.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            tdir = Path(args.trace)
            tdir.mkdir(parents=True, exist_ok=True)
            trace = tdir / f"trace_{cfg.preset}_r{r}.json"
            prof.export_chrome_trace(str(trace))
            table, top = top_kernels(prof, device, args.top)
            cats = category_times(prof, device, n_prof)
            for c in cats:
                cat_rows.append({"config": row["config"], "mask_ratio": r, "batch": batch, **c})
            if device.type == "cuda" and not cats:
                sections += ["No device kernel was recorded (a captured step's kernels may not be traced by this "
                             "profiler build): profile the same levers without the graph (e.g. triton+compile).", ""]
            sections += [f"## Top {args.top} ops by self time, mask ratio {r} ({n_prof} steps; trace {trace})", "",
                         md_table(top, ["name", "calls", "self_ms_total"]), "",
                         f"## Time per step by kernel category, mask ratio {r} ("
                         + ("device kernels" if device.type == "cuda" else "CPU ops' self time") + ")", "",
                         md_table(cats, ["category", "ms_per_step", "share_pct"]), ""]
            print(table)
        del runner
    tag = f"profile_{cfg.preset}_{device_tag(env)}_{today()}"
    out = Path(args.out)
    write_csv(rows, out / f"{tag}.csv")
    if cat_rows:  # time per step by kernel category, machine-readable beside the markdown
        write_csv(cat_rows, out / f"{tag}_categories.csv")
    lines = [f"# Profile of {cfg.preset} per mask ratio ({env.get('device')}, {env['date']})", "", env_block(env), "",
             md_table(rows, list(rows[0].keys()) if rows else []), ""] + sections
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

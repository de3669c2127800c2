"""`mae bench speedup`: what encoding only the visible patches buys, per model and mask ratio.

For each model and mask ratio, a full training step (forward, backward, fused AdamW) of
  mae        the MAE, encoder on the visible patches only;
  mae_dense  the same MAE with the encoder on all patches and mask tokens (the paper's baseline);
  vit        timm's dense supervised ViT of the same size (cross-entropy on random labels),
all at the same batch (and, with --max-batch, at the largest batch that fits), in one process, on
synthetic on-device input unless --data is given. Per row: img/s, step ms split into forward / backward
/ optimizer, peak memory (torch allocator and the device's used memory from pynvml), GPU utilisation and
power (pynvml), training FLOPs per image, MFU against the datasheet peak and against a matmul ceiling
measured in the same run, and the measured speedup next to its FLOP-ratio ceiling.

FLOPs: training = 6 x forward MACs per image; a ViT block of width d on T tokens costs
T*d*d*(4 + 2*mlp_ratio) + 2*T*T*d MACs (qkv, proj, MLP; QK^T and AV). The MAE encoder runs on
len_keep + 1 tokens (L + 1 in mae_dense), the decoder on L + 1; patch embedding, decoder embedding and the
pixel head are added. See engine/metrics.py.

Outputs: speedup_<gpu>_<date>.{csv,json,md} and .._imgs.png / .._memory.png in --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
from pathlib import Path

import torch

from engine.config import ConfigError, get_preset
from engine.metrics import datasheet_peak, device_memory_used, mfu

from .common import fresh_peak, pick_device, parse_choices, read_jsonl, RESULTS, device_tag, env_block, environment, md_table, today, write_csv, write_json
from .step import MODE_LABELS, MODES, NvmlSampler, StepRunner, flops_for_mode, matmul_ceiling

RATIOS = (0.5, 0.75, 0.9, 0.95)
# targets on one H100 (bf16, synthetic input); see ../DESIGN.md for the reference measurements
TARGETS = {"vit_h_img_s": 1700.0, "vit_l_img_s": 3000.0, "vit_b_img_s": 6000.0, "speedup_vit-h": 3.3,
           "speedup_vit-l": 2.9, "first_step_s": 30.0, "vit_h_b256_peak_gib": 42.8 * 0.85,
           "vit_h_vs_reference": 986.0 * 1.4}
SHORT = {"mae_vit_base_patch16": "vit-b", "mae_vit_large_patch16": "vit-l", "mae_vit_huge_patch14": "vit-h"}
# the device suite: (preset, same-batch for all modes, larger MAE-only batch as in DESIGN.md's table)
DEVICE_SUITE = (("vit-b", 256, 1024), ("vit-l", 128, 512), ("vit-h", 128, 256))


def speedup_ceiling(m, mask_ratio: float) -> float:
    """FLOP ratio of the encoder-on-all-patches MAE to the visible-only MAE: the ceiling of the speedup."""
    return flops_for_mode(m, "mae_dense", mask_ratio) / flops_for_mode(m, "mae", mask_ratio)


# lever sets: the reference's way (eager, torch ops, autocast) and each lever added in turn
CONFIGS = {
    "reference": {"kernels": "torch", "compile": "none", "graph": False},
    "triton": {"kernels": "auto", "compile": "none", "graph": False},
    "triton+compile": {"kernels": "auto", "compile": "regional", "graph": False},
    "fast": {"kernels": "auto", "compile": "regional", "graph": True},
    "fast+flash": {"kernels": "auto", "compile": "regional", "graph": True, "attention": "flash"},
    "fast+pure": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "bf16-pure"},
    "fast+pure+flash": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "bf16-pure",
                        "attention": "flash"},
    # attention as plain batched matmuls + softmax (fused by the compile): short sequences (65 tokens)
    "fast+math": {"kernels": "auto", "compile": "regional", "graph": True, "attention": "math"},
    # only the encoder's attention (65 tokens at ViT-H) as batched matmuls; the decoder's stays fused
    "fast+encmath": {"kernels": "auto", "compile": "regional", "graph": True, "attention": "encoder-math"},
    "fast+pure+encmath": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "bf16-pure",
                          "attention": "encoder-math"},
    # the encoder's attention in this project's Triton kernel (one program per batch and head, from the qkv output)
    "fast+enctriton": {"kernels": "auto", "compile": "regional", "graph": True, "attention": "encoder-triton"},
    "fast+pure+enctriton": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "bf16-pure",
                            "attention": "encoder-triton"},
    # memory for compute: the first 6 encoder blocks recomputed in backward
    "fast+ckpt6": {"kernels": "auto", "compile": "regional", "graph": True, "checkpoint_blocks": 6},
    # ... or the first 4 decoder blocks: at mask 0.75 a ViT-H decoder block frees 1.07 GiB at batch 256 against an
    # encoder block's 0.66 GiB, for two thirds of its compute (`mae bench memory`)
    "fast+dckpt4": {"kernels": "auto", "compile": "regional", "graph": True, "checkpoint_decoder_blocks": 4},
    "fast+pure+dckpt2": {"kernels": "auto", "compile": "regional", "graph": True, "precision": "bf16-pure",
                         "checkpoint_decoder_blocks": 2},
    # NVIDIA apex's fused LayerNorm in the eager blocks (against "triton"; an error row where apex is absent)
    "triton+apexln": {"kernels": "auto", "compile": "none", "graph": False, "layer_norm": "apex"},
    # apex FusedAdam instead of torch's fused AdamW (against "triton+compile"; it cannot be captured)
    "triton+compile+apexadam": {"kernels": "auto", "compile": "regional", "graph": False, "optimizer": "apex"},
    # inductor's GEMM autotuning with bias / GELU epilogues fused (minutes of compile: a separate section)
    "fast+autotune": {"kernels": "auto", "compile": "regional", "graph": True,
                      "compile_mode": "max-autotune-no-cudagraphs"},
}


def measure(m, model_name: str, mode: str, batch: int, ratio: float | None, device, warmup: int, reps: int,
            peak: float | None, ceiling: float | None, compile: bool | str = False, stream=None,
            config: str | None = None) -> dict:
    row = {"model": model_name, "mode": mode, "mask_ratio": ratio, "batch": batch}
    levers = {"compile": compile}
    if config is not None:
        row["config"] = config
        levers = CONFIGS[config]
    runner = None
    try:
        fresh_peak(device)
        runner = StepRunner(m, mode, batch, device, mask_ratio=ratio if ratio is not None else 0.0,
                            stream=stream, **levers)
        with NvmlSampler(device.index or 0) as sampler:
            st = runner.run(warmup=warmup, reps=reps)
        ips = batch / (st.step_ms / 1000)
        fl = flops_for_mode(m, mode, ratio if ratio is not None else 0.0)
        row.update(status="ok", img_per_s=round(ips, 1), step_ms=round(st.step_ms, 3), fwd_ms=_r(st.fwd_ms, 3),
                   bwd_ms=_r(st.bwd_ms, 3), opt_ms=_r(st.opt_ms, 3), p20_ms=round(st.p20_ms, 3),
                   p80_ms=round(st.p80_ms, 3), reps=st.reps, first_step_s=round(st.first_step_s, 2),
                   gflops_per_img=float(f"{fl / 1e9:.4g}"), tflops_per_s=float(f"{fl * ips / 1e12:.4g}"),
                   mfu_datasheet=_r(mfu(fl, ips, peak)), mfu_measured=_r(mfu(fl, ips, ceiling)))
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


def speedup_rows(rows: list[dict], models_cfg: dict) -> list[dict]:
    """Measured speedups next to their FLOP ceilings, per model, ratio and batch."""
    ok = {(r["model"], r["mode"], r["mask_ratio"], r["batch"], r.get("config"), r.get("run")): r for r in rows
          if r.get("status") == "ok" and r.get("batch_kind", "same") == "same"}
    out = []
    for (model, mode, ratio, batch, config, run), r in ok.items():
        if mode != "mae":
            continue
        m = models_cfg[model]
        # the baseline comes from the same run (process group on one machine) and lever set
        dense = ok.get((model, "mae_dense", ratio, batch, config, run)) or next(
            (v for k, v in ok.items() if k[0] == model and k[1] == "mae_dense" and k[3] == batch and k[4] == config
             and k[5] == run), None)
        # the conservative pairing: the fastest encoder-with-mask-tokens row of this run and batch, any lever set
        # (a lever that helps the visible-only encoder may slow the dense one down)
        bd = max((v for k, v in ok.items() if k[0] == model and k[1] == "mae_dense" and k[3] == batch
                  and k[5] == run), key=lambda v: v["img_per_s"], default=None)
        vit = ok.get((model, "vit", None, batch, config, run))
        row = {"model": model, "mask_ratio": ratio, "batch": batch, "mae_img_s": r["img_per_s"]}
        if config is not None:
            row["config"] = config
        if run is not None:
            row["run"] = run
        if dense:
            row.update(dense_img_s=dense["img_per_s"], speedup_vs_dense=round(r["img_per_s"] / dense["img_per_s"], 3),
                       dense_ratio_measured_at=dense["mask_ratio"])
        if bd:
            row.update(best_dense_img_s=bd["img_per_s"], best_dense_config=bd.get("config"),
                       speedup_vs_best_dense=round(r["img_per_s"] / bd["img_per_s"], 3))
        row["flop_ceiling_vs_dense"] = round(speedup_ceiling(m, ratio), 3)
        if vit:
            row.update(vit_img_s=vit["img_per_s"], speedup_vs_vit=round(r["img_per_s"] / vit["img_per_s"], 3),
                       flop_ceiling_vs_vit=round(flops_for_mode(m, "vit", 0) / flops_for_mode(m, "mae", ratio), 3))
        out.append(row)
    return out


def target_lines(rows: list[dict], sp: list[dict]) -> list[str]:
    lines = ["| target | goal | measured | met / gap |", "|---|---|---|---|"]

    def line(name, goal, val, higher=True):
        if val is None:
            lines.append(f"| {name} | {goal:g} | not measured | - |")
            return
        met = val >= goal if higher else val <= goal
        lines.append(f"| {name} | {goal:g} | {val:.4g} | {'met' if met else f'gap {abs(goal - val):.3g}'} |")

    def mae75(model):
        return [r for r in rows if r["model"] == model and r["mode"] == "mae" and r.get("mask_ratio") == 0.75
                and r.get("status") == "ok"]

    def best(rs):
        return max(rs, key=lambda r: r["img_per_s"], default=None)

    def tag(r):
        return f" ({r.get('config') or 'eager'}, batch {r['batch']})" if r else ""

    h = mae75("vit-h")
    for model, key, label in (("vit-h", "vit_h_img_s", "ViT-H/14"), ("vit-l", "vit_l_img_s", "ViT-L/16"),
                              ("vit-b", "vit_b_img_s", "ViT-B/16")):
        b = best(mae75(model))
        line(f"{label} r=0.75 img/s, best{tag(b)}", TARGETS[key], b["img_per_s"] if b else None)
    b = best(h)
    line(f"ViT-H/14 r=0.75 img/s vs the reference's 986 eager + 40%{tag(b)}", TARGETS["vit_h_vs_reference"],
         b["img_per_s"] if b else None)
    for model in ("vit-h", "vit-l"):
        sx = [x for x in sp if x["model"] == model and x["mask_ratio"] == 0.75 and "speedup_vs_best_dense" in x]
        bx = max(sx, key=lambda x: x["speedup_vs_best_dense"], default=None)
        label = (f" ({bx.get('config') or 'eager'} vs the dense baseline's fastest row, "
                 f"{bx.get('best_dense_config') or 'eager'}, batch {bx['batch']})") if bx else ""
        line(f"{model} speedup vs encoder-with-mask-tokens, same batch{label}",
             TARGETS[f"speedup_{model}"], bx["speedup_vs_best_dense"] if bx else None)
    cold = [r for r in h if r.get("compile_cache") in ("cold", "first in process")]  # the latter: older reports
    fs = min(cold or h, key=lambda r: r["first_step_s"], default=None)
    line("ViT-H/14 time to first step, s (build + compile + first step)" + tag(fs), TARGETS["first_step_s"],
         fs["first_step_s"] if fs else None, higher=False)
    b256 = [r for r in h if r["batch"] == 256 and r.get("peak_alloc_gib") is not None]
    bm = min(b256, key=lambda r: r["peak_alloc_gib"], default=None)
    line("ViT-H/14 batch 256 peak GiB, 15% under the reference's 42.8" + tag(bm), round(TARGETS["vit_h_b256_peak_gib"], 2),
         bm["peak_alloc_gib"] if bm else None, higher=False)
    return lines


def plots(rows: list[dict], out_prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, suffix in (("img_per_s", "images / s", "imgs"), ("peak_alloc_gib", "peak memory (GiB)", "memory")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for (model, mode, batch, config) in sorted({(r["model"], r["mode"], r["batch"], r.get("config") or "")
                                                    for r in rows}):
            pts = sorted((r["mask_ratio"], r.get(key)) for r in rows
                         if (r["model"], r["mode"], r["batch"], r.get("config") or "") == (model, mode, batch, config)
                         and r.get("status") == "ok" and r.get(key) is not None
                         and r.get("batch_kind", "same") == "same")
            if not pts:
                continue
            label = f"{model} {MODE_LABELS[mode]} (batch {batch}{', ' + config if config else ''})"
            if mode == "vit" or len(pts) == 1 and pts[0][0] is None:
                ax.axhline(pts[0][1], linestyle="--", linewidth=1, label=label, color=f"C{hash((model, mode)) % 10}")
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("mask ratio")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log" if key == "img_per_s" else "linear")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_prefix.parent / f"{out_prefix.name}_{suffix}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def run_sweep(plan: list[tuple], device, warmup, reps, compile=False, data=None, max_batch: int = 0,
              jsonl: Path | None = None) -> tuple[list[dict], dict, float | None, float | None]:
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
            done = [r for r in rows if r["model"] == name and r["mode"] == "mae" and r["status"] == "ok"
                    and r.get("config")]
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
        kw = dict(warmup=warmup, reps=reps, peak=peak, ceiling=ceiling, compile=compile, stream=stream)
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
            + (f" peak {r['peak_alloc_gib']} GiB" if r.get("peak_alloc_gib") is not None else ""))


def write_report(rows, sp, env, out: Path, peak, ceiling, name="speedup", runs: list[dict] | None = None) -> Path:
    tag = f"{name}_{device_tag(env)}_{today()}"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / f"{tag}.csv")
    write_json({"environment": env, "datasheet_peak_flops": peak, "matmul_ceiling_flops": ceiling,
                "rows": rows, "speedups": sp, "targets": TARGETS}, out / f"{tag}.json")
    pngs = plots(rows, out / tag)
    cols = ["model", "mode", "mask_ratio", "batch", "status", "img_per_s", "step_ms", "fwd_ms", "bwd_ms", "opt_ms",
            "peak_alloc_gib", "device_used_gib", "gpu_util_pct", "power_w", "gflops_per_img", "mfu_datasheet",
            "mfu_measured", "first_step_s"]
    if any(r.get("config") for r in rows):
        cols.insert(4, "config")
        cols.append("compile_cache")
    if runs:
        cols.insert(0, "run")
    lines = [f"# Visible-only MAE vs dense baselines ({env.get('device')}, {env['date']})", "", env_block(env), "",
             f"- datasheet bf16 peak: {peak / 1e12:.0f} TFLOP/s" if peak else "- datasheet peak: n/a (not a known GPU)",
             f"- measured bf16 matmul ceiling (8192^3): {ceiling / 1e12:.0f} TFLOP/s" if ceiling else
             "- matmul ceiling: n/a (CPU)", "",
             "Full training step (forward, backward, fused AdamW), median of timed steps after warm-up; "
             + ("CUDA events, bf16 (autocast, or bf16-pure where the config says pure)" if env.get("device") != "CPU"
                else "CPU wall clock, fp32")
             + "; synthetic on-device input unless stated. Training FLOPs = 6 x forward MACs; a block of width d "
             "on T tokens = T*d*d*(4 + 2*mlp_ratio) + 2*T*T*d MACs.", "",
             md_table(rows, cols), "", "## Speedup of visible-only encoding", "",
             md_table(sp, (["run"] if runs else []) + (["config"] if any(x.get("config") for x in sp) else []) + [
                 "model", "mask_ratio", "batch", "mae_img_s", "dense_img_s", "speedup_vs_dense",
                 "best_dense_config", "speedup_vs_best_dense", "flop_ceiling_vs_dense", "vit_img_s", "speedup_vs_vit",
                 "flop_ceiling_vs_vit"]),
             "", "## Targets (one H100, bf16, synthetic input)", ""] + target_lines(rows, sp)
    if runs:
        at = lines.index("## Speedup of visible-only encoding") - 2
        lines[at:at] = ["", ("Rows come from separate runs (column `run`); each run may be a different machine of "
                             "the same kind, so compare lever sets within one run. Speedups pair rows of the same "
                             "run:"), "",
                        md_table(runs, ["run", "file", "date", "device", "torch", "triton"]), ""]
    lines += ["", "Plots: " + ", ".join(p.name for p in pngs)] if pngs else []
    path = out / f"{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# the speed suite (issue targets): per model, the lever ladder at the reference's batch, then the same-batch
# visible-only vs encoder-with-mask-tokens pair with the fastest levers. The first row compiles (time to first
# step with compilation); graph rows come after the eager ones so a capture failure cannot hide them.
# "best": the fastest lever set measured so far for that model in the same process;
# "else:X": X, only when the model's previous row failed.
SPEED_SUITES = {
    # the whole ladder (benchmarks/device_check.sh section speed), most telling rows first in each model so a
    # time limit cuts the least: the compiled row (cold cache), the reference, the lever sets not yet measured
    # on a GPU, the same-batch pairs (the dense baseline also with plain `fast`: a lever that helps the
    # visible-only encoder may slow the dense one, and the target takes the dense baseline's fastest row)
    "full": {
        "vit-h": [("mae", 0.75, 256, "triton+compile"), ("mae", 0.75, 256, "reference"), ("mae", 0.75, 256, "fast"),
                  ("mae", 0.75, 256, "fast+pure"), ("mae", 0.75, 256, "fast+dckpt4"),
                  ("mae", 0.75, 256, "fast+enctriton"), ("mae", 0.75, 256, "fast+encmath"),
                  ("mae", 0.75, 256, "fast+pure+dckpt2"),
                  ("mae", 0.75, 256, "fast+pure+enctriton"), ("mae", 0.75, 128, "best"),
                  ("mae_dense", 0.75, 128, "best"), ("mae_dense", 0.75, 128, "fast"),
                  ("mae", 0.75, 128, "fast"), ("mae", 0.75, 256, "triton"), ("mae", 0.75, 256, "triton+apexln"),
                  ("mae", 0.75, 256, "triton+compile+apexadam"),
                  ("mae", 0.75, 256, "fast+pure+encmath"), ("mae", 0.75, 256, "fast+math"),
                  ("mae", 0.75, 256, "fast+flash"), ("mae", 0.75, 256, "fast+ckpt6")],
        # ViT-L's dense baseline also fits at batch 256 (ViT-H's does not on 80 GB): a second same-batch pair
        "vit-l": [("mae", 0.75, 512, "fast"), ("mae", 0.75, 512, "fast+enctriton"), ("mae", 0.75, 512, "fast+encmath"),
                  ("mae", 0.75, 256, "best"), ("mae_dense", 0.75, 256, "best"), ("mae_dense", 0.75, 256, "fast"),
                  ("mae", 0.75, 256, "fast"), ("mae", 0.75, 128, "best"), ("mae_dense", 0.75, 128, "best"),
                  ("mae_dense", 0.75, 128, "fast"), ("mae", 0.75, 128, "fast"), ("mae", 0.75, 512, "reference"),
                  ("mae", 0.75, 512, "fast+pure+enctriton")],
        "vit-b": [("mae", 0.75, 1024, "fast"), ("mae", 0.75, 1024, "fast+enctriton"),
                  ("mae", 0.75, 1024, "fast+encmath"), ("mae", 0.75, 1024, "reference")],
    },
    # only the newest levers and the targets' rows, for a short device call
    "new": {
        "vit-h": [("mae", 0.75, 256, "fast+enctriton"), ("mae", 0.75, 256, "fast+encmath"),
                  ("mae", 0.75, 256, "fast+dckpt4"), ("mae", 0.75, 256, "fast+pure"),
                  ("mae", 0.75, 256, "fast+pure+dckpt2"), ("mae", 0.75, 128, "best"),
                  ("mae_dense", 0.75, 128, "best"), ("mae_dense", 0.75, 128, "fast")],
        "vit-l": [("mae", 0.75, 512, "fast+enctriton"), ("mae", 0.75, 512, "fast+encmath")],
        "vit-b": [("mae", 0.75, 1024, "fast+enctriton"), ("mae", 0.75, 1024, "fast+encmath")],
    },
    # inductor's GEMM autotuning: minutes of compile per block shape, so a call of its own
    "autotune": {
        "vit-h": [("mae", 0.75, 256, "fast+autotune")],
        "vit-l": [("mae", 0.75, 512, "fast+autotune")],
    },
}


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


def merge(paths: list[str], out: Path) -> Path:
    """One report from the JSONL rows of several runs (e.g. one process per model on the GPU machine)."""
    rows, models_cfg, peak, ceiling, env, runs = [], {}, None, None, None, []
    from engine.config import ModelConfig

    for i, p in enumerate(paths):
        for rec in read_jsonl(p):
            if "environment" in rec:
                env = env or rec["environment"]
                if len(runs) <= i:
                    runs.append({"run": i + 1, "file": Path(p).name, **rec["environment"]})
                continue
            row = dict(rec["row"])
            if len(paths) > 1:
                row["run"] = i + 1
            rows.append(row)
            models_cfg[rec["row"]["model"]] = ModelConfig(**rec["model_cfg"])
            peak, ceiling = rec.get("peak") or peak, rec.get("ceiling") or ceiling
    if env is None:
        raise ValueError(f"no environment record in {', '.join(paths)}")
    return write_report(rows, speedup_rows(rows, models_cfg), env, out, peak, ceiling,
                        runs=runs if len(paths) > 1 else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mae bench speedup", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma list of presets (default: debug,tiny on CPU; vit-b,vit-l,vit-h on GPU)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--batch", type=int, default=0, help="same batch for every model and mode (default 32 CPU, 128 GPU)")
    ap.add_argument("--max-batch", type=int, default=0, help="also find the largest batch that fits, up to this (GPU)")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--compile", nargs="?", const="model", default="none", choices=("none", "regional", "model"),
                    help="torch.compile: the whole model (bare --compile) or each block (regional)")
    ap.add_argument("--config", default="", help=f"a lever set for every row: {', '.join(CONFIGS)} "
                    "(overrides --compile)")
    ap.add_argument("--speed-suite", nargs="?", const="full", default=None, choices=sorted(SPEED_SUITES),
                    help="the lever ladder and the speed targets' rows per model (GPU): full (default), new "
                    "(the newest levers) or autotune (GEMM autotuning, minutes of compile)")
    ap.add_argument("--jsonl", default="", help="append each row here as it is measured")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSONL",
                    help="write one report from the --jsonl files of earlier runs, measuring nothing")
    ap.add_argument("--data", default="", help="an image directory: include the data loader in the step")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--device-suite", action="store_true", help="the GPU suite of benchmarks/device_check.sh")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.merge:
        try:
            path = merge(args.merge, Path(args.out))
        except (OSError, ValueError, KeyError) as e:
            print(f"mae bench speedup: error: cannot merge: {e}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
        return 0
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    try:
        from engine.config import ALIASES

        models = [ALIASES.get(x, x) for x in (args.models or ("vit-b,vit-l,vit-h" if gpu else "debug,tiny")).split(",")]
        for mname in models:
            get_preset(mname)
        modes = parse_choices(args.modes, MODES, "mode(s)")
        if args.config and args.config not in CONFIGS:
            raise ConfigError(f"--config must be one of {', '.join(CONFIGS)}, got {args.config!r}")
        ratios = [float(x) for x in args.ratios.split(",") if x]
        for r in ratios:
            if not 0 <= r < 1:
                raise ConfigError(f"mask ratio {r} is outside [0, 1)")
    except (ConfigError, ValueError) as e:
        print(f"mae bench speedup: error: {e}", file=sys.stderr)
        return 2
    batch = args.batch or (128 if gpu else 32)
    warmup = args.warmup or (5 if gpu else 2)
    reps = args.reps or (20 if gpu else 5)
    plan = build_plan(models, modes, ratios, batch, args.device_suite and gpu, args.speed_suite,
                      args.config or None)
    env = environment(device)
    jsonl = Path(args.jsonl) if args.jsonl else None
    if jsonl is not None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(jsonl, "a") as f:
            f.write(json.dumps({"environment": env}) + "\n")
    compile_mode = {"none": False}.get(args.compile, args.compile)
    rows, models_cfg, peak, ceiling = run_sweep(plan, device, warmup, reps, compile_mode, args.data or None,
                                                args.max_batch, jsonl)
    sp = speedup_rows(rows, models_cfg)
    path = write_report(rows, sp, env, Path(args.out), peak, ceiling)
    for x in sp:
        if "speedup_vs_dense" in x:
            print(f"{x['model']} r={x['mask_ratio']} batch {x['batch']}: {x['speedup_vs_dense']:.2f}x vs encoder with "
                  f"mask tokens (FLOP ceiling {x['flop_ceiling_vs_dense']:.2f}x)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

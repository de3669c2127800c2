"""Reporting `mae bench speedup`: speedups beside their FLOP ceilings, the targets table, plots, and one report
(CSV, JSON, markdown) from the rows of one run or merged from the JSONL files of several."""

from __future__ import annotations

from pathlib import Path

from .common import device_tag, env_block, md_table, read_jsonl, today, write_csv, write_json
from .levers import REFERENCE_CONFIGS, TARGETS
from .step_runner import MODE_LABELS, flops_for_mode
from .sweep import trusted


def speedup_ceiling(m, mask_ratio: float) -> float:
    """FLOP ratio of the encoder-on-all-patches MAE to the visible-only MAE: the ceiling of the speedup."""
    return flops_for_mode(m, "mae_dense", mask_ratio) / flops_for_mode(m, "mae", mask_ratio)


def speedup_rows(rows: list[dict], models_cfg: dict) -> list[dict]:
    """Measured speedups next to their FLOP ceilings, per model, ratio and batch; only rows whose timing is
    trusted (sweep.trusted) enter. Against: the dense baseline with the same levers, the dense baseline's fastest
    row, the strongest reference way of training (eager or compiled whole, REFERENCE_CONFIGS) and the fastest
    dense supervised ViT, each from the same run and batch."""
    ok = {(r["model"], r["mode"], r["mask_ratio"], r["batch"], r.get("config"), r.get("run")): r for r in rows
          if trusted(r) and r.get("batch_kind", "same") == "same"}
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
        # the dense supervised ViT a user would pick: its fastest row of this run and batch (eager or compiled)
        vit = max((v for k, v in ok.items() if k[0] == model and k[1] == "vit" and k[3] == batch and k[5] == run),
                  key=lambda v: v["img_per_s"], default=None)
        # the paper's way of training, as strong as a user could make it: eager or the whole model compiled
        ref = max((v for k, v in ok.items() if k[0] == model and k[1] == "mae" and k[2] == ratio and k[3] == batch
                   and k[4] in REFERENCE_CONFIGS and k[5] == run), key=lambda v: v["img_per_s"], default=None)
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
        if ref and config not in REFERENCE_CONFIGS:
            row.update(strongest_reference_img_s=ref["img_per_s"], strongest_reference=ref.get("config"),
                       speedup_vs_strongest_reference=round(r["img_per_s"] / ref["img_per_s"], 3))
        if vit:
            row.update(vit_img_s=vit["img_per_s"], vit_config=vit.get("config"),
                       speedup_vs_vit=round(r["img_per_s"] / vit["img_per_s"], 3),
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
                and trusted(r)]

    def best(rs):
        return max(rs, key=lambda r: r["img_per_s"], default=None)

    def tag(r):
        return f" ({r.get('config') or 'eager'}, batch {r['batch']})" if r else ""

    h = mae75("vit-h")
    for model, key, label in (("vit-h", "vit_h_img_s", "ViT-H/14"), ("vit-l", "vit_l_img_s", "ViT-L/16"),
                              ("vit-b", "vit_b_img_s", "ViT-B/16")):
        b = best(mae75(model))
        line(f"{label} r=0.75 img/s, best{tag(b)}", TARGETS[key], b["img_per_s"] if b else None)
    # against the strongest way of running the paper's code measured in the same run and batch (eager, or the whole
    # model compiled as its users would), never a figure from another machine
    sh = [x for x in sp if x["model"] == "vit-h" and x["mask_ratio"] == 0.75 and "speedup_vs_strongest_reference" in x]
    bs = max(sh, key=lambda x: x["speedup_vs_strongest_reference"], default=None)
    line("ViT-H/14 r=0.75 speedup over the strongest reference way of the same run" + (
        f" ({bs.get('config')} {bs['mae_img_s']:g} vs {bs['strongest_reference']} {bs['strongest_reference_img_s']:g} "
        f"img/s, batch {bs['batch']})" if bs else ""), TARGETS["vit_h_vs_reference"],
         bs["speedup_vs_strongest_reference"] if bs else None)
    for model in ("vit-h", "vit-l"):
        sx = [x for x in sp if x["model"] == model and x["mask_ratio"] == 0.75 and "speedup_vs_best_dense" in x]
        bx = max(sx, key=lambda x: x["speedup_vs_best_dense"], default=None)
        label = (f" ({bx.get('config') or 'eager'} vs the dense baseline's fastest row, "
                 f"{bx.get('best_dense_config') or 'eager'}, batch {bx['batch']})") if bx else ""
        line(f"{model} speedup vs encoder-with-mask-tokens, same batch{label}",
             TARGETS[f"speedup_{model}"], bx["speedup_vs_best_dense"] if bx else None)
    # only a row that compiled with an empty cache shows what a user's first run waits (a warm cache hides compile)
    cold = [r for r in h if r.get("compile_cache") in ("cold", "first in process")]  # the latter: older reports
    fs = min(cold, key=lambda r: r["first_step_s"], default=None)
    line("ViT-H/14 time to first step with a cold compile cache, s (build + compile + first step)" + tag(fs),
         TARGETS["first_step_s"], fs["first_step_s"] if fs else None, higher=False)
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


def write_report(rows, sp, env, out: Path, peak, ceiling, name="speedup", runs: list[dict] | None = None) -> Path:
    tag = f"{name}_{device_tag(env)}_{today()}"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / f"{tag}.csv")
    write_json({"environment": env, "datasheet_peak_flops": peak, "matmul_ceiling_flops": ceiling,
                "rows": rows, "speedups": sp, "targets": TARGETS}, out / f"{tag}.json")
    pngs = plots(rows, out / tag)
    cols = ["model", "mode", "mask_ratio", "batch", "status", "img_per_s", "step_ms", "fwd_ms", "bwd_ms", "opt_ms",
            "peak_alloc_gib", "device_used_gib", "gpu_util_pct", "power_w", "gflops_per_img", "mfu_datasheet",
            "mfu_measured", "first_step_s", "timing"]
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
             "on T tokens = T*d*d*(4 + 2*mlp_ratio) + 2*T*T*d MACs. GPU utilisation and power are sampled over "
             "the timed steps only (not compilation or warm-up). `timing` is `ok` when the row was warmed up for "
             "its state (3 steps compiled or captured, 2 eager), timed over at least 5 steps with p80/p20 within the "
             "bound; other rows are marked `unstable` and left out of every speedup and target below. Speedups are "
             "against the strongest baseline of the same run and batch: the dense baseline's fastest row, the "
             "strongest reference way of training (eager or compiled whole), the fastest dense ViT.", "",
             md_table(rows, cols), "", "## Speedup of visible-only encoding", "",
             md_table(sp, (["run"] if runs else []) + (["config"] if any(x.get("config") for x in sp) else []) + [
                 "model", "mask_ratio", "batch", "mae_img_s", "dense_img_s", "speedup_vs_dense",
                 "best_dense_config", "speedup_vs_best_dense", "flop_ceiling_vs_dense", "strongest_reference",
                 "speedup_vs_strongest_reference", "vit_config", "vit_img_s", "speedup_vs_vit",
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

"""`mae ablate`: the paper's ablations at your own scale. For a preset, pretrain one model per setting of
mask ratio, decoder depth, decoder width and mask strategy, then probe each encoder, and write one table
(final loss, probe accuracy, img/s, peak memory) with a plot.

By default one factor varies at a time around the preset's values (the shape of the paper's Table 1);
--grid runs the full product.

    mae data digits data/digits
    mae ablate --preset debug --data data/digits/train --probe-train data/digits/train \
        --probe-val data/digits/val --mask-ratio 0.5,0.75,0.9 --mask-strategy random,block,grid --epochs 20
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

FACTORS = {"mask_ratio": ("model", "mask_ratio", float), "decoder_depth": ("model", "decoder_depth", int),
           "decoder_width": ("model", "decoder_embed_dim", int), "mask_strategy": ("model", "mask_strategy", str)}


def settings(base, values: dict[str, list], grid: bool) -> list[dict]:
    """The list of {factor: value} to run (always including the base setting)."""
    base_vals = {f: getattr(getattr(base, sec), attr) for f, (sec, attr, _) in FACTORS.items()}
    if grid:
        keys = [f for f in FACTORS if values.get(f)]
        return [dict(base_vals, **dict(zip(keys, combo))) for combo in itertools.product(*(values[k] for k in keys))]
    out = [dict(base_vals)]
    for f in FACTORS:
        for v in values.get(f, []):
            s = dict(base_vals, **{f: v})
            if s not in out:
                out.append(s)
    return out


def apply_setting(cfg, s: dict, run_dir: Path, extra: dict[str, str] | None = None):
    """A new config: `cfg` with the setting `s`, its run directory and `extra` overrides (validated as the command
    line is; `cfg` itself is left as it was). A decoder width its head count does not divide takes the most heads
    that do."""
    from ..config import apply_overrides

    over = {f"{sec}.{attr}": str(s[f]) for f, (sec, attr, _) in FACTORS.items()}
    width = s["decoder_width"]
    if width % cfg.model.decoder_num_heads:
        over["model.decoder_num_heads"] = str(max(h for h in (1, 2, 4, 8, 16) if width % h == 0))
    return apply_overrides(cfg, {**over, "train.run_dir": str(run_dir), **(extra or {})})


def name_of(s: dict) -> str:
    return f"r{s['mask_ratio']}_dd{s['decoder_depth']}_dw{s['decoder_width']}_{s['mask_strategy']}"


def run(args, extra) -> int:
    import torch

    from pipelines.labelled import LabelledLoader

    from .. import evaluate as ev
    from .options import build_config
    from ..metrics import read_metrics
    from ..trainer import Trainer

    base = build_config(args.preset, extra)
    vals = {f: [typ(x) for x in getattr(args, f).split(",") if x] for f, (_, _, typ) in FACTORS.items()}
    out = Path(args.out)
    rows = []
    quiet = {"train.vis_every": "0", "train.progress": "false", "train.ckpt_every": str(10**9),
             **({"data.path": args.data} if args.data else {}),
             **({"train.epochs": str(args.epochs)} if args.epochs else {})}
    for s in settings(base, vals, args.grid):
        cfg = apply_setting(base, s, out / "runs" / name_of(s), quiet)
        print(f"== {name_of(s)}", flush=True)
        trainer = Trainer(cfg, log=lambda *_: None)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        res = trainer.fit()
        recs = read_metrics(cfg.train.run_dir)
        row = dict(s, setting=name_of(s), steps=res.step, final_loss=round(res.last_loss, 4),
                   img_per_s=round(sum(r["img_per_s"] for r in recs[1:]) / max(1, len(recs) - 1), 1) if recs else None,
                   peak_mem_gib=round(torch.cuda.max_memory_allocated(trainer.device) / 2**30, 2)
                   if trainer.device.type == "cuda" else None)
        if args.probe_train and args.probe_val:
            d = dataclasses.replace(cfg.data, num_workers=args.workers)  # the probe's loaders only
            mae = trainer.model
            tr = LabelledLoader(args.probe_train, cfg.model.img_size, 256, d, 0, trainer.device, train=False)
            va = LabelledLoader(args.probe_val, cfg.model.img_size, 256, d, 0, trainer.device, train=False)
            row["knn_top1"] = round(ev.knn_eval(mae, tr, va, trainer.device).top1, 4)
            if args.probe_epochs:
                trl = LabelledLoader(args.probe_train, cfg.model.img_size, 128, d, 0, trainer.device, train=True)
                row["linprobe_top1"] = round(ev.linear_probe(mae, trl, va, trainer.device, epochs=args.probe_epochs,
                                                             base_lr=args.probe_lr, batch_size=128,
                                                             log=lambda *_: None).top1, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write(rows, out, args.preset)
    return 0


def write(rows: list[dict], out: Path, preset: str) -> None:
    from ..report import md_table, write_csv

    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "ablation.csv")
    cols = ["setting", "mask_ratio", "decoder_depth", "decoder_width", "mask_strategy", "steps", "final_loss",
            "knn_top1", "linprobe_top1", "img_per_s", "peak_mem_gib"]
    (out / "ablation.md").write_text(f"# Ablations of {preset}\n\n" + md_table(rows, cols) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "linprobe_top1" if any("linprobe_top1" in r for r in rows) else (
        "knn_top1" if any("knn_top1" in r for r in rows) else "final_loss")
    fig, axes = plt.subplots(1, len(FACTORS), figsize=(4 * len(FACTORS), 3.5))
    base = rows[0]
    for ax, f in zip(axes, FACTORS):
        pts = [(r[f], r.get(metric)) for r in rows
               if all(r[g] == base[g] for g in FACTORS if g != f) and r.get(metric) is not None]
        xs = [str(p[0]) for p in pts]
        ax.bar(xs, [p[1] for p in pts], color="C0")
        ax.set_title(f)
        ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=100)
    plt.close(fig)
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.csv'}, {out / 'ablation.png'}")


def register(sub) -> None:
    a = sub.add_parser("ablate", help="sweep mask ratio, decoder depth/width and mask strategy; one table + plot")
    a.add_argument("--preset", default="debug")
    a.add_argument("--data", default="", help="pretraining images (default: the embedded photographs)")
    a.add_argument("--probe-train", default="", help="labelled folder for the probes")
    a.add_argument("--probe-val", default="")
    a.add_argument("--mask-ratio", default="")
    a.add_argument("--decoder-depth", default="")
    a.add_argument("--decoder-width", default="")
    a.add_argument("--mask-strategy", default="")
    a.add_argument("--grid", action="store_true", help="the full product instead of one factor at a time")
    a.add_argument("--epochs", type=int, default=0)
    a.add_argument("--probe-epochs", type=int, default=0, help="also a linear probe of this many epochs")
    a.add_argument("--probe-lr", type=float, default=40.0)
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--out", default="runs/ablate")
    a.set_defaults(func=run, accepts_overrides=True)

"""`mae bench memory`: the peak GPU memory of a training step, estimated on any machine (no GPU needed).

Two full training steps (forward, backward, torch's fused AdamW; the second has the optimizer's state) run on
fake tensors (torch's FakeTensorMode: shapes, dtypes and autograd, no data and no arithmetic) under bf16
autocast with CUDA's casting policy, while a dispatch mode counts every storage the step allocates and frees,
rounded up to the CUDA caching allocator's 512-byte blocks. The peak is the most bytes alive at once: what
`torch.cuda.max_memory_allocated` reports for the eager step, less what no tensor op allocates (cuBLAS / cuDNN
workspaces, the allocator's block splitting). A ViT-H step at batch 256 is estimated in seconds on a CPU.

What it answers: which batch fits a given GPU, and what each memory lever (activation checkpointing of the
first N encoder or decoder blocks, bf16-pure, the attention path) buys, per model, mode and mask ratio.
What it does not model: torch.compile (it changes which tensors a block keeps for backward; a lever set with
compile is estimated as its eager equivalent and marked so), CUDA graphs (their pool holds the same tensors),
the Triton masking / loss kernels (estimated by their torch reference; at ViT-H batch 256 they were measured
0.8 GiB lighter). Fused attention ("auto" is cuDNN on an H100) keeps q, k, v, the output and its log-sum-exp.

Outputs: memory_estimate_<date>.{md,json} in --out; with --measured, the rows of `mae bench speedup` runs
(raw .jsonl) with the same model, mode, ratio, batch and lever set are set beside the estimate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from engine.config import ConfigError, get_preset
from engine.memory import MODES, estimate_step, largest_batch  # noqa: F401 - the estimator lives in the engine

from .common import RESULTS, environment, md_table, parse_choices, read_jsonl, today, write_json

def lever_kwargs(levers: dict) -> tuple[dict, str]:
    """estimate_step's keywords for a lever set of `mae bench speedup`, and what the estimate leaves out."""
    kw = {"precision": levers.get("precision", "autocast"), "attention": levers.get("attention", "auto"),
          "checkpoint_blocks": levers.get("checkpoint_blocks", 0),
          "checkpoint_decoder_blocks": levers.get("checkpoint_decoder_blocks", 0),
          "fp8_recipe": levers.get("fp8_recipe", "tensorwise")}
    left = []
    if levers.get("compile", "none") != "none":
        left.append("compile (estimated eager)")
    if levers.get("kernels", "torch") != "torch":
        left.append("Triton masking/loss (torch reference)")
    return kw, "; ".join(left)


def load_measured(paths: list[str]) -> dict:
    """(model, mode, mask_ratio, batch, config) -> measured peak_alloc_gib from `mae bench speedup` .jsonl files."""
    out = {}
    for p in paths:
        try:
            records = read_jsonl(p)
        except ValueError as e:
            raise ValueError(f"--measured {e}") from None
        for rec in records:
            r = rec.get("row") if isinstance(rec, dict) else None
            if r and r.get("status") == "ok" and r.get("peak_alloc_gib") is not None:
                out[(r["model"], r["mode"], float(r["mask_ratio"]), int(r["batch"]), r["config"])] = r["peak_alloc_gib"]
    return out


def _g(x: float) -> float:
    return float(f"{x:.4g}")


def _human(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.2f} MiB"


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"{what} must be a comma list of integers, got {text!r}") from None
    if not vals or min(vals) < 0:
        raise ValueError(f"{what} must be a comma list of integers >= 0, got {text!r}")
    return vals


def main(argv=None) -> int:
    from .levers import CONFIGS, SHORT

    ap = argparse.ArgumentParser(prog="mae bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vit-h", help="comma list of presets (vit-b, vit-l, vit-h or a preset name)")
    ap.add_argument("--modes", default="mae", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--ratios", default="0.75")
    ap.add_argument("--batch", default="256", help="comma list of batch sizes")
    ap.add_argument("--config", default="reference",
                    help=f"comma list of lever sets of mae bench speedup ({', '.join(CONFIGS)})")
    ap.add_argument("--encoder-ckpt", default="",
                    help="comma list: recompute the first N encoder blocks (overrides the lever set's)")
    ap.add_argument("--decoder-ckpt", default="",
                    help="comma list: recompute the first N decoder blocks (overrides the lever set's)")
    ap.add_argument("--budget-gib", type=float, default=0.0, help="mark each row as fitting under this many GiB or not")
    ap.add_argument("--largest-batch", type=int, default=0, metavar="CAP",
                    help="instead of --batch: the largest batch (multiple of 8, up to CAP) that fits --budget-gib")
    ap.add_argument("--measured", nargs="*", default=[], metavar="JSONL",
                    help="mae bench speedup raw rows to compare with")
    ap.add_argument("--append", action="store_true",
                    help="add the rows to today's report in --out instead of replacing it")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    try:
        presets = [get_preset(x) for x in args.models.split(",") if x]
        modes = parse_choices(args.modes, MODES, "mode")
        configs = parse_choices(args.config, list(CONFIGS), "lever set")
        ratios = [float(x) for x in args.ratios.split(",") if x]
        batches = _ints(args.batch, "--batch")
        if min(batches) < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch!r}")
        if args.largest_batch:
            if args.budget_gib <= 0:
                raise ValueError("--largest-batch needs --budget-gib (the GPU memory to fit, in GiB)")
            if args.largest_batch < 8:
                raise ValueError(f"--largest-batch must be >= 8, got {args.largest_batch}")
            batches = [None]
        enc = _ints(args.encoder_ckpt, "--encoder-ckpt") if args.encoder_ckpt else [None]
        dec = _ints(args.decoder_ckpt, "--decoder-ckpt") if args.decoder_ckpt else [None]
        measured = load_measured(args.measured)
        from engine.config import check_mask_ratio

        for cfg in presets:
            for r in ratios:
                check_mask_ratio(r, cfg.model.num_patches)
            for name, e, d in itertools.product(configs, enc, dec):  # before anything runs or is written
                lv = CONFIGS[name]
                for n, limit, what, flag in ((e, cfg.model.depth, "encoder", "--encoder-ckpt"),
                                             (d, cfg.model.decoder_depth, "decoder", "--decoder-ckpt")):
                    src = flag if n is not None else f"lever set {name}"
                    n = n if n is not None else lv.get(f"checkpoint{'' if what == 'encoder' else '_decoder'}_blocks", 0)
                    if n > limit:
                        raise ValueError(f"{src}: {n} recomputed {what} blocks is more than {cfg.preset}'s {limit}")
    except (ConfigError, ValueError) as e:
        print(f"mae bench memory: error: {e}", file=sys.stderr)
        return 2
    env = environment(None)
    rows = []
    for cfg, mode, r, b, name, e, d in itertools.product(presets, modes, ratios, batches, configs, enc, dec):
        kw, left = lever_kwargs(CONFIGS[name])
        if e is not None:
            kw["checkpoint_blocks"] = e
        if d is not None:
            kw["checkpoint_decoder_blocks"] = d
        model = SHORT.get(cfg.preset, cfg.preset)
        if b is None:
            b, est = largest_batch(cfg.model, mode, r, args.budget_gib, cap=args.largest_batch, **kw)
            if est is None:
                print(f"{model} {mode} r={r} {name}: batch 8 does not fit {args.budget_gib} GiB", flush=True)
                rows.append({"model": model, "mode": mode, "mask_ratio": r, "batch": 0, "config": name,
                             "encoder_ckpt": kw["checkpoint_blocks"], "decoder_ckpt": kw["checkpoint_decoder_blocks"],
                             "fits": "no (batch 8 does not fit)", "not_modelled": left or "-"})
                continue
        else:
            est = estimate_step(cfg.model, mode, b, r, **kw)
        row = {"model": model, "mode": mode, "mask_ratio": r, "batch": b, "config": name,
               "encoder_ckpt": kw["checkpoint_blocks"], "decoder_ckpt": kw["checkpoint_decoder_blocks"],
               "est_peak_gib": _g(est.peak_gib), "peak_phase": est.peak_phase,
               "resident_gib": _g(est.resident_gib), "activations_gib": _g(est.activations_gib),
               "not_modelled": left or "-"}
        got = measured.get((model, mode, r, b, name))
        own = (CONFIGS[name].get("checkpoint_blocks", 0), CONFIGS[name].get("checkpoint_decoder_blocks", 0))
        if got is not None and (kw["checkpoint_blocks"], kw["checkpoint_decoder_blocks"]) == own:
            row["measured_peak_gib"] = got
            row["est_minus_measured_gib"] = _g(est.peak_gib - got)
        if args.budget_gib:
            row["fits"] = "yes" if est.peak_gib <= args.budget_gib else "no"
        rows.append(row)
        print(f"{model} {mode} r={r} b={b} {name} enc_ckpt={row['encoder_ckpt']} dec_ckpt={row['decoder_ckpt']}: "
              f"{_human(est.peak_gib)} (peak in {est.peak_phase}; {est.seconds:.1f} s)", flush=True)
    out = Path(args.out)
    stem = f"memory_estimate_{today()}"
    import shlex

    commands = ["mae bench memory " + shlex.join(sys.argv[1:] if argv is None else argv)]
    if args.append and (out / f"{stem}.json").exists():
        try:
            old = json.loads((out / f"{stem}.json").read_text())
            rows, commands = old["rows"] + rows, old.get("commands", []) + commands
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            print(f"mae bench memory: error: --append: {out / stem}.json is not a report of this command ({e}); "
                  "nothing written", file=sys.stderr)
            return 2
    write_json({"environment": env, "commands": commands, "rows": rows}, out / f"{stem}.json")
    cols = [c for c in ("model", "mode", "mask_ratio", "batch", "config", "encoder_ckpt", "decoder_ckpt",
                        "est_peak_gib", "measured_peak_gib", "est_minus_measured_gib", "fits", "peak_phase",
                        "resident_gib", "activations_gib", "not_modelled") if any(c in r for r in rows)]
    text = (f"# Estimated peak GPU memory of a training step ({env['date']})\n\n"
            "Estimated on the CPU with fake tensors (shapes, no data, no arithmetic) under CUDA's bf16 autocast\n"
            "policy: the bytes of live tensors at the step's peak, as torch.cuda.max_memory_allocated counts them\n"
            "for the eager step on a GPU; library workspaces and allocator fragmentation are not in it. No GPU\n"
            f"figure. torch {torch.__version__}. See benchmarks/memory.py for what is and is not modelled.\n"
            "Commands (from the repository root):\n\n"
            + "".join(f"    {c}\n" for c in commands) + "\n" + md_table(rows, cols) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(f"wrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

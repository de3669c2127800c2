"""`mae bench scaling`: a model of data-parallel scaling with FSDP2 and with hybrid sharding (HSDP), from a measured
single-GPU step: per rank and step, the bytes each collective moves, its time at stated link bandwidths, how much
of it hides behind compute, and the expected img/s and scaling efficiency at 8 / 64 / 256 / 1,024 GPUs.

    mae bench scaling --rows benchmarks/results/speed_h100_2026-11-26_run1.jsonl --model vit-h --config triton+compile

Computed, not measured: a model to plan with, to be replaced by measurements on the machines a run will use.

The collectives (ring algorithms; P trainable parameters; S ranks per shard group, R = N / S replica groups):
  FSDP2 (S = N)   all-gather of bf16 parameters in forward and again in backward (reshard_after_forward):
                  2 x 2P (S-1)/S bytes per rank; reduce-scatter of fp32 gradients 4P (S-1)/S
  HSDP (S = GPUs per node)  the same inside the node, plus an all-reduce of the fp32 gradient shard across the R
                  groups: 2 x 4P/S x (R-1)/R bytes per rank over the inter-node link
The bytes are counted by default (`--bytes counted`: a rehearsal of each setup on a fake process group, FSDP2's
padding included); `--bytes formula` uses the formulas above.
Time: each GPU's share at the link it crosses (a ring spanning nodes runs at the inter-node bandwidth); overlap:
FSDP2 prefetches the next block's all-gather and reduce-scatters the previous block's gradients while a block
computes, so at most `--overlap` of the step's compute can hide communication and one block's collectives
(the first all-gather, the last reduce-scatter) never hide.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import RESULTS, md_table, today

# link bandwidths, per GPU and direction, with where the figure comes from
LINKS = {
    "nvlink": (450e9, "NVLink 4 on H100 SXM: 900 GB/s total bidirectional per GPU (NVIDIA H100 Tensor Core GPU "
                      "datasheet), 450 GB/s each way"),
    "ib": (50e9, "one 400 Gb/s InfiniBand NDR port per GPU (NVIDIA DGX H100: 8x ConnectX-7 400 Gb/s), 50 GB/s "
                 "each way"),
}
# what a collective reaches of the link's peak (NCCL bus bandwidth on large messages); an assumption, stated
EFFICIENCY = 0.8
PUBLISHED = [
    ("torchtitan, docs/performance.md (github.com/pytorch/torchtitan)", "Llama 3 8B, FSDP2 on 64 A100 80GB, local "
     "batch 1, selective activation checkpointing: 2,904-2,973 tokens/s per GPU, 56.8-58.2% MFU"),
    ("fms-fsdp, README (github.com/foundation-model-stack/fms-fsdp)", "Llama 2 7B, HSDP, no activation "
     "checkpointing: 3,700 tokens/s per GPU on 128 A100 (400 Gb/s) and 7,500 on 96 H100 (800 Gb/s)"),
]
GPUS = (8, 64, 256, 1024)


def trainable_params(preset: str) -> tuple[int, int]:
    """(trainable parameters, FSDP units: one per encoder and decoder block) of a preset."""
    import torch

    from engine.config import get_preset
    from engine.model import build_model

    m = get_preset(preset).model
    with torch.device("meta"):
        model = build_model(m)
    return sum(p.numel() for p in model.parameters() if p.requires_grad), m.depth + m.decoder_depth


def collective_bytes(params: int, world: int, shard: int) -> dict:
    """Bytes each rank sends (= receives) per step: intra-group all-gather + reduce-scatter, and across groups."""
    s, r = shard, world // shard
    frac = (s - 1) / s if s > 1 else 0.0
    ag = 2 * 2 * params * frac
    rs = 4 * params * frac
    ar = 2 * (4 * params / s) * (r - 1) / r if r > 1 else 0.0
    return {"all_gather": ag, "reduce_scatter": rs, "all_reduce_across": ar}


def counted_bytes(preset: str, world: int, shard: int, cache: dict | None = None) -> dict:
    """Bytes each rank sends per step, from the collectives a rehearsal of the job counts (`mae pretrain --dry-run`:
    the real sharding, FSDP2's padding included) with ring fractions: (S-1)/S of a gathered / reduce-scattered
    buffer, 2 (R-1)/R of an all-reduced one. A shard group's bytes do not depend on the number of replicas, so one
    rehearsal serves every world size with the same shard group (cached)."""
    from engine.config import apply_overrides, get_preset
    from engine.dryrun import rehearse

    r = world // shard
    key = (preset, shard, r > 1)
    if cache is None or key not in cache:
        cfg = apply_overrides(get_preset(preset), {"train.batch_size": "1", "parallel.replicate": str(2 if r > 1 else 1)})
        c = rehearse(cfg, shard * (2 if r > 1 else 1), 0, estimate_memory=False).collectives
        raw = {"all_gather": c.total("all_gather"), "reduce_scatter": c.total("reduce_scatter"),
               "all_reduce": c.bytes.get("all_reduce@replicate", 0)}
        if cache is not None:
            cache[key] = raw
    raw = cache[key] if cache is not None else raw
    frac = (shard - 1) / shard if shard > 1 else 0.0
    return {"all_gather": raw["all_gather"] * frac, "reduce_scatter": raw["reduce_scatter"] * frac,
            "all_reduce_across": 2 * raw["all_reduce"] * (r - 1) / r if r > 1 else 0.0}


def model_row(kind: str, world: int, gpus_per_node: int, params: int, units: int, step_s: float, batch: int,
              nvlink: float, ib: float, overlap: float, efficiency: float, counted: dict | None = None) -> dict:
    """One row of the model; `counted`: the bytes from counted_bytes (else the formula of collective_bytes)."""
    shard = world if kind == "FSDP2" else min(world, gpus_per_node)
    b = counted if counted is not None else collective_bytes(params, world, shard)
    intra_bw = (nvlink if shard <= gpus_per_node else ib) * efficiency  # a ring over nodes runs at the slow link
    t_intra = (b["all_gather"] + b["reduce_scatter"]) / intra_bw
    t_across = b["all_reduce_across"] / (ib * efficiency)
    t_comm = t_intra + t_across
    # hidden: up to `overlap` of the compute; never the first all-gather / last reduce-scatter (one unit's share),
    # and the cross-group all-reduce of the last gradients (FSDP2 issues it after the reduce-scatter)
    unexposed_floor = t_intra / units + t_across / units
    exposed = max(unexposed_floor, t_comm - overlap * step_s)
    step = step_s + exposed
    return {"setup": kind, "gpus": world, "shard_group": shard, "replicas": world // shard,
            "gb_intra": round((b["all_gather"] + b["reduce_scatter"]) / 1e9, 2),
            "gb_across": round(b["all_reduce_across"] / 1e9 if kind == "HSDP" else
                               ((b["all_gather"] + b["reduce_scatter"]) / 1e9 if shard > gpus_per_node else 0.0), 2),
            "comm_ms": round(t_comm * 1000, 1), "exposed_ms": round(exposed * 1000, 1),
            "step_ms": round(step * 1000, 1), "img_per_s": round(world * batch / step),
            "efficiency": round(step_s / step, 3), "no_overlap": round(step_s / (step_s + t_comm), 3)}


def measured_step(rows_path: str, model: str, config: str, mask: float = 0.75) -> dict:
    """The single-GPU row (mode mae) to start from, from a `mae bench speedup` .jsonl; the fastest matching row."""
    rows, env = [], {}
    for line in Path(rows_path).read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if isinstance(rec, dict) and rec.get("environment"):
            env = rec["environment"]
        r = rec.get("row") if isinstance(rec, dict) else None
        if r and r.get("status") == "ok" and r.get("model") == model and r.get("mode") == "mae" \
                and r.get("config") == config and float(r.get("mask_ratio", -1)) == mask:
            rows.append(dict(r, device=(rec.get("environment") or env).get("device")))
    if not rows:
        raise ValueError(f"no ok row of model {model}, mode mae, config {config}, mask {mask} in {rows_path}")
    return max(rows, key=lambda r: r["img_per_s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mae bench scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="benchmarks/results/speed_h100_2026-11-26_run1.jsonl",
                    help="a `mae bench speedup` .jsonl with the measured single-GPU step")
    ap.add_argument("--model", default="vit-h", help="the row's model (vit-b, vit-l, vit-h)")
    ap.add_argument("--config", default="triton+compile",
                    help="the row's lever set (FSDP2 runs regional compile, not the CUDA graph)")
    ap.add_argument("--batches", default="64", help="further per-GPU batches to model (step time scaled linearly)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--nvlink-gbs", type=float, default=LINKS["nvlink"][0] / 1e9)
    ap.add_argument("--ib-gbs", type=float, default=LINKS["ib"][0] / 1e9)
    ap.add_argument("--efficiency", type=float, default=EFFICIENCY, help="collective bandwidth / link peak")
    ap.add_argument("--overlap", type=float, default=0.8, help="share of the step's compute that can hide "
                    "communication")
    ap.add_argument("--bytes", choices=("counted", "formula"), default="counted",
                    help="counted: each setup's collectives counted by a rehearsal of the job on a fake process "
                         "group (`mae pretrain --dry-run`; about 20 s per shard-group size for ViT-H); formula: "
                         "2 x 2P (S-1)/S and 4P (S-1)/S from the parameter count (no padding)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    from engine.config import ALIASES

    try:
        row = measured_step(args.rows, args.model, args.config)
    except (OSError, ValueError) as e:
        print(f"mae bench scaling: error: {e}", file=sys.stderr)
        return 2
    preset = ALIASES.get(args.model, args.model)
    params, units = trainable_params(preset)
    step_s, batch = row["step_ms"] / 1000, int(row["batch"])
    nv, ib = args.nvlink_gbs * 1e9, args.ib_gbs * 1e9
    table, cache = [], {}
    for b in sorted({batch, *(int(x) for x in args.batches.split(",") if x)}, reverse=True):
        sb = step_s * b / batch  # compute taken as linear in the batch (an assumption below the measured batch)
        table += [dict(batch=b, **model_row(kind, n, args.gpus_per_node, params, units, sb, b, nv, ib, args.overlap,
                                            args.efficiency, counted=None if args.bytes == "formula" else
                                            counted_bytes(preset, n, n if kind == "FSDP2" else
                                                          min(n, args.gpus_per_node), cache)))
                  for n in GPUS for kind in ("FSDP2", "HSDP")]
    tag = f"scaling_{args.model}_{today()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps({"from_row": row, "params": params, "units": units,
                                                 "assumptions": vars(args), "rows": table}, indent=2))
    lines = [f"# Scaling model: {preset}, mask {row['mask_ratio']}, batch {batch} per GPU ({today()})", "",
             "**Computed, not measured.** A model to plan with; replace it with measurements on the machines a "
             "run will use.", "",
             f"Starting point (measured, one GPU): {row['img_per_s']:,.0f} img/s, step {row['step_ms']:.1f} ms, "
             f"lever set `{args.config}` on {row.get('device')}, from `{args.rows}`. {params / 1e6:.0f} M trainable "
             f"parameters in {units} FSDP units (blocks).", "",
             "Assumptions:", "",
             f"- NVLink {args.nvlink_gbs:.0f} GB/s per GPU each way: {LINKS['nvlink'][1]}",
             f"- InfiniBand {args.ib_gbs:.0f} GB/s per GPU each way: {LINKS['ib'][1]}",
             f"- collectives reach {args.efficiency:.0%} of a link's peak; at most {args.overlap:.0%} of the step's "
             f"compute hides communication, and one block's share never does; {args.gpus_per_node} GPUs per node; "
             "HSDP shards within a node and replicates across nodes (`--parallel.replicate NODES`)",
             "- the per-GPU batch stays as measured (weak scaling: the global batch grows with the GPUs)",
             ("- bytes per step: counted, not computed: each setup's collectives as a rehearsal of the job issues "
              "them (`mae pretrain --dry-run` on a fake process group: the real sharding with FSDP2's dim-0 padding), "
              "times the ring's (S-1)/S, or 2 (R-1)/R for the all-reduce across replicas" if args.bytes == "counted"
              else "- bytes per step: from the formula above (no padding)"), "",
             md_table(table, ["batch", "setup", "gpus", "shard_group", "replicas", "gb_intra", "gb_across", "comm_ms",
                              "exposed_ms", "step_ms", "img_per_s", "efficiency", "no_overlap"]), "",
             "gb_intra: GB each GPU sends per step inside its shard group (all-gather + reduce-scatter); gb_across: GB "
             "over the inter-node link (FSDP2 past one node: the whole of it; HSDP: the gradient all-reduce). efficiency: "
             "the one-GPU step over the modelled step; no_overlap: the same if nothing hid behind compute (the floor). "
             "Rows at a batch below the measured one scale its step linearly.", "",
             "Reading it: at ViT-H's 200 ms step the collectives fit behind compute either way while overlap works; "
             "what HSDP buys is the margin: 8x fewer bytes over InfiniBand, so a smaller per-GPU batch, a slower "
             "fabric or a poorly overlapped step still scales (compare no_overlap at batch 64).", "",
             "Published figures, for scale (other models and machines; not comparable row by row):", ""]
    lines += [f"- {what}: {src}" for src, what in PUBLISHED]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

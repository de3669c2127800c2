"""Single-GPU FSDP2 checks: FSDP2 (world size 1, bf16 MixedPrecisionPolicy) against plain single-device
training at the same batch, and peak memory against batch with and without activation checkpointing.
Adds a computed estimate of FSDP's collective volume per step and the interconnect it needs to scale.

    PYTHONPATH=. python3 -m benchmarks.fsdp --out benchmarks/results      # one GPU; no torchrun needed
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from engine.config import get_preset

from .common import fresh_peak, pick_device, RESULTS, device_tag, env_block, environment, md_table, today, write_json
from .step_runner import StepRunner


def ensure_process_group(device: torch.device) -> None:
    """A one-process group (FSDP2 needs one), as `--train.fsdp always` starts it."""
    import torch.distributed as dist

    from engine.parallel import init_distributed

    if not dist.is_initialized():
        init_distributed(str(device), fsdp="always")


def measure(preset, batch, device, fsdp, ac, warmup, reps) -> dict:
    """One row: the trainer's step (engine.step) on one process, with FSDP2 (world size 1) or without."""
    from engine.parallel import DistContext

    import torch.distributed as dist

    row = {"model": preset, "batch": batch, "fsdp": fsdp, "act_ckpt": ac}
    runner = None
    try:
        fresh_peak(device)
        ctx = DistContext(rank=0, world=dist.get_world_size() if dist.is_initialized() else 1, distributed=fsdp)
        runner = StepRunner(get_preset(preset).model, "mae", batch, device, 0.75, ctx=ctx,
                            activation_checkpointing=ac)
        st = runner.run(warmup=warmup, reps=reps)
        row.update(status="ok", img_per_s=round(batch / (st.step_ms / 1000), 1), step_ms=round(st.step_ms, 2))
        if device.type == "cuda":
            row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    finally:
        del runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(row, flush=True)
    return row


def comm_estimate(preset: str, world: int, step_s: float | None) -> list[str]:
    """Bytes each GPU moves per step under FSDP2 (ring collectives) and the bandwidth that hides them."""
    from engine.model import build_model

    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(get_preset(preset).model).parameters() if p.requires_grad)
    frac = (world - 1) / world
    ag = 2 * 2 * n * frac  # bf16 all-gather in forward and again in backward (reshard_after_forward)
    rs = 4 * n * frac  # fp32 reduce-scatter of gradients
    tot = ag + rs
    lines = [f"- trainable parameters: {n / 1e6:.0f} M; per GPU per step at world size {world}: "
             f"all-gather {ag / 1e9:.2f} GB (bf16, forward + backward) + reduce-scatter {rs / 1e9:.2f} GB (fp32) "
             f"= {tot / 1e9:.2f} GB"]
    if step_s:
        lines += [f"- at the measured single-GPU step of {step_s * 1000:.0f} ms: fully overlapped, the collectives need "
                  f"{tot / step_s / 1e9:.0f} GB/s per GPU; with no overlap at all, keeping scaling above 90% "
                  f"(exposed communication <= 10% of the step) needs {tot / (0.1 * step_s) / 1e9:.0f} GB/s per GPU"]
        for link, bw in (("NVLink 4 within an H100 SXM node, ~450 GB/s per direction", 450e9),
                         ("400 Gb/s InfiniBand per GPU across nodes, ~50 GB/s", 50e9)):
            t_comm = tot / bw
            lines.append(f"- {link}: the collectives take {t_comm * 1000:.1f} ms per step, "
                         f"{t_comm / step_s * 100:.0f}% of the step; scaling stays above 90% "
                         + ("even without overlap" if t_comm <= 0.1 * step_s else
                            "only if FSDP2's prefetch hides at least "
                            f"{(1 - 0.1 * step_s / t_comm) * 100:.0f}% of it behind compute"
                            + ("" if t_comm < step_s else " (impossible: communication outlasts the step; "
                               "raise the per-GPU batch)")))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mae bench fsdp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mae_vit_huge_patch14")
    ap.add_argument("--batch", type=int, default=128, help="batch of the FSDP vs single-device comparison")
    ap.add_argument("--memory-batches", default="256,512,1024", help="batches of the memory table")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--estimates", default="", metavar="JSON",
                    help="a `mae bench memory` report for the same preset (with --encoder-ckpt 0,DEPTH --decoder-ckpt "
                         "0,DEPTH and --largest-batch): its estimates are placed beside the measured peaks")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    estimates = []
    if args.estimates:
        import json

        try:
            estimates = json.loads(Path(args.estimates).read_text())["rows"]
        except (OSError, ValueError, KeyError) as e:
            print(f"mae bench fsdp: error: --estimates {args.estimates}: {e}", file=sys.stderr)
            return 2
    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # set_device and NCCL need an index
        torch.cuda.set_device(device)
    ensure_process_group(device)
    env = environment(device)
    single = measure(args.preset, args.batch, device, False, False, args.warmup, args.reps)
    fsdp = measure(args.preset, args.batch, device, True, False, args.warmup, args.reps)
    single2 = measure(args.preset, args.batch, device, False, False, args.warmup, args.reps)  # rerun baseline
    rows = [single, fsdp, single2]
    mem = []
    for b in [int(x) for x in args.memory_batches.split(",") if x]:
        for ac in (False, True):
            mem.append(measure(args.preset, b, device, True, ac, 2, 3))
    m = get_preset(args.preset).model

    def estimate(batch, ac, largest=False):
        """The estimator's peak (or largest fitting batch) for these settings: full checkpointing = every block."""
        want = (m.depth, m.decoder_depth) if ac else (0, 0)
        rows = [r for r in estimates if (int(r.get("encoder_ckpt", 0)), int(r.get("decoder_ckpt", 0))) == want
                and float(r.get("mask_ratio", 0.75)) == 0.75 and r.get("mode", "mae") == "mae"]
        if largest:
            return max((int(r["batch"]) for r in rows if r.get("fits") == "yes"), default=None)
        return next((r["est_peak_gib"] for r in rows if int(r["batch"]) == batch), None)

    for r in mem:
        r["estimate_gib"] = estimate(r["batch"], r["act_ckpt"])
    base = max((r.get("img_per_s", 0) for r in (single, single2)), default=0)
    cost = (1 - fsdp["img_per_s"] / base) if base and fsdp.get("img_per_s") else None
    step_s = (fsdp.get("step_ms") or 0) / 1000 or None
    tag = f"fsdp_{device_tag(env)}_{today()}"
    out = Path(args.out)
    write_json({"environment": env, "comparison": rows, "memory": mem, "fsdp_cost": cost}, out / f"{tag}.json")
    lines = [f"# FSDP2 on one device: {args.preset} ({env.get('device')}, {env['date']})", "", env_block(env), "",
             "MAE training step (mask 0.75, synthetic input, fused AdamW); FSDP2 with "
             "MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) plus autocast; single device with bf16 "
             "autocast over fp32 weights. Single device measured before and after FSDP (baseline rerun).", "",
             md_table(rows, ["model", "batch", "fsdp", "act_ckpt", "status", "img_per_s", "step_ms", "peak_alloc_gib"]),
             "", f"FSDP2 cost vs the better single-device run: {cost * 100:.1f}% (target <= 5%)" if cost is not None
             else "FSDP2 cost: not measured", "", "## Peak memory vs batch (FSDP2 + bf16)", "",
             md_table(mem, ["model", "batch", "act_ckpt", "status", "img_per_s", "peak_alloc_gib", "estimate_gib"]), "",
             "estimate_gib: `mae bench memory` (the single-device eager step on fake tensors, "
             f"{args.estimates or 'no --estimates given'}); FSDP2 adds bf16 parameter copies and keeps its own "
             "buffers, so its measured peak sits a little above the estimate.", ""]
    for ac in (False, True):
        ok = [r["batch"] for r in mem if r["act_ckpt"] == ac and r.get("status") == "ok"]
        oom = [r["batch"] for r in mem if r["act_ckpt"] == ac and r.get("status") == "OOM"]
        est = estimate(0, ac, largest=True)
        lines.append(f"- largest batch, activation checkpointing {'on' if ac else 'off'}: measured "
                     f"{max(ok) if ok else 'none'} ran" + (f", {min(oom)} ran out of memory" if oom else "")
                     + f"; the estimator's largest batch under its budget: {est if est else 'not given'}")
    lines += ["",
             "## Multi-GPU communication estimate (computed, not measured: one GPU here)", ""]
    lines += comm_estimate(args.preset, 8, step_s)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (tag + '.md')}")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Kernel benchmark in GPU time: Triton vs eager torch vs torch.compile for random masking (with the position
embedding folded in, as the model calls it), unshuffle (with the decoder's position embedding), the norm-pix loss
and the encoder's attention (from the qkv projection; eager = SDPA with PyTorch's kernel choice, compiled = the
batched-matmul path of train.attention=encoder-math) at ViT-B/L/H shapes, forward (under no_grad) and
forward+backward.

Per row: GPU time per call (many calls replayed from one CUDA graph, inputs rotated past the L2 cache; see
benchmarks/kernel_timing.py), the eager call's host time in its own column, effective GB/s (the minimum bytes the
op must move / GPU time) and that as a share of the measured device copy bandwidth; peak memory per op at ViT-H
batch 256.

    python -m benchmarks.kernels --out benchmarks/results            # GPU
    python -m benchmarks.kernels --shapes debug --impls eager        # CPU smoke run (wall clock, labelled CPU)

Reports: kernels_<gpu>_<date>.{csv,json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kernels.loss import norm_pix_mse_torch
from kernels.masking import len_keep_for, random_masking_torch, unshuffle_torch

from .common import RESULTS, device_tag, env_block, environment, md_table, parse_choices, pick_device, today, \
    write_csv, write_json
from .kernel_timing import copy_bandwidth, gpu_time, host_time, input_sets

SHAPES = {
    "debug": dict(N=8, img=32, p=4, D=64, Dd=32, r=0.75, H=4),
    "vit-b": dict(N=128, img=224, p=16, D=768, Dd=512, r=0.75, H=12),
    "vit-l": dict(N=128, img=224, p=16, D=1024, Dd=512, r=0.75, H=16),
    "vit-h": dict(N=128, img=224, p=14, D=1280, Dd=512, r=0.75, H=16),
}
# targets on one H100 at ViT-L shapes (GPU ms), against the reference measured there (DESIGN.md); and every
# memory-bound op at >= 70% of the measured copy bandwidth counting its minimum bytes
TARGETS_MS = {("masking", "fwd"): 0.03, ("unshuffle", "fwd"): 0.03, ("loss", "fwd+bwd"): 0.15}
TARGET_COPY_SHARE = 0.70
REFERENCE_MS = {("masking", "fwd"): (0.19, 0.10), ("unshuffle", "fwd"): (0.17, 0.056),
                ("loss", "fwd+bwd"): (0.76, 0.73)}
OPS = ("masking", "unshuffle", "loss", "loss_accum", "loss_recompute", "attention")
MEMORY_BOUND = ("masking", "unshuffle", "loss", "loss_accum", "loss_recompute")


def sdpa_from_qkv(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """timm's fused path from the qkv projection: split heads, scaled_dot_product_attention, merge heads."""
    b, n, c3 = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(b, n, c3 // 3)


def _impl_fns(impl: str):
    from kernels.attention import qkv_attention_torch

    if impl == "triton":
        from kernels.attention import qkv_attention_triton
        from kernels.loss import norm_pix_mse_triton
        from kernels.masking import random_masking_triton, unshuffle_triton

        return {"masking": random_masking_triton, "unshuffle": unshuffle_triton, "loss": norm_pix_mse_triton,
                "loss_recompute": lambda *a, **k: norm_pix_mse_triton(*a, grad_in_forward=False, **k),
                "attention": qkv_attention_triton}
    fns = {"masking": random_masking_torch, "unshuffle": unshuffle_torch, "loss": norm_pix_mse_torch,
           "attention": sdpa_from_qkv}
    if impl == "compiled":
        fns = {k: torch.compile(v, dynamic=False) for k, v in fns.items()}
        fns["attention"] = torch.compile(qkv_attention_torch, dynamic=False)  # encoder-math: matmuls + softmax
    return fns


def make_inputs(s: dict, device, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """One set of inputs at shape `s` (the model's dtypes: bf16 tokens and predictions, fp32 images and position
    embeddings, noise and mask from one masking)."""
    n, img, p, d, dd, r = s["N"], s["img"], s["p"], s["D"], s["Dd"], s["r"]
    length = (img // p) ** 2
    k = len_keep_for(length, r)
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.rand(n, length, device=device, generator=g)
    _, mask, ids_restore, _ = random_masking_torch(torch.zeros(n, length, 1, device=device), r, noise)
    return dict(
        x=torch.randn(n, length, d, device=device, dtype=dtype, generator=g).requires_grad_(),
        pos=torch.randn(1, length, d, device=device, generator=g),
        noise=noise, r=r, k=k, length=length,
        xd=torch.randn(n, k + 1, dd, device=device, dtype=dtype, generator=g).requires_grad_(),
        dpos=torch.randn(1, length + 1, dd, device=device, generator=g),
        ids_restore=ids_restore, mask=mask, count=n * (length - k),
        mask_token=torch.zeros(1, 1, dd, device=device).normal_(generator=g).requires_grad_(),
        imgs=torch.randn(n, 3, img, img, device=device, generator=g),
        pred=torch.randn(n, length, p * p * 3, device=device, dtype=dtype, generator=g).requires_grad_(),
        p=p,
        heads=s["H"],
        qkv=torch.randn(n, k + 1, 3 * d, device=device, dtype=dtype, generator=g).requires_grad_(),
    )


def op_calls(op: str, fns: dict, a: dict):
    """(forward-only callable, forward+backward callable, min bytes fwd, min bytes fwd+bwd) for one input set.
    Forward calls run under no_grad (no gradient is computed); backward calls use autograd.grad (nothing
    accumulates across calls)."""
    es = a["x"].element_size()
    n, length, k = a["x"].shape[0], a["length"], a["k"]
    if op == "masking":  # x + pos, keep K rows (the model's call)
        d = a["x"].shape[-1]
        f = fns["masking"]
        out_es = torch.empty((), dtype=torch.result_type(a["x"], a["pos"])).element_size()
        gout = torch.ones(n, k, d, device=a["x"].device, dtype=torch.result_type(a["x"], a["pos"]))

        def fwd():
            with torch.no_grad():
                return f(a["x"], a["r"], a["noise"], pos=a["pos"])

        def fwdbwd():
            return torch.autograd.grad(f(a["x"], a["r"], a["noise"], pos=a["pos"])[0], a["x"], gout)

        b_fwd = n * k * d * (es + out_es) + length * d * 4 + n * length * (4 + 4 + 8) + n * k * 8
        return fwd, fwdbwd, b_fwd, b_fwd + n * k * d * out_es + n * length * (8 + d * es)
    if op == "unshuffle":  # with mask tokens, + the decoder's position embedding
        d = a["xd"].shape[-1]
        f = fns["unshuffle"]
        gout = torch.ones(n, length + 1, d, device=a["xd"].device, dtype=a["xd"].dtype)

        def fwd():
            with torch.no_grad():
                return f(a["xd"], a["ids_restore"], a["mask_token"], True, pos=a["dpos"])

        def fwdbwd():
            out = f(a["xd"], a["ids_restore"], a["mask_token"], True, pos=a["dpos"])
            return torch.autograd.grad(out, (a["xd"], a["mask_token"]), gout)

        b_fwd = n * (k + 1) * d * es + n * length * 8 + (length + 1) * d * 4 + n * (length + 1) * d * es
        b_bwd = n * (length + 1) * d * es + n * length * 8 + n * (k + 1) * d * es + d * 4
        return fwd, fwdbwd, b_fwd, b_fwd + b_bwd
    if op == "attention":  # the encoder's: K + 1 visible tokens
        f, h = fns["attention"], a["heads"]
        t, c = a["qkv"].shape[1], a["qkv"].shape[2] // 3
        scale = (c // h) ** -0.5
        gout = torch.ones(n, t, c, device=a["qkv"].device, dtype=a["qkv"].dtype)

        def fwd():
            with torch.no_grad():
                return f(a["qkv"], h, scale)

        def fwdbwd():
            return torch.autograd.grad(f(a["qkv"], h, scale), a["qkv"], gout)

        b_fwd = n * t * 4 * c * es  # read q, k, v; write the output
        return fwd, fwdbwd, b_fwd, b_fwd + n * t * 8 * c * es  # + read q, k, v, out, dout; write dq, dk, dv
    # the loss: as the model calls it (the removed count known); loss_accum: a grad_output of 0.5 (accumulation
    # over two micro-batches), which the backward must apply
    f = fns["loss_recompute" if op == "loss_recompute" else "loss"]
    pdim = a["pred"].shape[-1]
    go = torch.full((), 0.5 if op == "loss_accum" else 1.0, device=a["pred"].device)
    removed = a["count"] / (n * length)

    def fwd():
        with torch.no_grad():
            return f(a["imgs"], a["pred"], a["mask"], a["p"], mask_count=a["count"])

    def fwdbwd():
        return torch.autograd.grad(f(a["imgs"], a["pred"], a["mask"], a["p"], mask_count=a["count"]), a["pred"], go)

    b_fwd = int(removed * (a["imgs"].numel() * a["imgs"].element_size() + n * length * pdim * es)) + n * length * 4
    return fwd, fwdbwd, b_fwd, b_fwd + n * length * pdim * es  # + the gradient, written once


def peak_extra_mib(fn, device) -> float:
    """Peak memory allocated during fn() above what was allocated before it, MiB."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run(shapes: list[str], impls: list[str], device: torch.device, reps: int, warmup: int,
        copy_gbs: float | None = None) -> tuple[list[dict], list[dict]]:
    rows, mem_rows = [], []
    for shape in shapes:
        s = SHAPES[shape]
        first = make_inputs(s, device)
        for impl in impls:
            try:
                fns = _impl_fns(impl)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"skip {impl}: {e}", file=sys.stderr)
                continue
            ops = [o for o in OPS if o in fns or o == "loss_accum"]
            for op in ops:
                _, _, b_fwd, b_fb = op_calls(op, fns, first)
                for mode, idx, nbytes in (("fwd", 0, b_fwd), ("fwd+bwd", 1, b_fb)):
                    if op in ("loss_accum", "loss_recompute") and mode == "fwd":
                        continue  # the same forward as "loss"
                    sets = [first] + [make_inputs(s, device, seed=i) for i in range(1, input_sets(nbytes, device))]
                    calls = [op_calls(op, fns, a)[idx] for a in sets]
                    try:
                        t = gpu_time(calls, device, reps=reps, warmup=warmup)
                        host = host_time(calls[0], device)
                    except Exception as e:  # noqa: BLE001 - e.g. a compile failure: a row with its error
                        rows.append({"shape": shape, "N": s["N"], "op": op, "mode": mode, "impl": impl,
                                     "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:150]}"})
                        continue
                    gbs = nbytes / t.median_ms / 1e6
                    row = {"shape": shape, "N": s["N"], "op": op, "mode": mode, "impl": impl, "status": "ok",
                           "gpu_ms": round(t.median_ms, 4), "p20_ms": round(t.p20_ms, 4),
                           "p80_ms": round(t.p80_ms, 4), "host_ms": round(host, 4),
                           "GB_per_s": float(f"{gbs:.4g}"), "min_MB": round(nbytes / 1e6, 2), "min_bytes": int(nbytes),
                           "timing": t.method}
                    if copy_gbs and op in MEMORY_BOUND:
                        row["pct_of_copy"] = round(100 * gbs / copy_gbs, 1)
                    rows.append(row)
                    print(f"{shape:6s} {op:15s} {mode:8s} {impl:9s} gpu {t.median_ms:8.4f} ms host {host:8.4f} ms "
                          f"{gbs:8.1f} GB/s [{t.method}]", flush=True)
                    del sets, calls
    if device.type == "cuda" and "vit-h" in SHAPES:
        s = dict(SHAPES["vit-h"], N=256)
        a = make_inputs(s, device)
        for impl in [i for i in impls if i in ("eager", "triton")]:
            fns = _impl_fns(impl)
            for op in ("masking", "unshuffle", "loss"):
                _, fwdbwd, _, _ = op_calls(op, fns, a)
                fwdbwd()
                mem_rows.append({"shape": "vit-h", "N": 256, "op": op, "impl": impl,
                                 "peak_extra_MiB": round(peak_extra_mib(fwdbwd, device), 1)})
    return rows, mem_rows


def target_lines(rows: list[dict], copy_gbs: float | None) -> list[str]:
    vl = {(r["op"], r["mode"], r["impl"]): r for r in rows if r["shape"] == "vit-l" and r.get("status") == "ok"}
    if not vl:
        return []
    lines = ["", "## Targets at ViT-L shapes (one H100, GPU time)", "",
             "| op | mode | target ms | triton GPU ms | triton host ms | eager GPU ms | compiled GPU ms | "
             f"triton % of copy (target {TARGET_COPY_SHARE:.0%}) | reference eager / compiled (H100, DESIGN.md) | "
             "met |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, mode), target in TARGETS_MS.items():
        tri = vl.get((op, mode, "triton"))
        ref = REFERENCE_MS[(op, mode)]
        if tri is None:
            met = "not measured"
        else:
            share = tri.get("pct_of_copy")
            ok_t = tri["gpu_ms"] <= target
            ok_b = share is not None and share >= 100 * TARGET_COPY_SHARE
            met = "yes" if ok_t and ok_b else "no (" + ", ".join(
                ([f"{tri['gpu_ms'] - target:.3f} ms over"] if not ok_t else [])
                + ([f"{share}% of copy" if share is not None else "no copy bandwidth"] if not ok_b else [])) + ")"

        def cell(impl, key="gpu_ms"):
            r = vl.get((op, mode, impl))
            return r[key] if r and key in r else "-"

        lines.append(f"| {op} | {mode} | {target} | {cell('triton')} | {cell('triton', 'host_ms')} | "
                     f"{cell('eager')} | {cell('compiled')} | {cell('triton', 'pct_of_copy')} | {ref[0]} / {ref[1]} | "
                     f"{met} |")
    lines.append("")
    lines.append("The DESIGN.md reference times were taken as one call between two events (host time included); "
                 "they are not GPU time and are shown for the record only.")
    return lines


def report(rows, mem_rows, env, out: Path, copy_gbs: float | None = None) -> Path:
    tag = f"kernels_{device_tag(env)}_{today()}"
    write_csv(rows, out / f"{tag}.csv")
    write_json({"environment": env, "copy_GB_per_s": copy_gbs, "rows": rows, "memory": mem_rows}, out / f"{tag}.json")
    gpu = env.get("device") != "CPU"
    lines = [f"# Kernel benchmark ({env.get('device')}, {env['date']})", "", env_block(env), "",
             ("GPU time per call: many calls replayed from one CUDA graph, cycling through enough input copies to "
              "exceed the L2 cache three times (do_bench with its L2 flush where an op cannot be captured); host_ms "
              "is the eager call's host time (launch, autograd, allocation), its own column. "
              if gpu else "CPU wall clock per call (no GPU figure). ")
             + "GB/s is the minimum traffic of the op over the GPU time. Tokens and predictions bf16, images and "
             "position embeddings fp32, mask ratio 0.75; the loss is called with the removed count as the model "
             "calls it (loss_accum: with grad_output 0.5, as under accumulation); forward rows run under no_grad.",
             ""]
    if copy_gbs:
        lines += [f"Measured device copy bandwidth (1 GiB, read + write): {copy_gbs:.0f} GB/s; pct_of_copy is each "
                  "memory-bound op's GB/s against it.", ""]
    lines += [md_table(rows, ["shape", "N", "op", "mode", "impl", "status", "gpu_ms", "p20_ms", "p80_ms", "host_ms",
                              "GB_per_s", "pct_of_copy", "timing"])]
    lines += target_lines(rows, copy_gbs)
    if mem_rows:
        saved = {}
        for r in mem_rows:
            saved.setdefault(r["op"], {})[r["impl"]] = r["peak_extra_MiB"]
        lines += ["", "## Peak memory per op, fwd+bwd, ViT-H/14 batch 256 (MiB above the inputs)", "",
                  md_table(mem_rows, ["shape", "N", "op", "impl", "peak_extra_MiB"])]
        tot = sum(v.get("eager", 0) - v.get("triton", 0) for v in saved.values())
        lines += ["", f"Saved per step by the Triton kernels (sum over the three ops): {tot:.0f} MiB."]
    path = out / f"{tag}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compile-only" in argv:  # compiled ahead of time for sm_80/90/100, no GPU (benchmarks/kernels_compiled.py)
        import os
        import subprocess

        rest = [a for a in argv if a != "--compile-only"]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter never compiles
        return subprocess.call([sys.executable, "-m", "benchmarks.kernels_compiled", *rest], env=env)
    ap = argparse.ArgumentParser(prog="mae bench kernels", description=__doc__.split("\n\n")[0],
                                 epilog="--compile-only: compile every kernel for sm_80 / sm_90 / sm_100 on this "
                                        "machine (no GPU) and report registers, spills, shared memory and "
                                        "occupancy; see python -m benchmarks.kernels_compiled --help")
    ap.add_argument("--shapes", default="vit-b,vit-l,vit-h", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--impls", default="triton,eager,compiled", help="comma list of triton, eager, compiled")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reps", type=int, default=20, help="graph replays (each of ~50 calls) per row")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    try:
        shapes = parse_choices(args.shapes, SHAPES, "shape(s)")
        impls = parse_choices(args.impls, ("triton", "eager", "compiled"), "impl(s)")
    except ValueError as e:
        print(f"mae bench kernels: error: {e}", file=sys.stderr)
        return 2
    if device.type == "cpu" and "triton" in impls:
        print("note: Triton kernels need CUDA for timing; skipping impl 'triton' on CPU", file=sys.stderr)
        impls.remove("triton")
    env = environment(device)
    copy_gbs = copy_bandwidth(device)
    if copy_gbs:
        print(f"device copy bandwidth: {copy_gbs:.0f} GB/s", flush=True)
    rows, mem_rows = run(shapes, impls, device, args.reps, args.warmup, copy_gbs)
    path = report(rows, mem_rows, env, Path(args.out), copy_gbs)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Kernel benchmark: Triton vs eager torch vs torch.compile for random masking, unshuffle, the
norm-pix loss and the encoder's attention (from the qkv projection; eager = SDPA with PyTorch's kernel choice,
compiled = the batched-matmul path of train.attention=encoder-math) at ViT-B/L/H shapes, forward and
forward+backward; median ms, 20/80 quantiles, effective
GB/s (minimum bytes an op must move / time), and peak memory per op at ViT-H batch 256.

    python -m benchmarks.kernels --out benchmarks/results            # GPU
    python -m benchmarks.kernels --shapes debug --impls eager        # CPU smoke run

Reports: kernels_<gpu>_<date>.{csv,json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kernels.loss import norm_pix_mse_torch
from kernels.masking import len_keep_for, random_masking_torch, unshuffle_torch

from .common import pick_device, parse_choices, RESULTS, device_tag, env_block, environment, md_table, time_fn, today, write_csv, write_json

SHAPES = {
    "debug": dict(N=8, img=32, p=4, D=64, Dd=32, r=0.75, H=4),
    "vit-b": dict(N=128, img=224, p=16, D=768, Dd=512, r=0.75, H=12),
    "vit-l": dict(N=128, img=224, p=16, D=1024, Dd=512, r=0.75, H=16),
    "vit-h": dict(N=128, img=224, p=14, D=1280, Dd=512, r=0.75, H=16),
}
# targets on one H100 at ViT-L shapes (ms), against the reference measured there (DESIGN.md)
TARGETS_MS = {("masking", "fwd"): 0.03, ("unshuffle", "fwd"): 0.03, ("loss", "fwd+bwd"): 0.15}
REFERENCE_MS = {("masking", "fwd"): (0.19, 0.10), ("unshuffle", "fwd"): (0.17, 0.056),
                ("loss", "fwd+bwd"): (0.76, 0.73)}


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

        return {"masking": random_masking_triton, "unshuffle": unshuffle_triton,
                "loss": norm_pix_mse_triton,
                "loss_recompute": lambda *a: norm_pix_mse_triton(*a, grad_in_forward=False),
                "attention": qkv_attention_triton}
    fns = {"masking": random_masking_torch, "unshuffle": unshuffle_torch, "loss": norm_pix_mse_torch,
           "attention": sdpa_from_qkv}
    if impl == "compiled":
        fns = {k: torch.compile(v, dynamic=False) for k, v in fns.items()}
        fns["attention"] = torch.compile(qkv_attention_torch, dynamic=False)  # encoder-math: matmuls + softmax
    return fns


def make_inputs(s: dict, device, dtype=torch.bfloat16) -> dict:
    n, img, p, d, dd, r = s["N"], s["img"], s["p"], s["D"], s["Dd"], s["r"]
    length = (img // p) ** 2
    k = len_keep_for(length, r)
    g = torch.Generator(device=device).manual_seed(0)
    noise = torch.rand(n, length, device=device, generator=g)
    _, mask, ids_restore, _ = random_masking_torch(torch.zeros(n, length, 1, device=device), r, noise)
    return dict(
        x=torch.randn(n, length, d, device=device, dtype=dtype, generator=g).requires_grad_(),
        noise=noise, r=r, k=k, length=length,
        xd=torch.randn(n, k + 1, dd, device=device, dtype=dtype, generator=g).requires_grad_(),
        ids_restore=ids_restore, mask=mask,
        mask_token=torch.zeros(1, 1, dd, device=device).normal_(generator=g).requires_grad_(),
        imgs=torch.randn(n, 3, img, img, device=device, generator=g),
        pred=torch.randn(n, length, p * p * 3, device=device, dtype=dtype, generator=g).requires_grad_(),
        p=p,
        heads=s["H"],
        qkv=torch.randn(n, k + 1, 3 * d, device=device, dtype=dtype, generator=g).requires_grad_(),
    )


def op_calls(op: str, fns: dict, a: dict):
    """(forward-only callable, forward+backward callable, min bytes fwd, min bytes fwd+bwd)."""
    es = a["x"].element_size()
    n, length, k = a["x"].shape[0], a["length"], a["k"]
    if op == "masking":
        d = a["x"].shape[-1]
        f = fns["masking"]
        gout = torch.ones(n, k, d, device=a["x"].device, dtype=a["x"].dtype)

        def fwd():
            with torch.no_grad():
                return f(a["x"], a["r"], a["noise"])

        def fwdbwd():
            f(a["x"], a["r"], a["noise"])[0].backward(gout)

        b_fwd = 2 * n * k * d * es + n * length * (4 + 4 + 8) + n * k * 8
        return fwd, fwdbwd, b_fwd, b_fwd + n * k * d * es + n * length * (8 + d * es)
    if op == "unshuffle":
        d = a["xd"].shape[-1]
        f = fns["unshuffle"]
        gout = torch.ones(n, length + 1, d, device=a["xd"].device, dtype=a["xd"].dtype)

        def fwd():
            with torch.no_grad():
                return f(a["xd"], a["ids_restore"], a["mask_token"], True)

        def fwdbwd():
            f(a["xd"], a["ids_restore"], a["mask_token"], True).backward(gout)

        b_fwd = n * (k + 1) * d * es + n * length * 8 + n * (length + 1) * d * es
        return fwd, fwdbwd, b_fwd, 2 * b_fwd
    if op == "attention":  # the encoder's: K + 1 visible tokens
        f, h = fns["attention"], a["heads"]
        t, c = a["qkv"].shape[1], a["qkv"].shape[2] // 3
        scale = (c // h) ** -0.5
        gout = torch.ones(n, t, c, device=a["qkv"].device, dtype=a["qkv"].dtype)

        def fwd():
            with torch.no_grad():
                return f(a["qkv"], h, scale)

        def fwdbwd():
            f(a["qkv"], h, scale).backward(gout)

        b_fwd = n * t * 4 * c * es  # read q, k, v; write the output
        return fwd, fwdbwd, b_fwd, b_fwd + n * t * 8 * c * es  # + read q, k, v, out, dout; write dq, dk, dv
    f = fns[op]
    pdim = a["pred"].shape[-1]

    def fwd():
        with torch.no_grad():
            return f(a["imgs"], a["pred"], a["mask"], a["p"])

    def fwdbwd():
        f(a["imgs"], a["pred"], a["mask"], a["p"]).backward()

    b_fwd = a["imgs"].numel() * a["imgs"].element_size() + n * length * (pdim * es + 4)
    return fwd, fwdbwd, b_fwd, b_fwd + n * length * pdim * es


def peak_extra_mib(fn, device) -> float:
    """Peak memory allocated during fn() above what was allocated before it, MiB."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def zero_grads(a: dict) -> None:
    for key in ("x", "xd", "mask_token", "pred", "qkv"):
        a[key].grad = None


def run(shapes: list[str], impls: list[str], device: torch.device, reps: int, warmup: int) -> tuple[list[dict], list[dict]]:
    rows, mem_rows = [], []
    for shape in shapes:
        s = SHAPES[shape]
        a = make_inputs(s, device)
        for impl in impls:
            try:
                fns = _impl_fns(impl)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"skip {impl}: {e}", file=sys.stderr)
                continue
            ops = ["masking", "unshuffle", "loss"] + (["loss_recompute"] if "loss_recompute" in fns else []) + [
                "attention"]
            for op in ops:
                fwd, fwdbwd, b_fwd, b_fb = op_calls(op, fns, a)
                for mode, fn, nbytes in (("fwd", fwd, b_fwd), ("fwd+bwd", fwdbwd, b_fb)):
                    def call():
                        fn()
                        zero_grads(a)
                    t = time_fn(call, device, warmup=warmup, reps=reps)
                    rows.append({"shape": shape, "N": s["N"], "op": op, "mode": mode, "impl": impl,
                                 "median_ms": round(t.median_ms, 4), "p20_ms": round(t.p20_ms, 4),
                                 "p80_ms": round(t.p80_ms, 4), "GB_per_s": float(f"{nbytes / t.median_ms / 1e6:.4g}"),
                                 "min_MB": round(nbytes / 1e6, 2)})
                    print(f"{shape:6s} {op:15s} {mode:8s} {impl:9s} {t.median_ms:8.4f} ms "
                          f"{nbytes / t.median_ms / 1e6:8.1f} GB/s", flush=True)
    if device.type == "cuda" and "vit-h" in SHAPES:
        s = dict(SHAPES["vit-h"], N=256)
        a = make_inputs(s, device)
        for impl in [i for i in impls if i in ("eager", "triton")]:
            fns = _impl_fns(impl)
            for op in ("masking", "unshuffle", "loss"):
                _, fwdbwd, _, _ = op_calls(op, fns, a)
                fwdbwd()
                zero_grads(a)
                mem_rows.append({"shape": "vit-h", "N": 256, "op": op, "impl": impl,
                                 "peak_extra_MiB": round(peak_extra_mib(lambda: (fwdbwd(), zero_grads(a)), device), 1)})
    return rows, mem_rows


def report(rows, mem_rows, env, out: Path) -> Path:
    tag = f"kernels_{device_tag(env)}_{today()}"
    write_csv(rows, out / f"{tag}.csv")
    write_json({"environment": env, "rows": rows, "memory": mem_rows}, out / f"{tag}.json")
    lines = [f"# Kernel benchmark ({env.get('device')}, {env['date']})", "", env_block(env), "",
             "Median of timed calls after warm-up (CUDA events); GB/s is the minimum traffic of the op over the "
             "median time. Tokens and predictions bf16, images fp32, mask ratio 0.75.", "",
             md_table(rows, ["shape", "N", "op", "mode", "impl", "median_ms", "p20_ms", "p80_ms", "GB_per_s"])]
    vl = {(r["op"], r["mode"], r["impl"]): r["median_ms"] for r in rows if r["shape"] == "vit-l"}
    if vl:
        lines += ["", "## Targets at ViT-L shapes (one H100)", "",
                  "| op | mode | target ms | triton ms | eager ms | compiled ms | reference eager / compiled (H100) | met |",
                  "|---|---|---|---|---|---|---|---|"]
        for (op, mode), target in TARGETS_MS.items():
            tri = vl.get((op, mode, "triton"))
            ref = REFERENCE_MS[(op, mode)]
            met = "-" if tri is None else ("yes" if tri <= target else f"no (gap {tri - target:.3f} ms)")
            lines.append(f"| {op} | {mode} | {target} | {tri if tri is not None else '-'} | "
                         f"{vl.get((op, mode, 'eager'), '-')} | {vl.get((op, mode, 'compiled'), '-')} | "
                         f"{ref[0]} / {ref[1]} | {met} |")
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
    ap = argparse.ArgumentParser(prog="mae bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="vit-b,vit-l,vit-h", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--impls", default="triton,eager,compiled", help="comma list of triton, eager, compiled")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
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
    rows, mem_rows = run(shapes, impls, device, args.reps, args.warmup)
    path = report(rows, mem_rows, env, Path(args.out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Correctness of the fast paths on the GPU at real ViT shapes, without pytest (the GPU machine may not
have it): Triton masking / unshuffle exact against torch, the fused loss within tolerance, and the model's
Triton path against its torch path. Prints one line per check and exits non-zero on any failure.

    PYTHONPATH=. python3 -m benchmarks.cuda_checks [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

from kernels.loss import norm_pix_mse_torch, norm_pix_mse_triton
from kernels.masking import random_masking_torch, random_masking_triton, unshuffle_torch, unshuffle_triton


def check_masking(n, length, d, r, dtype):
    x = torch.randn(n, length, d, device="cuda", dtype=dtype, requires_grad=True)
    noise = torch.rand(n, length, device="cuda")
    a, b = random_masking_triton(x, r, noise), random_masking_torch(x, r, noise)
    assert all(torch.equal(u, v) for u, v in zip(a, b)), "forward differs"
    g = torch.randn_like(a[0])
    assert torch.equal(torch.autograd.grad(a[0], x, g)[0], torch.autograd.grad(b[0], x, g)[0]), "grad differs"


def check_unshuffle(n, length, d, r, dtype):
    noise = torch.rand(n, length, device="cuda")
    _, _, ids_restore, _ = random_masking_torch(torch.zeros(n, length, 1, device="cuda"), r, noise)
    k = int(length * (1 - r))
    x = torch.randn(n, k + 1, d, device="cuda", dtype=dtype, requires_grad=True)
    mt = torch.randn(1, 1, d, device="cuda", requires_grad=True)
    a, b = unshuffle_triton(x, ids_restore, mt), unshuffle_torch(x, ids_restore, mt)
    assert torch.equal(a, b), "forward differs"
    g = torch.randn_like(a)
    ga, gb = torch.autograd.grad(a, (x, mt), g), torch.autograd.grad(b, (x, mt), g)
    assert torch.equal(ga[0], gb[0]), "grad x differs"
    # the mask-token gradient is a sum: the reference rounds it to x's dtype before casting back, the kernel
    # keeps fp32, so low-precision inputs differ by that rounding
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ga[1], gb[1], rtol=tol, atol=tol * gb[1].abs().max().item())


def check_loss(n, img, p, dtype, norm_pix, grad_in_forward):
    length, pdim = (img // p) ** 2, p * p * 3
    imgs = torch.randn(n, 3, img, img, device="cuda")
    pred = torch.randn(n, length, pdim, device="cuda", dtype=dtype, requires_grad=True)
    mask = (torch.rand(n, length, device="cuda") < 0.75).float()
    la = norm_pix_mse_triton(imgs, pred, mask, p, norm_pix, grad_in_forward=grad_in_forward)
    lb = norm_pix_mse_torch(imgs, pred, mask, p, norm_pix)
    rtol = 1e-6 if dtype == torch.float32 else 1e-5
    torch.testing.assert_close(la, lb, rtol=rtol, atol=0)
    ga, gb = torch.autograd.grad(la, pred)[0].float(), torch.autograd.grad(lb, pred)[0].float()
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(ga, gb, rtol=tol, atol=tol * gb.abs().max().item())


def check_model(preset):
    from engine.config import get_preset
    from engine.model import build_model

    cfg = get_preset(preset).model
    torch.manual_seed(0)
    ref = build_model(cfg).cuda()
    fast = build_model(cfg).cuda()
    fast.load_state_dict(ref.state_dict())
    ref.kernels, fast.kernels = "torch", "triton"
    imgs = torch.randn(8, 3, cfg.img_size, cfg.img_size, device="cuda")
    noise = torch.rand(8, cfg.num_patches, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        la, pa, ma = fast(imgs, 0.75, noise)
        lb, pb, mb = ref(imgs, 0.75, noise)
    assert torch.equal(ma, mb), "masks differ"
    torch.testing.assert_close(la, lb, rtol=2e-2, atol=0)
    la.backward()
    lb.backward()
    ga = torch.cat([p.grad.float().flatten() for p in fast.parameters() if p.grad is not None])
    gb = torch.cat([p.grad.float().flatten() for p in ref.parameters() if p.grad is not None])
    cos = torch.nn.functional.cosine_similarity(ga, gb, dim=0).item()
    assert cos > 0.999, f"gradient cosine {cos:.5f}"


CHECKS = []
for n, length, d in ((128, 196, 768), (128, 196, 1024), (64, 256, 1280), (3, 196, 100), (5, 256, 72)):
    for r in (0.5, 0.75, 0.9, 0.95):
        for dt in (torch.bfloat16, torch.float32):
            CHECKS.append((f"masking N={n} L={length} D={d} r={r} {str(dt)[6:]}", check_masking, (n, length, d, r, dt)))
for n, length, d in ((128, 196, 512), (64, 256, 512), (3, 196, 100)):
    for r in (0.75, 0.95):
        for dt in (torch.bfloat16, torch.float32, torch.float16):
            CHECKS.append((f"unshuffle N={n} L={length} D={d} r={r} {str(dt)[6:]}", check_unshuffle,
                           (n, length, d, r, dt)))
for n, img, p in ((128, 224, 16), (64, 224, 14), (3, 32, 4)):
    for dt in (torch.bfloat16, torch.float32):
        for norm_pix in (True, False):
            for gif in (True, False):
                CHECKS.append((f"loss N={n} img={img} p={p} {str(dt)[6:]} norm_pix={norm_pix} grad_in_fwd={gif}",
                               check_loss, (n, img, p, dt, norm_pix, gif)))
for preset in ("debug", "mae_vit_base_patch16"):
    CHECKS.append((f"model {preset} triton vs torch path (bf16 autocast)", check_model, (preset,)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_checks: no CUDA device", file=sys.stderr)
        return 2
    results = []
    for name, fn, fargs in CHECKS:
        try:
            fn(*fargs)
            ok, msg = True, ""
        except Exception as e:  # noqa: BLE001 - every failure is reported, the rest still run
            ok, msg = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(limit=2)
        results.append({"check": name, "ok": ok, "error": msg})
        print(f"{'PASS' if ok else 'FAIL'} {name} {msg}", flush=True)
    n_bad = sum(not r["ok"] for r in results)
    print(f"{len(results) - n_bad} passed, {n_bad} failed")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cuda_checks.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, indent=2))
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())

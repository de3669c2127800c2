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


def check_masking(n, length, d, r, dtype, with_pos=True):
    """Exact against the reference, with the model's fp32 position embedding folded in (and without)."""
    x = torch.randn(n, length, d, device="cuda", dtype=dtype, requires_grad=True)
    noise = torch.rand(n, length, device="cuda")
    pos = torch.randn(1, length, d, device="cuda") if with_pos else None
    a, b = random_masking_triton(x, r, noise, pos), random_masking_torch(x, r, noise, pos)
    assert all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(a, b)), "forward differs"
    g = torch.randn_like(a[0])
    assert torch.equal(torch.autograd.grad(a[0], x, g)[0], torch.autograd.grad(b[0], x, g)[0]), "grad differs"


def check_unshuffle(n, length, d, r, dtype, deterministic=False):
    """Exact rows (decoder position embedding folded in); the mask-token gradient within its reduction's rounding,
    from the atomic one-launch path or, deterministic=True, the ordered one (then bitwise repeatable)."""
    noise = torch.rand(n, length, device="cuda")
    _, _, ids_restore, _ = random_masking_torch(torch.zeros(n, length, 1, device="cuda"), r, noise)
    k = int(length * (1 - r))
    x = torch.randn(n, k + 1, d, device="cuda", dtype=dtype, requires_grad=True)
    mt = torch.randn(1, 1, d, device="cuda", requires_grad=True)
    pos = torch.randn(1, length + 1, d, device="cuda")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        a, b = unshuffle_triton(x, ids_restore, mt, True, pos), unshuffle_torch(x, ids_restore, mt, True, pos)
        assert torch.equal(a, b), "forward differs"
        g = torch.randn_like(a)
        ga, gb = torch.autograd.grad(a, (x, mt), g), torch.autograd.grad(b, (x, mt), g)
        if deterministic:
            again = torch.autograd.grad(unshuffle_triton(x, ids_restore, mt, True, pos), mt, g)[0]
            assert torch.equal(again, ga[1]), "deterministic mask-token gradient not repeatable"
    finally:
        torch.use_deterministic_algorithms(was)
    a, b = unshuffle_triton(x, ids_restore, mt), unshuffle_torch(x, ids_restore, mt)
    assert torch.equal(a, b), "forward differs"
    g = torch.randn_like(a)
    ga, gb = torch.autograd.grad(a, (x, mt), g), torch.autograd.grad(b, (x, mt), g)
    assert torch.equal(ga[0], gb[0]), "grad x differs"
    # the mask-token gradient is a sum: the reference rounds it to x's dtype before casting back, the kernel
    # keeps fp32, so low-precision inputs differ by that rounding
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ga[1], gb[1], rtol=tol, atol=tol * gb[1].abs().max().item())


def check_loss(n, img, p, dtype, norm_pix, grad_in_forward, counted=False, grad_out=1.0):
    """Within tolerance of the reference, from a random mask (count summed on the device) or, counted=True, from
    a masking's mask with the removed count given as the model gives it; grad_out != 1 as under accumulation."""
    length, pdim = (img // p) ** 2, p * p * 3
    imgs = torch.randn(n, 3, img, img, device="cuda")
    pred = torch.randn(n, length, pdim, device="cuda", dtype=dtype, requires_grad=True)
    if counted:
        _, mask, _, _ = random_masking_torch(torch.zeros(n, length, 1, device="cuda"), 0.75,
                                             torch.rand(n, length, device="cuda"))
        count = n * (length - int(length * 0.25))
    else:
        mask, count = (torch.rand(n, length, device="cuda") < 0.75).float(), None
    la = norm_pix_mse_triton(imgs, pred, mask, p, norm_pix, grad_in_forward=grad_in_forward, mask_count=count)
    lb = norm_pix_mse_torch(imgs, pred, mask, p, norm_pix)
    rtol = 1e-6 if dtype == torch.float32 else 1e-5
    torch.testing.assert_close(la, lb, rtol=rtol, atol=0)
    go = torch.tensor(grad_out, device="cuda")
    ga, gb = torch.autograd.grad(la, pred, go)[0].float(), torch.autograd.grad(lb, pred, go)[0].float()
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(ga, gb, rtol=tol, atol=tol * gb.abs().max().item())


def check_attention(n, t, h, d, dtype, device="cuda"):
    """The short-sequence attention kernel against the fp32 reference, within twice the reference's own
    low-precision error (relative Frobenius norm), forward and gradient."""
    from kernels.attention import qkv_attention_torch, qkv_attention_triton

    qkv = torch.randn(n, t, 3 * h * d, device=device).to(dtype).requires_grad_()
    g = torch.randn(n, t, h * d, device=device)
    scale = d ** -0.5
    got = qkv_attention_triton(qkv, h, scale)
    (dgot,) = torch.autograd.grad(got, qkv, g.to(dtype))
    q32 = qkv.detach().float().requires_grad_()
    want = qkv_attention_torch(q32, h, scale)
    (dwant,) = torch.autograd.grad(want, q32, g)
    ql = qkv.detach().requires_grad_()
    low = qkv_attention_torch(ql, h, scale)
    (dlow,) = torch.autograd.grad(low, ql, g.to(dtype))
    for what, a, ref, base in (("forward", got, want, low), ("gradient", dgot, dwant, dlow)):
        err = ((a.float() - ref).norm() / ref.norm()).item()
        budget = max(((base.float() - ref).norm() / ref.norm()).item(), 5e-6)  # fp32: approximate exp on the GPU
        assert err <= 2 * budget, f"{what}: relative error {err:.2e} vs the reference's own {budget:.2e}"


def check_model(preset, lever="triton"):
    """A model with one lever against the same weights without it, bf16 autocast: loss and gradients.
    lever "triton": the Triton masking / unshuffle / loss against the torch path (masks equal exactly);
    "apex-ln": apex's FusedLayerNorm swapped in (train.layer_norm=apex) against torch's LayerNorm."""
    from engine.config import get_preset
    from engine.model import build_model

    cfg = get_preset(preset).model
    torch.manual_seed(0)
    ref = build_model(cfg).cuda()
    fast = build_model(cfg).cuda()
    fast.load_state_dict(ref.state_dict())
    if lever == "triton":
        ref.kernels, fast.kernels = "torch", "triton"
    else:
        from engine.layernorm import apply_layer_norm

        assert apply_layer_norm(fast, "apex") > 0
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


def check_graph_step(preset, compile, pure=False, attention="auto", ckpt=0, compile_mode="default", device="cuda",
                     dckpt=0, precision=None):
    """The captured step (engine.graphstep) against the same body run eagerly: same losses, same parameters
    after a few steps with a changing lr and fresh inputs each step; a NaN step is skipped inside the graph.
    device="cpu" runs both bodies eagerly (what the CPU tests can hold of this check's set-up)."""
    from engine.config import get_preset
    from engine.optim import set_lr
    from engine.step import build_training
    from engine.levers import config_with_levers

    levers = dict(compile="regional" if compile else "none", compile_mode=compile_mode, attention=attention,
                  precision=precision or ("bf16-pure" if pure else "autocast"), checkpoint_blocks=ckpt,
                  checkpoint_decoder_blocks=dckpt)
    run_cfg = config_with_levers(get_preset(preset), levers, **{"train.device": device, "optim.fused": "torch",
                                                                 "optim.lr": 1e-3})
    cfg = run_cfg.model
    steps, models = [], []
    for cap in (False, True):  # the trainer's own step, built twice from the same config (the same weights)
        tr = build_training(run_cfg, device=torch.device(device), strict=False)
        st = tr.enable_graph(capture=cap and device == "cuda")
        steps.append((tr.model, tr.optimizer, st))
        models.append(tr.model)
    g = torch.Generator(device=device).manual_seed(1)
    n = 16
    for i in range(5):
        imgs = torch.randn(n, 3, cfg.img_size, cfg.img_size, device=device, generator=g)
        if i == 3:
            imgs[0, 0, 0, 0] = float("nan")
        noise = torch.rand(n, cfg.num_patches, device=device, generator=g)
        out = []
        for m, opt, st in steps:
            set_lr(opt, 1e-3 * (i + 1))
            before = [p.detach().clone() for p in m.parameters()] if i == 3 else None
            loss, finite = st([(imgs, noise)])
            out.append((loss.item(), bool(finite)))
            if i == 3:
                assert not bool(finite), "NaN step not flagged"
                assert all(torch.equal(a, b) for a, b in zip(before, m.parameters())), "NaN step changed parameters"
        (la, fa), (lb, fb) = out
        assert fa == fb, f"step {i}: finite flags differ"
        if fa:
            assert abs(la - lb) <= 1e-2 * abs(lb) + 1e-6, f"step {i}: loss {la} (eager) vs {lb} (graph)"
    pa = torch.cat([p.detach().float().flatten() for p in models[0].parameters()])
    pb = torch.cat([p.detach().float().flatten() for p in models[1].parameters()])
    rel = ((pa - pb).norm() / pa.norm()).item()
    assert rel < 1e-3, f"parameters differ after 5 steps: relative {rel:.2e}"
    if device == "cuda":
        assert steps[1][2].captures == 1, f"{steps[1][2].captures} captures for one shape"
    return rel


def check_fp8_follows_bf16(preset="mae_vit_base_patch16", recipe="tensorwise", device="cuda"):
    """train.precision=fp8 against bf16 autocast from the same weights, images and masks: the loss within 2%, the
    gradients within 10% relative and not equal (the float8 GEMMs ran). Returns the gradients' relative gap."""
    from engine.config import get_preset
    from engine.step import build_training
    from engine.levers import config_with_levers

    out = []
    for levers in ({"precision": "fp8", "fp8_recipe": recipe}, {"precision": "bf16"}):
        cfg = config_with_levers(get_preset(preset), levers, **{"train.device": device})
        torch.manual_seed(0)
        tr = build_training(cfg, device=torch.device(device), strict=False)
        g = torch.Generator(device=device).manual_seed(1)
        m = cfg.model
        x = torch.randn(32, 3, m.img_size, m.img_size, device=device, generator=g)
        noise = torch.rand(32, m.num_patches, device=device, generator=g)
        with tr.plain.autocast(False):
            loss, _, _ = tr.plain.forward(x, m.mask_ratio, noise)
        loss.backward()
        out.append((float(loss.detach()), torch.cat([p.grad.float().flatten() for p in tr.model.parameters()
                                                     if p.requires_grad])))
    (la, ga), (lb, gb) = out
    assert abs(la - lb) <= 2e-2 * abs(lb), f"fp8 loss {la} vs bf16 {lb}"
    rel = float((ga - gb).norm() / gb.norm())
    assert 0 < rel < 0.1, f"gradients: relative gap {rel:.3e} (0: no float8 GEMM ran)"
    return rel


def check_patchify_under_autocast():
    from kernels.loss import patchify, unpatchify

    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        p = patchify(x, 4)
        assert p.dtype == torch.float32, f"patchify gave {p.dtype} under autocast"
        assert torch.equal(unpatchify(p, 4, 3), x)


def check_trainer_graph(precision="auto", attention="auto"):
    """Trainer with train.cuda_graph=true on synthetic data: runs, logs finite losses, resumes."""
    import tempfile

    from engine.config import apply_overrides, debug
    from engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as d:
        over = {"train.run_dir": d, "data.backend": "synthetic", "train.max_steps": "6", "train.log_every": "2",
                "train.tensorboard": "false", "train.progress": "false", "train.cuda_graph": "true",
                "train.ckpt_every": "3", "train.precision": precision, "train.attention": attention}
        res = Trainer(apply_overrides(debug(), over)).fit()
        assert res.step == 6 and res.last_loss == res.last_loss, f"step {res.step}, loss {res.last_loss}"
        over["train.max_steps"] = "8"
        t = Trainer(apply_overrides(debug(), over), resume=True)
        assert t.step == 6
        assert t.fit().step == 8


CHECKS = []
for n, length, d in ((128, 196, 768), (128, 196, 1024), (64, 256, 1280), (3, 196, 100), (5, 256, 72)):
    for r in (0.5, 0.75, 0.9, 0.95):
        for dt in (torch.bfloat16, torch.float32):
            CHECKS.append((f"masking N={n} L={length} D={d} r={r} {str(dt)[6:]}", check_masking, (n, length, d, r, dt)))
    CHECKS.append((f"masking N={n} L={length} D={d} without pos bf16", check_masking,
                   (n, length, d, 0.75, torch.bfloat16, False)))
for n, length, d in ((128, 196, 512), (64, 256, 512), (3, 196, 100)):
    for r in (0.75, 0.95):
        for dt in (torch.bfloat16, torch.float32, torch.float16):
            CHECKS.append((f"unshuffle N={n} L={length} D={d} r={r} {str(dt)[6:]}", check_unshuffle,
                           (n, length, d, r, dt)))
    CHECKS.append((f"unshuffle N={n} L={length} D={d} deterministic bf16", check_unshuffle,
                   (n, length, d, 0.75, torch.bfloat16, True)))
for n, img, p in ((128, 224, 16), (64, 224, 14), (3, 32, 4)):
    for dt in (torch.bfloat16, torch.float32):
        for norm_pix in (True, False):
            for gif in (True, False):
                CHECKS.append((f"loss N={n} img={img} p={p} {str(dt)[6:]} norm_pix={norm_pix} grad_in_fwd={gif}",
                               check_loss, (n, img, p, dt, norm_pix, gif)))
                for go in ((1.0, 0.5) if norm_pix else ()):
                    CHECKS.append((f"loss N={n} img={img} p={p} {str(dt)[6:]} norm_pix={norm_pix} grad_in_fwd={gif} "
                                   f"counted grad_out={go}", check_loss, (n, img, p, dt, norm_pix, gif, True, go)))
for preset in ("debug", "mae_vit_base_patch16"):
    CHECKS.append((f"model {preset} triton vs torch path (bf16 autocast)", check_model, (preset,)))
for preset, comp in (("debug", False), ("mae_vit_base_patch16", False), ("mae_vit_base_patch16", True)):
    CHECKS.append((f"CUDA graph step {preset} compile={comp} vs eager body", check_graph_step, (preset, comp)))
CHECKS.append(("CUDA graph step mae_vit_base_patch16 bf16-pure flash vs eager body", check_graph_step,
               ("mae_vit_base_patch16", False, True, "flash")))
CHECKS.append(("CUDA graph step mae_vit_base_patch16 checkpoint_blocks=4 vs eager body", check_graph_step,
               ("mae_vit_base_patch16", False, False, "auto", 4)))
# recomputed decoder blocks, and bf16-pure's recompute on its bf16 copies, captured (eager blocks: no compile time
# inside checks-new's limit; the speed suite's fast+pure+dckpt2 row runs the compiled path)
CHECKS.append(("CUDA graph step mae_vit_base_patch16 bf16-pure checkpoint_blocks=2 decoder=4 vs eager body",
               check_graph_step, ("mae_vit_base_patch16", False, True, "auto", 2, "default", "cuda", 4)))
CHECKS.append(("CUDA graph step mae_vit_base_patch16 compile=True encoder-math vs eager body", check_graph_step,
               ("mae_vit_base_patch16", True, False, "encoder-math")))
CHECKS.append(("CUDA graph step mae_vit_base_patch16 compile=True bf16-pure encoder-math vs eager body",
               check_graph_step, ("mae_vit_base_patch16", True, True, "encoder-math")))
for n, t, h, d in ((256, 65, 16, 80), (256, 50, 16, 64), (256, 50, 12, 64), (3, 17, 2, 20)):
    for dt in (torch.bfloat16, torch.float32):
        CHECKS.append((f"attention kernel N={n} T={t} H={h} D={d} {str(dt)[6:]}", check_attention, (n, t, h, d, dt)))
CHECKS.append(("CUDA graph step mae_vit_base_patch16 compile=True encoder-triton vs eager body", check_graph_step,
               ("mae_vit_base_patch16", True, False, "encoder-triton")))
CHECKS.append(("CUDA graph step mae_vit_base_patch16 compile=True bf16-pure encoder-triton vs eager body",
               check_graph_step, ("mae_vit_base_patch16", True, True, "encoder-triton")))
CHECKS.append(("CUDA graph step debug compile=True max-autotune-no-cudagraphs vs eager body", check_graph_step,
               ("debug", True, False, "auto", 0, "max-autotune-no-cudagraphs")))
# float8 encoder GEMMs (torchao; section fp8 carries its wheel): against bf16, then captured and compiled
for recipe in ("tensorwise", "rowwise"):
    CHECKS.append((f"fp8 {recipe} mae_vit_base_patch16 step vs bf16", check_fp8_follows_bf16,
                   ("mae_vit_base_patch16", recipe)))
CHECKS.append(("fp8 CUDA graph step mae_vit_base_patch16 compile=True vs eager body", check_graph_step,
               ("mae_vit_base_patch16", True, False, "auto", 0, "default", "cuda", 0, "fp8")))
CHECKS.append(("fp8 CUDA graph step mae_vit_base_patch16 compile=True encoder-triton vs eager body", check_graph_step,
               ("mae_vit_base_patch16", True, False, "encoder-triton", 0, "default", "cuda", 0, "fp8")))
from engine.layernorm import apex_fused_layer_norm  # the apex check only where apex is installed

if apex_fused_layer_norm() is not None:
    CHECKS.append(("model mae_vit_base_patch16 apex LayerNorm vs torch (bf16 autocast)", check_model,
                   ("mae_vit_base_patch16", "apex-ln")))
CHECKS.append(("patchify keeps fp32 under CUDA autocast", check_patchify_under_autocast, ()))
CHECKS.append(("trainer with train.cuda_graph=true, resume", check_trainer_graph, ()))
CHECKS.append(("trainer with train.cuda_graph=true bf16-pure flash, resume", check_trainer_graph,
               ("bf16-pure", "flash")))
CHECKS.append(("trainer with train.cuda_graph=true encoder-triton, resume", check_trainer_graph,
               ("auto", "encoder-triton")))


def _first(name: str) -> int:
    """Run order: the ViT-H shapes and the model / graph checks first, so a time-limited run covers them."""
    first = ("model", "CUDA graph", "trainer", "patchify", "attention kernel N=256 T=65")
    if name.startswith(first) or "L=256 D=1280" in name or "img=224 p=14" in name:
        return 0
    return 1


CHECKS.sort(key=lambda c: _first(c[0]))  # stable: the rest keep their order


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--only", default="", help="run only the checks whose name contains one of these (comma list)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_checks: no CUDA device", file=sys.stderr)
        return 2
    results = []
    for name, fn, fargs in CHECKS:
        if args.only and not any(part and part in name for part in args.only.split(",")):
            continue
        try:
            fn(*fargs)
            ok, msg = True, ""
        except Exception as e:  # noqa: BLE001 - every failure is reported, the rest still run
            ok, msg = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(limit=2)
        results.append({"check": name, "ok": ok, "error": msg})
        print(f"{'PASS' if ok else 'FAIL'} {name} {msg}", flush=True)
        if args.out:  # after every check, so a run stopped by its time limit keeps what it checked
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "cuda_checks.json").write_text(json.dumps(
                {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, indent=2))
    n_bad = sum(not r["ok"] for r in results)
    print(f"{len(results) - n_bad} passed, {n_bad} failed")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""FSDP2 on one device, checked against the single-device step: the trainer's step (engine.step) built twice from
the same config, once plain and once sharded by FSDP2 over a one-process group (NCCL on a GPU, gloo on a CPU),
fed the same images and masks; then a sharded (DCP) checkpoint saved, reloaded and exported, compared with the
in-memory state. Without pytest (the GPU machine may not have it); one line per check, non-zero exit on failure.

    PYTHONPATH=. python3 -m benchmarks.fsdp_checks --out $OUT            # a GPU: ViT-B/16, bf16
    python -m benchmarks.fsdp_checks --device cpu --preset debug          # the same checks on a CPU (gloo, fp32)

Tolerances: on a GPU both steps compute in bf16 (autocast over fp32 weights against FSDP2's bf16 parameter copies
with fp32 reduction), so they agree to bf16 noise: losses within 2% and parameters within 1e-2 relative after
four steps. On a CPU both run fp32: 1e-5. The DCP round trip is exact (torch.equal).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch

STEPS = 4


def _tolerances(device: torch.device) -> tuple[float, float]:
    return (2e-2, 1e-2) if device.type == "cuda" else (1e-5, 1e-5)


def _config(preset: str, device: torch.device, **levers):
    from engine.config import get_preset
    from engine.levers import config_with_levers

    precision = "bf16" if device.type == "cuda" else "fp32"
    return config_with_levers(get_preset(preset), dict(levers, precision=precision),
                              **{"train.device": str(device), "optim.fused": "torch", "optim.lr": 1e-3,
                                 "train.batch_size": 16})


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter as a full fp32 tensor on the CPU (DTensors gathered)."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu()
            for n, p in model.named_parameters()}


def check_fsdp_step(preset: str, device, compile: bool = False, ac: bool = False) -> float:
    """The FSDP2 step against the single-device step: same weights, data and masks, STEPS steps; returns the
    parameters' relative difference at the end."""
    from engine.parallel import DistContext
    from engine.step import build_training

    device = torch.device(device)
    ensure_group(device)
    levers = {"compile": "regional" if compile else "none", "activation_checkpointing": ac}
    cfg = _config(preset, device, **levers)
    runs = {}
    for sharded in (False, True):
        if compile:
            torch._dynamo.reset()
        ctx = DistContext(rank=0, world=1, distributed=sharded)
        runs[sharded] = build_training(cfg, ctx, device, strict=False)
    m = cfg.model
    g = torch.Generator(device=device).manual_seed(3)
    loss_tol, param_tol = _tolerances(device)
    for i in range(STEPS):
        imgs = torch.randn(cfg.train.batch_size, m.in_chans, m.img_size, m.img_size, device=device, generator=g)
        noise = torch.rand(cfg.train.batch_size, m.num_patches, device=device, generator=g)
        la, lb = (float(runs[s].step_fn([(imgs, noise)], m.mask_ratio)[0]) for s in (False, True))
        assert abs(la - lb) <= loss_tol * abs(la) + 1e-6, f"step {i}: loss {la} (single device) vs {lb} (FSDP2)"
    a, b = full_params(runs[False].model), full_params(runs[True].model)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    va, vb = torch.cat([a[k].flatten() for k in a]), torch.cat([b[k].flatten() for k in a])
    rel = float((va - vb).norm() / va.norm())
    assert rel <= param_tol, f"parameters differ after {STEPS} steps: relative {rel:.2e} > {param_tol}"
    return rel


def check_dcp_roundtrip(preset: str, device) -> None:
    """Train a few FSDP2 steps, save a sharded checkpoint, load it into a fresh FSDP2 model and optimizer, export
    it consolidated: each equal to the in-memory state (model and optimizer, torch.equal)."""
    from torch.distributed.tensor import DTensor

    from engine import checkpoint as ckpt
    from engine.parallel import DistContext
    from engine.step import build_training

    device = torch.device(device)
    ensure_group(device)
    cfg = _config(preset, device)
    ctx = DistContext(rank=0, world=1, distributed=True)
    tr = build_training(cfg, ctx, device, strict=False)
    m = cfg.model
    g = torch.Generator(device=device).manual_seed(5)
    for _ in range(2):
        imgs = torch.randn(cfg.train.batch_size, m.in_chans, m.img_size, m.img_size, device=device, generator=g)
        noise = torch.rand(cfg.train.batch_size, m.num_patches, device=device, generator=g)
        tr.step_fn([(imgs, noise)], m.mask_ratio)
    with tempfile.TemporaryDirectory() as d:
        path = ckpt.save_training_checkpoint(d, 2, tr.model, tr.optimizer, {"step": 2}, keep_last=2, sharded=True)
        fresh = build_training(cfg, ctx, device, strict=False)
        ckpt.load_training_checkpoint(path, fresh.model, fresh.optimizer, cfg.model)
        a, b = full_params(tr.model), full_params(fresh.model)
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        assert not bad, f"reloaded parameters differ: {bad[:3]}"

        def opt_state(opt):
            out = {}
            for i, st in enumerate(opt.state.values()):
                for k, v in st.items():
                    if torch.is_tensor(v):
                        out[f"{i}.{k}"] = (v.full_tensor() if isinstance(v, DTensor) else v).cpu()
            return out

        oa, ob = opt_state(tr.optimizer), opt_state(fresh.optimizer)
        assert oa.keys() == ob.keys() and oa, (len(oa), len(ob))
        bad = [k for k in oa if not torch.equal(oa[k], ob[k])]
        assert not bad, f"reloaded optimizer state differs: {bad[:3]}"
        exported = ckpt.full_model_state(path)
        bad = [k for k in a if not torch.equal(exported[k].float().cpu(), a[k])]
        assert not bad, f"exported weights differ from the in-memory ones: {bad[:3]}"


_GROUP = {}


def ensure_group(device: torch.device) -> None:
    """A one-process group (NCCL on a GPU, gloo on a CPU), started once."""
    import torch.distributed as dist

    from engine.parallel import init_distributed

    if not dist.is_initialized():
        init_distributed(str(device), fsdp="always")


def checks(preset: str, device) -> list[tuple]:
    return [
        (f"FSDP2 step vs single-device step, {preset}", check_fsdp_step, (preset, device)),
        (f"FSDP2 + regional compile vs single device + regional compile, {preset}", check_fsdp_step,
         (preset, device, True)),
        (f"FSDP2 + activation checkpointing vs single device, {preset}", check_fsdp_step,
         (preset, device, False, True)),
        (f"DCP save, reload and export equal the in-memory state, {preset}", check_dcp_roundtrip, (preset, device)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fsdp_checks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="", help="default: mae_vit_base_patch16 on a GPU, debug on a CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", default="", help="run only the checks whose name contains one of these (comma list)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    from engine.device import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    preset = args.preset or ("mae_vit_base_patch16" if device.type == "cuda" else "debug")
    results = []
    for name, fn, fargs in checks(preset, device):
        if args.only and not any(p and p in name for p in args.only.split(",")):
            continue
        try:
            value = fn(*fargs)
            ok, msg = True, (f"relative difference {value:.2e}" if isinstance(value, float) else "")
        except Exception as e:  # noqa: BLE001 - every failure is reported, the rest still run
            ok, msg = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(limit=3)
        results.append({"check": name, "ok": ok, "detail": msg})
        print(f"{'PASS' if ok else 'FAIL'} {name} {msg}", flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "fsdp_checks.json").write_text(json.dumps(
                {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "results": results}, indent=2))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    n_bad = sum(not r["ok"] for r in results)
    print(f"{len(results) - n_bad} passed, {n_bad} failed")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())

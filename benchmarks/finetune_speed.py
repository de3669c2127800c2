"""`mae bench finetune`: images/s of a fine-tuning (or linear-probe) step of the published recipes, the engine's
against the reference code's way in the same call.

engine: `mae finetune`'s own model and step (engine/classify.py: build_classifier, build_classifier_optimizer,
    build_loss, engine.step.TrainStep): the encoder under its head, mixup / cutmix on the device, bf16 autocast on
    CUDA, fused AdamW over the layer-decay groups (LARS for the probe); `+compile`: the blocks compiled (regional).
reference: what the reference code's main_finetune.py runs: timm's VisionTransformer (global pool, the same drop
    path), torch AdamW (foreach) over the same groups, fp16 autocast with a GradScaler (its NativeScaler), mixup;
    `+compile`: the whole model compiled, as a user of that code would.

Each row: the same synthetic batch (random images and labels, no loader), `--steps` timed steps after `--warmup`,
img/s from the wall clock of the timed steps (synchronised), peak memory. On a CPU it runs at small sizes (a smoke
test), and its figures say CPU.

Output: finetune_<device>_<date>.{json,md} in --out. The README's GPU-hours of the recipes are estimates until this
has run on a GPU (benchmarks/results/PENDING.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from .common import RESULTS, device_tag, env_block, environment, md_table, parse_choices, pick_device, today, write_json

MODELS = {"vit-b": "finetune_vit_b16", "vit-l": "finetune_vit_l16", "vit-h": "finetune_vit_h14",
          "vit-h448": "finetune_vit_h14_448", "debug": "finetune_debug"}
CONFIGS = ("engine", "engine+compile", "reference", "reference+compile")


def recipe(model: str, protocol: str, batch: int | None):
    from engine.config import get_classify_preset

    name = MODELS[model] if protocol == "finetune" else MODELS[model].replace("finetune", "linprobe").replace(
        "_448", "")
    cfg = get_classify_preset(name)
    if batch:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch, accum_steps=1))
    return cfg


def engine_step(cfg, device: torch.device, num_classes: int, compile_: bool):
    """A closure running one optimizer step of `mae finetune` on a fixed batch."""
    from engine.classify import build_classifier, build_classifier_optimizer, build_loss, micro_batch_seed, seed_all
    from engine.device import resolve_dtype
    from engine.parallel import DistContext
    from engine.step import TrainStep, loss_scaler

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=compile_))
    model, _ = build_classifier(cfg, num_classes, DistContext(), device)
    opt = build_classifier_optimizer(cfg, model, cfg.optim.scaled_lr(cfg.train.batch_size), device)
    mixup, criterion = build_loss(cfg, num_classes)
    step = TrainStep(model, opt, device=device, amp_dtype=resolve_dtype(cfg.train.precision, device),
                     forward=lambda x, _r, y: (criterion(model(x).float(), y), None, None),
                     scaler=loss_scaler(cfg.train.precision, device))
    imgs, labels = _batch(cfg, device, num_classes)
    n = [0]

    def run():
        n[0] += 1
        seed_all(micro_batch_seed(0, n[0], 0))
        x, y = mixup(imgs, labels) if mixup is not None else (imgs, labels)
        model.train()
        return step([(x, y)])
    return run, model


def reference_step(cfg, device: torch.device, num_classes: int, compile_: bool):
    """The reference code's step: timm ViT, torch AdamW (foreach), fp16 autocast + GradScaler on CUDA, mixup."""
    import timm
    from timm.optim import param_groups_layer_decay

    from engine.classify import build_loss

    m, task = cfg.model, cfg.task
    probe = task.protocol == "linprobe"
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=m.img_size, patch_size=m.patch_size,
                            embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                            num_classes=num_classes, global_pool="token" if task.pool == "cls" else "avg",
                            fc_norm=task.pool == "gap", drop_path_rate=0.0 if probe else task.drop_path).to(device)
    if probe:  # the reference probe: BatchNorm (no affine) + linear head, the encoder frozen
        vit.head = torch.nn.Sequential(torch.nn.BatchNorm1d(m.embed_dim, affine=False, eps=1e-6),
                                       vit.head).to(device)
        for n_, p in vit.named_parameters():
            p.requires_grad = n_.startswith("head")
        from engine.evaluate import lars

        opt = lars([p for p in vit.parameters() if p.requires_grad], lr=cfg.optim.scaled_lr(cfg.train.batch_size))
    else:
        opt = torch.optim.AdamW(param_groups_layer_decay(vit, weight_decay=cfg.optim.weight_decay,
                                                         no_weight_decay_list=("pos_embed", "cls_token"),
                                                         layer_decay=task.layer_decay),
                                lr=cfg.optim.scaled_lr(cfg.train.batch_size), betas=cfg.optim.betas)
    fwd = torch.compile(vit) if compile_ else vit
    mixup, criterion = build_loss(cfg, num_classes)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    imgs, labels = _batch(cfg, device, num_classes)

    def run():
        x, y = mixup(imgs, labels) if mixup is not None else (imgs, labels)
        vit.train()
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = criterion(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss
    return run, vit


def _batch(cfg, device, num_classes):
    g = torch.Generator().manual_seed(0)
    b, s = cfg.train.batch_size, cfg.model.img_size
    return (torch.randn(b, cfg.model.in_chans, s, s, generator=g).to(device),
            torch.randint(0, num_classes, (b,), generator=g).to(device))


def measure(run, device: torch.device, batch: int, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"img_s": round(steps * batch / dt, 2), "step_ms": round(1000 * dt / steps, 2),
            "peak_gib": round(peak, 2) if peak is not None else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mae bench finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit-b,vit-l,vit-h", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--protocols", default="finetune,linprobe", help="comma list of finetune, linprobe")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--batch", type=int, default=0, help="per-device batch (default: the preset's)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    try:
        models = parse_choices(a.models, MODELS, "model")
        protocols = parse_choices(a.protocols, ("finetune", "linprobe"), "protocol")
        configs = parse_choices(a.configs, CONFIGS, "config")
    except ValueError as e:
        p.error(str(e))
    device = pick_device(a.device)
    rows = []
    for model in models:
        for protocol in protocols:
            cfg = recipe(model, protocol, a.batch or None)
            for config in configs:
                make = engine_step if config.startswith("engine") else reference_step
                row = {"model": model, "protocol": protocol, "config": config, "batch": cfg.train.batch_size,
                       "img_size": cfg.model.img_size}
                try:
                    run, module = make(cfg, device, a.classes, config.endswith("+compile"))
                    row.update(measure(run, device, cfg.train.batch_size, a.warmup, a.steps), status="ok")
                    del run, module
                except torch.OutOfMemoryError:
                    row.update(status="out of memory")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                print(row, flush=True)
    env = environment(device)
    tag = device_tag(env)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"finetune_{tag}_{today()}"
    write_json({"env": env, "rows": rows, "argv": argv}, out / f"{name}.json")
    text = [f"# Fine-tuning and linear-probe steps: the engine vs the reference code's way ({env.get('device')}, "
            f"{today()})", "", env_block(env), "",
            "Synthetic batches (no loader); img/s over the timed steps. reference = timm ViT + torch AdamW + fp16 "
            "autocast with a GradScaler (the reference main_finetune.py); engine = `mae finetune`'s step "
            "(bf16 autocast on CUDA, fused AdamW). Figures from one machine only; a CPU's are a smoke test.", "",
            md_table(rows, ["model", "protocol", "config", "batch", "img_size", "status", "img_s", "step_ms",
                            "peak_gib"])]
    (out / f"{name}.md").write_text("\n".join(text) + "\n")
    print(f"wrote {out / name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

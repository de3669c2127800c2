"""`mae eval linprobe | finetune | knn` and `mae import`, registered with the `mae` command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def _encoder(args, extra):
    """An MAE built from the checkpoint's config (or --preset) with its weights, or randomly initialised."""
    import torch

    from .. import checkpoint as ckpt
    from .options import UserError, build_config, checkpoint_config
    from ..model import build_model

    if args.checkpoint:
        cfg = checkpoint_config(args.checkpoint, args.preset, extra)
    else:
        if not args.random:
            raise UserError("give --checkpoint CKPT, or --random for a randomly initialised encoder (a baseline)")
        cfg = build_config(args.preset or "debug", extra)
    torch.manual_seed(args.seed)
    model = build_model(cfg.model)
    model.init_weights(args.seed)
    info = {"format": "random init"}
    if args.checkpoint:
        info = ckpt.import_weights(model, args.checkpoint)
    return cfg, model, info


def cmd_eval(args, extra) -> int:
    import torch

    from pipelines.labelled import LabelledLoader

    from .. import evaluate as ev
    from ..device import resolve_device

    cfg, mae, info = _encoder(args, extra)
    device = resolve_device(args.device)
    mae = mae.to(device)
    img = cfg.model.img_size
    d = cfg.data
    d.num_workers = args.workers
    train = LabelledLoader(args.train, img, args.batch_size, d, args.seed, device, train=args.protocol != "knn")
    val = LabelledLoader(args.val, img, args.batch_size, d, args.seed, device, train=False)
    if args.protocol == "knn":
        train = LabelledLoader(args.train, img, args.batch_size, d, args.seed, device, train=False)
        res = ev.knn_eval(mae, train, val, device, k=args.k, temperature=args.temperature, pool=args.pool or "gap")
    elif args.protocol == "linprobe":
        res = ev.linear_probe(mae, train, val, device, epochs=args.epochs or 90, base_lr=args.lr or 0.1,
                              batch_size=args.batch_size, warmup=args.warmup if args.warmup >= 0 else 10,
                              pool=args.pool or "cls")
    else:
        res = ev.finetune(mae, train, val, device, epochs=args.epochs or 100, base_lr=args.lr or 5e-4,
                          batch_size=args.batch_size, warmup=args.warmup if args.warmup >= 0 else 5,
                          layer_decay=args.layer_decay, drop_path=args.drop_path, smoothing=args.smoothing,
                          mixup=args.mixup, cutmix=args.cutmix, last_blocks=args.last_blocks, pool=args.pool or "gap")
    out = {"protocol": res.protocol, "top1": res.top1, "checkpoint": args.checkpoint or "random init",
           "weights": info.get("format"), "preset": cfg.preset, "train": args.train, "val": args.val,
           "train_samples": res.train_samples, "val_samples": res.val_samples, "epochs": res.epochs,
           "history": res.history, "device": str(device), "torch": torch.__version__}
    print(f"{res.protocol}: top-1 {res.top1 * 100:.2f}% on {res.val_samples} validation images "
          f"({args.checkpoint or 'random init'})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


def cmd_import(args, extra) -> int:
    from .. import checkpoint as ckpt
    from ..hf import import_hf, is_hf_dir
    from ..model import build_model
    from .options import UserError, build_config

    if is_hf_dir(args.source):  # the architecture comes from its config.json (a preset, if given, must agree)
        m, _ = import_hf(args.source)
        cfg = build_config(args.preset or "debug", extra)
        if args.preset:
            ckpt.check_architecture({"model": m.__dict__}, cfg.model, args.source)
        cfg = dataclasses.replace(cfg, model=m, preset=cfg.preset if args.preset else "custom")
    elif not args.preset:
        raise UserError(f"{args.source} carries no architecture; name it with --preset")
    else:
        cfg = build_config(args.preset, extra)
    model = build_model(cfg.model)
    info = ckpt.import_weights(model, args.source)
    out = ckpt.atomic_torch_save({"model": model.state_dict(), "config": cfg.to_dict()}, args.out)
    kept = info["kept_init"]
    print(f"imported {args.source} ({info['format']}, {info['loaded']} tensors) as {cfg.preset} into {out}"
          + (f"; freshly initialised: {len(kept)} tensors ({', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''})"
             if kept else ""))
    return 0


def register(sub) -> None:
    e = sub.add_parser("eval", help="linear probe, (partial) fine-tuning or kNN of a pretrained encoder")
    e.add_argument("protocol", choices=("linprobe", "finetune", "knn"))
    e.add_argument("--checkpoint", default="", help="engine checkpoint, the paper's release, or timm weights")
    e.add_argument("--random", action="store_true", help="evaluate a randomly initialised encoder instead")
    e.add_argument("--preset", default="", help="architecture (default: the checkpoint's config)")
    e.add_argument("--train", required=True, help="labelled image folder (one subfolder per class)")
    e.add_argument("--val", required=True, help="labelled image folder for evaluation")
    e.add_argument("--epochs", type=int, default=0, help="default 90 (linprobe), 100 (finetune)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--lr", type=float, default=0.0, help="base lr per 256 images (default 0.1 LARS / 5e-4 AdamW)")
    e.add_argument("--warmup", type=float, default=-1, help="warm-up epochs (default 10 linprobe / 5 finetune)")
    e.add_argument("--pool", choices=("cls", "gap"), default=None, help="default cls (linprobe, as the paper), gap (knn, finetune)")
    e.add_argument("--last-blocks", type=int, default=None, help="finetune: train only the last k blocks (0 = probe)")
    e.add_argument("--layer-decay", type=float, default=0.75)
    e.add_argument("--drop-path", type=float, default=0.1)
    e.add_argument("--smoothing", type=float, default=0.1)
    e.add_argument("--mixup", type=float, default=0.8)
    e.add_argument("--cutmix", type=float, default=1.0)
    e.add_argument("--k", type=int, default=20)
    e.add_argument("--temperature", type=float, default=0.07)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="", help="write the result as JSON")
    e.set_defaults(func=cmd_eval, accepts_overrides=True)

    i = sub.add_parser("import", help="convert the paper's checkpoints, timm ViT weights or a Hugging Face "
                                      "ViTMAEForPreTraining directory into an engine checkpoint (encoder-only sources "
                                      "get a fresh decoder)")
    i.add_argument("source")
    i.add_argument("--preset", default="", help="architecture (not needed for a Hugging Face directory)")
    i.add_argument("--out", required=True)
    i.set_defaults(func=cmd_import, accepts_overrides=True)

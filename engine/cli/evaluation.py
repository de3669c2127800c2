"""`mae eval linprobe | finetune | knn` and `mae import`, registered with the `mae` command."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
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
    torch.manual_seed(args.seed or 0)
    model = build_model(cfg.model)
    model.init_weights(args.seed or 0)
    info = {"format": "random init"}
    if args.checkpoint:
        info = ckpt.import_weights(model, args.checkpoint)
    return cfg, model, info


def cmd_eval(args, extra) -> int:
    """`mae eval knn` here; `mae eval finetune | linprobe` are the `mae finetune | linprobe` runs (classify.py)."""
    if args.protocol != "knn":
        from .classify import cmd_eval_run

        return cmd_eval_run(args, extra)
    import torch

    from pipelines.labelled import LabelledLoader

    from .. import evaluate as ev
    from ..device import resolve_device

    cfg, mae, info = _encoder(args, extra)
    device = resolve_device(args.device or "auto")
    mae = mae.to(device)
    img = cfg.model.img_size
    d = replace(cfg.data, num_workers=2 if args.workers is None else args.workers)
    bs = args.batch_size or 256
    train = LabelledLoader(args.train, img, bs, d, args.seed or 0, device, train=False)
    val = LabelledLoader(args.val, img, bs, d, args.seed or 0, device, train=False)
    res = ev.knn_eval(mae, train, val, device, k=args.k, temperature=args.temperature, pool=args.pool or "gap")
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
    e = sub.add_parser("eval", help="kNN of a pretrained encoder; linprobe / finetune: the `mae linprobe` / "
                                    "`mae finetune` runs under this command's first option names")
    e.add_argument("protocol", choices=("linprobe", "finetune", "knn"))
    e.add_argument("--checkpoint", default="", help="engine checkpoint, the paper's release, or timm weights")
    e.add_argument("--random", action="store_true", help="evaluate a randomly initialised encoder instead")
    e.add_argument("--preset", default="", help="architecture (default: the checkpoint's config)")
    e.add_argument("--train", required=True, help="labelled image folder (one subfolder per class)")
    e.add_argument("--val", required=True, help="labelled image folder for evaluation")
    e.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the preset's)")
    e.add_argument("--batch-size", type=int, default=None, help="train.batch_size (kNN: 256)")
    e.add_argument("--lr", type=float, default=None, help="optim.base_lr: lr per 256 images")
    e.add_argument("--warmup", type=float, default=None, help="optim.warmup_epochs")
    e.add_argument("--pool", choices=("cls", "gap"), default=None, help="task.pool (default cls for linprobe, as "
                   "the paper; gap for knn and finetune)")
    e.add_argument("--last-blocks", type=int, default=None, help="finetune: train only the last k blocks (0 = probe)")
    e.add_argument("--layer-decay", type=float, default=None)
    e.add_argument("--drop-path", type=float, default=None)
    e.add_argument("--smoothing", type=float, default=None)
    e.add_argument("--mixup", type=float, default=None)
    e.add_argument("--cutmix", type=float, default=None)
    e.add_argument("--k", type=int, default=20)
    e.add_argument("--temperature", type=float, default=0.07)
    e.add_argument("--workers", type=int, default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--run-dir", default="", help="linprobe / finetune: keep the run here (default: a temporary "
                   "directory, removed afterwards)")
    e.add_argument("--out", default="", help="write the result as JSON")
    e.set_defaults(func=cmd_eval, accepts_overrides=True)

    i = sub.add_parser("import", help="convert the paper's checkpoints, timm ViT weights or a Hugging Face "
                                      "ViTMAEForPreTraining directory into an engine checkpoint (encoder-only sources "
                                      "get a fresh decoder)")
    i.add_argument("source")
    i.add_argument("--preset", default="", help="architecture (not needed for a Hugging Face directory)")
    i.add_argument("--out", required=True)
    i.set_defaults(func=cmd_import, accepts_overrides=True)

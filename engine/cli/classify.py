"""`mae finetune` and `mae linprobe`: fine-tuning and linear probing as runs (engine/classify.py), with the presets,
config files and dotted overrides of `mae pretrain`; `mae eval finetune | linprobe` are the same runs under the
first version's option names (evaluation.py forwards them here)."""

from __future__ import annotations

import argparse
from pathlib import Path

PROTOCOLS = ("finetune", "linprobe")


def build_classify_config(protocol: str, preset: str | None, extra: list[str], config_file: str | None = None,
                          checkpoint: str = ""):
    """The preset (named, the config file's, or the one whose architecture is the pretrained checkpoint's, else
    {protocol}_debug), then the file's values, then the dotted overrides; task.protocol is the command's."""
    from ..config import ClassifyConfig, apply_overrides, get_classify_preset
    from .options import UserError, config_file_values, layered

    file_preset, file_vals = config_file_values(config_file, ClassifyConfig)
    preset = preset or file_preset
    note = None
    if not preset and checkpoint:
        preset, note = preset_for_checkpoint(protocol, checkpoint)
    cfg = get_classify_preset(preset or f"{protocol}_debug", protocol)
    if cfg.task.protocol != protocol and config_file and file_vals.get("task.protocol", protocol) != protocol:
        raise UserError(f"{config_file} is the configuration of a `mae {cfg.task.protocol}` run; this is `mae "
                        f"{protocol}`: use another run directory (or --preset {protocol}_...)")
    if cfg.task.protocol != protocol:
        raise UserError(f"preset {preset} is a {cfg.task.protocol} recipe; `mae {protocol}` takes a {protocol}_* "
                        "preset (or --task.* overrides on one)")
    if isinstance(note, dict):  # the checkpoint's own architecture, under the debug recipe
        cfg = apply_overrides(cfg, {f"model.{k}": str(v) for k, v in note.items()})
    return layered(cfg, file_vals, extra)


def preset_for_checkpoint(protocol: str, checkpoint: str):
    """The {protocol} preset whose encoder is the checkpoint's (by its saved config), else (None, its model fields)
    so that the debug recipe runs on that architecture; (None, None) when the checkpoint names no architecture."""
    from .. import checkpoint as ckpt
    from ..config import ARCH_KEYS, CLASSIFY_PRESETS

    p = Path(checkpoint)
    try:
        meta = ckpt.read_meta(p) if p.is_file() or (p / "meta.pt").is_file() else {}
    except ckpt.CheckpointError:
        return None, None  # the load reports it, with its own message
    model = (meta.get("config") or {}).get("model") if isinstance(meta.get("config"), dict) else None
    if not isinstance(model, dict):
        return None, None
    for name, make in CLASSIFY_PRESETS.items():
        m = make().model
        if name.startswith(protocol) and all(model.get(k) == getattr(m, k) for k in ARCH_KEYS):
            return name, None
    return None, {k: model[k] for k in ARCH_KEYS + ("img_size",) if k in model}


def cmd_classify(args, extra) -> int:
    from ..classify import run_classify
    from ..config import apply_overrides
    from .options import UserError, resume_config_file

    protocol = args.command
    cfg = build_classify_config(protocol, args.preset, extra, resume_config_file(args), args.checkpoint)
    given = {k: v for k, v in (("train.run_dir", args.run_dir), ("task.train", args.train), ("task.val", args.val),
                               ("task.checkpoint", args.checkpoint)) if v}
    if given:
        cfg = apply_overrides(cfg, given)
    if not cfg.task.checkpoint and not args.random and not args.resume:
        raise UserError("give --checkpoint CKPT (the pretrained encoder), or --random for a randomly initialised one "
                        "(the baseline)")
    return run_classify(cfg, resume=args.resume)


def add_run_parser(sub, protocol: str, help_preset: str | None = None) -> argparse.ArgumentParser:
    from ..config import CLASSIFY_PRESETS, PAPER_DIFFERS, describe_fields, get_classify_preset

    name = help_preset or f"{protocol}_debug"
    what = {"finetune": "fine-tune a pretrained encoder (the paper's end-to-end or partial fine-tuning)",
            "linprobe": "linear probe of a pretrained encoder (frozen, BatchNorm without affine + linear, LARS)"}
    differs = PAPER_DIFFERS.get(name)
    paper = ("\n\nWhere the paper's Table 9 differs from the reference code (the preset follows the code): "
             + ", ".join(f"{k} paper {v:g}" for k, v in differs.items()) + "." if differs else "")
    p = sub.add_parser(
        protocol, help=what[protocol] + " as a resumable run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{what[protocol][0].upper() + what[protocol][1:]}: a run like `mae pretrain` (run directory, "
                    f"metrics.jsonl with top-1 / top-5, checkpoints and best.pt, --resume, torchrun). Any config "
                    f"field can be overridden as --SECTION.FIELD VALUE; the defaults of the preset {name} "
                    f"(--preset NAME --help shows another's):{paper}\n\n" + describe_fields(get_classify_preset(name)))
    names = [n for n in CLASSIFY_PRESETS if n.startswith(protocol)]
    p.add_argument("--preset", default=None, help=f"one of: {', '.join(names)} (or debug, vit-b, vit-l, vit-h; "
                   "default: the one of the checkpoint's architecture, else the config file's, else debug)")
    p.add_argument("--checkpoint", default="", help="the pretrained encoder: engine checkpoint, the paper's release, "
                   "timm weights, Hugging Face directory (shorthand for --task.checkpoint)")
    p.add_argument("--random", action="store_true", help="a randomly initialised encoder (the baseline)")
    p.add_argument("--train", default="", help="labelled folder, one subfolder per class (--task.train)")
    p.add_argument("--val", default="", help="labelled folder for validation (--task.val)")
    p.add_argument("--config", default="", help="a TOML config file (every run writes RUN_DIR/config.toml)")
    p.add_argument("--run-dir", default="", help="run directory (shorthand for --train.run_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    p.set_defaults(func=cmd_classify, accepts_overrides=True)
    return p


def help_preset(argv: list[str], protocol: str) -> str | None:
    """The preset named on a `mae finetune|linprobe ... --help` command line, when it is a known one."""
    from ..config import ConfigError, get_classify_preset

    if protocol not in argv:
        return None
    for i, a in enumerate(argv):
        name = argv[i + 1] if a == "--preset" and i + 1 < len(argv) else (a[9:] if a.startswith("--preset=") else None)
        if name:
            try:
                return get_classify_preset(name, protocol).preset
            except ConfigError:
                return None
    return None


def register(sub) -> None:
    from . import current_argv

    argv = current_argv()
    for protocol in PROTOCOLS:
        add_run_parser(sub, protocol, help_preset(argv, protocol))


# ----------------------------------------------------------------------------------------------------------
# `mae eval finetune | linprobe`: the first version's options, forwarded to the runs


EVAL_OPTIONS = {"epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.base_lr",
                "warmup": "optim.warmup_epochs", "pool": "task.pool", "last_blocks": "task.last_blocks",
                "layer_decay": "task.layer_decay", "drop_path": "task.drop_path", "smoothing": "task.smoothing",
                "mixup": "task.mixup", "cutmix": "task.cutmix", "workers": "data.num_workers",
                "device": "train.device", "seed": "train.seed"}
"""`mae eval` option -> the run's config field (only options given on the command line are forwarded)."""


def cmd_eval_run(args, extra) -> int:
    """`mae eval finetune|linprobe ...` as `mae finetune|linprobe` in a run directory (--run-dir, or a temporary one
    removed afterwards), the result copied to --out."""
    import shutil
    import tempfile

    from ..classify import run_classify
    from ..config import apply_overrides
    from .options import UserError

    protocol = args.protocol
    if not args.checkpoint and not args.random:
        raise UserError("give --checkpoint CKPT, or --random for a randomly initialised encoder (a baseline)")
    arch = args.preset or None
    cfg = build_classify_config(protocol, arch, extra, None, args.checkpoint)
    given = {key: str(getattr(args, opt)) for opt, key in EVAL_OPTIONS.items() if getattr(args, opt) is not None}
    if given.get("optim.warmup_epochs", "0").startswith("-"):
        given.pop("optim.warmup_epochs")
    temp = None if args.run_dir else tempfile.mkdtemp(prefix=f"mae_eval_{protocol}_")
    run_dir = args.run_dir or temp
    given.update({"task.train": args.train, "task.val": args.val, "task.checkpoint": args.checkpoint,
                  "train.run_dir": run_dir, "train.progress": "false", "train.tensorboard": "false",
                  "train.log_every": str(10**6)})
    cfg = apply_overrides(cfg, given)
    try:
        rc = run_classify(cfg)
        if rc == 0 and args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(run_dir) / "result.json", args.out)
        return rc
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)

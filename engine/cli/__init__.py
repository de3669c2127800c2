"""`mae` command line: pretrain | visualize | export (and the subcommands other modules register).

Options are a preset plus dotted overrides (`--optim.lr 1e-3 --model.mask_ratio 0.9`). Bad input ends
with one paragraph naming the problem and exit status 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import PRESETS, ConfigError, apply_overrides, describe_fields, get_preset
from .options import UserError, build_config, checkpoint_config, resume_config_file

EXIT_USAGE = 2

# Subcommands that live in the other modules of this wing, registered by name (imported when `mae` runs, never at
# import time): each module has register(subparsers) and may have dispatch(argv) -> exit code | None, for commands
# that parse their own options. Other packages add commands through the entry-point group "mae.commands"
# (pyproject.toml): the benchmarks (`mae bench`, `mae profile`) are one, so the engine never names them.
COMMANDS = ("engine.cli.data", "engine.cli.classify", "engine.cli.evaluation", "engine.cli.ablate")

_ARGV: list[str] = []


def current_argv() -> list[str]:
    """The command line `main` is parsing (a command's register() reads it for `--preset NAME --help`)."""
    return list(_ARGV)


# ----------------------------------------------------------------------------------------------------------


def cmd_pretrain(args, extra) -> int:
    cfg = build_config(args.preset, extra, resume_config_file(args))
    given = {**({"train.run_dir": args.run_dir} if args.run_dir else {}), **({"data.path": args.data} if args.data
                                                                            else {})}
    if given:
        cfg = apply_overrides(cfg, given)
    if args.dry_run:  # rank K of an N-rank job, built and stepped on this CPU (engine/dryrun.py)
        from ..dryrun import run_dry

        return run_dry(cfg, args.world_size, args.rank, args.gpu_memory_gib)
    from .launch import run_pretrain

    return run_pretrain(cfg, resume=args.resume)


VISUALIZE_DESCRIPTION = (
    "Write a grid with one row per image and the columns original | masked input | untrained | trained | error, "
    "untrained | error, trained: the same masked input predicted by the untrained model (the run's initial weights) "
    "and by the checkpoint, each removed patch from the prediction alone, and each model's squared error on the "
    "removed pixels with the image's masked-patch error in the corner (1.0 = predicting each patch's mean).")
"""`mae visualize --help` (kept here so that --help imports no torch; a test holds it to engine.visualize.COLUMNS)."""


def cmd_visualize(args, extra) -> int:
    import torch

    from pipelines.common import DataError
    from .. import checkpoint as ckpt
    from ..model import build_model
    from ..visualize import COLUMNS, initial_model, reconstruction_grid, save_grid

    sd = ckpt.full_model_state(args.checkpoint)
    cfg = checkpoint_config(args.checkpoint, getattr(args, "preset", None), extra)
    model = build_model(cfg.model)
    ckpt.load_model_state(model, sd, args.checkpoint)
    imgs = []
    from pipelines.torchvision import ImageFiles

    ds = ImageFiles([], cfg.model.img_size, cfg.data.scale, cfg.data.ratio, 0.0, cfg.data.mean, cfg.data.std, 0,
                    deterministic=True)
    for path in args.images:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"image {p} does not exist")
        try:
            img = ds.load(str(p))
        except Exception as e:
            raise DataError(f"cannot read image {p}: {type(e).__name__}: {e}") from None
        imgs.append(ds.transform(img, None))
    batch = torch.stack(imgs)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(batch.shape[0], cfg.model.num_patches, generator=gen)
    ratio = cfg.model.mask_ratio if args.mask_ratio is None else args.mask_ratio
    from ..config import check_mask_ratio

    check_mask_ratio(ratio, cfg.model.num_patches)
    grid = reconstruction_grid(model, batch, cfg.data.mean, cfg.data.std, ratio, noise,
                               scale=max(1, 224 // cfg.model.img_size), untrained=initial_model(cfg))
    target = args.out or Path(args.checkpoint).resolve().parent / "recon" / f"visualize_{Path(args.checkpoint).stem}.png"
    out = save_grid(grid, target)
    print(f"wrote {out} ({len(imgs)} image(s): {' | '.join(COLUMNS)})")
    return 0


def cmd_export(args, extra) -> int:
    from .. import checkpoint as ckpt

    sd = ckpt.full_model_state(args.checkpoint)
    if args.format == "hf":  # the whole model as ViTMAEForPreTraining: config.json + model.safetensors
        from ..hf import export_hf

        cfg = checkpoint_config(args.checkpoint, getattr(args, "preset", None), extra)
        out = export_hf(sd, cfg.model, args.out)
        print(f"wrote {out}/config.json and model.safetensors ({len(sd)} tensors; loads with "
              "transformers' ViTMAEForPreTraining.from_pretrained)")
        return 0
    if args.what == "encoder":
        out_sd = ckpt.encoder_state_dict(sd)
    else:
        out_sd = ckpt.to_reference_format(sd)
    out = ckpt.atomic_torch_save(out_sd, args.out)
    n = len(out_sd) if args.what == "encoder" else len(sd)
    print(f"wrote {out}: {args.what} state dict, {n} tensors"
          + (" (loads into timm.create_model(..., num_classes=0) with strict=True)" if args.what == "encoder" else
             " (the reference implementation's format: {'model': state_dict})"))
    return 0


# ----------------------------------------------------------------------------------------------------------


def make_parser(help_preset: str = "debug") -> argparse.ArgumentParser:
    """help_preset: the preset whose defaults `mae pretrain --help` lists (the one named with --preset)."""
    presets = ", ".join(PRESETS)
    p = argparse.ArgumentParser(prog="mae", description="Masked Autoencoder pretraining engine.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pre = sub.add_parser(
        "pretrain", help="MAE pretraining (embedded sample photographs when no data is given)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Pretrain an MAE. Any config field can be overridden as --SECTION.FIELD VALUE (defaults of "
                    f"the preset {help_preset}; --preset NAME --help shows another's). On CUDA in one process the "
                    f"default is the fastest setting measured (train.compile and train.cuda_graph auto = on; the "
                    f"banner names them; --train.compile false --train.cuda_graph false turns them off); on the CPU "
                    f"and under torchrun they stay off:\n\n"
                    + describe_fields(get_preset(help_preset)))
    pre.add_argument("--preset", default=None, help=f"one of: {presets} (default: the --config file's, else debug)")
    pre.add_argument("--config", default="", help="a TOML config file (as every run writes to RUN_DIR/config.toml); "
                     "command-line overrides win")
    pre.add_argument("--data", default="", help="image directory (shorthand for --data.path)")
    pre.add_argument("--run-dir", default="", help="run directory (shorthand for --train.run_dir)")
    pre.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory "
                     "(with the run's own config.toml when neither --preset nor --config is given)")
    pre.add_argument("--dry-run", action="store_true",
                     help="rehearse the job on this CPU: build rank --rank of --world-size exactly as torchrun would "
                          "(fake process group), run one step on fake tensors, print the plan (batch, mesh, bytes per "
                          "rank, the collectives of a step, peak memory per GPU) and exit; nothing touches a GPU")
    pre.add_argument("--world-size", type=int, default=8, help="with --dry-run: the number of ranks (GPUs)")
    pre.add_argument("--rank", type=int, default=0, help="with --dry-run: the rank to build")
    pre.add_argument("--gpu-memory-gib", type=float, default=80.0,
                     help="with --dry-run: the GPU's memory the step's peak is held to (80: H100, 141: H200)")
    pre.set_defaults(func=cmd_pretrain)

    vis = sub.add_parser("visualize", help="reconstruction grid PNG from a checkpoint and images",
                         description=VISUALIZE_DESCRIPTION)
    vis.add_argument("checkpoint", help="a checkpoint (.pt file, sharded .dcp directory, or a Hugging Face "
                                        "directory with --preset)")
    vis.add_argument("images", nargs="+", help="image files to mask and reconstruct")
    vis.add_argument("--out", default=None, help="the PNG to write (default: recon/visualize_<checkpoint>.png in the "
                                                 "checkpoint's run directory)")
    vis.add_argument("--mask-ratio", type=float, default=None)
    vis.add_argument("--seed", type=int, default=0, help="seed of the mask")
    vis.add_argument("--preset", default=None, help="architecture, for checkpoints without a config")
    vis.set_defaults(func=cmd_visualize)

    exp = sub.add_parser("export", help="write the encoder (timm layout), the full model (the paper's format) or a "
                                        "Hugging Face ViTMAEForPreTraining directory from a checkpoint")
    exp.add_argument("checkpoint")
    exp.add_argument("--out", required=True, help="a file (encoder, full) or a directory (--format hf)")
    exp.add_argument("--what", choices=("encoder", "full"), default="encoder")
    exp.add_argument("--format", choices=("torch", "hf"), default="torch",
                     help="hf: config.json + model.safetensors in --out (the whole model; --what is ignored)")
    exp.add_argument("--preset", default=None, help="architecture, for checkpoints without a config")
    exp.set_defaults(func=cmd_export, accepts_overrides=True)

    for register in _extra_commands():
        register(sub)
    return p


def _command_modules() -> list:
    """The modules of COMMANDS that import here, then those of the "mae.commands" entry points."""
    import importlib

    mods = []
    names = list(COMMANDS)
    try:
        from importlib.metadata import entry_points

        names += [ep.value.split(":")[0] for ep in entry_points(group="mae.commands") if ep.value not in names]
    except Exception:  # noqa: BLE001 - broken distribution metadata: the built-in table still works
        pass
    for name in dict.fromkeys(names):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:  # e.g. benchmarks/ left out of an installation
            continue
    return mods


def _extra_commands():
    """register(subparsers) of every command module."""
    return [m.register for m in _command_modules() if hasattr(m, "register")]


def _passthrough(argv: list[str]) -> int | None:
    """Commands that parse their own options (`mae bench X ...`, `mae profile ...`): the module's dispatch."""
    for m in _command_modules():
        rc = m.dispatch(argv) if hasattr(m, "dispatch") else None
        if rc is not None:
            return rc
    return None


def _help_preset(argv: list[str]) -> str:
    """The preset named on the command line (for `mae pretrain --preset vit-h --help`), if it is a known one."""
    for i, a in enumerate(argv):
        name = argv[i + 1] if a == "--preset" and i + 1 < len(argv) else (a[9:] if a.startswith("--preset=") else None)
        if name:
            try:
                get_preset(name)
                return name
            except ConfigError:
                return "debug"
    return "debug"


def main(argv: list[str] | None = None) -> int:
    from pipelines.common import DataError

    from ..atomic import CheckpointError
    from ..errors import DivergenceError

    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    passthrough = _passthrough(argv)
    if passthrough is not None:  # `mae bench X ...` / `mae profile ...`: the module parses its own options
        return passthrough
    parser = make_parser(_help_preset(argv))
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if extra and args.command not in ("pretrain", "visualize") and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args, extra) or 0)
    except (UserError, ConfigError, DataError, CheckpointError, DivergenceError) as e:
        print(f"mae {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE if not isinstance(e, DivergenceError) else 1
    except KeyboardInterrupt:
        print(f"mae {args.command}: interrupted; the last checkpoint written is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

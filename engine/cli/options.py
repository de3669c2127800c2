"""What every command shares to turn its arguments into a Config: the user-error type the CLI prints as one
line, and the preset + dotted-override parsing (`--optim.lr 1e-3 --model.mask_ratio=0.9`)."""

from __future__ import annotations

from ..config import Config, apply_overrides, get_preset


class UserError(Exception):
    """An error in what the user asked for; printed as one paragraph, exit status 2."""


def split_overrides(extra: list[str]) -> dict[str, str]:
    """['--optim.lr', '1e-3', '--model.mask_ratio=0.9'] -> {'optim.lr': '1e-3', 'model.mask_ratio': '0.9'}."""
    out, i = {}, 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--") or len(tok) <= 2:
            raise UserError(f"unexpected argument {tok!r}; overrides look like --SECTION.FIELD VALUE "
                            "(see --help for the list)")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
        else:
            if i + 1 >= len(extra) or (extra[i + 1].startswith("--") and not _is_number(extra[i + 1])):
                raise UserError(f"option --{key} needs a value")
            val = extra[i + 1]
            i += 1
        if "." not in key:
            raise UserError(f"unknown option --{key}; see --help")
        out[key] = val
        i += 1
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def config_file_values(config_file: str | None, kind=Config) -> tuple[str | None, dict[str, str]]:
    """(the file's preset, its values as dotted overrides) of a config file for a config of class `kind`; (None, {})
    without a file."""
    from ..config import file_overrides, read_toml

    if not config_file:
        return None, {}
    return file_overrides(read_toml(config_file), config_file, kind)


def layered(cfg, file_vals: dict[str, str], extra: list[str]):
    """A preset's config, then a config file's values, then the command line's dotted overrides: the last one to set
    a field wins."""
    if file_vals:
        cfg = apply_overrides(cfg, file_vals)
    return apply_overrides(cfg, split_overrides(extra))


def resume_config_file(args) -> str | None:
    """The config file a command reads: --config, or on --resume without --preset and --config the run's own
    config.toml (overrides given still win, and a resume that changes what the run learns says so)."""
    from pathlib import Path

    if args.config or not args.resume or args.preset or not args.run_dir:
        return args.config or None
    saved = Path(args.run_dir) / "config.toml"
    if not saved.is_file():
        return None
    print(f"resuming with the run's own settings ({saved}); options given here override them", flush=True)
    return str(saved)


def build_config(preset: str | None, extra: list[str], config_file: str | None = None) -> Config:
    """The preset (the config file's own `preset` when none is named, else debug), then the file's values, then
    the command line's dotted overrides: the last one to set a field wins."""
    file_preset, file_vals = config_file_values(config_file)
    return layered(get_preset(preset or file_preset or "debug"), file_vals, extra)


def checkpoint_config(path, preset: str | None, extra: list[str]) -> Config:
    """The config a command uses for a checkpoint: --preset (with overrides) when given, else the checkpoint's own
    config (with overrides). A damaged or refused checkpoint is its own error, never "carries no config"."""
    from pathlib import Path

    from .. import checkpoint as ckpt
    from ..config import ConfigError

    if preset:
        return build_config(preset, extra)
    p = Path(path)
    if not p.exists():
        raise ckpt.CheckpointError(f"checkpoint {p} does not exist")
    if p.is_dir() and (p / ".metadata").is_file():
        ckpt.read_dcp_metadata(p)  # a sharded checkpoint that would run code is refused before anything else
    meta = {} if p.is_dir() and not (p / "meta.pt").is_file() else ckpt.read_meta(p)
    saved = meta.get("config")
    if saved is None:
        raise UserError(f"{path} carries no config (a bare weights file, or a Hugging Face directory); name its "
                        "architecture with --preset")
    try:
        cfg = Config.from_dict(saved)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise ConfigError(f"{path}: its saved config is invalid: {e}") from None
        raise ckpt.CheckpointError(f"{path}: its saved config is damaged ({type(e).__name__}: {str(e)[:120]})") from None
    return apply_overrides(cfg, split_overrides(extra))

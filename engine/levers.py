"""Every lever (a speed or memory switch) declared once, in one record: its short name (the benchmarks' vocabulary,
benchmarks/levers.py), the config fields it sets and how a short value maps onto them, the check that refuses it
where it cannot run, and how it is applied to the model. Everything else reads this table:

- check_levers (engine/step.py's build_training, at start-up) runs every record's `check`;
- engine/parallel.py's build_parallel_model applies the `model` stage records to the meta-built model in table order
  (before FSDP2 shards it), then the `after` stage to the materialised model;
- engine/step.py's build_training reads the `step` stage fields (the captured step, the optimizer, the compiled
  whole model) and applies the `given` records to a model handed in (the dense ViT baseline of the benchmarks);
- levers_to_overrides / config_with_levers turn a benchmark's lever set into dotted overrides.

Adding a lever: its field (and value check) in engine/config.py, one record here, its test; tests/test_step_units.py
holds that every record's fields exist and validate, that every record is applied or read, and that each is
benchmarked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import Config, ConfigError, apply_overrides

_BOOL = lambda v: "true" if v else "false"  # noqa: E731


@dataclass(frozen=True)
class Lever:
    name: str
    """The short name (a benchmark row's lever set names it)."""
    fields: tuple[str, ...]
    """The config fields it sets ("train.compile", ...)."""
    values: Callable | dict
    """Short value -> the fields' values as text (a dict of the accepted values, or a conversion)."""
    stage: str
    """Where it takes effect: model (applied to the meta-built model, before FSDP2), after (to the materialised
    model), step (read by build_training: the captured step, the optimizer, the model compiled whole), reads (read by
    the model or by another lever's application: the lever's `doc` says which)."""
    doc: str
    apply: Callable | None = None
    """apply(model, cfg, ctx) for the model and after stages."""
    check: Callable | None = None
    """check(cfg, ctx, device, strict) -> the refusal's message, or None (it may raise UnavailableError itself)."""
    given: bool = False
    """Also applied to a finished model handed to build_training (the benchmarks' dense ViT)."""


# ----------------------------------------------------------------------------------------------------------
# applications

def apply_activation_checkpointing(model, first: int | None = None,
                                   decoder_first: int | None = None) -> None:
    """Recompute every encoder and decoder block in backward, or only the first `first` encoder blocks and the
    first `decoder_first` decoder blocks (parameter names unchanged).

    Per recomputed FLOP a decoder block frees more memory than an encoder block: at mask 0.75 it runs on every
    patch (4x the encoder's tokens) at a narrower width (ViT-H: 257 tokens x 512 against 65 x 1280), so its
    saved activations are ~1.6x an encoder block's for about two thirds of its forward FLOPs."""
    if first is None and decoder_first is None:
        model.grad_checkpointing = True
        return
    model.checkpoint_first = first or 0
    model.checkpoint_first_decoder = decoder_first or 0


def apply_regional_compile(model, mode: str = "default") -> None:
    """torch.compile each block in place: one compiled block reused by every layer of that shape, not a
    whole-model graph (a 32-block encoder compiles one block). An MAE's encoder and decoder blocks, or the
    `blocks` of any ViT (timm's too). `mode` is torch.compile's (train.compile_mode)."""
    kw = {} if mode == "default" else {"mode": mode}
    for name in ("blocks", "decoder_blocks"):
        for blk in getattr(model, name, []):
            blk.compile(**kw)


def _full_checkpointing(model, cfg: Config, ctx) -> None:
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)


def _first_blocks(attr: str, field: str):
    def apply(model, cfg: Config, ctx) -> None:
        n = getattr(cfg.train, field)
        if n and not cfg.train.activation_checkpointing:  # <= the depth: checked by Config
            setattr(model, attr, n)
    return apply


def _attention(model, cfg: Config, ctx) -> None:
    from .attention import apply_attention

    apply_attention(model, cfg.train.attention)


def _fp8(model, cfg: Config, ctx) -> None:
    t = cfg.train
    if t.precision == "fp8":  # on the meta model, before the compile (which fuses the casts) and FSDP2
        from .fp8 import apply_fp8

        apply_fp8(model, t.fp8_recipe, t.fp8_decoder, fsdp=ctx.distributed)


def _regional_compile(model, cfg: Config, ctx) -> None:
    t = cfg.train
    if t.compile and t.compile_scope == "blocks":
        apply_regional_compile(model, t.compile_mode)


def _layer_norm(model, cfg: Config, ctx) -> None:
    if cfg.train.layer_norm == "torch":
        return
    from .layernorm import apply_layer_norm

    try:  # after the values are set: the swap keeps the Parameters, not the module types
        apply_layer_norm(model, cfg.train.layer_norm)
    except RuntimeError as e:
        from .config import UnavailableError

        raise UnavailableError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------
# checks


def _check_precision(cfg: Config, ctx, device, strict: bool) -> str | None:
    t = cfg.train
    if t.precision == "bf16-pure" and ctx.distributed:
        return ("train.precision=bf16-pure is for one process; under FSDP2 use bf16 (FSDP2 keeps bf16 parameters "
                "with fp32 master weights itself)")
    if t.precision == "fp8":
        from .fp8 import supported_here, torchao_float8

        torchao_float8()  # UnavailableError naming the extra to install
        why = supported_here(device)
        if why:
            return f"train.precision=fp8: {why}; use --train.precision bf16"
    if t.precision == "fp16" and t.cuda_graph:
        return ("train.precision=fp16: its loss scaler is not captured in a CUDA graph; set --train.cuda_graph false "
                "(or use bf16 on a GPU that has it)")
    return None


def _check_graph(cfg: Config, ctx, device, strict: bool) -> str | None:
    if not (strict and cfg.train.cuda_graph):
        return None
    why = None
    if device.type != "cuda":
        why = f"it needs CUDA (train.device resolved to {device})"
    elif ctx.distributed:
        why = "FSDP2 (torchrun or train.fsdp=always) is not captured; it overlaps its own collectives"
    return f"train.cuda_graph=true: {why}; set --train.cuda_graph false" if why else None


def _check_layer_norm(cfg: Config, ctx, device, strict: bool) -> str | None:
    t = cfg.train
    if strict and t.layer_norm != "torch" and (ctx.distributed or device.type != "cuda"):
        return (f"train.layer_norm={t.layer_norm} runs in one CUDA process "
                f"({'FSDP2 is on' if ctx.distributed else f'the device is {device}'}); use --train.layer_norm torch")
    return None


# ----------------------------------------------------------------------------------------------------------
# the table, in the order the model stage applies them

_TABLE = (
    Lever("kernels", ("model.kernels",), str, "reads",
          "masking / unshuffle / loss kernels: torch | triton | auto (read by the model, engine/model.py)"),
    Lever("activation_checkpointing", ("train.activation_checkpointing",), _BOOL, "model",
          "recompute every encoder and decoder block in backward", apply=_full_checkpointing),
    Lever("checkpoint_blocks", ("train.checkpoint_blocks",), str, "model",
          "recompute the first N encoder blocks", apply=_first_blocks("checkpoint_first", "checkpoint_blocks")),
    Lever("checkpoint_decoder_blocks", ("train.checkpoint_decoder_blocks",), str, "model",
          "recompute the first N decoder blocks",
          apply=_first_blocks("checkpoint_first_decoder", "checkpoint_decoder_blocks")),
    Lever("attention", ("train.attention",), str, "model", "the attention path (engine/attention.py)",
          apply=_attention, given=True),
    Lever("precision", ("train.precision",),
          {"autocast": "auto", "bf16": "bf16", "bf16-pure": "bf16-pure", "fp32": "fp32", "auto": "auto", "fp8": "fp8",
           "fp16": "fp16"}, "model",
          "autocast dtype (engine/device.py), bf16 weight copies (build_training), float8 GEMMs (applied here), "
          "fp16 loss scaling (build_training)", apply=_fp8, check=_check_precision),
    Lever("fp8_recipe", ("train.fp8_recipe",), str, "reads", "float8 scaling recipe (read by precision's fp8)"),
    Lever("compile", ("train.compile", "train.compile_scope"),
          {"none": ("false", "blocks"), "regional": ("true", "blocks"), "model": ("true", "model"),
           False: ("false", "blocks"), True: ("true", "model")}, "model",
          "torch.compile: each block (applied here) or the whole model (build_training)", apply=_regional_compile,
          given=True),
    Lever("compile_mode", ("train.compile_mode",), str, "reads", "torch.compile mode (read by compile)"),
    Lever("graph", ("train.cuda_graph",), _BOOL, "step", "the whole step captured in a CUDA graph (build_training)",
          check=_check_graph),
    Lever("layer_norm", ("train.layer_norm",), str, "after", "apex FusedLayerNorm swapped in (engine/layernorm.py)",
          apply=_layer_norm, check=_check_layer_norm, given=True),
    Lever("optimizer", ("optim.fused",), str, "step", "torch fused AdamW or apex FusedAdam (engine/optim.py)"),
)
LEVERS: dict[str, Lever] = {lever.name: lever for lever in _TABLE}


# ----------------------------------------------------------------------------------------------------------


def check_levers(cfg: Config, ctx, device: torch.device, strict: bool = True) -> None:
    """Refuse lever combinations that cannot run here, naming the lever and the way out (ConfigError): the mesh
    first, then every record's check in table order. strict=False (benchmarks, CPU tests) lets the captured step run
    its body eagerly off CUDA and apex's layer norm run wherever its module does; what cannot work anywhere is
    refused either way."""
    if cfg.parallel.replicate > 1 and (not ctx.distributed or ctx.world % cfg.parallel.replicate
                                       or ctx.world == cfg.parallel.replicate):
        raise ConfigError(f"parallel.replicate={cfg.parallel.replicate} needs a torchrun job whose world size is a "
                          f"multiple of it with at least 2 ranks per group (world size {ctx.world if ctx.distributed else 1})"
                          "; use --parallel.replicate 1")
    for lever in _TABLE:
        why = lever.check(cfg, ctx, device, strict) if lever.check else None
        if why:
            raise ConfigError(why)


def apply_levers(model, cfg: Config, ctx, stage: str) -> None:
    """Apply the records of `stage` (model | after) to `model`, in table order."""
    for lever in _TABLE:
        if lever.stage == stage and lever.apply is not None:
            lever.apply(model, cfg, ctx)


def apply_to_given_model(model, cfg: Config, ctx) -> None:
    """The records that apply to a finished model handed in (attention, regional compile, layer norm)."""
    for lever in _TABLE:
        if lever.given:
            lever.apply(model, cfg, ctx)


def levers_to_overrides(levers: dict) -> dict[str, str]:
    """{"kernels": "auto", "compile": "regional", "graph": True, ...} -> dotted config overrides."""
    out: dict[str, str] = {}
    for name, value in levers.items():
        if name not in LEVERS:
            raise ValueError(f"unknown lever {name!r}; levers: {', '.join(LEVERS)}")
        lever = LEVERS[name]
        conv = lever.values
        if isinstance(conv, dict):
            if value not in conv:
                raise ValueError(f"lever {name} must be one of {', '.join(map(str, conv))}, got {value!r}")
            v = conv[value]
        else:
            v = conv(value)
        out.update(zip(lever.fields, v) if len(lever.fields) > 1 else {lever.fields[0]: v})
    return out


def config_with_levers(cfg: Config, levers: dict, **overrides) -> Config:
    """`cfg` with a lever set and further dotted overrides applied (validated as the command line is)."""
    return apply_overrides(cfg, {**levers_to_overrides(levers), **{k: str(v) for k, v in overrides.items()}})

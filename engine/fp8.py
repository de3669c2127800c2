"""train.precision=fp8: the encoder's linear layers (qkv, proj, fc1, fc2) as float8 GEMMs through torchao's float8
training (`torchao.float8.convert_to_float8_training`), bf16 autocast everywhere else.

The encoder's GEMMs are most of a ViT-H step's matmul time at mask 0.75 (M = batch x 65 tokens, K and N 1,280 and
5,120: large enough for float8 to pay); the decoder (width 512) stays bf16 unless train.fp8_decoder. Recipes:
tensorwise (one dynamic scale per tensor, the fastest) or rowwise (a scale per row: closer to bf16). Float8Linear
keeps the module's parameter names and fp32 master weights, so checkpoints, exports and FSDP2 see the same model;
the conversion happens on the meta-built model, before the regional compile (which fuses the casts) and FSDP2.

torchao is an optional extra (`pip install -e ".[fp8]"`; checked with torchao 0.18). float8 GEMMs need a GPU with
float8 tensor cores (H100: compute capability 8.9+); torch 2.14's `torch._scaled_mm` also runs on the CPU, which is
how the tests hold this path to the bf16 one.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import FP8_RECIPES as RECIPES
from .config import UnavailableError


def torchao_float8():
    """torchao.float8, or an UnavailableError saying how to install it."""
    try:
        from torchao import float8
    except ImportError as e:
        raise UnavailableError(f"train.precision=fp8 needs torchao ({e}); pip install -e \".[fp8]\" "
                               "(torchao>=0.18), or use --train.precision bf16") from None
    return float8


def fp8_filter(decoder: bool = False):
    """module_filter_fn: the Linear layers of the encoder blocks (and of the decoder blocks with decoder=True) whose
    dimensions float8 GEMMs take (multiples of 16); the patch embedding, the decoder embedding and the pixel head
    stay bf16."""
    prefixes = ("blocks.",) + (("decoder_blocks.",) if decoder else ())

    def keep(mod: nn.Module, fqn: str) -> bool:
        return (isinstance(mod, nn.Linear) and fqn.startswith(prefixes)
                and mod.in_features % 16 == 0 and mod.out_features % 16 == 0)

    return keep


def apply_fp8(model: nn.Module, recipe: str = "tensorwise", decoder: bool = False, fsdp: bool = False) -> list[str]:
    """Swap the selected Linear layers for torchao's Float8Linear in place; returns their names. fsdp=True with the
    tensorwise recipe: FSDP2 all-gathers those weights in float8 (half the bytes of bf16)."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe must be one of {RECIPES}, got {recipe!r}")
    f8 = torchao_float8()
    config = f8.Float8LinearConfig.from_recipe_name(recipe)
    if fsdp and recipe == "tensorwise":
        import dataclasses

        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    f8.convert_to_float8_training(model, config=config, module_filter_fn=fp8_filter(decoder))
    return fp8_layers(model)


def fp8_layers(model: nn.Module) -> list[str]:
    """Names of the modules that run as float8 GEMMs."""
    return [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]


def float8_all_gather(model: nn.Module) -> bool:
    """Whether FSDP2 gathers some weights in float8 (torchao's float8-cast weight inside the shards' DTensors)."""
    return any("Float8" in type(getattr(p, "_local_tensor", p)).__name__ for p in model.parameters())


def describe(model: nn.Module, recipe: str) -> str:
    """The banner's precision: 'fp8 tensorwise (128 float8 linear layers, float8 all-gather), bf16 elsewhere'."""
    n = len(fp8_layers(model))
    return (f"fp8 {recipe} ({n} float8 linear layers" + (", float8 all-gather" if float8_all_gather(model) else "")
            + "), bf16 elsewhere")


def supported_here(device: torch.device) -> str | None:
    """Why float8 GEMMs cannot run on `device` (None when they can)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no float8 GEMMs"
    return None

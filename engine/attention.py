"""How the blocks compute attention (`train.attention`).

auto lets PyTorch choose the `scaled_dot_product_attention` kernel (on an H100 with torch 2.11 it picks cuDNN
for bf16); flash, efficient, cudnn and math restrict it to that kernel, with the math kernel as the fallback for
shapes the fused one refuses. The choice is made when a step is first run (and traced, under torch.compile),
so the whole step, backward included, runs inside the context.

encoder-math changes the encoder's modules instead (`apply_attention`): its blocks compute attention as two
batched matmuls and a softmax (timm's non-fused path), which the regional compile fuses with the scaling; the
decoder keeps PyTorch's choice. At 75% masking the encoder sees 50 to 65 tokens, where a fused kernel launches
thousands of programs for little work; the decoder's 197 to 257 tokens would hold their score matrices for
backward (about 0.5 GB per ViT-H decoder block at batch 256), so it stays fused.
"""

from __future__ import annotations

import contextlib

from torch import nn

ATTENTION = ("auto", "flash", "efficient", "cudnn", "math", "encoder-math")


def attention_context(name: str):
    if name not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {name!r}")
    if name in ("auto", "encoder-math"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel(list(dict.fromkeys([chosen, SDPBackend.MATH])))


def apply_attention(model: nn.Module, name: str) -> int:
    """Set the encoder blocks' attention path for `name` (before torch.compile traces them); returns how many
    blocks were switched. Only encoder-math changes modules; an MAE's encoder or any ViT's `blocks`."""
    if name not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {name!r}")
    if name != "encoder-math":
        return 0
    n = 0
    for blk in getattr(model, "blocks", []):
        attn = getattr(blk, "attn", None)
        if attn is None or not hasattr(attn, "fused_attn"):
            raise ValueError(f"train.attention=encoder-math needs timm attention modules (with fused_attn); "
                             f"{type(blk).__name__}.attn is {type(attn).__name__}")
        attn.fused_attn = False
        n += 1
    return n

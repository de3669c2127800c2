"""Which fused attention kernel `scaled_dot_product_attention` may use (`train.attention`).

auto lets PyTorch choose (on an H100 with torch 2.11 it picks cuDNN for bf16); flash, efficient, cudnn and
math restrict it to that kernel, with the math kernel as the fallback for shapes the fused one refuses.
The choice is made when a step is first run (and traced, under torch.compile), so the whole step, backward
included, runs inside the context.
"""

from __future__ import annotations

import contextlib

ATTENTION = ("auto", "flash", "efficient", "cudnn", "math")


def attention_context(name: str):
    if name not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {name!r}")
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel(list(dict.fromkeys([chosen, SDPBackend.MATH])))

"""How the blocks compute attention (`train.attention`).

auto lets PyTorch choose the `scaled_dot_product_attention` kernel (on an H100 with torch 2.11 it picks cuDNN
for bf16); flash, efficient, cudnn and math restrict it to that kernel, with the math kernel as the fallback for
shapes the fused one refuses. The choice is made when a step is first run (and traced, under torch.compile),
so the whole step, backward included, runs inside the context.

encoder-triton routes the encoder's attention through this project's Triton kernel (kernels/attention.py): one
program per (batch, head) with the whole short sequence in registers, reading q / k / v straight from the qkv
projection's output and writing its gradient the same way (no head split, stack or copy); the decoder keeps
PyTorch's choice. encoder-math changes the encoder's modules too (`apply_attention`): its blocks compute
attention as two batched matmuls and a softmax (timm's non-fused path), which the regional compile fuses with
the scaling; the decoder keeps PyTorch's choice. At 75% masking the encoder sees 50 to 65 tokens, where a fused
kernel launches thousands of programs for little work; the decoder's 197 to 257 tokens would hold their score
matrices for backward (about 0.5 GB per ViT-H decoder block at batch 256), so it stays fused.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .config import ATTENTION  # noqa: E402 - the names, declared with the config that checks them


def attention_context(name: str):
    if name not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {name!r}")
    if name in ("auto", "encoder-math", "encoder-triton"):  # the latter two change modules, not SDPA's choice
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel(list(dict.fromkeys([chosen, SDPBackend.MATH])))


def apply_attention(model: nn.Module, name: str) -> int:
    """Set the encoder blocks' attention path for `name` (before torch.compile traces them); returns how many
    blocks were switched. encoder-math and encoder-triton change modules (an MAE's encoder or any ViT's
    `blocks`); the other names leave them as built. Parameter names and values are unchanged."""
    if name not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {name!r}")
    if name not in ("encoder-math", "encoder-triton"):
        return 0
    n = 0
    for blk in getattr(model, "blocks", []):
        attn = getattr(blk, "attn", None)
        if attn is None or not hasattr(attn, "fused_attn") or not hasattr(attn, "qkv"):
            raise ValueError(f"train.attention={name} needs timm attention modules (with fused_attn and qkv); "
                             f"{type(blk).__name__}.attn is {type(attn).__name__}")
        if name == "encoder-math":
            attn.fused_attn = False
        else:
            attn.kernels = getattr(model, "kernels", "auto")  # model.kernels: auto | triton | torch
            if not isinstance(attn, _ShortSeq):
                attn.__class__ = _short_seq_class(type(attn))
        n += 1
    return n


class _ShortSeq:
    """Marker base of the encoder-triton attention classes."""


_CLASSES: dict[type, type] = {}


def _short_seq_class(base: type) -> type:
    """`base` (timm's Attention) with its forward routed through kernels.qkv_attention; the same parameters
    and names (the instance's class is swapped, as FSDP2 does), so checkpoints and optimizers are unaffected."""
    if base not in _CLASSES:
        from kernels import attention as kattn
        from kernels import resolve_impl

        def forward(self, x, *args, **kwargs):
            extra = [a for a in (*args, *kwargs.values()) if a is not None and a is not False]
            head_dim = self.qkv.out_features // (3 * self.num_heads)
            plain = (extra or getattr(self, "gate", None) is not None
                     or not isinstance(getattr(self, "q_norm", nn.Identity()), nn.Identity)
                     or not isinstance(getattr(self, "k_norm", nn.Identity()), nn.Identity)
                     or (self.training and self.attn_drop.p > 0)
                     or not kattn.supported(x.shape[1], head_dim)  # e.g. the dense baseline's 197-257 tokens
                     or resolve_impl(self.kernels, x) != "triton")  # model.kernels=torch, or auto on a CPU
            if plain:  # timm's own path (SDPA)
                return base.forward(self, x, *args, **kwargs)
            out = kattn.qkv_attention_triton(self.qkv(x), self.num_heads, self.scale)
            norm = getattr(self, "norm", None)
            if norm is not None:
                out = norm(out)
            return self.proj_drop(self.proj(out))

        _CLASSES[base] = type(f"ShortSeq{base.__name__}", (base, _ShortSeq), {"forward": forward,
                                                                              "__module__": __name__})
    return _CLASSES[base]

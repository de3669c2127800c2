"""MAE kernels: pure functions on tensors (random masking, unshuffle, norm-pixel MSE loss, short-sequence
attention from the fused qkv projection).

Each op has a plain torch reference and, where Triton is available, a Triton kernel with the same
signature. `impl` picks: "auto" (Triton on CUDA tensors, torch elsewhere), "triton" (forced; on CPU
only under TRITON_INTERPRET=1) or "torch".

Note: an unrelated package on PyPI is also called `kernels`; this one is the MAE engine's.
"""

from __future__ import annotations

import os

import torch

from .loss import norm_pix_mse_torch, patchify, unpatchify
from .masking import len_keep_for, random_masking_torch, unshuffle_torch

__all__ = ["random_masking", "unshuffle", "norm_pix_mse", "qkv_attention", "patchify", "unpatchify", "len_keep_for",
           "triton_available", "resolve_impl", "IMPLS"]

IMPLS = ("auto", "triton", "torch")
MAE_ENGINE_KERNELS = True  # marker: tests check that `import kernels` resolves to this project


def triton_available() -> bool:
    from .masking import HAS_TRITON

    return HAS_TRITON


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, t: torch.Tensor) -> str:
    """Return "triton" or "torch" for a request on tensor `t`."""
    if impl not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    usable = triton_available() and (t.is_cuda or (_interpreting() and t.device.type == "cpu"))
    if impl == "triton":
        if not usable:
            raise RuntimeError("Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU) and an importable "
                               f"triton; got a {t.device.type} tensor, triton importable: {triton_available()}")
        return "triton"
    return "triton" if (usable and t.is_cuda) else "torch"


def random_masking(x, mask_ratio, noise=None, impl="auto", pos=None):
    """x [N, L, D] (+ pos, the patches' position embedding) -> (x_kept [N, K, D], mask [N, L], ids_restore [N, L],
    ids_keep [N, K])."""
    if resolve_impl(impl, x) == "triton":
        from .masking import random_masking_triton

        return random_masking_triton(x, mask_ratio, noise, pos)
    return random_masking_torch(x, mask_ratio, noise, pos)


def unshuffle(x, ids_restore, mask_token, has_cls=True, impl="auto", pos=None):
    """x [N, K(+1), D] kept tokens -> [N, L(+1), D] in patch order with mask tokens at removed positions
    (+ pos, the decoder's position embedding, in x's dtype)."""
    if resolve_impl(impl, x) == "triton":
        from .masking import unshuffle_triton

        return unshuffle_triton(x, ids_restore, mask_token, has_cls, pos)
    return unshuffle_torch(x, ids_restore, mask_token, has_cls, pos)


def norm_pix_mse(imgs, pred, mask, patch_size, norm_pix=True, eps=1e-6, impl="auto", mask_count=None):
    """Scalar MSE over removed patches against (per-patch normalised) pixels; see kernels/loss.py. mask_count:
    mask.sum() when the caller knows it (then the kernel writes its gradient final in the forward)."""
    if resolve_impl(impl, pred) == "triton":
        from .loss import norm_pix_mse_triton

        return norm_pix_mse_triton(imgs, pred, mask, patch_size, norm_pix, eps, mask_count=mask_count)
    return norm_pix_mse_torch(imgs, pred, mask, patch_size, norm_pix, eps, mask_count=mask_count)


def qkv_attention(qkv, num_heads, scale, impl="auto"):
    """qkv [B, N, 3*C] from the fused projection -> attention output [B, N, C] (heads merged); see
    kernels/attention.py. The Triton kernel takes N <= 128 and head_dim <= 128; longer sequences use torch."""
    from .attention import qkv_attention_torch, qkv_attention_triton, supported

    fits = supported(qkv.shape[1], qkv.shape[2] // (3 * num_heads))
    # impl="triton" on a shape the kernel does not take: its own error names the limits
    if resolve_impl(impl, qkv) == "triton" and (impl == "triton" or fits):
        return qkv_attention_triton(qkv, num_heads, scale)
    return qkv_attention_torch(qkv, num_heads, scale)

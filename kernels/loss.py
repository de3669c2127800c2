"""Norm-pixel MSE loss of MAE: MSE on removed patches against per-patch normalised pixels.

The numeric spec (DESIGN.md), transcribed by `norm_pix_mse_torch`:
    target = patchify(imgs)                              # [N, L, P], P = p*p*C, fp32
    mean = target.mean(-1); var = target.var(-1)         # UNBIASED variance (divide by P - 1)
    target = (target - mean) / sqrt(var + 1e-6)          # eps inside the square root
    loss = ((pred - target) ** 2).mean(-1)               # [N, L]
    loss = (loss * mask).sum() / mask.sum()              # mean over removed patches only
"""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs [N, C, H, W] -> [N, L, p*p*C], patch pixels ordered (p, q, c) (nchpwq -> nhwpqc)."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int = 3) -> torch.Tensor:
    """[N, L, p*p*C] -> imgs [N, C, H, W] (square grid)."""
    n, length, _ = x.shape
    g = int(round(length**0.5))
    if g * g != length:
        raise ValueError(f"unpatchify needs a square grid, got L={length}")
    x = x.reshape(n, g, g, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, g * p, g * p)


def norm_pix_mse_torch(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                       norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """imgs [N, C, H, W]; pred [N, L, P]; mask [N, L] (1 = removed). Scalar fp32 loss."""
    target = patchify(imgs.float(), patch_size)
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {list(pred.shape)}, expected {list(target.shape)} from the images")
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased
        target = (target - mean) / (var + eps) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)
    mask = mask.float()
    return (loss * mask).sum() / mask.sum()

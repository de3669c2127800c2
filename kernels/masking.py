"""Random masking (gather of the kept patches) and unshuffle (scatter back with mask tokens).

Conventions (../DESIGN): `mask` [N, L] float, 1 = removed, 0 = kept; `ids_restore` [N, L];
`ids_keep` [N, K] with K = int(L * (1 - mask_ratio)). The order of patches is an argsort of per-sample
noise in [0, 1): the first K of that order are kept. Ties are broken by patch index (a stable sort), so
the torch reference and the Triton kernel agree exactly.

This file holds the plain torch reference; the Triton kernels live in `kernels/triton_masking.py` behind
the same signatures, and `kernels.random_masking` / `kernels.unshuffle` pick one.
"""

from __future__ import annotations

import torch


def len_keep_for(num_patches: int, mask_ratio: float) -> int:
    """Number of kept patches: int(L * (1 - r)), at least one (a ratio that keeps none is an error)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    k = int(num_patches * (1 - mask_ratio))
    if k < 1:
        raise ValueError(f"mask ratio {mask_ratio} keeps no patch out of {num_patches}")
    return k


def check_noise(noise: torch.Tensor, n: int, length: int) -> None:
    if noise.shape != (n, length):
        raise ValueError(f"noise must have shape [N, L] = [{n}, {length}], got {list(noise.shape)}")


def random_masking_torch(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Keep a random subset of patches per sample.

    x: [N, L, D] patch tokens; noise: [N, L] in [0, 1) (drawn when None).
    Returns x_kept [N, K, D], mask [N, L] (1 = removed), ids_restore [N, L] int64, ids_keep [N, K] int64.
    """
    n, length, d = x.shape
    k = len_keep_for(length, mask_ratio)
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    check_noise(noise, n, length)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :k]
    # expand, never repeat: the index is a view of [N, K], not an [N, K, D] tensor
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device, dtype=torch.float32)
    mask[:, :k] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore, ids_keep


def unshuffle_torch(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, has_cls: bool = True):
    """Put the kept tokens back in patch order and fill removed positions with the mask token.

    x: [N, K (+1 if has_cls), D] kept tokens in keep order (cls first); ids_restore: [N, L];
    mask_token: [D] (any shape with D elements). Returns [N, L (+1), D].
    """
    n, t, d = x.shape
    length = ids_restore.shape[1]
    k = t - 1 if has_cls else t
    body = x[:, 1:, :] if has_cls else x
    mask_tokens = mask_token.reshape(1, 1, d).to(x.dtype).expand(n, length - k, d)
    x_ = torch.cat([body, mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    if has_cls:
        x_ = torch.cat([x[:, :1, :], x_], dim=1)
    return x_

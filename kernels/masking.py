"""Random masking (gather of the kept patches) and unshuffle (scatter back with mask tokens).

Conventions (../DESIGN): `mask` [N, L] float, 1 = removed, 0 = kept; `ids_restore` [N, L];
`ids_keep` [N, K] with K = int(L * (1 - mask_ratio)). The order of patches is an argsort of per-sample
noise in [0, 1): the first K of that order are kept. Ties are broken by patch index (a stable sort), so
the torch reference and the Triton kernel agree exactly.

This file holds the plain torch references and, below them, the Triton kernels with their autograd
Functions behind the same signatures; `kernels.random_masking` / `kernels.unshuffle` pick one.

Triton kernels are decorated when this module is imported: for the CPU interpreter, set
TRITON_INTERPRET=1 before importing `kernels`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - torch without triton (e.g. some CPU wheels)
    HAS_TRITON = False


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


# ----------------------------------------------------------------------------------------------------------
# Triton
#
# Random masking is ONE launch: grid (N, cdiv(K, BLOCK_K)). Every program sorts its row's L noise keys in
# registers (L <= 1024: a bitonic tl.sort of int64 keys (monotone float bits << 32) | index, which is a
# stable argsort), program 0 of the row writes ids_restore / mask / ids_keep, and each program copies its
# BLOCK_K kept rows of x. Re-sorting per chunk costs a few thousand register compare-swaps, far less than
# a second launch and a round trip of the ids through memory. No [N, K, D] index is ever built.

MAX_SORT_L = 1024


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if HAS_TRITON:

    @triton.jit
    def _sorted_ids(noise_ptr, row, L, BLOCK_L: tl.constexpr):
        """Stable argsort of noise[row, :L] -> (ids_shuffle [BLOCK_L] int32 (pad at the end), offs)."""
        offs = tl.arange(0, BLOCK_L)
        valid = offs < L
        v = tl.load(noise_ptr + row.to(tl.int64) * L + offs, mask=valid, other=0.0).to(tl.float32) + 0.0  # -0 -> +0
        bits = v.to(tl.int32, bitcast=True)
        mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 order == float order
        key = (mono.to(tl.int64) << 32) | offs.to(tl.int64)  # ties broken by index: a stable sort
        key = tl.where(valid, key, 0x7FFFFFFFFFFFFFFF)
        key = tl.sort(key)
        return (key & 0x7FFFFFFF).to(tl.int32), offs

    @triton.jit
    def _masking_fwd_kernel(
        x_ptr,  # [N, L, D] patch tokens
        noise_ptr,  # [N, L] fp32
        out_ptr,  # [N, K, D] kept tokens
        mask_ptr,  # [N, L] fp32, 1 = removed
        ids_restore_ptr,  # [N, L] int64
        ids_keep_ptr,  # [N, K] int64
        L, K, D,
        BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        ids, offs = _sorted_ids(noise_ptr, row, L, BLOCK_L)
        valid = offs < L
        if chunk == 0:
            base = row.to(tl.int64) * L
            tl.store(ids_restore_ptr + base + ids, offs.to(tl.int64), mask=valid)  # ids_restore[ids[j]] = j
            tl.store(mask_ptr + base + ids, (offs >= K).to(tl.float32), mask=valid)
            tl.store(ids_keep_ptr + row.to(tl.int64) * K + offs, ids.to(tl.int64), mask=offs < K)
        j = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
        # pick ids[j] for this chunk out of the register row: a [BLOCK_K, BLOCK_L] select-and-sum
        src = tl.sum(tl.where(offs[None, :] == j[:, None], ids[None, :], 0), axis=1)
        jm = j < K
        x_row = x_ptr + row.to(tl.int64) * L * D
        o_row = out_ptr + row.to(tl.int64) * K * D
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m2 = jm[:, None] & (dd[None, :] < D)
            v = tl.load(x_row + src[:, None].to(tl.int64) * D + dd[None, :], mask=m2)
            tl.store(o_row + j[:, None].to(tl.int64) * D + dd[None, :], v, mask=m2)

    @triton.jit
    def _masking_bwd_kernel(
        g_ptr,  # [N, K, D] grad of the kept tokens
        ids_restore_ptr,  # [N, L] int64
        gx_ptr,  # [N, L, D] grad of x (zeros at removed positions)
        L, K, D,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        l = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        lm = l < L
        r = tl.load(ids_restore_ptr + row.to(tl.int64) * L + l, mask=lm, other=0)
        kept = lm & (r < K)
        g_row = g_ptr + row.to(tl.int64) * K * D
        gx_row = gx_ptr + row.to(tl.int64) * L * D
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd[None, :] < D
            v = tl.load(g_row + r[:, None] * D + dd[None, :], mask=kept[:, None] & dm, other=0.0)
            tl.store(gx_row + l[:, None].to(tl.int64) * D + dd[None, :], v, mask=lm[:, None] & dm)

    @triton.jit
    def _unshuffle_fwd_kernel(
        x_ptr,  # [N, T, D] kept tokens in keep order, T = K + HAS_CLS
        ids_restore_ptr,  # [N, L] int64
        mt_ptr,  # [D] mask token, already in x's dtype
        out_ptr,  # [N, L + HAS_CLS, D]
        T, L, K, D,
        HAS_CLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # output positions
        pm = p < L + HAS_CLS
        l = p - HAS_CLS
        r = tl.load(ids_restore_ptr + row.to(tl.int64) * L + l, mask=pm & (l >= 0), other=0)
        is_cls = pm & (l < 0)
        take_x = is_cls | (pm & (l >= 0) & (r < K))
        src = tl.where(is_cls, 0, r + HAS_CLS)
        x_row = x_ptr + row.to(tl.int64) * T * D
        o_row = out_ptr + row.to(tl.int64) * (L + HAS_CLS) * D
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd < D
            xv = tl.load(x_row + src[:, None] * D + dd[None, :], mask=take_x[:, None] & dm[None, :], other=0.0)
            mt = tl.load(mt_ptr + dd, mask=dm, other=0.0)
            v = tl.where(take_x[:, None], xv, mt[None, :])
            tl.store(o_row + p[:, None].to(tl.int64) * D + dd[None, :], v, mask=pm[:, None] & dm[None, :])

    @triton.jit
    def _unshuffle_bwd_kernel(
        g_ptr,  # [N, L + HAS_CLS, D] grad of the decoder input
        ids_restore_ptr,  # [N, L] int64
        gx_ptr,  # [N, T, D] grad of the kept tokens (every row written exactly once)
        part_ptr,  # [N * n_chunks, D] fp32 per-program partial sums of the grad at removed positions
        T, L, K, D,
        HAS_CLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        p = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
        pm = p < L + HAS_CLS
        l = p - HAS_CLS
        r = tl.load(ids_restore_ptr + row.to(tl.int64) * L + l, mask=pm & (l >= 0), other=0)
        is_cls = pm & (l < 0)
        to_x = is_cls | (pm & (l >= 0) & (r < K))
        removed = pm & (l >= 0) & (r >= K)
        dst = tl.where(is_cls, 0, r + HAS_CLS)
        g_row = g_ptr + row.to(tl.int64) * (L + HAS_CLS) * D
        gx_row = gx_ptr + row.to(tl.int64) * T * D
        part_row = part_ptr + (row.to(tl.int64) * tl.num_programs(1) + chunk) * D
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd < D
            gv = tl.load(g_row + p[:, None].to(tl.int64) * D + dd[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
            tl.store(gx_row + dst[:, None] * D + dd[None, :], gv, mask=to_x[:, None] & dm[None, :])
            s = tl.sum(tl.where(removed[:, None], gv.to(tl.float32), 0.0), axis=0)
            tl.store(part_row + dd, s, mask=dm)


def _block_d(d: int) -> int:
    return min(128, _pow2(d))


class _RandomMaskingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, noise, k):
        n, length, d = x.shape
        x = x.contiguous()
        noise = noise.to(torch.float32).contiguous()
        out = torch.empty(n, k, d, device=x.device, dtype=x.dtype)
        mask = torch.empty(n, length, device=x.device, dtype=torch.float32)
        ids_restore = torch.empty(n, length, device=x.device, dtype=torch.int64)
        ids_keep = torch.empty(n, k, device=x.device, dtype=torch.int64)
        block_k = 16
        grid = (n, triton.cdiv(k, block_k))
        _masking_fwd_kernel[grid](x, noise, out, mask, ids_restore, ids_keep, length, k, d,
                                  BLOCK_L=_pow2(length), BLOCK_K=block_k, BLOCK_D=_block_d(d),
                                  num_warps=4 if length <= 256 else 8)
        ctx.save_for_backward(ids_restore)
        ctx.k = k
        ctx.mark_non_differentiable(mask, ids_restore, ids_keep)
        return out, mask, ids_restore, ids_keep

    @staticmethod
    def backward(ctx, g_out, _g_mask, _g_restore, _g_keep):
        (ids_restore,) = ctx.saved_tensors
        n, length = ids_restore.shape
        g_out = g_out.contiguous()
        d = g_out.shape[-1]
        gx = torch.empty(n, length, d, device=g_out.device, dtype=g_out.dtype)
        block_r = 16
        _masking_bwd_kernel[(n, triton.cdiv(length, block_r))](g_out, ids_restore, gx, length, ctx.k, d,
                                                               BLOCK_R=block_r, BLOCK_D=_block_d(d))
        return gx, None, None


class _UnshuffleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_restore, mask_token, has_cls):
        n, t, d = x.shape
        length = ids_restore.shape[1]
        x = x.contiguous()
        ids_restore = ids_restore.contiguous()
        mt = mask_token.reshape(d).to(x.dtype).contiguous()
        k = t - int(has_cls)
        out = torch.empty(n, length + int(has_cls), d, device=x.device, dtype=x.dtype)
        block_r = 16
        _unshuffle_fwd_kernel[(n, triton.cdiv(length + int(has_cls), block_r))](
            x, ids_restore, mt, out, t, length, k, d, HAS_CLS=int(has_cls), BLOCK_R=block_r, BLOCK_D=_block_d(d))
        ctx.save_for_backward(ids_restore)
        ctx.meta = (t, k, int(has_cls), mask_token.shape, mask_token.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        (ids_restore,) = ctx.saved_tensors
        t, k, has_cls, mt_shape, mt_dtype = ctx.meta
        g = g.contiguous()
        n, _, d = g.shape
        length = ids_restore.shape[1]
        block_r = 16
        chunks = triton.cdiv(length + has_cls, block_r)
        gx = torch.empty(n, t, d, device=g.device, dtype=g.dtype)
        part = torch.empty(n * chunks, d, device=g.device, dtype=torch.float32)
        _unshuffle_bwd_kernel[(n, chunks)](g, ids_restore, gx, part, t, length, k, d, HAS_CLS=has_cls,
                                           BLOCK_R=block_r, BLOCK_D=_block_d(d))
        g_mt = part.sum(0).to(mt_dtype).reshape(mt_shape) if ctx.needs_input_grad[2] else None
        return gx, None, g_mt, None


def random_masking_triton(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Triton version of `random_masking_torch` (same signature and results, bit for bit)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable")
    n, length, d = x.shape
    if length > MAX_SORT_L:
        return random_masking_torch(x, mask_ratio, noise)
    k = len_keep_for(length, mask_ratio)
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    check_noise(noise, n, length)
    return _RandomMaskingFn.apply(x, noise, k)


def unshuffle_triton(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, has_cls: bool = True):
    """Triton version of `unshuffle_torch` (same signature and results, bit for bit)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable")
    return _UnshuffleFn.apply(x, ids_restore, mask_token, bool(has_cls))

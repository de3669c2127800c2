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

from .tl_util import HAS_TRITON, INTERPRETING, pow2 as _pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .tl_util import cast


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


def random_masking_torch(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                         pos: torch.Tensor | None = None):
    """Keep a random subset of patches per sample.

    x: [N, L, D] patch tokens; noise: [N, L] in [0, 1) (drawn when None); pos: the patches' position embedding
    (L x D elements, e.g. [1, L, D]) added to x first (`x + pos`, torch's type promotion).
    Returns x_kept [N, K, D], mask [N, L] (1 = removed), ids_restore [N, L] int64, ids_keep [N, K] int64.
    """
    if pos is not None:
        x = x + pos.reshape(1, x.shape[1], x.shape[2])
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


def unshuffle_torch(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, has_cls: bool = True,
                    pos: torch.Tensor | None = None):
    """Put the kept tokens back in patch order and fill removed positions with the mask token.

    x: [N, K (+1 if has_cls), D] kept tokens in keep order (cls first); ids_restore: [N, L];
    mask_token: [D] (any shape with D elements); pos: the decoder's position embedding ((L + 1) x D elements
    with the cls row first), added in x's dtype (`out + pos.to(x.dtype)`). Returns [N, L (+1), D].
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
    if pos is not None:
        x_ = x_ + pos.reshape(1, x_.shape[1], d).to(x.dtype)
    return x_


# ----------------------------------------------------------------------------------------------------------
# Triton
#
# Random masking is ONE launch: grid (N, cdiv(K, BLOCK_K), cdiv(D, BLOCK_D)). Every program sorts its row's L
# noise keys in registers (L <= 1024: a bitonic tl.sort of int64 keys (monotone float bits << 32) | index, which
# is a stable argsort), program (row, 0, 0) writes ids_restore / mask / ids_keep, and each program moves one
# [BLOCK_K, BLOCK_D] tile of kept rows, adding the position embedding of exactly those rows (the add over all L
# patches before masking is folded in: only kept tokens' embeddings are read). Tiles of ~4K elements without a
# loop keep many loads in flight per SM; re-sorting per tile costs register compare-swaps, not memory traffic.
# No [N, K, D] index is ever built.
#
# The gathers are exact: each output element is one input element (plus its embedding, in torch's promotion:
# both read as fp32, one rounding), so tests compare with torch.equal. The unshuffle backward's mask-token
# gradient is a sum over every removed position: by default one fp32 atomic add per program and column into a
# zeroed buffer (one launch; the order of additions varies, as with torch's index_add_ on CUDA); under
# torch.use_deterministic_algorithms(True) per-program partial sums are added in a fixed order instead.

MAX_SORT_L = 1024


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
        pos_ptr,  # [L, D] the patches' position embedding, added to the kept rows (HAS_POS)
        noise_ptr,  # [N, L] fp32
        out_ptr,  # [N, K, D] kept tokens (+ position embedding), in the promoted dtype
        mask_ptr,  # [N, L] fp32, 1 = removed
        ids_restore_ptr,  # [N, L] int64
        ids_keep_ptr,  # [N, K] int64
        L, K, D,
        HAS_POS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        EXACT_BF16: tl.constexpr = INTERPRETING,
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        dblk = tl.program_id(2)
        ids, offs = _sorted_ids(noise_ptr, row, L, BLOCK_L)
        valid = offs < L
        if chunk == 0:
            if dblk == 0:
                base = row.to(tl.int64) * L
                tl.store(ids_restore_ptr + base + ids, offs.to(tl.int64), mask=valid)  # ids_restore[ids[j]] = j
                tl.store(mask_ptr + base + ids, (offs >= K).to(tl.float32), mask=valid)
                tl.store(ids_keep_ptr + row.to(tl.int64) * K + offs, ids.to(tl.int64), mask=offs < K)
        j = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
        # pick ids[j] for this chunk out of the register row: a [BLOCK_K, BLOCK_L] select-and-sum
        src = tl.sum(tl.where(offs[None, :] == j[:, None], ids[None, :], 0), axis=1).to(tl.int64)
        dd = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
        m2 = (j < K)[:, None] & (dd[None, :] < D)
        v = tl.load(x_ptr + row.to(tl.int64) * L * D + src[:, None] * D + dd[None, :], mask=m2)
        if HAS_POS:  # x + pos in torch's promotion: both read as fp32, one rounding to the output dtype
            pv = tl.load(pos_ptr + src[:, None] * D + dd[None, :], mask=m2)
            v = v.to(tl.float32) + pv.to(tl.float32)
        tl.store(out_ptr + row.to(tl.int64) * K * D + j[:, None].to(tl.int64) * D + dd[None, :],
                 cast(v, out_ptr.dtype.element_ty, EXACT_BF16), mask=m2)

    @triton.jit
    def _masking_bwd_kernel(
        g_ptr,  # [N, K, D] grad of the kept tokens
        ids_restore_ptr,  # [N, L] int64
        gx_ptr,  # [N, L, D] grad of x (zeros at removed positions), in x's dtype
        L, K, D,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EXACT_BF16: tl.constexpr = INTERPRETING,
    ):
        row = tl.program_id(0)
        l = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        dd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        lm = l < L
        dm = dd[None, :] < D
        r = tl.load(ids_restore_ptr + row.to(tl.int64) * L + l, mask=lm, other=0)
        kept = lm & (r < K)
        v = tl.load(g_ptr + row.to(tl.int64) * K * D + r[:, None] * D + dd[None, :], mask=kept[:, None] & dm, other=0.0)
        tl.store(gx_ptr + row.to(tl.int64) * L * D + l[:, None].to(tl.int64) * D + dd[None, :],
                 cast(v, gx_ptr.dtype.element_ty, EXACT_BF16), mask=lm[:, None] & dm)

    @triton.jit
    def _unshuffle_fwd_kernel(
        x_ptr,  # [N, T, D] kept tokens in keep order, T = K + HAS_CLS
        ids_restore_ptr,  # [N, L] int64
        mt_ptr,  # [D] mask token, already in x's dtype
        pos_ptr,  # [L + HAS_CLS, D] position embedding added after the scatter (HAS_POS), rounded to x's dtype first
        out_ptr,  # [N, L + HAS_CLS, D]
        T, L, K, D,
        HAS_CLS: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
        EXACT_BF16: tl.constexpr = INTERPRETING,
    ):
        row = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # output positions
        dd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        pm = p < L + HAS_CLS
        dm = dd < D
        l = p - HAS_CLS
        r = tl.load(ids_restore_ptr + row.to(tl.int64) * L + l, mask=pm & (l >= 0), other=0)
        is_cls = pm & (l < 0)
        take_x = is_cls | (pm & (l >= 0) & (r < K))
        src = tl.where(is_cls, 0, r + HAS_CLS)
        xv = tl.load(x_ptr + row.to(tl.int64) * T * D + src[:, None] * D + dd[None, :], mask=take_x[:, None] & dm[None, :],
                     other=0.0)
        mt = tl.load(mt_ptr + dd, mask=dm, other=0.0)
        v = tl.where(take_x[:, None], xv, mt[None, :])
        if HAS_POS:  # x + pos.to(x.dtype): one rounding of the embedding, one of the sum
            pv = tl.load(pos_ptr + p[:, None] * D + dd[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
            v = v.to(tl.float32) + cast(pv, out_ptr.dtype.element_ty, EXACT_BF16).to(tl.float32)
        tl.store(out_ptr + row.to(tl.int64) * (L + HAS_CLS) * D + p[:, None].to(tl.int64) * D + dd[None, :],
                 cast(v, out_ptr.dtype.element_ty, EXACT_BF16), mask=pm[:, None] & dm[None, :])

    @triton.jit
    def _unshuffle_bwd_kernel(
        g_ptr,  # [N, L + HAS_CLS, D] grad of the decoder input
        ids_restore_ptr,  # [N, L] int64
        gx_ptr,  # [N, T, D] grad of the kept tokens (every row written exactly once)
        gmt_ptr,  # ATOMIC: [D] fp32 (zeroed) mask-token gradient, added to; else [N * n_chunks, D] fp32 partial sums
        T, L, K, D,
        HAS_CLS: tl.constexpr, ATOMIC: tl.constexpr, WANT_MT: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        dd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        p = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
        pm = p < L + HAS_CLS
        dm = dd < D
        l = p - HAS_CLS
        r = tl.load(ids_restore_ptr + row.to(tl.int64) * L + l, mask=pm & (l >= 0), other=0)
        is_cls = pm & (l < 0)
        to_x = is_cls | (pm & (l >= 0) & (r < K))
        removed = pm & (l >= 0) & (r >= K)
        dst = tl.where(is_cls, 0, r + HAS_CLS)
        gv = tl.load(g_ptr + row.to(tl.int64) * (L + HAS_CLS) * D + p[:, None].to(tl.int64) * D + dd[None, :],
                     mask=pm[:, None] & dm[None, :], other=0.0)
        tl.store(gx_ptr + row.to(tl.int64) * T * D + dst[:, None] * D + dd[None, :], gv, mask=to_x[:, None] & dm[None, :])
        if WANT_MT:
            s = tl.sum(tl.where(removed[:, None], gv.to(tl.float32), 0.0), axis=0)
            if ATOMIC:
                tl.atomic_add(gmt_ptr + dd, s, mask=dm)
            else:
                tl.store(gmt_ptr + (row.to(tl.int64) * tl.num_programs(1) + chunk) * D + dd, s, mask=dm)


def _tile(d: int, rows: int, elems: int = 4096, max_d: int = 512) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_D): a pow2 column block that divides D where one of at least 128 does (no idle lanes:
    1280 -> 256), else the padded width up to max_d; rows so that a tile holds about `elems` elements."""
    block_d = next((b for b in (512, 256, 128) if b <= max_d and d % b == 0), min(_pow2(d), max_d))
    return max(1, min(_pow2(rows), elems // block_d)), block_d


def _promoted(x: torch.Tensor, pos: torch.Tensor | None) -> torch.dtype:
    return x.dtype if pos is None else torch.result_type(x, pos)


class _RandomMaskingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, noise, k, pos):
        n, length, d = x.shape
        x = x.contiguous()
        noise = noise.to(torch.float32).contiguous()
        out = torch.empty(n, k, d, device=x.device, dtype=_promoted(x, pos))
        mask = torch.empty(n, length, device=x.device, dtype=torch.float32)
        ids_restore = torch.empty(n, length, device=x.device, dtype=torch.int64)
        ids_keep = torch.empty(n, k, device=x.device, dtype=torch.int64)
        pos_t = pos.reshape(length, d).contiguous() if pos is not None else x
        block_k, block_d = _tile(d, k)
        grid = (n, triton.cdiv(k, block_k), triton.cdiv(d, block_d))
        _masking_fwd_kernel[grid](x, pos_t, noise, out, mask, ids_restore, ids_keep, length, k, d,
                                  HAS_POS=pos is not None, BLOCK_L=_pow2(length), BLOCK_K=block_k, BLOCK_D=block_d,
                                  num_warps=4 if length <= 256 else 8)
        ctx.save_for_backward(ids_restore)
        ctx.k = k
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(mask, ids_restore, ids_keep)
        return out, mask, ids_restore, ids_keep

    @staticmethod
    def backward(ctx, g_out, _g_mask, _g_restore, _g_keep):
        (ids_restore,) = ctx.saved_tensors
        n, length = ids_restore.shape
        g_out = g_out.contiguous()
        d = g_out.shape[-1]
        gx = torch.empty(n, length, d, device=g_out.device, dtype=ctx.x_dtype)  # x + pos: the grad of x, cast back
        block_r, block_d = _tile(d, length)
        _masking_bwd_kernel[(n, triton.cdiv(length, block_r), triton.cdiv(d, block_d))](
            g_out, ids_restore, gx, length, ctx.k, d, BLOCK_R=block_r, BLOCK_D=block_d)
        return gx, None, None, None


class _UnshuffleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_restore, mask_token, has_cls, pos):
        n, t, d = x.shape
        length = ids_restore.shape[1]
        x = x.contiguous()
        ids_restore = ids_restore.contiguous()
        mt = mask_token.reshape(d).to(x.dtype).contiguous()
        k = t - int(has_cls)
        out = torch.empty(n, length + int(has_cls), d, device=x.device, dtype=x.dtype)
        pos_t = pos.reshape(length + int(has_cls), d).contiguous() if pos is not None else x
        block_r, block_d = _tile(d, length + int(has_cls))
        grid = (n, triton.cdiv(length + int(has_cls), block_r), triton.cdiv(d, block_d))
        _unshuffle_fwd_kernel[grid](x, ids_restore, mt, pos_t, out, t, length, k, d, HAS_CLS=int(has_cls),
                                    HAS_POS=pos is not None, BLOCK_R=block_r, BLOCK_D=block_d)
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
        block_r, block_d = _tile(d, length + has_cls)
        chunks = triton.cdiv(length + has_cls, block_r)
        gx = torch.empty(n, t, d, device=g.device, dtype=g.dtype)
        want_mt = ctx.needs_input_grad[2]
        atomic = not torch.are_deterministic_algorithms_enabled()
        if not want_mt:  # the rows only: no sum is made (a 1-element dummy for the unused pointer)
            acc, atomic = torch.empty(1, device=g.device, dtype=torch.float32), True
        elif atomic:
            acc = torch.zeros(d, device=g.device, dtype=torch.float32)
        else:
            acc = torch.empty(n * chunks, d, device=g.device, dtype=torch.float32)
        _unshuffle_bwd_kernel[(n, chunks, triton.cdiv(d, block_d))](
            g, ids_restore, gx, acc, t, length, k, d, HAS_CLS=has_cls, ATOMIC=atomic, WANT_MT=want_mt,
            BLOCK_R=block_r, BLOCK_D=block_d)
        g_mt = None
        if want_mt:
            g_mt = (acc if atomic else acc.sum(0)).to(mt_dtype).reshape(mt_shape)  # no copy when fp32
        return gx, None, g_mt, None, None


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def random_masking_triton(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                          pos: torch.Tensor | None = None):
    """Triton version of `random_masking_torch` (same signature and results, bit for bit)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable")
    n, length, d = x.shape
    if length > MAX_SORT_L or x.dtype not in KERNEL_DTYPES or (pos is not None and (
            pos.requires_grad or pos.dtype not in KERNEL_DTYPES)):  # a trainable embedding needs its gradient
        return random_masking_torch(x, mask_ratio, noise, pos)
    k = len_keep_for(length, mask_ratio)
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    check_noise(noise, n, length)
    if pos is not None and pos.numel() != length * d:
        raise ValueError(f"pos must hold L x D = {length} x {d} elements, got shape {list(pos.shape)}")
    return _RandomMaskingFn.apply(x, noise, k, pos)


def unshuffle_triton(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, has_cls: bool = True,
                     pos: torch.Tensor | None = None):
    """Triton version of `unshuffle_torch` (same signature and results, bit for bit)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable")
    if x.dtype not in KERNEL_DTYPES or (pos is not None and (pos.requires_grad or pos.dtype not in KERNEL_DTYPES)):
        return unshuffle_torch(x, ids_restore, mask_token, has_cls, pos)
    rows = ids_restore.shape[1] + int(has_cls)
    if pos is not None and pos.numel() != rows * x.shape[-1]:
        raise ValueError(f"pos must hold (L + cls) x D = {rows} x {x.shape[-1]} elements, got shape {list(pos.shape)}")
    return _UnshuffleFn.apply(x, ids_restore, mask_token, bool(has_cls), pos)

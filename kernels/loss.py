"""Norm-pixel MSE loss of MAE: MSE on removed patches against per-patch normalised pixels.

The numeric spec (DESIGN.md), transcribed by `norm_pix_mse_torch`:
    target = patchify(imgs)                              # [N, L, P], P = p*p*C, fp32
    mean = target.mean(-1); var = target.var(-1)         # UNBIASED variance (divide by P - 1)
    target = (target - mean) / sqrt(var + 1e-6)          # eps inside the square root
    loss = ((pred - target) ** 2).mean(-1)               # [N, L]
    loss = (loss * mask).sum() / mask.sum()              # mean over removed patches only

`norm_pix_mse_torch` transcribes it in plain torch; `norm_pix_mse_triton` is the fused kernel: it reads
the images [N, C, H, W] directly in their own layout (a patch is C x p rows of p contiguous pixels; patchify
is index arithmetic, no patchified copy), reads nothing of kept patches, keeps each removed patch in
registers, and writes the per-program partial sums of the loss and of the mask plus, when pred needs a
gradient, dL/dpred (zeros at kept patches); a one-program kernel adds the partials in a fixed order.

`mask_count` (both implementations): the number of removed patches when the caller knows it (the model does:
N x (L - len_keep)), so the gradient is written final in the forward and the backward has nothing to do when
its grad_output is 1; without it the count is summed on the device and the backward scales the gradient.
"""

from __future__ import annotations

import torch

from .tl_util import HAS_TRITON, INTERPRETING

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .tl_util import cast


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs [N, C, H, W] -> [N, L, p*p*C], patch pixels ordered (p, q, c) (nchpwq -> nhwpqc)."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # nchpwq -> nhwpqc (a permute, not einsum: autocast would cast einsum to bf16)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int = 3) -> torch.Tensor:
    """[N, L, p*p*C] -> imgs [N, C, H, W] (square grid)."""
    n, length, _ = x.shape
    g = int(round(length**0.5))
    if g * g != length:
        raise ValueError(f"unpatchify needs a square grid, got L={length}")
    x = x.reshape(n, g, g, p, p, c)
    x = x.permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
    return x.reshape(n, c, g * p, g * p)


def norm_pix_mse_torch(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                       norm_pix: bool = True, eps: float = 1e-6, mask_count: int | None = None) -> torch.Tensor:
    """imgs [N, C, H, W]; pred [N, L, P]; mask [N, L] (1 = removed). Scalar fp32 loss. mask_count: mask.sum()
    when the caller knows it (the same value; saves a reduction)."""
    target = patchify(imgs.float(), patch_size)
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {list(pred.shape)}, expected {list(target.shape)} from the images")
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased
        target = (target - mean) / (var + eps) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)
    mask = mask.float()
    return (loss * mask).sum() / (mask.sum() if mask_count is None else float(mask_count))


# ----------------------------------------------------------------------------------------------------------
# Triton
#
# Forward: grid over blocks of BLOCK_M consecutive patches. A removed patch is loaded channel by channel as a
# [PATCH, PATCH] tile in the image's own layout (rows of contiguous pixels; p = 14 pads to 16 x 16, p = 16 not
# at all), twice: once for its mean and variance (shifted by its first pixel, so flat patches keep their
# precision), once more (an L1 / L2 hit) to normalise and compare with the prediction. Kept patches are masked
# out of every load. Each program writes two partial sums; a one-program kernel adds them in order (the loss is
# deterministic) and writes the loss and 1 / count.
# Gradient (grad_in_forward, the default): dL/dpred is written in the forward while the patch is in registers
# (the Liger pattern), already divided by the removed count when mask_count is given; the backward then scales
# it in place by grad_output on the device (no host sync, capturable) and skips all work when that is 1.
# Bytes at ViT-L shapes (N=128, mask 0.75, fp32 images, bf16 pred): forward reads 58 MB of removed pixels and
# 29 MB of removed predictions and writes the 38.5 MB gradient; the backward moves nothing when grad_output is 1
# and 58 MB (the removed rows, read and written) otherwise. grad_in_forward=False recomputes in the backward.

if HAS_TRITON:

    @triton.jit
    def _norm_pix_mse_fwd_kernel(
        img_ptr,  # [N, C, H, W] images (fp32 / bf16 / fp16), contiguous
        pred_ptr,  # [N, L, P] predictions, contiguous, P = p*p*C ordered (pi, q, c)
        mask_ptr,  # [N, L] 1 = removed (any float dtype)
        grad_ptr,  # [N, L, P] out (pred's dtype): dL/dpred (WRITE_GRAD); zeros at kept patches
        part_ptr,  # [programs, 2] fp32 out: (sum over this program's patches of mask * mse, sum of mask)
        gscale_ptr,  # [1] fp32: extra gradient factor read on the device (HAS_GSCALE), e.g. backward's grad_output
        NL, L, H, W, GW, P, coef, eps,
        C: tl.constexpr, PATCH: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        NORM_PIX: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_GSCALE: tl.constexpr,
        EXACT_BF16: tl.constexpr = INTERPRETING,
    ):
        pid = tl.program_id(0)
        g = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # flat patch index n * L + l
        gm = g < NL
        mk = tl.load(mask_ptr + g, mask=gm, other=0.0).to(tl.float32)
        rem = gm & (mk != 0.0)  # kept patches: nothing is read, their gradient is zero
        n = g // L
        l = g % L
        gh = l // GW
        gw = l % GW
        pi = tl.arange(0, BLOCK_Q)  # row within the patch
        q = tl.arange(0, BLOCK_Q)  # column within the patch (contiguous in the image)
        inside = (pi[:, None] < PATCH) & (q[None, :] < PATCH)  # [BQ, BQ]
        m3 = rem[:, None, None] & inside[None, :, :]
        # image offsets of channel 0, in the image's own layout (a patch row is PATCH contiguous pixels)
        base = (n.to(tl.int64) * C * H * W + (gh * PATCH).to(tl.int64) * W + gw * PATCH)
        img0 = base[:, None, None] + (pi[:, None] * W + q[None, :])[None, :, :]
        # pred offsets of channel 0: pixel (pi, q, c) sits at (pi * PATCH + q) * C + c
        pr0 = g.to(tl.int64)[:, None, None] * P + ((pi[:, None] * PATCH + q[None, :]) * C)[None, :, :]
        if NORM_PIX:
            # pass 1: mean and unbiased variance, shifted by the patch's first pixel (stable for flat patches)
            k0 = tl.load(img_ptr + base, mask=rem, other=0.0).to(tl.float32)
            s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for c in tl.static_range(C):
                t = tl.load(img_ptr + img0 + c * H * W, mask=m3, other=0.0).to(tl.float32)
                d = tl.where(m3, t - k0[:, None, None], 0.0)
                s1 += tl.sum(tl.sum(d, axis=2), axis=1)
                s2 += tl.sum(tl.sum(d * d, axis=2), axis=1)
            mean = k0 + s1 / P
            var = (s2 - s1 * s1 / P) / (P - 1)  # unbiased
            rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)  # eps inside the square root
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        gcoef = coef * mk
        if HAS_GSCALE:
            gcoef = gcoef * tl.load(gscale_ptr)
        for c in tl.static_range(C):
            # pass 2: the tile again (an L1 / L2 hit), normalised against the prediction
            t = tl.load(img_ptr + img0 + c * H * W, mask=m3, other=0.0).to(tl.float32)
            if NORM_PIX:
                t = (t - mean[:, None, None]) * rstd[:, None, None]
            pr = tl.load(pred_ptr + pr0 + c, mask=m3, other=0.0).to(tl.float32)
            diff = tl.where(m3, pr - t, 0.0)
            acc += tl.sum(tl.sum(diff * diff, axis=2), axis=1)
            if WRITE_GRAD:
                gv = diff * gcoef[:, None, None]
                tl.store(grad_ptr + pr0 + c, cast(gv, grad_ptr.dtype.element_ty, EXACT_BF16),
                         mask=gm[:, None, None] & inside[None, :, :])
        tl.store(part_ptr + pid * 2, tl.sum(acc / P * mk, axis=0))
        tl.store(part_ptr + pid * 2 + 1, tl.sum(mk, axis=0))


    @triton.jit
    def _norm_pix_mse_finish_kernel(
        part_ptr,  # [programs, 2] fp32 partial sums
        out_ptr,  # [2] fp32 out: (loss, 1 / removed count)
        programs, count,
        HAS_COUNT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        s = tl.zeros((BLOCK,), dtype=tl.float32)
        m = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, programs, BLOCK):
            j = i + tl.arange(0, BLOCK)
            jm = j < programs
            s += tl.load(part_ptr + j * 2, mask=jm, other=0.0)
            m += tl.load(part_ptr + j * 2 + 1, mask=jm, other=0.0)
        total = tl.sum(s, axis=0)
        cnt = tl.sum(m, axis=0)
        if HAS_COUNT:
            cnt = count * 1.0
        tl.store(out_ptr, total / cnt)
        tl.store(out_ptr + 1, 1.0 / cnt)


    @triton.jit
    def _scale_grad_kernel(
        grad_ptr,  # [N, L, P] in place
        mask_ptr,  # [N, L]: only removed patches hold non-zero gradients
        gout_ptr,  # [1] grad_output of the loss
        inv_ptr,  # [2] fp32 from the finish kernel: (loss, 1 / removed count)
        NL, P,
        PRESCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
        EXACT_BF16: tl.constexpr = INTERPRETING,
    ):
        s = tl.load(gout_ptr).to(tl.float32)
        if not PRESCALED:
            s = s * tl.load(inv_ptr + 1)
        g = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        gm = g < NL
        if PRESCALED:  # grad_output 1 (loss.backward(), or one micro-batch): nothing to read or write
            gm = gm & (tl.zeros((BLOCK_M,), dtype=tl.float32) + s != 1.0)  # (a vector: the interpreter's `&`)
        rem = gm & (tl.load(mask_ptr + g, mask=gm, other=0.0) != 0)
        for p0 in range(0, P, BLOCK_P):
            k = p0 + tl.arange(0, BLOCK_P)
            m2 = rem[:, None] & (k[None, :] < P)
            ptr = grad_ptr + g.to(tl.int64)[:, None] * P + k[None, :]
            v = tl.load(ptr, mask=m2, other=0.0).to(tl.float32)
            tl.store(ptr, cast(v * s, grad_ptr.dtype.element_ty, EXACT_BF16), mask=m2)


def _loss_blocks(p: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_M): the padded patch side and patches per program (a [BLOCK_M, BLOCK_Q, BLOCK_Q] tile of
    about 1K elements per channel)."""
    bq = 1 << max(0, (p - 1).bit_length())
    return bq, max(1, min(64, 1024 // (bq * bq)))


def _launch_loss(imgs, pred, mask, patch_size, norm_pix, eps, write_grad, coef, gscale=None):
    n, c, h, w = imgs.shape
    length, p_dim = pred.shape[1], pred.shape[2]
    nl = n * length
    bq, bm = _loss_blocks(patch_size)
    programs = triton.cdiv(nl, bm)
    part = torch.empty(programs, 2, device=pred.device, dtype=torch.float32)
    grad = torch.empty_like(pred) if write_grad else part
    _norm_pix_mse_fwd_kernel[(programs,)](
        imgs, pred, mask, grad, part, gscale if gscale is not None else part, nl, length, h, w, w // patch_size,
        p_dim, coef, eps, C=c, PATCH=patch_size, BLOCK_Q=bq, BLOCK_M=bm, NORM_PIX=bool(norm_pix),
        WRITE_GRAD=bool(write_grad), HAS_GSCALE=gscale is not None, num_warps=4)
    return part, (grad if write_grad else None)


def _finish(part, count):
    out = torch.empty(2, device=part.device, dtype=torch.float32)
    _norm_pix_mse_finish_kernel[(1,)](part, out, part.shape[0], count or 0, HAS_COUNT=count is not None,
                                      BLOCK=1024)
    return out


class _NormPixMSEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, imgs, pred, mask, patch_size, norm_pix, eps, grad_in_forward, count):
        imgs = imgs.contiguous()
        pred = pred.contiguous()
        mask = mask.to(torch.float32).contiguous()
        p_dim = pred.shape[2]
        write = bool(grad_in_forward and ctx.needs_input_grad[1])
        coef = 2.0 / p_dim / (count if count is not None else 1)
        part, grad = _launch_loss(imgs, pred, mask, patch_size, norm_pix, eps, write, coef)
        out = _finish(part, count)
        ctx.grad_in_forward = write
        ctx.args = (patch_size, norm_pix, eps, count)
        ctx.scaled = False
        if write:
            ctx.save_for_backward(grad, mask, out)
        else:
            ctx.save_for_backward(imgs, pred, mask, out)
        return out[0].clone()  # the loss (a fresh 0-d tensor: `out` also carries 1 / count for the backward)

    @staticmethod
    def backward(ctx, g):
        patch_size, norm_pix, eps, count = ctx.args
        g = g.to(torch.float32).reshape(1)
        if ctx.grad_in_forward:
            grad, mask, out = ctx.saved_tensors
            if ctx.scaled:
                raise RuntimeError("norm_pix_mse_triton: a second backward through the same loss would scale the "
                                   "gradient twice; use grad_in_forward=False with retain_graph")
            ctx.scaled = True
            nl, p_dim = mask.numel(), grad.shape[2]
            bm = 4
            _scale_grad_kernel[(triton.cdiv(nl, bm),)](grad, mask, g, out, nl, p_dim, PRESCALED=count is not None,
                                                       BLOCK_M=bm, BLOCK_P=256)
        else:
            imgs, pred, mask, out = ctx.saved_tensors
            gscale = g if count is not None else g * out[1:2]
            coef = 2.0 / pred.shape[2] / (count if count is not None else 1)
            _, grad = _launch_loss(imgs, pred, mask, patch_size, norm_pix, eps, True, coef, gscale)
        return None, grad, None, None, None, None, None, None


def norm_pix_mse_triton(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                        norm_pix: bool = True, eps: float = 1e-6, grad_in_forward: bool = True,
                        mask_count: int | None = None) -> torch.Tensor:
    """Triton version of `norm_pix_mse_torch` (same signature; fp32 accumulation; gradient for pred only). Under
    torch.no_grad (or for a pred without requires_grad) no gradient is computed or allocated."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable")
    n, c, h, w = imgs.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch_size}")
    expect = (n, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)
    if tuple(pred.shape) != expect:
        raise ValueError(f"pred has shape {list(pred.shape)}, expected {list(expect)} from the images")
    if mask_count is not None and mask_count <= 0:
        mask_count = None  # nothing removed: 0 / 0, a NaN loss, as the reference gives
    grad_in_forward = grad_in_forward and torch.is_grad_enabled() and pred.requires_grad
    return _NormPixMSEFn.apply(imgs, pred, mask, patch_size, norm_pix, eps, grad_in_forward, mask_count)

"""Norm-pixel MSE loss of MAE: MSE on removed patches against per-patch normalised pixels.

The numeric spec (DESIGN.md), transcribed by `norm_pix_mse_torch`:
    target = patchify(imgs)                              # [N, L, P], P = p*p*C, fp32
    mean = target.mean(-1); var = target.var(-1)         # UNBIASED variance (divide by P - 1)
    target = (target - mean) / sqrt(var + 1e-6)          # eps inside the square root
    loss = ((pred - target) ** 2).mean(-1)               # [N, L]
    loss = (loss * mask).sum() / mask.sum()              # mean over removed patches only

`norm_pix_mse_torch` transcribes it in plain torch; `norm_pix_mse_triton` is the fused kernel: it reads
the images [N, C, H, W] directly (patchify is index arithmetic inside the kernel, no patchified copy),
keeps each patch in registers, and writes the mask-weighted per-patch loss plus, when pred needs a
gradient, dL/dpred.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


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


# ----------------------------------------------------------------------------------------------------------
# Triton
#
# Gradient strategy: by default dL/dpred is computed in the forward pass while the patch is in registers
# and only scaled by grad_output in backward (the Liger pattern). Byte count at ViT-L shapes (N=128,
# L=196, P=768, fp32 images, bf16 pred): forward 154 MB + backward 77 MB = 231 MB, against 115 MB +
# 154 MB = 270 MB for recomputing in backward. `grad_in_forward=False` selects the recompute variant;
# benchmarks/kernels.py times both so the choice can be checked on the GPU at hand.

if HAS_TRITON:

    @triton.jit
    def _norm_pix_mse_kernel(
        img_ptr,  # [N, C, H, W] images (fp32 / bf16 / fp16), contiguous
        pred_ptr,  # [N, L, P] predictions, contiguous, P = p*p*C ordered (p, q, c)
        mask_ptr,  # [N, L] fp32, 1 = removed
        scale_ptr,  # [1] fp32: grad_output / mask.sum()
        loss_ptr,  # [N * L] fp32 out: mask * mean_P((pred - target)^2)
        grad_ptr,  # [N, L, P] out (pred's dtype): dL/dpred, written when WRITE_GRAD
        NL, L, C, H, W, GW, P, PATCH, eps,
        NORM_PIX: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        g = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # flat patch index n * L + l
        gm = g < NL
        n = g // L
        l = g % L
        gh = l // GW
        gw = l % GW
        k = tl.arange(0, BLOCK_P)  # pixel within the patch, ordered (pi, q, c)
        km = k < P
        c = k % C
        q = (k // C) % PATCH
        pi = k // (C * PATCH)
        m2 = gm[:, None] & km[None, :]
        off = (n[:, None].to(tl.int64) * C * H * W + c[None, :] * H * W
               + (gh[:, None] * PATCH + pi[None, :]) * W + gw[:, None] * PATCH + q[None, :])
        t = tl.load(img_ptr + off, mask=m2, other=0.0).to(tl.float32)
        if NORM_PIX:
            mean = tl.sum(t, axis=1) / P
            dev = tl.where(m2, t - mean[:, None], 0.0)
            var = tl.sum(dev * dev, axis=1) / (P - 1)  # unbiased
            t = dev / tl.sqrt(var + eps)[:, None]  # eps inside the square root
        pr = tl.load(pred_ptr + g[:, None].to(tl.int64) * P + k[None, :], mask=m2, other=0.0).to(tl.float32)
        diff = tl.where(m2, pr - t, 0.0)
        mk = tl.load(mask_ptr + g, mask=gm, other=0.0).to(tl.float32)
        tl.store(loss_ptr + g, tl.sum(diff * diff, axis=1) / P * mk, mask=gm)
        if WRITE_GRAD:
            s = tl.load(scale_ptr)
            coef = mk * (2.0 / P) * s
            tl.store(grad_ptr + g[:, None].to(tl.int64) * P + k[None, :],
                     (diff * coef[:, None]).to(grad_ptr.dtype.element_ty), mask=m2)


def _launch_loss(imgs, pred, mask, scale, patch_size, norm_pix, eps, write_grad):
    n, c, h, w = imgs.shape
    length, p_dim = pred.shape[1], pred.shape[2]
    nl = n * length
    block_p = 1 << (p_dim - 1).bit_length()
    block_m = max(1, min(16, 4096 // block_p))
    loss_w = torch.empty(nl, device=pred.device, dtype=torch.float32)
    grad = torch.empty_like(pred) if write_grad else loss_w
    _norm_pix_mse_kernel[(triton.cdiv(nl, block_m),)](
        imgs, pred, mask, scale, loss_w, grad, nl, length, c, h, w, w // patch_size, p_dim, patch_size, eps,
        NORM_PIX=bool(norm_pix), WRITE_GRAD=bool(write_grad), BLOCK_M=block_m, BLOCK_P=block_p,
        num_warps=4 if block_p * block_m <= 2048 else 8)
    return loss_w, (grad if write_grad else None)


class _NormPixMSEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, imgs, pred, mask, patch_size, norm_pix, eps, grad_in_forward):
        imgs = imgs.contiguous()
        pred = pred.contiguous()
        mask = mask.to(torch.float32).contiguous()
        msum = mask.sum()
        write = bool(grad_in_forward and ctx.needs_input_grad[1])
        scale = (1.0 / msum).reshape(1)
        loss_w, grad = _launch_loss(imgs, pred, mask, scale, patch_size, norm_pix, eps, write)
        ctx.grad_in_forward = write
        ctx.args = (patch_size, norm_pix, eps)
        if write:
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(imgs, pred, mask, msum)
        return loss_w.sum() / msum

    @staticmethod
    def backward(ctx, g):
        if ctx.grad_in_forward:
            (grad,) = ctx.saved_tensors
            grad = grad * g.to(grad.dtype)
        else:
            imgs, pred, mask, msum = ctx.saved_tensors
            patch_size, norm_pix, eps = ctx.args
            scale = (g.to(torch.float32) / msum).reshape(1)
            _, grad = _launch_loss(imgs, pred, mask, scale, patch_size, norm_pix, eps, True)
        return None, grad, None, None, None, None, None


def norm_pix_mse_triton(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                        norm_pix: bool = True, eps: float = 1e-6, grad_in_forward: bool = True) -> torch.Tensor:
    """Triton version of `norm_pix_mse_torch` (same signature; fp32 accumulation; gradient for pred only)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable")
    n, c, h, w = imgs.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch_size}")
    expect = (n, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)
    if tuple(pred.shape) != expect:
        raise ValueError(f"pred has shape {list(pred.shape)}, expected {list(expect)} from the images")
    return _NormPixMSEFn.apply(imgs, pred, mask, patch_size, norm_pix, eps, grad_in_forward)

"""Attention over short sequences straight from the fused qkv projection (the MAE encoder's 50-65 tokens).

`qkv_attention(qkv, num_heads, scale)`: qkv [B, N, 3*C] as timm's `Attention.qkv` Linear writes it (q, k, v
blocks of C = heads x head_dim channels, head-major inside each) -> out [B, N, C], already in the layout the
output projection reads. The plain torch reference splits heads, computes softmax(q k^T * scale) v with two
matmuls and merges heads again; the Triton kernel does one (batch, head) pair per program with the whole
sequence in registers (N <= 128, head_dim <= 128):

  forward   S = q k^T * scale, P = softmax(S) (fp32), O = P v; stores O and the row log-sum-exp (fp32);
  backward  recomputes P from the log-sum-exp, dV = P^T dO, dP = dO v^T, dS = P (dP - rowsum(dO * O)),
            dQ = dS k * scale, dK = dS^T q * scale, written straight into dqkv [B, N, 3*C].

So neither direction splits, stacks or copies q / k / v (the eager profile of a ViT-H step spent 11 ms on the
q / k / v gradient stack alone), and the saved state is O and the log-sum-exp, as in the fused SDPA kernels.
Products run in the input dtype with fp32 accumulation (bf16 on the GPU; fp32 inputs use IEEE fp32 products).
The Triton op is a torch.library custom op, so torch.compile treats it as one opaque node inside a compiled
block and CUDA graphs capture it.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - torch without triton
    HAS_TRITON = False

MAX_N = 128  # tokens per sequence the kernel holds in registers
MAX_HEAD_DIM = 128


def _split(qkv: torch.Tensor, num_heads: int):
    b, n, c3 = qkv.shape
    if c3 % (3 * num_heads):
        raise ValueError(f"qkv's last dimension {c3} is not 3 x num_heads ({num_heads}) x head_dim")
    return b, n, c3 // 3, c3 // (3 * num_heads)


def qkv_attention_torch(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Reference: timm's non-fused attention path, from the qkv projection to the merged heads."""
    b, n, c, d = _split(qkv, num_heads)
    q, k, v = qkv.reshape(b, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(b, n, c)


def supported(n_tokens: int, head_dim: int) -> bool:
    """Shapes the Triton kernel takes: N <= 128 tokens, head_dim <= 128."""
    return n_tokens <= MAX_N and head_dim <= MAX_HEAD_DIM


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if HAS_TRITON:

    @triton.jit
    def _tile(ptr, base, row_stride, n, d, N, D):
        """A [BLOCK_N, BLOCK_D] tile of rows n < N, columns d < D (zeros outside)."""
        return tl.load(ptr + base + n[:, None] * row_stride + d[None, :], mask=(n[:, None] < N) & (d[None, :] < D),
                       other=0.0)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b with fp32 accumulation: IEEE fp32 products for fp32 inputs; under the CPU interpreter low-precision
        operands are widened first (its bf16 dot is wrong; bf16 x bf16 products are exact in fp32 anyway)."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        elif UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _qkv_attn_fwd_kernel(qkv_ptr, out_ptr, lse_ptr, N, H, D, C, scale,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        pid = tl.program_id(0)  # one (batch, head) pair
        b = pid // H
        h = pid % H
        n = tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        base = b.to(tl.int64) * N * 3 * C + h * D
        q = _tile(qkv_ptr, base, 3 * C, n, d, N, D)
        k = _tile(qkv_ptr, base + C, 3 * C, n, d, N, D)
        v = _tile(qkv_ptr, base + 2 * C, 3 * C, n, d, N, D)
        s = _dot(q, tl.trans(k), IEEE, UPCAST)
        s = tl.where(n[None, :] < N, s * scale, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        l_ = tl.sum(p, axis=1)
        p = p / l_[:, None]
        o = _dot(p.to(v.dtype), v, IEEE, UPCAST)
        rows = n < N
        tl.store(out_ptr + b.to(tl.int64) * N * C + h * D + n[:, None] * C + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=rows[:, None] & (d[None, :] < D))
        tl.store(lse_ptr + pid.to(tl.int64) * N + n, m + tl.log(l_), mask=rows)

    @triton.jit
    def _qkv_attn_bwd_kernel(qkv_ptr, out_ptr, lse_ptr, dout_ptr, dqkv_ptr, N, H, D, C, scale,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        n = tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        rows = n < N
        base = b.to(tl.int64) * N * 3 * C + h * D
        obase = b.to(tl.int64) * N * C + h * D
        q = _tile(qkv_ptr, base, 3 * C, n, d, N, D)
        k = _tile(qkv_ptr, base + C, 3 * C, n, d, N, D)
        v = _tile(qkv_ptr, base + 2 * C, 3 * C, n, d, N, D)
        o = _tile(out_ptr, obase, C, n, d, N, D).to(tl.float32)
        do = _tile(dout_ptr, obase, C, n, d, N, D)
        lse = tl.load(lse_ptr + pid.to(tl.int64) * N + n, mask=rows, other=0.0)
        s = _dot(q, tl.trans(k), IEEE, UPCAST)
        s = tl.where(rows[None, :], s * scale, float("-inf"))
        p = tl.exp(s - lse[:, None])  # softmax, recomputed; padded rows have dO = 0 and contribute nothing
        dv = _dot(tl.trans(p.to(do.dtype)), do, IEEE, UPCAST)
        dp = _dot(do, tl.trans(v), IEEE, UPCAST)
        delta = tl.sum(do.to(tl.float32) * o, axis=1)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, IEEE, UPCAST) * scale
        dk = _dot(tl.trans(ds.to(q.dtype)), q, IEEE, UPCAST) * scale
        cols = rows[:, None] & (d[None, :] < D)
        ptr = dqkv_ptr + base + n[:, None] * 3 * C + d[None, :]
        ty = dqkv_ptr.dtype.element_ty
        tl.store(ptr, dq.to(ty), mask=cols)
        tl.store(ptr + C, dk.to(ty), mask=cols)
        tl.store(ptr + 2 * C, dv.to(ty), mask=cols)


def _launch_meta(qkv: torch.Tensor, num_heads: int):
    b, n, c, d = _split(qkv, num_heads)
    if not supported(n, d):
        raise ValueError(f"qkv_attention_triton takes up to {MAX_N} tokens and head_dim {MAX_HEAD_DIM}; "
                         f"got N={n}, head_dim={d}")
    block_n, block_d = max(16, _pow2(n)), max(16, _pow2(d))
    return b, n, c, d, {"BLOCK_N": block_n, "BLOCK_D": block_d, "IEEE": qkv.dtype == torch.float32,
                        "UPCAST": os.environ.get("TRITON_INTERPRET", "0") == "1",
                        "num_warps": 8 if block_n * block_d >= 128 * 128 else 4}


@torch.library.custom_op("mae_engine::qkv_attention_fwd", mutates_args=())
def _qkv_attention_fwd(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = qkv.contiguous()
    b, n, c, d, meta = _launch_meta(qkv, num_heads)
    out = torch.empty(b, n, c, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(b, num_heads, n, device=qkv.device, dtype=torch.float32)
    _qkv_attn_fwd_kernel[(b * num_heads,)](qkv, out, lse, n, num_heads, d, c, scale, **meta)
    return out, lse


@_qkv_attention_fwd.register_fake
def _(qkv, num_heads, scale):
    b, n, c, _ = _split(qkv, num_heads)
    return qkv.new_empty(b, n, c), qkv.new_empty(b, num_heads, n, dtype=torch.float32)


@torch.library.custom_op("mae_engine::qkv_attention_bwd", mutates_args=())
def _qkv_attention_bwd(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, num_heads: int,
                       scale: float) -> torch.Tensor:
    qkv, out, lse, dout = qkv.contiguous(), out.contiguous(), lse.contiguous(), dout.contiguous().to(qkv.dtype)
    b, n, c, d, meta = _launch_meta(qkv, num_heads)
    dqkv = torch.empty_like(qkv)
    _qkv_attn_bwd_kernel[(b * num_heads,)](qkv, out, lse, dout, dqkv, n, num_heads, d, c, scale, **meta)
    return dqkv


@_qkv_attention_bwd.register_fake
def _(qkv, out, lse, dout, num_heads, scale):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return _qkv_attention_bwd(qkv, out, lse, dout, ctx.num_heads, ctx.scale), None, None


_qkv_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def qkv_attention_triton(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The Triton path of `qkv_attention` (N <= 128 tokens, head_dim <= 128)."""
    if not HAS_TRITON:
        raise RuntimeError("qkv_attention_triton needs triton")
    return _qkv_attention_fwd(qkv, num_heads, float(scale))[0]

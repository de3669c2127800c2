"""Attention over short sequences straight from the fused qkv projection (the MAE encoder's 50-65 tokens).

`qkv_attention(qkv, num_heads, scale)`: qkv [B, N, 3*C] as timm's `Attention.qkv` Linear writes it (q, k, v
blocks of C = heads x head_dim channels, head-major inside each) -> out [B, N, C], already in the layout the
output projection reads. The plain torch reference splits heads, computes softmax(q k^T * scale) v with two
matmuls and merges heads again; the Triton kernel does one (batch, head) pair per program with the whole
sequence in registers (N <= 128, head_dim <= 128), as a main tile of rows (the largest power of two <= N) and a
tail tile (the rest, rounded up), so 65 tokens compute 80 rows of scores, not 128 (`tiles`):

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
    def _rows_fwd(q, ka, kb, va, vb, na, nb, N, scale, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """softmax(q [k_a; k_b]^T * scale) [v_a; v_b] for one tile of query rows, over the main and the tail key
        tiles together (one max, one sum), and the rows' log-sum-exp."""
        sa = tl.where(na[None, :] < N, _dot(q, tl.trans(ka), IEEE, UPCAST) * scale, float("-inf"))
        sb = tl.where(nb[None, :] < N, _dot(q, tl.trans(kb), IEEE, UPCAST) * scale, float("-inf"))
        m = tl.maximum(tl.max(sa, axis=1), tl.max(sb, axis=1))
        pa = tl.exp(sa - m[:, None])
        pb = tl.exp(sb - m[:, None])
        l_ = tl.sum(pa, axis=1) + tl.sum(pb, axis=1)
        pa = pa / l_[:, None]
        pb = pb / l_[:, None]
        o = _dot(pa.to(va.dtype), va, IEEE, UPCAST) + _dot(pb.to(vb.dtype), vb, IEEE, UPCAST)
        return o, m + tl.log(l_)

    @triton.jit
    def _store_rows(ptr, base, row_stride, n, d, N, D, x):
        tl.store(ptr + base + n[:, None] * row_stride + d[None, :], x.to(ptr.dtype.element_ty),
                 mask=(n[:, None] < N) & (d[None, :] < D))

    @triton.jit
    def _qkv_attn_fwd_kernel(qkv_ptr, out_ptr, lse_ptr, N, H, D, C, scale, BLOCK_A: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """One (batch, head) pair; rows and keys in a main tile of BLOCK_A (the largest power of two <= N) and a
        tail tile of BLOCK_B (the rest, rounded up): 65 tokens take 64 + 16 rows, not 128."""
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        na = tl.arange(0, BLOCK_A)
        nb = BLOCK_A + tl.arange(0, BLOCK_B)
        d = tl.arange(0, BLOCK_D)
        base = b.to(tl.int64) * N * 3 * C + h * D
        qa = _tile(qkv_ptr, base, 3 * C, na, d, N, D)
        qb = _tile(qkv_ptr, base, 3 * C, nb, d, N, D)
        ka = _tile(qkv_ptr, base + C, 3 * C, na, d, N, D)
        kb = _tile(qkv_ptr, base + C, 3 * C, nb, d, N, D)
        va = _tile(qkv_ptr, base + 2 * C, 3 * C, na, d, N, D)
        vb = _tile(qkv_ptr, base + 2 * C, 3 * C, nb, d, N, D)
        oa, lsea = _rows_fwd(qa, ka, kb, va, vb, na, nb, N, scale, IEEE, UPCAST)
        ob, lseb = _rows_fwd(qb, ka, kb, va, vb, na, nb, N, scale, IEEE, UPCAST)
        obase = b.to(tl.int64) * N * C + h * D
        _store_rows(out_ptr, obase, C, na, d, N, D, oa)
        _store_rows(out_ptr, obase, C, nb, d, N, D, ob)
        tl.store(lse_ptr + pid.to(tl.int64) * N + na, lsea, mask=na < N)
        tl.store(lse_ptr + pid.to(tl.int64) * N + nb, lseb, mask=nb < N)

    @triton.jit
    def _rows_bwd(q, do, o, lse, ka, kb, va, vb, na, nb, N, scale, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """One tile of query rows' share of the backward: dQ for these rows, and their contributions to dK and dV
        of the main (a) and tail (b) key tiles."""
        sa = tl.where(na[None, :] < N, _dot(q, tl.trans(ka), IEEE, UPCAST) * scale, float("-inf"))
        sb = tl.where(nb[None, :] < N, _dot(q, tl.trans(kb), IEEE, UPCAST) * scale, float("-inf"))
        pa = tl.exp(sa - lse[:, None])  # softmax, recomputed; padded rows have dO = 0 and contribute nothing
        pb = tl.exp(sb - lse[:, None])
        dva = _dot(tl.trans(pa.to(do.dtype)), do, IEEE, UPCAST)
        dvb = _dot(tl.trans(pb.to(do.dtype)), do, IEEE, UPCAST)
        delta = tl.sum(do.to(tl.float32) * o, axis=1)
        dsa = pa * (_dot(do, tl.trans(va), IEEE, UPCAST) - delta[:, None])
        dsb = pb * (_dot(do, tl.trans(vb), IEEE, UPCAST) - delta[:, None])
        dq = (_dot(dsa.to(ka.dtype), ka, IEEE, UPCAST) + _dot(dsb.to(kb.dtype), kb, IEEE, UPCAST)) * scale
        dka = _dot(tl.trans(dsa.to(q.dtype)), q, IEEE, UPCAST) * scale
        dkb = _dot(tl.trans(dsb.to(q.dtype)), q, IEEE, UPCAST) * scale
        return dq, dka, dkb, dva, dvb

    @triton.jit
    def _qkv_attn_bwd_kernel(qkv_ptr, out_ptr, lse_ptr, dout_ptr, dqkv_ptr, N, H, D, C, scale, BLOCK_A: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        na = tl.arange(0, BLOCK_A)
        nb = BLOCK_A + tl.arange(0, BLOCK_B)
        d = tl.arange(0, BLOCK_D)
        base = b.to(tl.int64) * N * 3 * C + h * D
        obase = b.to(tl.int64) * N * C + h * D
        ka = _tile(qkv_ptr, base + C, 3 * C, na, d, N, D)
        kb = _tile(qkv_ptr, base + C, 3 * C, nb, d, N, D)
        va = _tile(qkv_ptr, base + 2 * C, 3 * C, na, d, N, D)
        vb = _tile(qkv_ptr, base + 2 * C, 3 * C, nb, d, N, D)
        qa = _tile(qkv_ptr, base, 3 * C, na, d, N, D)
        qb = _tile(qkv_ptr, base, 3 * C, nb, d, N, D)
        oa = _tile(out_ptr, obase, C, na, d, N, D).to(tl.float32)
        ob = _tile(out_ptr, obase, C, nb, d, N, D).to(tl.float32)
        doa = _tile(dout_ptr, obase, C, na, d, N, D)
        dob = _tile(dout_ptr, obase, C, nb, d, N, D)
        lsea = tl.load(lse_ptr + pid.to(tl.int64) * N + na, mask=na < N, other=0.0)
        lseb = tl.load(lse_ptr + pid.to(tl.int64) * N + nb, mask=nb < N, other=0.0)
        dqa, dka1, dkb1, dva1, dvb1 = _rows_bwd(qa, doa, oa, lsea, ka, kb, va, vb, na, nb, N, scale, IEEE, UPCAST)
        dqb, dka2, dkb2, dva2, dvb2 = _rows_bwd(qb, dob, ob, lseb, ka, kb, va, vb, na, nb, N, scale, IEEE, UPCAST)
        _store_rows(dqkv_ptr, base, 3 * C, na, d, N, D, dqa)
        _store_rows(dqkv_ptr, base, 3 * C, nb, d, N, D, dqb)
        _store_rows(dqkv_ptr, base + C, 3 * C, na, d, N, D, dka1 + dka2)
        _store_rows(dqkv_ptr, base + C, 3 * C, nb, d, N, D, dkb1 + dkb2)
        _store_rows(dqkv_ptr, base + 2 * C, 3 * C, na, d, N, D, dva1 + dva2)
        _store_rows(dqkv_ptr, base + 2 * C, 3 * C, nb, d, N, D, dvb1 + dvb2)


def tiles(n: int) -> tuple[int, int]:
    """(main, tail) row tiles for n tokens: the largest power of two <= n (at least 16, tl.dot's smallest), then the
    rest rounded up to a power of two (at least 16; fully masked when nothing is left). 65 -> (64, 16): 80 rows
    computed instead of 128; 50 -> (32, 32)."""
    main = max(16, 1 << (max(1, int(n)).bit_length() - 1))
    return main, max(16, _pow2(n - main)) if n > main else 16


def _launch_meta(qkv: torch.Tensor, num_heads: int):
    b, n, c, d = _split(qkv, num_heads)
    if not supported(n, d):
        raise ValueError(f"qkv_attention_triton takes up to {MAX_N} tokens and head_dim {MAX_HEAD_DIM}; "
                         f"got N={n}, head_dim={d}")
    block_a, block_b = tiles(n)
    block_d = max(16, _pow2(d))
    return b, n, c, d, {"BLOCK_A": block_a, "BLOCK_B": block_b, "BLOCK_D": block_d,
                        "IEEE": qkv.dtype == torch.float32, "UPCAST": os.environ.get("TRITON_INTERPRET", "0") == "1",
                        "num_warps": 8 if (block_a + block_b) * block_d >= 128 * 128 else 4}


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

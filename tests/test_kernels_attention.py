"""The short-sequence attention kernel (kernels/attention.py) against the torch reference: on CUDA when present,
else on the CPU under TRITON_INTERPRET=1 (set in conftest); then the encoder-triton attention path of the model."""

import os

import pytest
import torch

import kernels
from kernels.attention import HAS_TRITON, MAX_N, qkv_attention_torch, qkv_attention_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not HAS_TRITON or (DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton on CUDA, or TRITON_INTERPRET=1 on CPU")


def _case(b, n, h, d, dtype):
    qkv = torch.randn(b, n, 3 * h * d, device=DEV).to(dtype).requires_grad_()
    scale = d ** -0.5
    got = qkv_attention_triton(qkv, h, scale)
    g = torch.randn(b, n, h * d, device=DEV)
    (dgot,) = torch.autograd.grad(got, qkv, g.to(dtype))
    q32 = qkv.detach().float().requires_grad_()
    want = qkv_attention_torch(q32, h, scale)  # fp32 reference
    (dwant,) = torch.autograd.grad(want, q32, g)
    qlow = qkv.detach().requires_grad_()
    low = qkv_attention_torch(qlow, h, scale)  # the reference in the same low precision: its error is the budget
    (dlow,) = torch.autograd.grad(low, qlow, g.to(dtype))
    return got, dgot, want, dwant, low, dlow


@pytest.mark.parametrize("b,n,h,d", [(2, 5, 2, 16), (1, 1, 1, 16), (2, 17, 3, 20), (1, 50, 2, 64), (1, 65, 2, 80),
                                     (1, MAX_N, 1, 32), (2, 33, 4, 128)])
def test_fp32_matches_reference(b, n, h, d):
    got, dgot, want, dwant, _, _ = _case(b, n, h, d, torch.float32)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dgot, dwant, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,n,h,d", [(2, 50, 2, 32), (1, 65, 2, 80)])
def test_low_precision_within_the_references_own_error(dtype, b, n, h, d):
    got, dgot, want, dwant, low, dlow = _case(b, n, h, d, dtype)
    assert got.dtype == dtype and dgot.dtype == dtype
    for a, ref, base in ((got, want, low), (dgot, dwant, dlow)):  # relative (Frobenius) error against fp32
        err = ((a.float() - ref).norm() / ref.norm()).item()
        budget = ((base.float() - ref).norm() / ref.norm()).item()
        assert err <= 2 * budget, (err, budget)  # measured: 1.3-1.6x in bf16 (P rounded before P V), < 1x in fp16


def test_dispatch_falls_back_beyond_the_kernels_limits():
    h, d = 2, 16
    long = torch.randn(1, MAX_N + 1, 3 * h * d, device=DEV)
    torch.testing.assert_close(kernels.qkv_attention(long, h, 0.25, impl="auto" if DEV == "cuda" else "torch"),
                               qkv_attention_torch(long, h, 0.25))
    with pytest.raises(ValueError, match="takes up to 128 tokens"):
        kernels.qkv_attention(long, h, 0.25, impl="triton")
    with pytest.raises(ValueError, match="not 3 x num_heads"):
        qkv_attention_torch(torch.randn(1, 4, 10), 2, 0.25)


def test_custom_op_registration_is_consistent():
    """Fake (meta) shapes, autograd and schema of the custom op, as torch.compile and CUDA graphs rely on them."""
    qkv = torch.randn(2, 9, 3 * 2 * 16, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.mae_engine.qkv_attention_fwd.default, (qkv, 2, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_model_encoder_triton_path_matches_plain_and_compiles(monkeypatch):
    from engine.attention import apply_attention
    from engine.config import debug
    from engine.model import build_model
    from engine.levers import apply_regional_compile

    torch.manual_seed(0)
    m = build_model(debug().model).to(DEV)
    m.kernels = "triton"
    # batch 8: the compiled decoder blocks are test_agreement's (one inductor cache entry for both)
    imgs, noise = torch.randn(8, 3, 32, 32, device=DEV), torch.rand(8, 64, device=DEV)
    ref = m(imgs, 0.75, noise)[0]
    ref.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    keys = list(m.state_dict())
    assert apply_attention(m, "encoder-triton") == len(m.blocks)
    assert list(m.state_dict()) == keys and type(m.decoder_blocks[0].attn).__name__ == "Attention"
    calls = []
    real = kernels.attention.qkv_attention_triton
    monkeypatch.setattr(kernels.attention, "qkv_attention_triton", lambda *a: calls.append(1) or real(*a))
    apply_regional_compile(m)  # the custom op is one opaque node inside each compiled encoder block
    out = m(imgs, 0.75, noise)[0]
    out.backward()
    assert len(calls) == len(m.blocks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(m.get_parameter(n).grad, g, rtol=1e-4, atol=1e-6, msg=n)


def test_trainer_with_encoder_triton_trains_like_auto(tmp_path, monkeypatch):
    from conftest import debug_cfg
    from test_train import params_of

    from engine.trainer import Trainer

    over = {"train.max_steps": 2, "train.batch_size": 4, "train.device": DEV}
    a = Trainer(debug_cfg(tmp_path / "a", **over))
    b = Trainer(debug_cfg(tmp_path / "b", **over, **{"train.attention": "encoder-triton"}))
    assert all(type(blk.attn).__name__.startswith("ShortSeq") for blk in b.model.blocks)
    assert all(blk.attn.kernels == b.model.kernels for blk in b.model.blocks)  # model.kernels decides
    for blk in b.model.blocks:  # the attention kernel only (the masking / loss kernels under the CPU interpreter
        blk.attn.kernels = "triton"  # are slow and tested elsewhere)
    ra = a.fit()
    calls = []
    real = kernels.attention.qkv_attention_triton
    monkeypatch.setattr(kernels.attention, "qkv_attention_triton", lambda *x: calls.append(1) or real(*x))
    rb = b.fit()
    assert len(calls) >= 2 * len(b.model.blocks)  # every step's encoder blocks ran the kernel
    assert abs(ra.last_loss - rb.last_loss) < 1e-4 * ra.last_loss
    for k, v in params_of(a).items():
        torch.testing.assert_close(params_of(b)[k], v, rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_check_of_the_kernel_runs_here(dtype):
    from benchmarks.cuda_checks import check_attention

    check_attention(2, 17, 2, 20, dtype, device=DEV)


def test_encoder_triton_falls_back_to_timms_path_beyond_the_kernel(monkeypatch):
    """Sequences the kernel does not take (the dense baseline's 197-257 tokens) and kernels=torch run timm's own
    SDPA path, not the slower matmul reference."""
    from timm.models.vision_transformer import Attention

    from engine.attention import _short_seq_class

    torch.manual_seed(0)
    plain = Attention(32, num_heads=2, qkv_bias=True).to(DEV)
    fast = Attention(32, num_heads=2, qkv_bias=True).to(DEV)
    fast.load_state_dict(plain.state_dict())
    fast.__class__ = _short_seq_class(Attention)
    fast.kernels = "triton"
    calls, sdpa = [], []
    real = kernels.attention.qkv_attention_triton
    monkeypatch.setattr(kernels.attention, "qkv_attention_triton", lambda *a: calls.append(1) or real(*a))
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa.append(1) or real_sdpa(*a, **k))
    long = torch.randn(2, MAX_N + 1, 32, device=DEV)
    torch.testing.assert_close(fast(long), plain(long))
    assert calls == [] and len(sdpa) == 2
    short = torch.randn(2, 20, 32, device=DEV)
    torch.testing.assert_close(fast(short), plain(short), rtol=1e-5, atol=1e-6)
    assert calls == [1] and len(sdpa) == 3
    fast.kernels = "torch"
    fast(short)
    assert calls == [1] and len(sdpa) == 4


def test_two_tiles_cover_every_length_with_little_padding():
    """The row tiles: a power-of-two main tile and a tail that together cover N; the tokens the paper's shapes give
    (ViT-B/16 and ViT-H/14 at mask 0.75: 49+1 and 64+1) computed in 64 and 80 rows, not 64 and 128."""
    from kernels.attention import MAX_N, tiles

    for n in range(1, MAX_N + 1):
        a, b = tiles(n)
        assert a & (a - 1) == 0 and b & (b - 1) == 0 and min(a, b) >= 16, n
        assert n <= a + b, n
        assert a <= max(16, n) and (n <= a or b < 2 * (n - a) or b == 16), n  # the tail is the rest, rounded up
    assert tiles(50) == (32, 32) and tiles(65) == (64, 16) and tiles(197) == (128, 128)

"""Triton kernels against the torch references: on CUDA when present, else on the CPU under
TRITON_INTERPRET=1 (set in conftest). Gathers are exact (torch.equal); reductions within tolerance."""

import os

import pytest
import torch

import kernels
from kernels.loss import HAS_TRITON, norm_pix_mse_torch, norm_pix_mse_triton
from kernels.masking import random_masking_torch, random_masking_triton, unshuffle_torch, unshuffle_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not HAS_TRITON or (DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton on CUDA, or TRITON_INTERPRET=1 on CPU")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_masking(n, length, d, ratio, dtype=torch.float32, noise=None):
    x = torch.randn(n, length, d, device=DEV).to(dtype).requires_grad_()
    if noise is None:
        noise = torch.rand(n, length, device=DEV)
    got = random_masking_triton(x, ratio, noise)
    want = random_masking_torch(x, ratio, noise)
    names = ("x_kept", "mask", "ids_restore", "ids_keep")
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    g = torch.randn_like(got[0])
    (ga,) = torch.autograd.grad(got[0], x, g)
    (gb,) = torch.autograd.grad(want[0], x, g)
    assert torch.equal(ga, gb)
    return got


@pytest.mark.parametrize("n,length,d,ratio", [
    (3, 196, 40, 0.75), (1, 256, 72, 0.5), (3, 196, 24, 0.9), (1, 256, 100, 0.95),
])
def test_masking_matches_reference(n, length, d, ratio):
    check_masking(n, length, d, ratio)


@pytest.mark.parametrize("ratio,k", [(0.994, 1), (0.004, 195)])
def test_masking_extreme_keep_counts(ratio, k):
    x_kept, *_ = check_masking(1, 196, 8, ratio)
    assert x_kept.shape[1] == k


@pytest.mark.parametrize("dtype", DTYPES)
def test_masking_dtypes(dtype):
    check_masking(3, 64, 33, 0.75, dtype)


def test_masking_ties_and_signed_zero_sort_like_stable_argsort():
    noise = torch.tensor([[0.5, 0.25, 0.5, 0.25, 0.0, -0.0, 0.75, 0.25] * 2], device=DEV)
    noise = torch.cat([noise, torch.rand(1, 16, device=DEV).round(decimals=1)])
    check_masking(2, 16, 8, 0.5, noise=noise)


def test_masking_draws_noise_when_none():
    torch.manual_seed(3)
    x = torch.randn(2, 16, 8, device=DEV)
    kept, mask, ids_restore, ids_keep = random_masking_triton(x, 0.75)
    assert kept.shape == (2, 4, 8) and mask.sum().item() == 24
    assert torch.equal(torch.gather(ids_keep, 1, torch.argsort(ids_keep)), ids_keep.sort(1).values)


@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("n,length,d,ratio,dtype", [
    (3, 196, 40, 0.75, torch.float32), (1, 256, 72, 0.9, torch.float32), (3, 196, 24, 0.5, torch.bfloat16),
    (1, 256, 20, 0.95, torch.float16),
])
def test_unshuffle_matches_reference(n, length, d, ratio, dtype, has_cls):
    noise = torch.rand(n, length, device=DEV)
    _, _, ids_restore, _ = random_masking_torch(torch.zeros(n, length, 1, device=DEV), ratio, noise)
    k = kernels.len_keep_for(length, ratio)
    x = torch.randn(n, k + int(has_cls), d, device=DEV).to(dtype).requires_grad_()
    mt = torch.randn(1, 1, d, device=DEV).requires_grad_()  # fp32 parameter, as in the model under autocast
    got = unshuffle_triton(x, ids_restore, mt, has_cls)
    want = unshuffle_torch(x, ids_restore, mt, has_cls)
    assert got.dtype == want.dtype == dtype and torch.equal(got, want)
    g = torch.randn_like(got)
    gx_a, gm_a = torch.autograd.grad(got, (x, mt), g)
    gx_b, gm_b = torch.autograd.grad(want, (x, mt), g)
    assert torch.equal(gx_a, gx_b)
    assert gm_a.dtype == gm_b.dtype and gm_a.shape == gm_b.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gm_a, gm_b, rtol=tol, atol=tol * gm_b.abs().max().item())


LOSS_SHAPES = [(1, 3, 224, 16), (3, 3, 56, 14), (2, 3, 32, 8), (1, 1, 12, 4)]


@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("shape", LOSS_SHAPES)
def test_loss_fp32_matches_reference(shape, norm_pix, grad_in_forward):
    n, c, h, p = shape
    length, pdim = (h // p) ** 2, p * p * c
    imgs = torch.randn(n, c, h, h, device=DEV)
    pred = torch.randn(n, length, pdim, device=DEV, requires_grad=True)
    mask = (torch.rand(n, length, device=DEV) < 0.75).float()
    mask[0, 0] = 1
    la = norm_pix_mse_triton(imgs, pred, mask, p, norm_pix, grad_in_forward=grad_in_forward)
    lb = norm_pix_mse_torch(imgs, pred, mask, p, norm_pix)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    (ga,) = torch.autograd.grad(la * 2.5, pred)
    (gb,) = torch.autograd.grad(lb * 2.5, pred)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6 * gb.abs().max().item())
    assert torch.all(ga[mask == 0] == 0)  # kept patches get no gradient


@pytest.mark.parametrize("pred_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("img_dtype", [torch.float32, torch.bfloat16])
def test_loss_low_precision(pred_dtype, img_dtype):
    n, c, h, p = 3, 3, 56, 14
    imgs = torch.randn(n, c, h, h, device=DEV).to(img_dtype)
    pred = torch.randn(n, 16, p * p * c, device=DEV).to(pred_dtype).requires_grad_()
    mask = (torch.rand(n, 16, device=DEV) < 0.75).float()
    mask[0, 0] = 1
    la = norm_pix_mse_triton(imgs, pred, mask, p)
    lb = norm_pix_mse_torch(imgs, pred, mask, p)
    assert la.dtype == torch.float32
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0)  # fp32 accumulation either way
    (ga,) = torch.autograd.grad(la, pred)
    (gb,) = torch.autograd.grad(lb, pred)
    assert ga.dtype == pred_dtype
    torch.testing.assert_close(ga.float(), gb.float(), rtol=1.6e-2, atol=1e-2 * gb.float().abs().max().item())


def test_loss_without_grad_writes_no_gradient():
    imgs = torch.randn(1, 3, 16, 16, device=DEV)
    pred = torch.randn(1, 4, 192, device=DEV)
    mask = torch.tensor([[1.0, 0, 1, 0]], device=DEV)
    torch.testing.assert_close(norm_pix_mse_triton(imgs, pred, mask, 8), norm_pix_mse_torch(imgs, pred, mask, 8),
                               rtol=1e-6, atol=0)


def test_loss_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"pred has shape \[1, 4, 10\], expected \[1, 4, 192\]"):
        norm_pix_mse_triton(torch.randn(1, 3, 16, 16, device=DEV), torch.randn(1, 4, 10, device=DEV),
                            torch.ones(1, 4, device=DEV), 8)


def test_model_triton_path_matches_torch_path():
    from engine.config import debug
    from engine.model import build_model

    cfg = debug().model
    torch.manual_seed(0)
    m_ref = build_model(cfg).to(DEV)
    m_tri = build_model(cfg).to(DEV)
    m_tri.load_state_dict(m_ref.state_dict())
    m_ref.kernels, m_tri.kernels = "torch", "triton"
    imgs = torch.randn(3, 3, 32, 32, device=DEV)
    noise = torch.rand(3, 64, device=DEV)
    la, pa, ma = m_tri(imgs, 0.75, noise)
    lb, pb, mb = m_ref(imgs, 0.75, noise)
    assert torch.equal(ma, mb)
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)  # masking and unshuffle are exact
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    la.backward()
    lb.backward()
    for (name, a), (_, b) in zip(m_tri.named_parameters(), m_ref.named_parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6 * (1 + b.grad.abs().max().item())), name


def test_dispatch():
    x = torch.randn(2, 16, 8)
    assert kernels.resolve_impl("torch", x) == "torch"
    assert kernels.resolve_impl("auto", x) == "torch"  # CPU tensors use the reference by default
    with pytest.raises(ValueError, match="kernel impl must be one of"):
        kernels.resolve_impl("cuda", x)


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton kernels need a CUDA tensor"):
        kernels.resolve_impl("triton", torch.randn(2, 3))

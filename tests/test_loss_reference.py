"""The torch reference loss against a literal transcription of the spec in DESIGN.md."""

import pytest
import torch

from kernels import norm_pix_mse
from kernels.loss import norm_pix_mse_torch


def spec_loss(imgs, pred, mask, p, norm_pix=True):
    # literal transcription of DESIGN.md "Numeric spec of the loss"
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    target = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(N, h * w, p * p * C).float()
    if norm_pix:
        P = target.shape[-1]
        mean = target.sum(-1, keepdim=True) / P
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (P - 1)  # unbiased
        target = (target - mean) / torch.sqrt(var + 1e-6)  # eps inside the square root
    loss = ((pred.float() - target) ** 2).mean(-1)  # [N, L]
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 32, 32, 4), (3, 3, 28, 28, 14), (1, 1, 16, 16, 8)])
def test_reference_matches_spec(shape, norm_pix):
    N, C, H, W, p = shape
    imgs = torch.randn(N, C, H, W, dtype=torch.float64).float()
    L = (H // p) * (W // p)
    pred = torch.randn(N, L, p * p * C)
    mask = (torch.rand(N, L) < 0.75).float()
    mask[0, 0] = 1
    got = norm_pix_mse_torch(imgs, pred, mask, p, norm_pix)
    want = spec_loss(imgs, pred, mask, p, norm_pix)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert torch.equal(norm_pix_mse(imgs, pred, mask, p, norm_pix, impl="torch"), got)


def test_unbiased_variance_and_eps_placement():
    # a constant patch: var = 0 -> target = 0 / sqrt(1e-6) = 0; pred = 1 -> loss 1
    imgs = torch.full((1, 3, 4, 4), 0.3)
    pred = torch.ones(1, 1, 48)
    assert norm_pix_mse_torch(imgs, pred, torch.ones(1, 1), 4).item() == pytest.approx(1.0)
    # a two-valued patch: unbiased std differs from biased
    imgs = torch.zeros(1, 1, 2, 2)
    imgs[0, 0, 0, 0] = 1.0
    target = torch.tensor([1.0, 0, 0, 0])
    t = (target - 0.25) / torch.sqrt(target.var(unbiased=True) + 1e-6)
    got = norm_pix_mse_torch(imgs, t.view(1, 1, 4), torch.ones(1, 1), 2)
    assert got.item() == pytest.approx(0.0, abs=1e-10)


def test_only_removed_patches_count():
    imgs = torch.randn(1, 3, 8, 8)
    pred = torch.zeros(1, 4, 48)
    mask = torch.tensor([[1.0, 0, 0, 0]])
    base = norm_pix_mse_torch(imgs, pred, mask, 4)
    pred2 = pred.clone()
    pred2[0, 1:] = 100.0  # kept patches: no effect
    assert torch.equal(norm_pix_mse_torch(imgs, pred2, mask, 4), base)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_eps_sits_inside_the_square_root(impl):
    """A patch whose variance is of the order of eps: with eps inside the square root (the spec, the paper's code)
    a zero prediction costs (P-1)/P * var / (var + eps); with eps outside it would cost about (P-1)/P. The two
    placements differ by ~2x here (the large-variance patches of the other tests cannot tell them apart)."""
    import os

    if impl == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs CUDA or the interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p, P, a = 4, 48, 1e-3
    signs = torch.tensor([1.0, -1.0]).repeat(P // 2)[torch.randperm(P)]
    patch = 0.3 + a * signs  # mean 0.3, unbiased variance a^2 * P / (P - 1): ~1e-6
    imgs = patch.view(1, 4, 4, 3).permute(0, 3, 1, 2).contiguous().to(dev)  # (p, q, c) ordering of one patch
    var = float(patch.double().var())
    pred = torch.zeros(1, 1, P, device=dev, requires_grad=True)
    mask = torch.ones(1, 1, device=dev)
    got = norm_pix_mse(imgs, pred, mask, p, impl=impl)
    inside = (P - 1) / P * var / (var + 1e-6)
    outside = (P - 1) / P * var / (var ** 0.5 + 1e-6) ** 2
    assert abs(inside - outside) > 0.3  # the case separates the two placements
    assert got.item() == pytest.approx(inside, rel=2e-3), (got.item(), inside, outside)

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


LOSS_SHAPES = [(1, 3, 224, 16), (3, 3, 56, 14), (2, 3, 32, 8), (1, 1, 12, 4), (2, 3, 32, 16),  # p = 16 small
               (2, 2, 6, 3), (1, 3, 4, 2)]  # odd and tiny patches: the tile is the next power of two


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


# --- the position-embedding add folded into the gathers, the one-kernel unshuffle backward, the loss's count path


@pytest.mark.parametrize("x_dtype,pos_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_masking_with_position_embedding_is_exact(x_dtype, pos_dtype):
    """x + pos then the gather, in torch's promotion (bf16 tokens + fp32 embedding -> fp32 kept rows): the kernel
    reads only the kept rows' embeddings and equals the reference bit for bit, output and gradient of x."""
    n, length, d = 3, 49, 40
    x = torch.randn(n, length, d, device=DEV).to(x_dtype).requires_grad_()
    pos = torch.randn(1, length, d, device=DEV).to(pos_dtype)
    noise = torch.rand(n, length, device=DEV)
    got = random_masking_triton(x, 0.75, noise, pos)
    want = random_masking_torch(x, 0.75, noise, pos)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[0].dtype == torch.result_type(x, pos)
    g = torch.randn_like(got[0])
    (ga,) = torch.autograd.grad(got[0], x, g)
    (gb,) = torch.autograd.grad(want[0], x, g)
    assert ga.dtype == x_dtype and torch.equal(ga, gb)


def test_masking_with_a_trainable_embedding_takes_the_reference_path():
    x = torch.randn(2, 16, 8, device=DEV)
    pos = torch.randn(1, 16, 8, device=DEV, requires_grad=True)
    noise = torch.rand(2, 16, device=DEV)
    out = random_masking_triton(x, 0.5, noise, pos)[0]
    (gp,) = torch.autograd.grad(out.sum(), pos)  # the fused kernel would give no gradient for pos
    assert gp.abs().sum() > 0


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_unshuffle_with_position_embedding_is_exact(x_dtype):
    n, length, d, ratio = 2, 64, 24, 0.75
    noise = torch.rand(n, length, device=DEV)
    _, _, ids_restore, _ = random_masking_torch(torch.zeros(n, length, 1, device=DEV), ratio, noise)
    x = torch.randn(n, 17, d, device=DEV).to(x_dtype).requires_grad_()
    mt = torch.randn(1, 1, d, device=DEV).requires_grad_()
    pos = torch.randn(1, length + 1, d, device=DEV)  # fp32, rounded to x's dtype before the add
    got = unshuffle_triton(x, ids_restore, mt, True, pos)
    want = unshuffle_torch(x, ids_restore, mt, True, pos)
    assert got.dtype == want.dtype == x_dtype and torch.equal(got, want)
    g = torch.randn_like(got)
    (gx_a,) = torch.autograd.grad(got, x, g)
    (gx_b,) = torch.autograd.grad(want, x, g)
    assert torch.equal(gx_a, gx_b)


def test_unshuffle_mask_token_gradient_deterministic_and_atomic_paths_agree():
    """The default backward adds each program's mask-token partial sum atomically (one launch); under
    torch.use_deterministic_algorithms the partials are added in a fixed order. Both equal the fp32 sum over
    the removed positions; without a mask-token gradient none is made."""
    n, length, d = 3, 196, 40
    noise = torch.rand(n, length, device=DEV)
    _, mask, ids_restore, _ = random_masking_torch(torch.zeros(n, length, 1, device=DEV), 0.75, noise)
    x = torch.randn(n, 50, d, device=DEV, requires_grad=True)
    mt = torch.randn(1, 1, d, device=DEV, requires_grad=True)
    g = torch.randn(n, length + 1, d, device=DEV)
    want = (g[:, 1:][mask.bool()]).sum(0).reshape(1, 1, d)
    (atomic,) = torch.autograd.grad(unshuffle_triton(x, ids_restore, mt), mt, g)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        (ordered,) = torch.autograd.grad(unshuffle_triton(x, ids_restore, mt), mt, g)
        (again,) = torch.autograd.grad(unshuffle_triton(x, ids_restore, mt), mt, g)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(ordered, again)
    torch.testing.assert_close(atomic, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ordered, want, rtol=1e-5, atol=1e-5)
    frozen = mt.detach()
    (gx,) = torch.autograd.grad(unshuffle_triton(x, ids_restore, frozen), x, g)
    assert torch.equal(gx, torch.autograd.grad(unshuffle_torch(x, ids_restore, frozen), x, g)[0])


def test_tiles_fill_their_lanes():
    from kernels.masking import _tile

    assert _tile(1280, 64) == (16, 256)  # ViT-H: 5 blocks of 256, no idle lane (not 2048 lanes for 1280)
    assert _tile(1024, 49) == (8, 512) and _tile(768, 49) == (16, 256) and _tile(512, 197) == (8, 512)
    assert _tile(72, 16) == (16, 128)  # no divisor: padded


def _loss_inputs(n=2, c=3, h=32, p=8, dtype=torch.float32):
    length = (h // p) ** 2
    imgs = torch.randn(n, c, h, h, device=DEV)
    pred = torch.randn(n, length, p * p * c, device=DEV).to(dtype).requires_grad_()
    noise = torch.rand(n, length, device=DEV)
    _, mask, _, _ = random_masking_torch(torch.zeros(n, length, 1, device=DEV), 0.75, noise)
    return imgs, pred, mask, p, int(mask.sum().item())


@pytest.mark.parametrize("grad_out", [1.0, 0.25])
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_loss_with_known_count_matches_reference(grad_out, grad_in_forward):
    """mask_count (the model passes N x (L - K)): the gradient is written final in the forward; a backward with
    grad_output 1 has nothing to do, any other is applied on the device."""
    imgs, pred, mask, p, count = _loss_inputs()
    la = norm_pix_mse_triton(imgs, pred, mask, p, grad_in_forward=grad_in_forward, mask_count=count)
    lb = norm_pix_mse_torch(imgs, pred, mask, p, mask_count=count)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    torch.testing.assert_close(lb, norm_pix_mse_torch(imgs, pred, mask, p), rtol=0, atol=0)  # same divisor
    (ga,) = torch.autograd.grad(la * grad_out, pred)
    (gb,) = torch.autograd.grad(lb * grad_out, pred)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6 * gb.abs().max().item())


def test_loss_second_backward_through_an_in_place_gradient_is_refused():
    imgs, pred, mask, p, _ = _loss_inputs()
    loss = norm_pix_mse_triton(imgs, pred, mask, p) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError) as e:
        loss.backward()
    assert str(e.value) == ("norm_pix_mse_triton: a second backward through the same loss would scale the gradient "
                            "twice; use grad_in_forward=False with retain_graph")


def test_loss_under_no_grad_allocates_no_gradient():
    """A forward under no_grad (the kernel benchmark's fwd rows, evaluation) computes and allocates no dL/dpred:
    nothing of pred's size is allocated, and the loss equals the reference."""
    from engine.memory import AllocTracker

    imgs, pred, mask, p, count = _loss_inputs(n=4, h=64)
    nbytes = pred.numel() * pred.element_size()

    def extra_peak():  # bytes allocated beyond the inputs (counted first: the interpreter re-wraps them)
        with AllocTracker() as t:
            t.track(imgs, pred, mask)
            base = t.current
            loss = norm_pix_mse_triton(imgs, pred, mask, p, mask_count=count)
        return t.peak - base, loss

    with torch.no_grad():
        extra, la = extra_peak()
    assert extra < nbytes, extra
    torch.testing.assert_close(la, norm_pix_mse_torch(imgs, pred, mask, p), rtol=1e-6, atol=0)
    assert extra_peak()[0] >= nbytes  # with grad: the gradient buffer is there (the check above can fail)


def test_loss_reads_nothing_of_kept_patches():
    """A kept patch's pixels and prediction never enter the loss or the gradient: NaNs there change nothing."""
    imgs, pred, mask, p, count = _loss_inputs()
    kept = (mask == 0).nonzero()[0].tolist()
    n_, l_ = kept
    gh, gw = divmod(l_, imgs.shape[-1] // p)
    imgs2 = imgs.clone()
    imgs2[n_, :, gh * p:(gh + 1) * p, gw * p:(gw + 1) * p] = float("nan")
    pred2 = pred.detach().clone()
    pred2[n_, l_] = float("nan")
    pred2.requires_grad_()
    la = norm_pix_mse_triton(imgs2, pred2, mask, p, mask_count=count)
    (ga,) = torch.autograd.grad(la, pred2)
    lb = norm_pix_mse_triton(imgs, pred, mask, p, mask_count=count)
    (gb,) = torch.autograd.grad(lb, pred)
    assert torch.equal(la, lb) and torch.equal(ga, gb)


# --- the launchers' contracts: buffers, fallbacks, the deterministic switch, messages (found by mutation testing)


def _unshuffle_inputs(n=3, length=49, d=24, ratio=0.75, dtype=torch.float32, has_cls=True):
    noise = torch.rand(n, length, device=DEV)
    _, mask, ids_restore, _ = random_masking_torch(torch.zeros(n, length, 1, device=DEV), ratio, noise)
    k = kernels.len_keep_for(length, ratio)
    x = torch.randn(n, k + int(has_cls), d, device=DEV).to(dtype).requires_grad_()
    mt = torch.randn(1, 1, d, device=DEV).requires_grad_()
    return x, ids_restore, mt, mask


def _both_kernels(x, mt, noise, deterministic=False):
    """Masking and unshuffle through the kernels, forward and backward: every output and gradient."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        xm = x.detach().requires_grad_()
        kept, mask, restore, keep = random_masking_triton(xm, 0.75, noise)
        (g_masked,) = torch.autograd.grad(kept, xm, torch.ones_like(kept))
        xu = torch.cat([kept[:, :1], kept], 1).detach().requires_grad_()
        mtu = mt.detach().requires_grad_()
        out = unshuffle_triton(xu, restore, mtu)
        g = torch.arange(out.numel(), device=DEV, dtype=torch.float32).reshape(out.shape).sin()
        g_x, g_mt = torch.autograd.grad(out, (xu, mtu), g)
    finally:
        torch.use_deterministic_algorithms(was)
    return {"kept": kept, "mask": mask, "ids_restore": restore, "ids_keep": keep, "grad x (masking)": g_masked,
            "unshuffled": out, "grad x (unshuffle)": g_x, "grad mask token": g_mt}


@pytest.mark.parametrize("deterministic", [False, True])
def test_kernel_buffers_do_not_follow_the_default_dtype(deterministic):
    """A script that sets torch's default dtype to float64 gets the same masks, tokens and gradients: the mask is
    fp32 and the mask token's gradient is summed in fp32 whatever the default (the launchers name every dtype)."""
    x = torch.randn(3, 64, 24, device=DEV)
    mt = torch.randn(1, 1, 24, device=DEV)
    noise = torch.rand(3, 64, device=DEV)
    want = _both_kernels(x, mt, noise, deterministic)
    was = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = _both_kernels(x, mt, noise, deterministic)
    finally:
        torch.set_default_dtype(was)
    for name, a in got.items():
        assert a.dtype == want[name].dtype and torch.equal(a, want[name]), name
    assert got["mask"].dtype == torch.float32 and got["grad mask token"].dtype == torch.float32


class _LaunchSpy:
    """Stands in for a Triton kernel object: records each launch's keyword arguments and launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_unshuffle_backward_adds_atomically_by_default_and_in_a_fixed_order_when_deterministic(monkeypatch):
    """torch.use_deterministic_algorithms(True) promises run-to-run identical gradients: the mask token's sum
    must then not use atomics (their order varies on a GPU), and by default it is one launch with atomics."""
    from kernels import masking

    spy = _LaunchSpy(masking._unshuffle_bwd_kernel)
    monkeypatch.setattr(masking, "_unshuffle_bwd_kernel", spy)
    x, ids_restore, mt, _ = _unshuffle_inputs()
    torch.autograd.grad(unshuffle_triton(x, ids_restore, mt), (x, mt), torch.ones(3, 50, 24, device=DEV))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.autograd.grad(unshuffle_triton(x, ids_restore, mt), (x, mt), torch.ones(3, 50, 24, device=DEV))
    finally:
        torch.use_deterministic_algorithms(was)
    assert [(k["ATOMIC"], k["WANT_MT"]) for k in spy.launches] == [(True, True), (False, True)]


def test_unshuffle_falls_back_to_the_reference_exactly_where_the_kernel_cannot_serve(monkeypatch):
    """Tokens outside the kernel dtypes (float64) or a trainable embedding (the kernel gives it no gradient) take
    the reference with every argument passed on; every other case runs the kernel."""
    from kernels import masking

    calls = []
    real = masking._UnshuffleFn.apply
    monkeypatch.setattr(masking._UnshuffleFn, "apply", lambda *a: calls.append(1) or real(*a))
    x, ids_restore, mt, _ = _unshuffle_inputs()
    pos = torch.randn(1, 50, 24, device=DEV)
    for x_dtype, pos_grad, kernel in [(torch.float64, False, False), (torch.float32, True, False),
                                      (torch.float32, False, True), (torch.bfloat16, False, True)]:
        calls.clear()
        xx = x.detach().to(x_dtype)
        pp = pos.detach().to(x_dtype).requires_grad_(pos_grad)
        got = unshuffle_triton(xx, ids_restore, mt, True, pp)
        assert torch.equal(got, unshuffle_torch(xx, ids_restore, mt, True, pp)), (x_dtype, pos_grad)
        assert got.dtype == x_dtype and bool(calls) == kernel, (x_dtype, pos_grad)
        if pos_grad:
            (gp,) = torch.autograd.grad(got.sum(), pp)
            assert gp.abs().sum() > 0
    calls.clear()
    got = unshuffle_triton(x.detach().double(), ids_restore, mt, False)  # no cls row: the flag is passed on
    assert got.shape == (3, 49, 24) and not calls
    assert torch.equal(got, unshuffle_torch(x.detach().double(), ids_restore, mt, False))


def test_launcher_messages_name_the_problem(monkeypatch):
    from kernels import masking

    x, ids_restore, mt, _ = _unshuffle_inputs()
    with pytest.raises(ValueError) as e:
        unshuffle_triton(x, ids_restore, mt, True, torch.zeros(1, 49, 24, device=DEV))
    assert str(e.value) == "pos must hold (L + cls) x D = 50 x 24 elements, got shape [1, 49, 24]"
    with pytest.raises(ValueError) as e:
        random_masking_triton(torch.zeros(2, 16, 8, device=DEV), 0.5, None, torch.zeros(1, 17, 8, device=DEV))
    assert str(e.value) == "pos must hold L x D = 16 x 8 elements, got shape [1, 17, 8]"
    monkeypatch.setattr(masking, "HAS_TRITON", False)
    for call in (lambda: unshuffle_triton(x, ids_restore, mt), lambda: random_masking_triton(x, 0.5)):
        with pytest.raises(RuntimeError) as e:
            call()
        assert str(e.value) == "triton is not importable"


def _loss_everything(imgs, pred, mask, p, **kw):
    x = pred.detach().requires_grad_()
    loss = norm_pix_mse_triton(imgs, x, mask, p, **kw)
    (g,) = torch.autograd.grad(loss * 0.5, x)
    return loss, g


@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("count", [True, False])
@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_loss_buffers_do_not_follow_the_default_dtype(grad_in_forward, count, default):
    """Partial sums, the finished loss and 1 / count stay fp32 when a script sets torch's default dtype to
    float64 or bfloat16: the same loss and gradient, bit for bit."""
    imgs, pred, mask, p, n_removed = _loss_inputs()
    kw = {"grad_in_forward": grad_in_forward, "mask_count": n_removed if count else None}
    want = _loss_everything(imgs, pred, mask, p, **kw)
    was = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = _loss_everything(imgs, pred, mask, p, **kw)
    finally:
        torch.set_default_dtype(was)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 / 0
def test_loss_with_nothing_removed_is_nan_like_the_reference():
    """A mask that removes nothing: 0 / 0, a NaN loss in both paths (a count of 0 given by the caller too)."""
    imgs, pred, _, p, _ = _loss_inputs()
    none = torch.zeros(pred.shape[:2], device=DEV)
    assert norm_pix_mse_torch(imgs, pred, none, p).isnan()
    for count in (None, 0):
        loss, g = _loss_everything(imgs, pred, none, p, mask_count=count)
        assert loss.isnan() and g.shape == pred.shape


def test_loss_messages_name_the_problem(monkeypatch):
    from kernels import loss as kloss

    imgs, pred, mask, p, _ = _loss_inputs()
    for fn in (norm_pix_mse_triton, norm_pix_mse_torch):
        with pytest.raises(ValueError) as e:
            fn(imgs[..., :30], pred, mask, p)
        assert str(e.value) == "image size 32x30 is not divisible by patch size 8"
        with pytest.raises(ValueError) as e:
            fn(imgs, pred[:, :, :10], mask, p)
        assert str(e.value) == "pred has shape [2, 16, 10], expected [2, 16, 192] from the images"
    with pytest.raises(ValueError) as e:
        kloss.unpatchify(pred[:, :15], p)
    assert str(e.value) == "unpatchify needs a square grid, got L=15"
    assert torch.equal(kloss.unpatchify(kloss.patchify(imgs, p), p), imgs)
    one = imgs[:, :1]
    assert torch.equal(kloss.unpatchify(kloss.patchify(one, p), p, c=1), one)
    monkeypatch.setattr(kloss, "HAS_TRITON", False)
    with pytest.raises(RuntimeError) as e:
        norm_pix_mse_triton(imgs, pred, mask, p)
    assert str(e.value) == "triton is not importable"


# --- masking: its checks, its defaults, and where the kernel hands over to the reference (the 12-03 full run)


def test_the_mask_ratio_and_noise_checks_name_the_value():
    assert kernels.len_keep_for(4, 0.0) == 4 and kernels.len_keep_for(4, 0.5) == 2
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError) as e:
            kernels.len_keep_for(4, bad)
        assert str(e.value) == f"mask ratio must be in [0, 1), got {bad}"
    with pytest.raises(ValueError) as e:
        kernels.len_keep_for(4, 0.9)
    assert str(e.value) == "mask ratio 0.9 keeps no patch out of 4"
    with pytest.raises(ValueError) as e:
        random_masking_torch(torch.zeros(2, 4, 1), 0.5, torch.rand(2, 5))
    assert str(e.value) == "noise must have shape [N, L] = [2, 4], got [2, 5]"


@pytest.mark.parametrize("masking", [random_masking_torch, random_masking_triton])
def test_masking_without_noise_draws_it_from_torchs_generator(masking):
    x = torch.randn(3, 16, 8, device=DEV)
    torch.manual_seed(5)
    a = masking(x, 0.5)
    torch.manual_seed(5)
    b = masking(x, 0.5, torch.rand(3, 16, device=DEV))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_tied_noise_keeps_the_lowest_indices_in_order():
    """argsort is stable: samples whose noise ties (a constant noise) keep their first K patches, in order."""
    x = torch.arange(2 * 64 * 1, dtype=torch.float32).reshape(2, 64, 1)
    kept, mask, restore, keep = random_masking_torch(x, 0.75, torch.zeros(2, 64))
    assert torch.equal(keep, torch.arange(16).expand(2, 16)) and torch.equal(restore, torch.arange(64).expand(2, 64))


def test_the_mask_is_fp32_and_not_differentiable_whatever_the_default_dtype():
    x = torch.randn(2, 16, 8, device=DEV, requires_grad=True)
    for masking in (random_masking_torch, random_masking_triton):
        was = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            _, mask, _, _ = masking(x, 0.5, torch.rand(2, 16, device=DEV))
        finally:
            torch.set_default_dtype(was)
        assert mask.dtype == torch.float32 and not mask.requires_grad, masking


def test_the_reference_fallback_takes_the_given_noise():
    x = torch.randn(2, 16, 8, device=DEV, dtype=torch.float64)  # not a kernel dtype: the reference serves
    noise = torch.rand(2, 16, device=DEV)
    got = random_masking_triton(x, 0.5, noise)
    want = random_masking_torch(x, 0.5, noise)
    assert all(torch.equal(u, v) for u, v in zip(got, want))


def test_masking_hands_sequences_past_the_kernels_sort_to_the_reference(monkeypatch):
    """The kernel sorts up to MAX_SORT_L patches in registers; longer sequences take the reference (the limit is
    lowered here so that the interpreter's run stays small; the routing reads it at each call)."""
    from kernels import masking

    calls = []
    real = masking._RandomMaskingFn.apply
    monkeypatch.setattr(masking._RandomMaskingFn, "apply", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(masking, "MAX_SORT_L", 16)
    for length, kernel in [(16, True), (17, False)]:
        calls.clear()
        x = torch.randn(2, length, 4, device=DEV)
        noise = torch.rand(2, length, device=DEV)
        got = random_masking_triton(x, 0.5, noise)
        assert bool(calls) is kernel, length
        assert all(torch.equal(u, v) for u, v in zip(got, random_masking_torch(x, 0.5, noise)))

"""Levers applied from outside the model (engine/parallel.py), each against the plain path."""

import torch

from engine.config import debug
from engine.parallel import DistContext, build_parallel_model


def build(**train):
    cfg = debug()
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return build_parallel_model(cfg, DistContext(), torch.device("cpu"))


def step(model, x, noise):
    loss, _, _ = model(x, 0.75, noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_meta_build_is_deterministic_and_matches_eager_build():
    from engine.model import build_model

    a, b = build(), build()
    eager = build_model(debug().model)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and torch.equal(v, eager.state_dict()[k]), k


def test_activation_checkpointing_matches_plain():
    x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    la, ga = step(build(activation_checkpointing=True), x, noise)
    lb, gb = step(build(), x, noise)
    assert torch.equal(la, lb)
    for k in gb:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-7, msg=k)


def test_regional_compile_matches_eager_and_keeps_names():
    x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    compiled = build(compile=True)
    eager = build()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints stay interchangeable
    la, ga = step(compiled, x, noise)
    lb, gb = step(eager, x, noise)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0)
    for k in gb:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_autotuned_compile_of_the_encoder_math_path_matches_eager(monkeypatch):
    """train.compile_mode reaches torch.compile for every block; with train.attention=encoder-math the compiled
    blocks trace the matmul path; loss and gradients equal the plain eager model's."""
    seen = []
    real = torch.compile

    def recording(fn, *a, **kw):
        seen.append(kw.get("mode"))
        return real(fn, *a, **kw)

    monkeypatch.setattr(torch, "compile", recording)
    x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    fast = build(compile=True, compile_mode="max-autotune-no-cudagraphs", attention="encoder-math")
    cfg = debug()
    assert seen == ["max-autotune-no-cudagraphs"] * (cfg.model.depth + cfg.model.decoder_depth)
    assert not any(b.attn.fused_attn for b in fast.blocks)
    la, ga = step(fast, x, noise)
    lb, gb = step(build(), x, noise)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0)
    assert set(ga) == set(gb)
    for k in gb:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=k)

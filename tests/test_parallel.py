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
    x, noise = torch.randn(8, 3, 32, 32), torch.rand(8, 64)  # batch 8: test_agreement's compiled blocks
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
    blocks trace the matmul path; loss and gradients equal the plain eager model's. The blocks compile in the
    default mode here: max-autotune's search times GEMM templates for the GPU it runs on, and on this CPU it only
    added a minute (73 s against an empty inductor cache) to what the test holds."""
    seen = []
    real = torch.compile

    def recording(fn, *a, **kw):
        seen.append(kw.get("mode"))
        return real(fn, *a, **{**kw, "mode": "default"})

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


def test_fsdp2_computes_in_bf16_reduces_in_fp32_and_returns_no_view(one_rank_group):
    """train.precision bf16 under FSDP2: the blocks see bf16 weights in forward, the sharded parameters and their
    gradients stay fp32 (reduced in fp32), the root's inputs are not cast (fp32 images for the loss target); and
    the model returns no view (FSDP2 warned that an in-place op on one would skip its pre-backward hook)."""
    import warnings

    from engine.step import build_training
    from engine.levers import config_with_levers

    cfg = config_with_levers(debug(), {"precision": "bf16"}, **{"train.device": "cpu", "train.batch_size": 4})
    tr = build_training(cfg, DistContext(distributed=True), torch.device("cpu"))
    seen = {}
    tr.model.blocks[0].attn.qkv.register_forward_pre_hook(
        lambda m, a: seen.update(weight=m.weight.dtype, x=a[0].dtype))
    real_loss = tr.model.forward_loss

    def loss_spy(imgs, pred, mask, **kw):  # the loss target: the images as the root received them
        seen.update(imgs=imgs.dtype)
        return real_loss(imgs, pred, mask, **kw)

    tr.model.forward_loss = loss_spy
    policy = tr.model.blocks[0]._get_fsdp_state()._mp_policy  # private: the policy fully_shard was given
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, finite = tr.step_fn([(torch.randn(4, 3, 32, 32), torch.rand(4, 64))])
    assert bool(finite) and torch.isfinite(loss)
    assert seen == {"weight": torch.bfloat16, "x": torch.bfloat16, "imgs": torch.float32}
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    assert not [w for w in caught if "view tensor" in str(w.message)], [str(w.message) for w in caught]


def test_fsdp_checks_pass_on_cpu_and_catch_a_sharding_bug(tmp_path, monkeypatch, capsys):
    """benchmarks/fsdp_checks.py (the CUDA FSDP2 checks) run on a CPU with gloo, in this process (one-process
    groups, torn down at the end): they pass, and an FSDP2 model whose first block's weights were altered after
    sharding fails the step check."""
    import json

    import engine.parallel as P
    from benchmarks.fsdp_checks import main as checks

    assert checks(["--device", "cpu", "--only", "FSDP2 step,DCP", "--out", str(tmp_path)]) == 0, capsys.readouterr()
    res = json.loads((tmp_path / "fsdp_checks.json").read_text())["results"]
    assert [x["ok"] for x in res] == [True, True] and len(res) == 2
    orig = P.materialize

    def altered(model, device, seed):
        orig(model, device, seed)
        if P.is_fsdp(model):
            with torch.no_grad():
                model.blocks[0].attn.qkv.weight.mul_(1.01)

    monkeypatch.setattr(P, "materialize", altered)
    capsys.readouterr()
    assert checks(["--device", "cpu", "--only", "FSDP2 step"]) == 1
    assert "FAIL FSDP2 step vs single-device step" in capsys.readouterr().out

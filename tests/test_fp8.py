"""train.precision=fp8 (engine/fp8.py): torchao's float8 GEMMs in the encoder's linear layers, held to the bf16 path
on the CPU (torch's _scaled_mm runs float8 here)."""


import pytest
import torch

from engine.config import ConfigError, UnavailableError, debug
from engine.step import build_training
from engine.levers import config_with_levers

torchao = pytest.importorskip("torchao", reason="the fp8 extra (torchao) is not installed")

CPU = torch.device("cpu")


def training(precision, **extra):
    levers = {"precision": precision, **extra}
    cfg = config_with_levers(debug(), levers, **{"train.device": "cpu", "optim.lr": "1e-3"})
    torch.manual_seed(0)
    return cfg, build_training(cfg, device=CPU, strict=False)


def batch(cfg, seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    return torch.randn(n, 3, m.img_size, m.img_size, generator=g), torch.rand(n, m.num_patches, generator=g)


def test_only_the_encoder_linears_turn_float8_and_nothing_else_changes():
    from engine.fp8 import fp8_layers

    cfg, f8 = training("fp8")
    _, bf = training("bf16")
    want = [f"blocks.{i}.{n}" for i in range(cfg.model.depth) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert fp8_layers(f8.model) == want
    a, b = f8.model.state_dict(), bf.model.state_dict()
    assert a.keys() == b.keys()  # checkpoints, exports and FSDP2 see the same parameters
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same initial values
    assert all(p.dtype == torch.float32 for p in f8.model.parameters())  # fp32 master weights
    _, dec = training("fp8", fp8_recipe="rowwise")
    assert len(fp8_layers(dec.model)) == len(want)


def test_decoder_in_float8_only_when_asked():
    from engine.fp8 import fp8_layers

    cfg = config_with_levers(debug(), {"precision": "fp8"}, **{"train.device": "cpu", "train.fp8_decoder": "true"})
    tr = build_training(cfg, device=CPU, strict=False)
    names = fp8_layers(tr.model)
    assert any(n.startswith("decoder_blocks.") for n in names)
    assert not any(n in ("decoder_embed", "decoder_pred", "patch_embed.proj") for n in names)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_step_follows_the_bf16_step(recipe):
    """Same weights, images and masks: the fp8 loss within 2% of bf16 autocast's, the gradients within 10% relative
    (float8 e4m3 keeps 3 mantissa bits; e5m2 gradients 2), the encoder's weights actually moved by fp8 GEMMs. The
    check is benchmarks/cuda_checks.py's (ViT-B on the GPU), run here on the debug preset."""
    from benchmarks.cuda_checks import check_fp8_follows_bf16

    rel = check_fp8_follows_bf16("debug", recipe, device="cpu")  # asserts the loss and the gradients itself
    assert 0 < rel < 0.1, rel  # 0: the float8 layers did not run


def test_fp8_under_regional_compile_and_the_graph_body_matches_eager_fp8():
    cfg, eager = training("fp8")
    _, compiled = training("fp8", compile="regional", graph=True)  # the graph's body (no capture on a CPU)
    torch._dynamo.reset()
    for i in range(2):
        x, noise = batch(cfg, seed=i)
        la, _ = eager.step_fn([(x, noise)], 0.75)
        lb, _ = compiled.step_fn([(x, noise)], 0.75)
        assert float(lb) == pytest.approx(float(la), rel=1e-3), i


def test_fp8_under_fsdp2_trains_like_fp8_alone(tmp_path, capsys):
    """--train.fsdp always (FSDP2 over a one-process gloo group) with fp8: the weights gathered in float8, the same
    losses as fp8 without FSDP2."""
    import json

    from engine.cli import main

    common = ["--preset", "debug", "--data.num_workers", "0", "--train.tensorboard", "false", "--train.device", "cpu",
              "--data.backend", "torchvision", "--train.log_every", "1", "--train.vis_every", "0",
              "--train.precision", "fp8", "--train.batch_size", "16", "--train.max_steps", "2"]
    losses, outs = [], []
    for name, extra in (("fsdp", ["--train.fsdp", "always"]), ("plain", [])):
        assert main(["pretrain", *common, "--run-dir", str(tmp_path / name), *extra]) == 0
        outs.append(capsys.readouterr().out)
        recs = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses.append([x["loss"] for x in recs if "loss" in x])
    assert "(FSDP2)" in outs[0] and "(FSDP2)" not in outs[1]
    n = 4 * debug().model.depth
    assert f"precision fp8 tensorwise ({n} float8 linear layers, float8 all-gather), bf16 elsewhere" in outs[0]
    assert f"precision fp8 tensorwise ({n} float8 linear layers), bf16 elsewhere" in outs[1]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_fp8_refusals_name_the_way_out(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torchao(name, *a, **k):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    cfg = config_with_levers(debug(), {"precision": "fp8"}, **{"train.device": "cpu"})
    with pytest.raises(UnavailableError, match=r'pip install -e "\.\[fp8\]"'):
        build_training(cfg, device=CPU)
    monkeypatch.setattr(builtins, "__import__", real)
    with pytest.raises(ConfigError, match="fp8_recipe must be tensorwise or rowwise"):
        config_with_levers(debug(), {"precision": "fp8"}, **{"train.fp8_recipe": "blockwise"})


def test_the_cuda_checks_of_fp8_run_here():
    """benchmarks/cuda_checks.py's fp8 checks (run on the GPU by device section fp8), on the CPU with the debug preset,
    so a broken check does not cost device time (check_fp8_follows_bf16: test_fp8_step_follows_the_bf16_step)."""
    from benchmarks.cuda_checks import CHECKS, check_graph_step

    assert check_graph_step("debug", False, device="cpu", precision="fp8") < 1e-3
    assert sum(name.startswith("fp8 ") for name, _, _ in CHECKS) == 4

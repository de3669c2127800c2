"""train.layer_norm=apex: the swap to apex's FusedLayerNorm keeps Parameters, names and values; refusals.

apex is not installable from the package index, so the swap is held here against a stand-in class registered as
`apex.normalization.FusedLayerNorm` (conftest's `stand_in_apex`: a LayerNorm written out with torch ops); on a
GPU machine with apex the speed suite's `triton+apexln` row and a CUDA check run the real one.
"""

import sys

import pytest
import torch
from torch import nn

from engine.config import ConfigError, apply_overrides, debug
from engine.layernorm import apply_layer_norm
from engine.model import build_model


def test_swap_keeps_parameters_names_and_output(stand_in_apex):
    torch.manual_seed(0)
    m = build_model(debug().model)
    n_ln = sum(isinstance(x, nn.LayerNorm) for x in m.modules())
    params = dict(m.named_parameters())
    keys = list(m.state_dict())
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    ref = m(imgs, 0.75, noise)[0]
    assert apply_layer_norm(m, "apex") == n_ln > 0
    assert not any(isinstance(x, nn.LayerNorm) for x in m.modules())
    assert list(m.state_dict()) == keys  # checkpoints stay interchangeable
    assert all(p is params[n] for n, p in m.named_parameters())  # same objects: the optimizer's state applies
    out = m(imgs, 0.75, noise)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert m.blocks[0].norm1.calls == 1 and m.decoder_norm.calls == 1 and m.blocks[0].norm1.eps == 1e-6
    out.backward()
    assert m.blocks[0].norm1.weight.grad is not None
    assert apply_layer_norm(m, "apex") == 0  # idempotent


def test_without_apex_it_is_refused_with_a_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex raises ImportError
    m = build_model(debug().model)
    with pytest.raises(RuntimeError, match="apex is not importable"):
        apply_layer_norm(m, "apex")
    assert apply_layer_norm(m, "torch") == 0
    with pytest.raises(ValueError, match="layer_norm must be one of"):
        apply_layer_norm(m, "triton")


def test_config_and_trainer_refusals(tmp_path, stand_in_apex):
    with pytest.raises(ConfigError, match="train.layer_norm must be torch or apex"):
        apply_overrides(debug(), {"train.layer_norm": "fused"})
    with pytest.raises(ConfigError, match="train.layer_norm=apex is for eager blocks"):
        apply_overrides(debug(), {"train.layer_norm": "apex", "train.compile": "true"})
    from conftest import debug_cfg

    from engine.trainer import Trainer

    with pytest.raises(ConfigError, match="runs in one CUDA process .the device is cpu"):
        Trainer(debug_cfg(tmp_path, **{"train.layer_norm": "apex"}))


def test_step_runner_refuses_apex_with_compile_or_without_apex(monkeypatch):
    from benchmarks.step_runner import StepRunner

    with pytest.raises(ValueError, match="eager blocks"):
        StepRunner(debug().model, "mae", 2, "cpu", compile="regional", layer_norm="apex")
    monkeypatch.setitem(sys.modules, "apex", None)
    with pytest.raises(RuntimeError, match="not importable"):
        StepRunner(debug().model, "mae", 2, "cpu", layer_norm="apex")

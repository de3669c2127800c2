"""engine/optim.py function by function, in well under a second each: the parameter groups against their rule
written out by name, the schedule against the paper's (util/lr_sched.py, per step) at every position including its
edges, set_lr on float and tensor lrs with and without lr_scale, and which optimizer each setting builds. This file
is what the mutation run (tools/mutation.py) holds each planted change of optim.py against."""

import math
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import optim
from engine.config import OptimConfig, debug
from engine.model import build_model


def _paper_lr(step, total, warm, lr, min_lr):
    """MAE's util/lr_sched.adjust_learning_rate, per step instead of per (fractional) epoch, where it is defined
    (total > warm, step <= total); past the end the schedule holds at min_lr, and with no room for a cosine
    (total <= warm) it holds at lr after the warm-up."""
    if step < warm:
        return lr * step / warm
    if total <= warm:
        return lr
    step = min(step, total)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total - warm)))


@settings(max_examples=300, deadline=None)
@given(total=st.integers(0, 400), warm=st.integers(0, 60), step=st.integers(0, 500),
       lr=st.floats(1e-6, 10.0), min_lr=st.floats(0.0, 1e-6))
def test_the_schedule_is_the_papers_at_every_step(total, warm, step, lr, min_lr):
    assert optim.lr_at(step, total, warm, lr, min_lr) == pytest.approx(_paper_lr(step, total, warm, lr, min_lr),
                                                                      rel=1e-12, abs=1e-18)


def test_the_schedule_at_its_corners():
    assert optim.lr_at(0, 100, 10, 2.0) == 0.0  # warm-up starts from 0
    assert optim.lr_at(9, 100, 10, 2.0) == pytest.approx(1.8) and optim.lr_at(10, 100, 10, 2.0) == 2.0  # the peak
    assert optim.lr_at(0, 100, 0, 2.0) == 2.0  # no warm-up: the peak at once
    assert optim.lr_at(0, 100, 1, 2.0) == 0.0 and optim.lr_at(1, 100, 1, 2.0) == 2.0  # a one-step warm-up
    assert optim.lr_at(100, 100, 10, 2.0) == 0.0  # min_lr 0 unless given
    assert optim.lr_at(55, 100, 10, 2.0, 0.2) == pytest.approx(1.1)  # half-way down the cosine
    assert optim.lr_at(100, 100, 10, 2.0, 0.2) == pytest.approx(0.2)  # min_lr at the end
    assert optim.lr_at(150, 100, 10, 2.0, 0.2) == pytest.approx(0.2)  # and after it (no second half-cycle)
    assert optim.lr_at(3, 10, 10, 2.0) == pytest.approx(0.6) and optim.lr_at(10, 10, 10, 2.0) == 2.0
    assert optim.lr_at(20, 5, 10, 2.0) == 2.0  # the run shorter than its warm-up: lr after it


def test_param_groups_follow_the_rule_name_by_name():
    """decay: every trainable weight of two or more dimensions; no decay: norms, biases, tokens, position
    embeddings; frozen parameters (the sin-cos position embeddings) in neither."""
    m = build_model(debug().model)
    m.register_parameter("extra_pos_embed", torch.nn.Parameter(torch.zeros(1, 3, 4)))  # a token by name, 3-D
    m.decoder_embed.bias.requires_grad_(False)
    groups = optim.param_groups(m, 0.05)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.05), ("no_decay", 0.0)]
    names = {id(p): n for n, p in m.named_parameters()}
    got = [[names[id(p)] for p in g["params"]] for g in groups]
    want_nd = [n for n, p in m.named_parameters() if p.requires_grad and (
        p.ndim <= 1 or n.endswith(".bias") or n.split(".")[-1] in optim.NO_DECAY_NAMES)]
    want_d = [n for n, p in m.named_parameters() if p.requires_grad and n not in want_nd]
    assert got == [want_d, want_nd]
    assert "cls_token" in want_nd and "mask_token" in want_nd and "blocks.0.attn.qkv.weight" in want_d
    assert "extra_pos_embed" in want_d  # not one of the named tokens: decayed like any 3-D weight
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert {"pos_embed", "decoder_pos_embed", "decoder_embed.bias"} <= frozen and not frozen & {*want_d, *want_nd}


def test_param_groups_name_the_tokens_by_their_last_name_only():
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
            self.inner = torch.nn.Module()
            self.inner.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
            self.inner.pos_embed_proj = torch.nn.Parameter(torch.zeros(4, 4))
            self.inner.bias_table = torch.nn.Parameter(torch.zeros(4, 4))
            self.inner.bias = torch.nn.Parameter(torch.zeros(4, 4))  # a bias of any shape: no decay

    h = Holder()
    decay, no_decay = optim.param_groups(h, 0.1)
    assert [id(p) for p in decay["params"]] == [id(h.inner.pos_embed_proj), id(h.inner.bias_table)]
    assert [id(p) for p in no_decay["params"]] == [id(h.cls_token), id(h.inner.mask_token), id(h.inner.bias)]


def test_set_lr_scales_each_group_and_fills_a_tensor_lr_in_place():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.5}, {"params": [c], "lr_scale": 2.0}],
                          lr=1.0)
    optim.set_lr(opt, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.15, 0.6]
    t = torch.tensor(9.0)
    opt.param_groups[1]["lr"] = t
    optim.set_lr(opt, 0.1)
    assert opt.param_groups[1]["lr"] is t and t.item() == pytest.approx(0.05)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[2]["lr"] == 0.2


def test_the_default_optimizer_is_torchs_fused_adamw_with_the_configs_values():
    m = build_model(debug().model)
    opt = optim.build_optimizer(m, OptimConfig(weight_decay=0.07, betas=(0.8, 0.9)), 0.01, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True and optim.supports_found_inf(opt)
    assert opt.defaults["lr"] == 0.01 and opt.defaults["betas"] == (0.8, 0.9)
    assert [(g["name"], g["weight_decay"]) for g in opt.param_groups] == [("decay", 0.07), ("no_decay", 0.0)]
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in m.parameters() if p.requires_grad)
    assert not optim.supports_found_inf(torch.optim.SGD(m.parameters(), lr=0.1))


def test_where_fused_adamw_cannot_serve_the_plain_one_does(monkeypatch):
    real = torch.optim.AdamW
    made = []

    def adamw(*a, fused=None, **k):
        if fused:
            raise RuntimeError("fused=True requires all the params to be floating point Tensors of supported devices")
        made.append(k)
        return real(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    opt = optim.build_optimizer(build_model(debug().model), OptimConfig(betas=(0.7, 0.8)), 0.02, torch.device("cpu"))
    assert type(opt) is real and not opt.defaults["fused"] and opt.defaults["betas"] == (0.7, 0.8)
    assert made == [{"lr": 0.02, "betas": (0.7, 0.8), "weight_decay": 0.05}]


def _fake_apex(monkeypatch):
    made = []

    class FusedAdam(torch.optim.SGD):
        def __init__(self, groups, lr, betas, weight_decay, adam_w_mode):
            made.append((lr, betas, weight_decay, adam_w_mode))
            super().__init__(groups, lr=lr)

    apex = types.ModuleType("apex")
    apex.optimizers = types.ModuleType("apex.optimizers")
    apex.optimizers.FusedAdam = FusedAdam
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
    return FusedAdam, made


def test_apex_is_used_when_asked_for_or_found_on_cuda_and_refused_clearly_otherwise(monkeypatch):
    m = build_model(debug().model)
    monkeypatch.setitem(sys.modules, "apex", None)  # not importable
    assert optim.apex_fused_adam() is None
    with pytest.raises(RuntimeError, match=r"^optim.fused=apex but apex is not importable; use --optim.fused torch$"):
        optim.build_optimizer(m, OptimConfig(fused="apex"), 0.01, torch.device("cpu"))
    assert type(optim.build_optimizer(m, OptimConfig(fused="auto"), 0.01, torch.device("cuda"))) is torch.optim.AdamW
    FusedAdam, made = _fake_apex(monkeypatch)
    assert optim.apex_fused_adam() is FusedAdam
    with pytest.raises(RuntimeError, match=r"^optim.fused=apex needs CUDA$"):
        optim.build_optimizer(m, OptimConfig(fused="apex"), 0.01, torch.device("cpu"))
    assert type(optim.build_optimizer(m, OptimConfig(fused="auto"), 0.01, torch.device("cpu"))) is torch.optim.AdamW
    assert type(optim.build_optimizer(m, OptimConfig(fused="torch"), 0.01, torch.device("cuda"))) is torch.optim.AdamW
    opt = optim.build_optimizer(m, OptimConfig(fused="auto", weight_decay=0.03, betas=(0.85, 0.9)), 0.04,
                                torch.device("cuda"))
    assert type(opt) is FusedAdam and made == [(0.04, (0.85, 0.9), 0.03, True)]
    assert [(g["name"], g["weight_decay"]) for g in opt.param_groups] == [("decay", 0.03), ("no_decay", 0.0)]
    assert type(optim.build_optimizer(m, OptimConfig(fused="apex"), 0.04, torch.device("cuda"))) is FusedAdam

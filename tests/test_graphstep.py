"""The captured-step path (engine.graphstep) against the plain trainer step. On CPU the graph body runs eagerly
(capture=False); the capture itself is checked on CUDA by benchmarks/cuda_checks.py."""

import json

import pytest
import torch
from conftest import debug_cfg
from test_train import _expect_unchanged, _poison, params_of

from engine import checkpoint as ckpt
from engine.config import ConfigError
from engine.graphstep import GraphedStep, tensor_lr_
from engine.step import TrainStep
from engine.optim import set_lr
from engine.trainer import Trainer


def graphed_trainer(cfg, resume=False):
    t = Trainer(cfg, resume=resume)
    t.enable_graph(capture=False)
    return t


@pytest.mark.parametrize("accum", [1, 2])
def test_graph_body_equals_plain_step(tmp_path, accum):
    over = {"train.max_steps": 6, "train.accum_steps": accum, "train.batch_size": 16, "train.ckpt_every": 100}
    plain = Trainer(debug_cfg(tmp_path / "a", **over))
    plain.fit()
    fast = graphed_trainer(debug_cfg(tmp_path / "b", **over))
    fast.fit()
    assert fast.micro_batch == plain.micro_batch == 6 * accum
    for k, v in params_of(plain).items():
        assert torch.equal(v, params_of(fast)[k]), k
    sa, sb = plain.optimizer.state_dict()["state"], fast.optimizer.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_graph_body_skips_non_finite_steps(tmp_path):
    t = graphed_trainer(debug_cfg(tmp_path, **{"train.max_steps": 6, "train.log_every": 3, "train.max_bad_steps": 5}))
    _poison(t, 3, 5)
    _expect_unchanged(t, 2, 4)
    t.fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped"] for r in recs) == 2
    assert t.optimizer.state_dict()["state"][0]["step"].item() == 4


def test_graph_body_checkpoint_resumes_into_plain_and_back(tmp_path):
    """A tensor lr in the optimizer state survives a checkpoint; graphed and plain runs resume each other."""
    over = {"train.ckpt_every": 100}
    straight = Trainer(debug_cfg(tmp_path / "a", **over, **{"train.max_steps": 8}))
    straight.fit()
    graphed_trainer(debug_cfg(tmp_path / "b", **over, **{"train.max_steps": 4})).fit()
    plain = Trainer(debug_cfg(tmp_path / "b", **over, **{"train.max_steps": 6}), resume=True)
    assert plain.step == 4
    plain.fit()
    back = graphed_trainer(debug_cfg(tmp_path / "b", **over, **{"train.max_steps": 8}), resume=True)
    assert back.step == 6
    back.fit()
    for k, v in params_of(straight).items():
        assert torch.equal(v, params_of(back)[k]), k
    assert ckpt.latest_checkpoint(tmp_path / "b").name == "ckpt_00000008.pt"


def test_warmup_before_capture_changes_nothing():
    """The warm-up iterations run with the update forced off: parameters and optimizer state stay put."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, ratio, noise):
            return (self.lin(x).pow(2).mean() + 0 * noise.sum(), None, None)

    m = M()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, fused=True)
    g = GraphedStep(TrainStep(m, opt, device="cpu"), 0.75, capture=False)
    c = g._new([(torch.randn(3, 4), torch.rand(3, 5))], 0.75)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    c.skip.fill_(True)
    g._body(c)
    assert not bool(c.finite)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(s["step"].item() == 0 for s in opt.state.values())


def test_tensor_lr_is_filled_in_place():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.5, fused=True)
    tensor_lr_(opt)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == 0.5
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.25


def test_graphed_step_refuses_an_optimizer_that_cannot_skip_on_device():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="skips on the device"):
        GraphedStep(TrainStep(torch.nn.Linear(2, 2), torch.optim.SGD([p], lr=0.1), device="cpu"), 0.75, capture=False)


def test_cuda_graph_config_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="train.cuda_graph=true: it needs CUDA"):
        Trainer(debug_cfg(tmp_path, **{"train.cuda_graph": "true", "train.max_steps": 1}))


def test_graph_body_with_partial_checkpointing_equals_plain_step(tmp_path):
    over = {"train.max_steps": 4, "train.checkpoint_blocks": 1, "train.ckpt_every": 100}
    plain = Trainer(debug_cfg(tmp_path / "a", **{k: v for k, v in over.items() if k != "train.checkpoint_blocks"}))
    plain.fit()
    fast = graphed_trainer(debug_cfg(tmp_path / "b", **over))
    assert fast.model.checkpoint_first == 1
    fast.fit()
    for k, v in params_of(plain).items():
        assert torch.equal(v, params_of(fast)[k]), k


def test_mask_ratio_sweep_reuses_buffers_per_ratio_and_matches_plain_steps():
    from engine.config import OptimConfig, debug
    from engine.model import build_model
    from engine.optim import build_optimizer

    cfg = debug().model
    torch.manual_seed(0)
    a, b = build_model(cfg), build_model(cfg)
    b.load_state_dict(a.state_dict())
    oa = build_optimizer(a, OptimConfig(), 1e-3, torch.device("cpu"))
    ob = build_optimizer(b, OptimConfig(), 1e-3, torch.device("cpu"))
    g = GraphedStep(TrainStep(b, ob, device="cpu"), 0.75, capture=False, max_graphs=4)
    gen = torch.Generator().manual_seed(3)
    for r in (0.5, 0.75, 0.5, 0.9, 0.75):
        imgs, noise = torch.randn(4, 3, 32, 32, generator=gen), torch.rand(4, 64, generator=gen)
        la, _, _ = a(imgs, r, noise)
        la.backward()
        oa.step()
        oa.zero_grad(set_to_none=True)
        lb, ok = g([(imgs, noise)], mask_ratio=r)
        assert bool(ok) and torch.equal(la.detach(), lb), r
    assert g.builds == 3  # one per distinct ratio
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


class FakeCapture:
    """Stands in for CUDA in GraphedStep: the warm-up runs, `record` keeps the body without running it (as a
    capture runs nothing), `replay` runs it again on the same static buffers. It holds the capture protocol on
    the CPU; what it cannot hold (Python values baked into a real graph) the CUDA checks do on a GPU."""

    def __init__(self):
        self.recorded = 0

    def available(self, device):
        return True

    def warm_up(self, device, fn):
        fn()

    def settle(self, device):
        pass

    def record(self, fn):
        from types import SimpleNamespace

        self.recorded += 1
        return SimpleNamespace(replay=fn)


def test_capture_protocol_replays_the_plain_step_exactly():
    """Warm-up with the update off, capture recording only, replays on fresh inputs copied into the static buffers,
    a tensor lr changed between replays, a NaN step skipped inside the replay, one capture per shape and ratio: the
    parameters and losses equal the plain step's, bit for bit (a skip flag left set, a warm-up that updates, an
    input not copied in, would each fail this)."""
    from engine.config import OptimConfig, debug
    from engine.model import build_model
    from engine.optim import build_optimizer

    cfg = debug().model
    torch.manual_seed(0)
    a, b = build_model(cfg), build_model(cfg)
    b.load_state_dict(a.state_dict())
    oa = build_optimizer(a, OptimConfig(), 1e-3, torch.device("cpu"))
    ob = build_optimizer(b, OptimConfig(), 1e-3, torch.device("cpu"))
    tensor_lr_(oa)
    plain = TrainStep(a, oa, device="cpu")
    fake = FakeCapture()
    graphed = GraphedStep(TrainStep(b, ob, device="cpu"), 0.75, capture=True, backend=fake)
    gen = torch.Generator().manual_seed(5)
    for i, r in enumerate((0.75, 0.75, 0.75, 0.5, 0.75, 0.75)):
        imgs, noise = torch.randn(4, 3, 32, 32, generator=gen), torch.rand(4, 64, generator=gen)
        if i == 2:
            imgs[0, 0, 0, 0] = float("nan")
        set_lr(oa, 1e-3 * (i + 1))
        set_lr(ob, 1e-3 * (i + 1))
        la, fa = plain([(imgs, noise)], mask_ratio=r)
        lb, fb = graphed([(imgs, noise)], mask_ratio=r)
        assert bool(fa) == bool(fb) == (i != 2), i
        assert torch.equal(la, lb) or (i == 2 and not torch.isfinite(lb)), (i, la, lb)
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), (i, n)
    assert fake.recorded == graphed.captures == 2  # one per mask ratio; 0.75 replayed after 0.5

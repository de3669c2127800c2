"""engine/step.py: one training step for the trainer, the captured graph, the benchmarks and the memory estimator."""

import pytest
import torch
from conftest import debug_cfg

from benchmarks.step_runner import PhaseTimer, StepRunner
from engine.config import ConfigError, apply_overrides, debug
from engine.step import PHASES, TrainStep, build_training
from engine.levers import config_with_levers, levers_to_overrides
from engine.trainer import Trainer


def _inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, 64, generator=g)


@pytest.mark.parametrize("levers", [{}, {"precision": "bf16-pure", "attention": "encoder-math", "checkpoint_blocks": 1,
                                         "checkpoint_decoder_blocks": 1}])
def test_benchmark_step_is_the_trainers_step(tmp_path, levers):
    """A benchmark row (StepRunner with a lever set) and `mae pretrain` with the same levers as overrides build the
    same model and step: the same inputs give the same losses and parameters, bit for bit."""
    over = {"optim.lr": "1e-4", "train.batch_size": 4, **levers_to_overrides(levers)}
    trainer = Trainer(debug_cfg(tmp_path, **over), log=lambda m: None)
    runner = StepRunner(debug().model, "mae", 4, "cpu", **levers)
    for i in range(3):
        batch = [_inputs(seed=i)]
        la, fa = trainer.training.step_fn(batch)
        lb, fb = runner.training.step_fn(batch, 0.75)
        assert torch.equal(la, lb) and bool(fa) and bool(fb), i
    pa, pb = dict(trainer.model.named_parameters()), dict(runner.model.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_hooks_see_the_phases_in_order():
    cfg = config_with_levers(debug(), {}, **{"train.accum_steps": 2, "train.device": "cpu"})
    tr = build_training(cfg)
    seen = []
    tr.step_fn([_inputs(seed=1), _inputs(seed=2)], hooks=[seen.append])
    assert seen == ["forward", "backward", "forward", "backward", "optimizer", "end"]
    assert set(seen) == set(PHASES)


def test_phase_timer_splits_a_step():
    r = StepRunner(debug().model, "mae", 4, "cpu")
    st = r.run(warmup=1, reps=3)
    assert st.fwd_ms > 0 and st.bwd_ms > 0 and st.opt_ms > 0
    # the phases of one step add up to its total (CPU clock: exactly the same stamps)
    t = PhaseTimer(torch.device("cpu"))
    t.start()
    r.step(hooks=[t])
    fwd, bwd, opt, tot = t.phases()
    assert fwd[0] + bwd[0] + opt[0] == pytest.approx(tot[0])


def test_step_takes_exactly_accum_micro_batches():
    tr = build_training(config_with_levers(debug(), {}, **{"train.accum_steps": 2, "train.device": "cpu"}))
    with pytest.raises(ValueError, match="accum_steps=2 micro-batches; got 1"):
        tr.step_fn([_inputs()])
    with pytest.raises(ValueError, match="got more"):
        tr.step_fn([_inputs(), _inputs(), _inputs()])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_loss_skips_the_update(bad, fused):
    """NaN and +-Inf losses are skipped, on the device with the fused optimizer and through the host-sync fallback
    for an optimizer that cannot skip on the device; a finite loss is applied either way."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, ratio, noise):
            return self.lin(x).mean() * noise.sum(), None, None

    m = M()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, fused=True) if fused else torch.optim.SGD(m.parameters(), lr=0.1)
    step = TrainStep(m, opt, device="cpu")
    before = [p.detach().clone() for p in m.parameters()]
    x = torch.randn(3, 4)
    loss, finite = step([(x, torch.full((3,), bad))])
    assert not bool(finite) and not torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    loss, finite = step([(x, torch.ones(3))])
    assert bool(finite)
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_unknown_lever_and_bad_value_are_named():
    with pytest.raises(ValueError, match="unknown lever 'compiled'"):
        levers_to_overrides({"compiled": True})
    with pytest.raises(ValueError, match="lever compile must be one of"):
        levers_to_overrides({"compile": "everything"})
    with pytest.raises(ConfigError, match="compile_scope=model compiles the fp32 module"):
        config_with_levers(debug(), {"compile": "model", "precision": "bf16-pure"})


def test_whole_model_compile_is_a_config_lever(monkeypatch):
    """train.compile_scope=model (the paper's code compiled, the reference+compile baseline) wraps the model's
    forward in torch.compile; the blocks stay as built and the names unchanged."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: calls.append(fn) or fn)
    tr = build_training(config_with_levers(debug(), {"compile": "model", "kernels": "torch"}, **{"train.device": "cpu"}))
    assert calls == [tr.model] and tr.plain.forward is tr.model
    assert not any(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl for b in tr.model.blocks)


# train.compile / train.cuda_graph at auto (issue 29: fast by default on a GPU, the CPU's default unchanged)
from engine.parallel import DistContext  # noqa: E402
from engine.step import resolve_auto_levers  # noqa: E402

ONE = DistContext()
TORCHRUN = DistContext(rank=0, world=2, distributed=True)


@pytest.mark.parametrize("device, ctx, over, fault, want", [
    ("cuda", ONE, {}, False, (True, True)),                                     # the measured `fast` set
    ("cpu", ONE, {}, False, (False, False)),                                    # the CPU: as before
    ("cuda", TORCHRUN, {}, False, (False, False)),                              # FSDP2: not measured yet
    ("cuda", ONE, {"train.fsdp": "always"}, False, (False, False)),
    ("cuda", ONE, {"train.cuda_graph": "false"}, False, (True, False)),         # what is given is kept
    ("cuda", ONE, {"train.compile": "false"}, False, (False, True)),
    ("cpu", ONE, {"train.compile": "true"}, False, (True, False)),
    ("cuda", ONE, {"optim.fused": "apex"}, False, (True, False)),              # cannot skip a step on device
    ("cuda", ONE, {}, True, (True, False)),                                     # fault injection
    ("cuda", ONE, {"train.layer_norm": "apex"}, False, (False, False)),
    ("cuda", ONE, {"train.compile_scope": "model", "train.precision": "bf16-pure"}, False, (False, True)),
])
def test_auto_levers_are_the_measured_fast_set_in_one_cuda_process(device, ctx, over, fault, want):
    cfg = apply_overrides(debug(), over)
    resolved, line = resolve_auto_levers(cfg, ctx, torch.device(device), fault_injection=fault)
    assert (resolved.train.compile, resolved.train.cuda_graph) == want
    assert resolved.train.compile is not None and resolved.train.cuda_graph is not None
    on = [f"train.{n}" for n, v in zip(("compile", "cuda_graph"), want) if v]
    if on:  # the banner names what is on and how to turn it off
        assert line.endswith("turn off with " + " ".join(f"--{n} false" for n in on))
    else:
        assert "train.compile and train.cuda_graph off" in line
    if want == (True, True):
        assert "speedup_h100_2026-11-26.md" in line  # the measurement behind the default
    resolved.train.__post_init__()  # what auto chose passes the config's own checks


def test_a_run_records_what_auto_chose_and_names_it(tmp_path):
    lines = []
    cfg = debug_cfg(tmp_path, **{"train.max_steps": 1, "train.vis_every": 0})
    assert cfg.train.compile is None and cfg.train.cuda_graph is None  # the defaults are auto
    tr = Trainer(cfg, log=lines.append)
    tr.fit()
    text = (tmp_path / "config.toml").read_text()
    assert "compile = false" in text and "cuda_graph = false" in text  # replayed as chosen, not as auto
    assert any("auto is off on the CPU" in x for x in lines)
    assert tr.cfg.train.compile is False


def test_auto_is_a_config_value_that_round_trips():
    from engine.config import file_overrides, to_toml

    import tomllib

    cfg = apply_overrides(debug(), {"train.compile": "true"})
    data = tomllib.loads(to_toml(cfg))
    assert data["train"]["compile"] is True and data["train"]["cuda_graph"] == "auto"
    assert apply_overrides(debug(), file_overrides(data, "f")[1]) == cfg
    with pytest.raises(ConfigError, match="--train.cuda_graph: expected true or false or auto"):
        apply_overrides(debug(), {"train.cuda_graph": "maybe"})
    with pytest.raises(ConfigError, match="--train.progress: expected true or false$"):
        apply_overrides(debug(), {"train.progress": "auto"})

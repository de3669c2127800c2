"""engine/step.py part by part, in this process and in about a second each: the gradient and parameter norms against
torch's own, gradient accumulation against one batch, the skip flag, the step's autocast, every refusal of
check_levers with its message, the auto levers' banner line, and every lever's config fields. This file is what the
mutation run (tools/mutation.py) holds each planted change of step.py against."""

import contextlib

import pytest
import torch

from engine.config import ConfigError, apply_overrides, debug
from engine.parallel import DistContext
from engine.step import TrainStep, build_training, resolve_auto_levers
from engine.levers import LEVERS, check_levers, config_with_levers, levers_to_overrides

ONE = DistContext()
TORCHRUN = DistContext(rank=0, world=4, distributed=True)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


class Quadratic(torch.nn.Module):
    """The MAE call signature on a model whose loss is a mean over the batch (as the MAE loss is with equal
    mask counts): the gradient of the mean of two half batches' losses is the gradient of the whole batch's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x, ratio, noise):
        out = self.lin(x.to(self.lin.weight.dtype)) * self.scale  # bf16-pure: the copies' dtype
        return ((out.float() - noise) ** 2).mean() * (1 + ratio), None, None


class Linear(Quadratic):
    """Quadratic without its 0-d parameter (fully_shard takes none)."""

    def __init__(self):
        super().__init__()
        del self.scale
        self.scale = 1.5


def _data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64).float(), torch.randn(n, 3, generator=g)


def test_the_gradient_and_parameter_norms_are_torchs_total_norms():
    m = Quadratic()
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.0), device=CPU)
    assert step._grad_norm().item() == 0.0  # no gradient yet
    x, y = _data()
    m(x, 0.5, y)[0].backward()
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in m.parameters()]))
    assert torch.allclose(step._grad_norm(), want, rtol=1e-6)
    m.lin.bias.grad = None  # a parameter without a gradient is left out, not counted as zero-sized trouble
    want = torch.linalg.vector_norm(torch.stack([m.lin.weight.grad.norm(), m.scale.grad.norm()]))
    assert torch.allclose(step._grad_norm(), want, rtol=1e-6)
    pn = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.allclose(step.param_norm(), pn, rtol=1e-6) and step.param_norm().dtype == torch.float32


def test_the_norms_are_fp32_for_bf16_tensors():
    m = Quadratic().to(torch.bfloat16)
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.0), device=CPU)
    for p in m.parameters():
        p.grad = torch.full_like(p, 300.0)  # squares past bf16's 8 bits of mantissa
    n = sum(p.numel() for p in m.parameters())
    assert step._grad_norm().dtype == torch.float32 and step._grad_norm().item() == pytest.approx(300.0 * n ** 0.5)


def test_accumulated_micro_batches_make_the_update_of_their_whole_batch():
    x, y = _data()
    a, b = Quadratic(), Quadratic()
    sa = TrainStep(a, torch.optim.SGD(a.parameters(), lr=0.1), device=CPU, accum_steps=2, mask_ratio=0.5)
    sb = TrainStep(b, torch.optim.SGD(b.parameters(), lr=0.1), device=CPU, accum_steps=1, mask_ratio=0.5)
    la, fa = sa([(x[:4], y[:4]), (x[4:], y[4:])])
    lb, fb = sb([(x, y)])
    assert bool(fa) and bool(fb) and torch.allclose(la, lb, rtol=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
        assert p.grad is None  # released after the step
    assert torch.allclose(sa.grad_norm, sb.grad_norm, rtol=1e-5)
    frozen = TrainStep(a, torch.optim.SGD(a.parameters(), lr=0.0), device=CPU, accum_steps=2, mask_ratio=0.5)
    l0, _ = frozen([(x[:4], y[:4]), (x[4:], y[4:])], mask_ratio=0.0)  # a ratio given for this step only
    l5, _ = frozen([(x[:4], y[:4]), (x[4:], y[4:])])  # the step's own
    assert torch.allclose(l0 * 1.5, l5, rtol=1e-6)


def test_the_loss_is_the_mean_over_micro_batches_in_fp32():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, ratio, noise):
            return (self.w * x.sum()).to(torch.bfloat16), None, None

    m = Fixed()
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.0), device=CPU, accum_steps=3)
    loss, finite = step([(torch.tensor([1.0]), None), (torch.tensor([2.0]), None), (torch.tensor([6.0]), None)])
    assert loss.dtype == torch.float32 and loss.item() == 3.0 and bool(finite)
    with pytest.raises(ValueError, match=r"^a step takes accum_steps=3 micro-batches; got more$"):
        step([(torch.tensor([1.0]), None)] * 4)
    with pytest.raises(ValueError, match=r"^a step takes accum_steps=3 micro-batches; got 2$"):
        step([(torch.tensor([1.0]), None)] * 2)


@pytest.mark.parametrize("fused", [True, False])
def test_a_skip_asked_for_skips_a_finite_step_and_the_flag_is_left_unset(fused):
    m = Quadratic()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, fused=True) if fused else torch.optim.SGD(m.parameters(), lr=0.1)
    step = TrainStep(m, opt, device=CPU)
    before = [p.detach().clone() for p in m.parameters()]
    loss, bad = step.body([_data()], 0.5, skip=torch.tensor(True))
    assert torch.isfinite(loss) and bad.dtype == torch.float32 and bad.item() == 1.0
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))
    assert getattr(opt, "found_inf", None) is None  # not kept for the next step
    opt.zero_grad(set_to_none=True)
    loss, bad = step.body([_data()], 0.5, skip=torch.tensor(False))
    assert bad.item() == 0.0 and not all(torch.equal(p, q) for p, q in zip(before, m.parameters()))
    assert getattr(opt, "found_inf", None) is None


def test_an_infinite_gradient_with_a_finite_loss_skips_the_step():
    m = Quadratic()
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), device=CPU)
    m.scale.register_hook(lambda g: g * float("inf"))
    before = [p.detach().clone() for p in m.parameters()]
    loss, finite = step([_data()])
    assert torch.isfinite(loss) and not bool(finite) and not torch.isfinite(step.grad_norm)
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))


def test_the_steps_autocast_follows_its_dtype_and_cache_setting():
    m = Quadratic()
    plain = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), device=CPU)
    assert isinstance(plain.autocast(), contextlib.nullcontext)
    amp = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), device=CPU, amp_dtype=torch.bfloat16)
    for cache in (True, False):
        with amp.autocast(cache):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert torch.is_autocast_cache_enabled() == cache
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert amp.autocast().device == "cpu" and amp.autocast().fast_dtype == torch.bfloat16
    assert amp.autocast()._cache_enabled is True and amp.autocast(False)._cache_enabled is False


def test_a_step_writes_its_lr_and_batch_from_the_config():
    cfg = config_with_levers(debug(), {}, **{"train.device": "cpu", "train.batch_size": 8, "train.accum_steps": 2,
                                            "optim.base_lr": "1e-3", "model.mask_ratio": "0.6"})
    tr = build_training(cfg, DistContext(rank=0, world=1))
    assert tr.lr == pytest.approx(1e-3 * 16 / 256) and tr.plain.accum_steps == 2 and tr.plain.mask_ratio == 0.6
    assert tr.step_fn is tr.plain and tr.graphed is None and tr.amp_dtype is None and tr.compute is None
    assert tr.optimizer.defaults["lr"] == tr.lr


@pytest.mark.parametrize("over, ctx, device, message", [
    ({"parallel.replicate": "2"}, ONE, CPU, "parallel.replicate=2 needs a torchrun job whose world size is a multiple "
     "of it with at least 2 ranks per group (world size 1); use --parallel.replicate 1"),
    ({"parallel.replicate": "3"}, TORCHRUN, CPU, "parallel.replicate=3 needs a torchrun job whose world size is a "
     "multiple of it with at least 2 ranks per group (world size 4); use --parallel.replicate 1"),
    ({"parallel.replicate": "4"}, TORCHRUN, CPU, "parallel.replicate=4 needs a torchrun job whose world size is a "
     "multiple of it with at least 2 ranks per group (world size 4); use --parallel.replicate 1"),
    ({"train.precision": "bf16-pure"}, TORCHRUN, CPU, "train.precision=bf16-pure is for one process; under FSDP2 use "
     "bf16 (FSDP2 keeps bf16 parameters with fp32 master weights itself)"),
    ({"train.cuda_graph": "true"}, ONE, CPU, "train.cuda_graph=true: it needs CUDA (train.device resolved to cpu); "
     "set --train.cuda_graph false"),
    ({"train.cuda_graph": "true"}, TORCHRUN, CUDA, "train.cuda_graph=true: FSDP2 (torchrun or train.fsdp=always) is "
     "not captured; it overlaps its own collectives; set --train.cuda_graph false"),
    ({"train.layer_norm": "apex"}, ONE, CPU, "train.layer_norm=apex runs in one CUDA process (the device is cpu); use "
     "--train.layer_norm torch"),
    ({"train.layer_norm": "apex"}, TORCHRUN, CUDA, "train.layer_norm=apex runs in one CUDA process (FSDP2 is on); "
     "use --train.layer_norm torch"),
])
def test_each_refused_lever_combination_is_named_with_its_way_out(over, ctx, device, message):
    cfg = apply_overrides(debug(), over)
    with pytest.raises(ConfigError) as e:
        check_levers(cfg, ctx, device)
    assert str(e.value) == message


@pytest.mark.parametrize("over, ctx, device, strict", [
    ({"parallel.replicate": "2"}, TORCHRUN, CPU, True),  # 2 groups of 2
    ({"train.precision": "bf16-pure"}, ONE, CPU, True),
    ({"train.cuda_graph": "true"}, ONE, CPU, False),  # benchmarks and CPU tests: the body runs eagerly
    ({"train.cuda_graph": "true"}, ONE, CUDA, True),
    ({"train.layer_norm": "apex"}, ONE, CPU, False),
    ({"train.layer_norm": "apex"}, ONE, CUDA, True),
])
def test_what_can_run_passes_the_lever_checks(over, ctx, device, strict):
    check_levers(apply_overrides(debug(), over), ctx, device, strict)


def test_a_replicate_that_is_not_strict_is_still_refused():
    with pytest.raises(ConfigError, match="^parallel.replicate=2 needs"):
        check_levers(apply_overrides(debug(), {"parallel.replicate": "2"}), ONE, CPU, strict=False)


@pytest.mark.parametrize("device, ctx, over, fault, line", [
    ("cpu", ONE, {}, False, "levers: train.compile and train.cuda_graph off; auto is off on the CPU"),
    ("cuda", TORCHRUN, {}, False, "levers: train.compile and train.cuda_graph off; auto is off under FSDP2: not "
     "measured on GPUs yet"),
    ("cuda", ONE, {}, False, "levers: train.compile (auto), train.cuda_graph (auto) on; auto = {M}; turn off with "
     "--train.compile false --train.cuda_graph false"),
    ("cpu", ONE, {"train.compile": "true"}, False, "levers: train.compile on; train.cuda_graph auto is off on the "
     "CPU; turn off with --train.compile false"),
    ("cuda", ONE, {"train.cuda_graph": "false"}, False, "levers: train.compile (auto) on; auto = {M}; turn off with "
     "--train.compile false"),
    ("cuda", ONE, {}, True, "levers: train.compile (auto) on; auto = {M}; train.cuda_graph auto is off (fault "
     "injection (MAE_FAULT_STEP)); turn off with --train.compile false"),
    ("cuda", ONE, {"optim.fused": "apex"}, False, "levers: train.compile (auto) on; auto = {M}; train.cuda_graph auto "
     "is off (apex FusedAdam cannot skip a step on the device); turn off with --train.compile false"),
    ("cuda", ONE, {"train.layer_norm": "apex"}, False, "levers: train.compile and train.cuda_graph off; "
     "train.compile auto is off (apex LayerNorm); train.cuda_graph auto is off (apex LayerNorm)"),
    ("cuda", ONE, {"train.compile_scope": "model", "train.precision": "bf16-pure"}, False, "levers: train.cuda_graph "
     "(auto) on; auto = {M}; train.compile auto is off (bf16-pure with compile_scope model); turn off with "
     "--train.cuda_graph false"),
    ("cuda", ONE, {"train.compile": "false", "train.cuda_graph": "false"}, False,
     "levers: train.compile and train.cuda_graph off"),
    ("cuda", ONE, {"train.compile_scope": "model"}, False, "levers: train.compile (auto), train.cuda_graph (auto) on; "
     "auto = {M}; turn off with --train.compile false --train.cuda_graph false"),  # either alone is no reason
    ("cuda", ONE, {"train.precision": "bf16-pure"}, False, "levers: train.compile (auto), train.cuda_graph (auto) "
     "on; auto = {M}; turn off with --train.compile false --train.cuda_graph false"),
])
def test_the_auto_levers_banner_line_says_what_is_on_why_and_how_to_turn_it_off(device, ctx, over, fault, line):
    from engine.step import MEASURED_DEFAULT

    _, got = resolve_auto_levers(apply_overrides(debug(), over), ctx, torch.device(device), fault_injection=fault)
    assert got == line.replace("{M}", MEASURED_DEFAULT)


def test_apex_found_on_cuda_turns_the_capture_off_but_not_on_the_cpu(monkeypatch):
    import engine.optim

    monkeypatch.setattr(engine.optim, "apex_fused_adam", lambda: object)
    cfg = debug()
    assert resolve_auto_levers(cfg, ONE, CUDA)[0].train.cuda_graph is False
    assert resolve_auto_levers(cfg, ONE, CPU)[0].train.compile is False
    monkeypatch.setattr(engine.optim, "apex_fused_adam", lambda: None)
    assert resolve_auto_levers(cfg, ONE, CUDA)[0].train.cuda_graph is True


def test_every_lever_maps_onto_its_config_fields():
    assert levers_to_overrides({"kernels": "triton", "compile_mode": "max-autotune-no-cudagraphs", "fp8_recipe": "rowwise",
                                "attention": "flash", "checkpoint_blocks": 3, "checkpoint_decoder_blocks": 2,
                                "layer_norm": "triton", "optimizer": "apex"}) == {
        "model.kernels": "triton", "train.compile_mode": "max-autotune-no-cudagraphs", "train.fp8_recipe": "rowwise",
        "train.attention": "flash", "train.checkpoint_blocks": "3", "train.checkpoint_decoder_blocks": "2",
        "train.layer_norm": "triton", "optim.fused": "apex"}
    for value, want in [("none", ("false", "blocks")), ("regional", ("true", "blocks")), ("model", ("true", "model")),
                        (False, ("false", "blocks")), (True, ("true", "model"))]:
        assert levers_to_overrides({"compile": value}) == dict(zip(("train.compile", "train.compile_scope"), want))
    for value, want in [(True, "true"), (False, "false"), (1, "true"), (0, "false")]:
        assert levers_to_overrides({"graph": value}) == {"train.cuda_graph": want}
        assert levers_to_overrides({"activation_checkpointing": value}) == {"train.activation_checkpointing": want}
    for value, want in [("autocast", "auto"), ("bf16", "bf16"), ("bf16-pure", "bf16-pure"), ("fp32", "fp32"),
                        ("auto", "auto"), ("fp8", "fp8"), ("fp16", "fp16")]:
        assert levers_to_overrides({"precision": value}) == {"train.precision": want}
    assert set(LEVERS) == {"kernels", "compile", "compile_mode", "graph", "precision", "fp8_recipe", "attention",
                           "checkpoint_blocks", "checkpoint_decoder_blocks", "activation_checkpointing",
                           "layer_norm", "optimizer"}
    with pytest.raises(ValueError, match=r"^unknown lever 'compiled'; levers: kernels, activation_checkpointing, "
                                         r"checkpoint_blocks, checkpoint_decoder_blocks, attention, precision, "):
        levers_to_overrides({"compiled": True})
    with pytest.raises(ValueError, match=r"^lever precision must be one of autocast, bf16, bf16-pure, fp32, auto, fp8, "
                                         r"fp16, got 'fp64'$"):
        levers_to_overrides({"precision": "fp64"})


def test_a_config_with_levers_takes_further_overrides_as_strings():
    cfg = config_with_levers(debug(), {"graph": False, "kernels": "torch"}, **{"train.batch_size": 6,
                                                                               "train.device": "cpu"})
    assert cfg.train.cuda_graph is False and cfg.model.kernels == "torch" and cfg.train.batch_size == 6


def test_the_parameter_norm_is_fp32_for_bf16_parameters():
    m = Quadratic().to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(300.0)
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.0), device=CPU)
    n = sum(p.numel() for p in m.parameters())
    assert step.param_norm().dtype == torch.float32 and step.param_norm().item() == pytest.approx(300.0 * n ** 0.5)


@pytest.mark.parametrize("replicas", [1, 2])
def test_sharded_norms_sum_their_squares_over_ranks_once_per_replica(one_rank_group, monkeypatch, replicas):
    """Under FSDP2 each rank holds a shard (a DTensor: its local part counts) and the squares are summed over the
    ranks; under HSDP each shard lives on `replicas` ranks and is counted once. Four ranks holding this rank's
    shard stand in for the all-reduce here."""
    import engine.step as step_mod
    from torch.distributed.fsdp import fully_shard

    world, seen = 4, []

    def four_ranks(t, op="sum"):
        seen.append(op)
        t.mul_({"sum": world}[op])  # an op all_reduce_ does not know fails as it would
        return t

    m = Linear()
    want_p = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in m.parameters()]))
    x, y = _data()
    m(x, 0.5, y)[0].backward()
    want_g = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m.parameters()]))
    sharded = Linear()
    fully_shard(sharded)
    sharded(x, 0.5, y)[0].backward()
    step = TrainStep(sharded, torch.optim.SGD(sharded.parameters(), lr=0.0), device=CPU)
    assert step.fsdp and step.replicas == 1
    step.replicas = replicas
    monkeypatch.setattr(step_mod, "all_reduce_", four_ranks)
    scale = (world / replicas) ** 0.5
    assert torch.allclose(step.param_norm(), want_p * scale, rtol=1e-5)
    assert torch.allclose(step._grad_norm(), want_g * scale, rtol=1e-5)
    assert seen == ["sum", "sum"]


def test_a_given_device_wins_over_the_configs():
    cfg = config_with_levers(debug(), {}, **{"train.device": "cuda"})  # no CUDA here: resolving it would refuse
    assert build_training(cfg, device=CPU).device == CPU
    with pytest.raises(ConfigError, match="^train.device=cuda but CUDA is not available here"):
        build_training(cfg)


def test_build_training_is_strict_by_default_and_checks_with_its_context():
    cfg = config_with_levers(debug(), {"graph": True}, **{"train.device": "cpu"})
    with pytest.raises(ConfigError, match=r"^train.cuda_graph=true: it needs CUDA \(train.device resolved to cpu\)"):
        build_training(cfg)
    tr = build_training(cfg, strict=False)  # the captured step's body, eagerly (benchmarks, CPU tests)
    assert tr.graphed is tr.step_fn and (tr.step_fn.max_graphs, tr.step_fn.warmup, tr.step_fn.capture) == (2, 2, False)
    tr = build_training(cfg, strict=False, max_graphs=5, graph_warmup=1)
    assert (tr.step_fn.max_graphs, tr.step_fn.warmup) == (5, 1)
    with pytest.raises(ConfigError, match="^parallel.replicate=2 needs a torchrun job"):
        build_training(apply_overrides(debug(), {"parallel.replicate": "2", "train.device": "cpu"}))


def test_the_lr_is_scaled_to_the_global_batch_over_every_rank():
    cfg = config_with_levers(debug(), {}, **{"train.device": "cpu", "train.batch_size": 8, "train.accum_steps": 2,
                                            "optim.base_lr": "1e-3"})
    tr = build_training(cfg, DistContext(rank=0, world=4))
    assert tr.lr == pytest.approx(1e-3 * 8 * 2 * 4 / 256)


def test_an_optimizer_that_cannot_skip_on_the_device_is_refused_for_a_captured_step_only(monkeypatch):
    import engine.step as step_mod

    monkeypatch.setattr(step_mod, "build_optimizer", lambda model, cfg, lr, device: torch.optim.SGD(
        model.parameters(), lr=lr))
    build_training(config_with_levers(debug(), {}, **{"train.device": "cpu"}))  # no capture: any optimizer
    monkeypatch.setattr(step_mod, "check_levers", lambda *a, **k: None)  # as on a GPU
    with pytest.raises(ConfigError) as e:
        build_training(config_with_levers(debug(), {"graph": True}, **{"train.device": "cpu"}))
    assert str(e.value) == ("train.cuda_graph=true: the optimizer (SGD) cannot skip a step on the device; use "
                            "optim.fused=torch; set --train.cuda_graph false")


def test_each_precision_builds_its_compute_and_autocast():
    from engine.mixed import Bf16Compute

    pure = build_training(config_with_levers(debug(), {"precision": "bf16-pure"}, **{"train.device": "cpu"}))
    assert isinstance(pure.compute, Bf16Compute) and pure.plain.compute is pure.compute and pure.amp_dtype is None
    amp = build_training(config_with_levers(debug(), {"precision": "bf16"}, **{"train.device": "cpu"}))
    assert amp.compute is None and amp.amp_dtype == torch.bfloat16 and amp.plain.amp_dtype == torch.bfloat16


def test_only_compile_scope_model_compiles_the_whole_forward(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(fn) or fn)
    tr = build_training(config_with_levers(debug(), {"compile": "regional"}, **{"train.device": "cpu"}))
    assert tr.plain.forward is tr.model and tr.model not in compiled


def test_the_levers_apply_to_a_given_model(monkeypatch):
    """A finished model handed in (the dense baseline of the benchmarks) gets the records of engine/levers.py marked
    `given`, in table order: the attention path, the regional compile (only when on and regional), the layer norm
    (only when not torch's)."""
    import engine.attention
    import engine.layernorm
    import engine.levers

    calls = []
    monkeypatch.setattr(engine.layernorm, "apply_layer_norm", lambda m, v: calls.append(("layer_norm", m, v)))
    monkeypatch.setattr(engine.attention, "apply_attention", lambda m, v: calls.append(("attention", m, v)))
    monkeypatch.setattr(engine.levers, "apply_regional_compile", lambda m, v: calls.append(("compile", m, v)))
    given = Quadratic()
    cfg = config_with_levers(debug(), {"compile": "regional", "compile_mode": "max-autotune-no-cudagraphs",
                                       "attention": "encoder-math"}, **{"train.device": "cpu"})
    tr = build_training(cfg, model=given)
    assert tr.model is given and calls == [("attention", given, "encoder-math"),
                                           ("compile", given, "max-autotune-no-cudagraphs")]
    calls.clear()
    build_training(config_with_levers(debug(), {"compile": "model"}, **{"train.device": "cpu"}), model=given)
    assert [c[0] for c in calls] == ["attention"]
    calls.clear()
    build_training(config_with_levers(debug(), {"layer_norm": "apex"}, **{"train.device": "cpu"}), model=given,
                   strict=False)
    assert calls == [("attention", given, "auto"), ("layer_norm", given, "apex")]


def test_bf16_pure_accumulates_micro_batches_into_the_fp32_masters():
    """bf16-pure runs the forward on bf16 copies and moves their gradients to the fp32 masters after each
    micro-batch (the first replaces, the others add): two half batches make nearly the update of the whole."""
    from engine.mixed import Bf16Compute

    x, y = _data()
    steps = []
    for accum in (2, 1):
        m = Quadratic()
        s = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), device=CPU, compute=Bf16Compute(m),
                      accum_steps=accum, mask_ratio=0.5)
        batches = [(x[:4], y[:4]), (x[4:], y[4:])] if accum == 2 else [(x, y)]
        loss, finite = s(batches)
        assert bool(finite) and all(p.dtype == torch.float32 for p in m.parameters())
        steps.append((m, loss))
    (a, la), (b, lb) = steps
    assert torch.allclose(la, lb, rtol=2e-2)
    moved = [(p - q).abs().max().item() for p, q in zip(a.parameters(), Quadratic().parameters())]
    assert all(d > 1e-4 for d in moved)  # the update happened
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=2e-3)


def test_the_loss_stays_fp32_under_a_float64_default_dtype():
    m = Quadratic()
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.0), device=CPU)
    was = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loss, _ = step([_data()])
    finally:
        torch.set_default_dtype(was)
    assert loss.dtype == torch.float32


def test_sharded_gradients_are_reduced_on_the_last_micro_batch_only(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    m = Linear()
    fully_shard(m)
    asked = []
    real = m.set_requires_gradient_sync
    m.set_requires_gradient_sync = lambda v, **k: asked.append(v) or real(v, **k)
    x, y = _data()
    TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), device=CPU, accum_steps=3)(
        [(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:], y[6:])])
    assert asked == [False, False, True]


def test_a_bad_step_on_another_rank_skips_this_ranks_update(monkeypatch):
    """The bad flag is all-reduced with MAX: when another rank's loss or gradient is not finite, this rank skips its
    finite update too (the stand-in reduce plays that rank's vote)."""
    import engine.step as step_mod

    ops = []

    def another_rank_is_bad(t, op="sum"):
        ops.append(op)
        if {"max": True}[op]:  # an op all_reduce_ does not know fails as it would
            t.fill_(1.0)
        return t

    monkeypatch.setattr(step_mod, "all_reduce_", another_rank_is_bad)
    for opt_cls in (lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True), lambda ps: torch.optim.SGD(ps, lr=0.1)):
        m = Quadratic()
        before = [p.detach().clone() for p in m.parameters()]
        loss, finite = TrainStep(m, opt_cls(m.parameters()), device=CPU)([_data()])
        assert torch.isfinite(loss) and not bool(finite)
        assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))
    assert ops == ["max", "max"]


def test_a_fused_optimizer_skips_on_the_device_reading_the_flag_during_its_step():
    m = Quadratic()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, fused=True)
    seen = []
    real = opt.step
    opt.step = lambda *a, **k: seen.append(opt.found_inf) or real(*a, **k)
    TrainStep(m, opt, device=CPU)([_data()])
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor) and seen[0].item() == 0.0
    assert opt.found_inf is None


def test_the_captured_steps_body_takes_the_configs_mask_ratio_and_graph_limits():
    tr = build_training(config_with_levers(debug(), {}, **{"train.device": "cpu", "model.mask_ratio": "0.6"}))
    g = tr.enable_graph(capture=False)
    assert tr.step_fn is g and tr.graphed is g and (g.mask_ratio, g.max_graphs, g.warmup) == (0.6, 2, 2)


def test_a_captured_step_with_the_default_fused_optimizer_is_built(monkeypatch):
    import engine.step as step_mod

    monkeypatch.setattr(step_mod, "check_levers", lambda *a, **k: None)  # as on a GPU
    tr = build_training(config_with_levers(debug(), {"graph": True}, **{"train.device": "cpu"}))
    assert tr.graphed is not None and tr.graphed.capture is False  # no CUDA here: the body runs eagerly


def test_a_step_built_bare_masks_at_0_75_and_starts_with_a_zero_gradient_norm():
    m = Quadratic()
    bare = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.0), device=CPU)
    assert torch.equal(bare.grad_norm, torch.zeros(())) and bare.forward is m and bare.attention == "auto"
    given = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.0), device=CPU, mask_ratio=0.75)
    assert torch.equal(bare([_data()])[0], given([_data()])[0])


def test_the_step_calls_the_compiled_forward_and_the_configs_attention(monkeypatch):
    class Compiled:  # a distinct stand-in for what torch.compile returns
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, *a, **k):
            return self.fn(*a, **k)

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(Compiled(fn)) or compiled[-1])
    tr = build_training(config_with_levers(debug(), {"compile": "model", "attention": "encoder-math"},
                                           **{"train.device": "cpu"}))
    assert tr.plain.forward is compiled[0] and compiled[0].fn is tr.model
    assert tr.plain.attention == "encoder-math"


def test_fp8_where_it_cannot_run_is_refused_with_the_reason(monkeypatch):
    import engine.fp8

    cfg = apply_overrides(debug(), {"train.precision": "fp8"})
    check_levers(cfg, ONE, CPU, strict=False)  # torchao's float8 runs here
    seen = []
    monkeypatch.setattr(engine.fp8, "supported_here", lambda d: seen.append(d) or "an A100 has no float8 GEMMs")
    with pytest.raises(ConfigError) as e:
        check_levers(cfg, ONE, CPU, strict=False)
    assert str(e.value) == "train.precision=fp8: an A100 has no float8 GEMMs; use --train.precision bf16"
    assert seen == [CPU]


def test_every_lever_is_a_config_field_and_is_benchmarked():
    """Each short name of LEVERS sets config fields that exist and validate, and is measured: in a lever set of `mae
    bench speedup` (benchmarks/levers.py), or, for activation checkpointing, in `mae bench fsdp` (its memory under
    FSDP2)."""
    import inspect

    import benchmarks.fsdp
    from benchmarks.levers import CONFIGS

    values = {"kernels": "torch", "compile": "regional", "compile_mode": "default", "graph": True,
              "precision": "bf16", "fp8_recipe": "rowwise", "attention": "math", "checkpoint_blocks": 1,
              "checkpoint_decoder_blocks": 1, "activation_checkpointing": True, "layer_norm": "apex",
              "optimizer": "torch"}
    assert set(values) == set(LEVERS)
    for name, value in values.items():
        cfg = config_with_levers(debug(), {name: value})
        for key, text in levers_to_overrides({name: value}).items():
            sec, field = key.split(".")
            assert str(getattr(getattr(cfg, sec), field)).lower() == text.lower(), (name, key)
    in_sets = {k for levers in CONFIGS.values() for k in levers}
    assert set(LEVERS) - in_sets == {"activation_checkpointing"}
    assert "activation_checkpointing" in inspect.getsource(benchmarks.fsdp)


def test_bf16_pure_replaces_the_gradients_a_captured_body_keeps_from_its_last_step():
    """The captured step's body leaves the gradients in place between steps (they live in the graph's memory): the
    first micro-batch of the next step replaces them, it does not add to them."""
    from engine.mixed import Bf16Compute

    m = Quadratic()
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.0), device=CPU, compute=Bf16Compute(m))
    step.body([_data()], 0.5)
    first = [p.grad.clone() for p in m.parameters()]
    step.body([_data()], 0.5)  # no zero_grad in between, as under the capture
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), first))


def test_every_lever_record_is_applied_or_read_and_its_fields_are_checked():
    """One record per lever (engine/levers.py): a model or after stage lever has its application; a step lever's
    fields are read where the step is built; a `reads` lever names its reader; every field refuses a bad value."""
    import inspect

    import engine.optim
    import engine.step
    from engine.config import ConfigError as CE
    from engine.levers import LEVERS as RECORDS

    built = inspect.getsource(engine.step) + inspect.getsource(engine.optim)
    for lever in RECORDS.values():
        assert lever.stage in ("model", "after", "step", "reads"), lever.name
        if lever.stage in ("model", "after"):
            assert lever.apply is not None, lever.name
        elif lever.stage == "step":
            assert all(f.split(".")[1] in built for f in lever.fields), lever.name
        else:
            assert "read by" in lever.doc, lever.name
        assert not lever.given or lever.apply is not None
        for field in lever.fields:
            with pytest.raises(CE):
                config_with_levers(debug(), {}, **{field: "no-such-value"})


def test_the_model_stage_applies_its_levers_in_table_order(monkeypatch):
    """Checkpointing, then the attention path, then float8, then the regional compile (which fuses the casts), all
    on the meta model before FSDP2; the layer norm after materialisation."""
    import engine.levers as lv
    from engine.parallel import DistContext, build_parallel_model

    order = []
    for name in ("_full_checkpointing", "_attention", "_fp8", "_regional_compile", "_layer_norm"):
        monkeypatch.setattr(lv, name, lambda m, c, x, name=name: order.append((name, str(next(m.parameters()).device))))
    records = tuple(lv.Lever(r.name, r.fields, r.values, r.stage, r.doc,
                             getattr(lv, r.apply.__name__) if r.apply is not None and hasattr(lv, r.apply.__name__)
                             else r.apply, r.check, r.given) for r in lv._TABLE)
    monkeypatch.setattr(lv, "_TABLE", records)
    build_parallel_model(debug(), DistContext(), torch.device("cpu"))
    assert [n for n, _ in order] == ["_full_checkpointing", "_attention", "_fp8", "_regional_compile", "_layer_norm"]
    assert [d for _, d in order] == ["meta"] * 4 + ["cpu"]

"""The training step, written once: `mae pretrain`, the captured CUDA graph, the benchmarks and the memory
estimator all run `TrainStep`, built from a Config by `build_training`; `mae finetune` / `mae linprobe` run it with
the classifier's forward and loss (engine/classify.py).

    training = build_training(cfg, ctx, device)        # model, optimizer, step: every lever applied here
    loss, finite = training.step_fn([(imgs, noise), ...])  # one optimizer step over accum_steps micro-batches

One step: refresh the bf16 weight copies (bf16-pure), then per micro-batch the attention context, autocast,
the forward with its mask noise, the backward of loss / accum_steps (FSDP2 reduces gradients on the last
micro-batch only) and the copies' gradients moved to the fp32 masters; then the mean loss, the gradient norm,
a non-finite flag (loss or gradient; all-reduced, so every rank skips together) and the optimizer step, which
the fused optimizer skips on the device when the flag is set (`found_inf`). Loss, norm and flag stay on the
device: no host sync. Under train.precision=fp16 the loss is scaled before backward and the gradients unscaled
before the norm (engine.mixed.LossScaler): an overflow is a bad step, and the scale follows on the device.

`train.cuda_graph` wraps the same TrainStep in engine.graphstep.GraphedStep, which records `TrainStep.body`
once per batch shape and mask ratio and replays it. Benchmarks time `training.step_fn`; phase timing (forward /
backward / optimizer) and the memory estimator's phase accounting are hooks called at the phase boundaries
(`PHASES`), not a second implementation.

Levers: each lever (model.kernels, train.compile, train.cuda_graph, train.precision, ...) is one record of
engine/levers.py: its fields, its check (check_levers, called here) and its application (to the meta-built model in
engine/parallel.py's build_parallel_model, to a model handed in here); build_training reads the `step` ones (the
capture, the optimizer, the whole-model compile, the fp16 loss scaler). The benchmarks' lever sets name the same
records, so a benchmark row runs what `mae pretrain` runs with those overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .attention import attention_context
from .config import Config, ConfigError
from .device import autocast, resolve_device, resolve_dtype
from .levers import apply_to_given_model, check_levers
from .optim import build_optimizer, supports_found_inf
from .parallel import DistContext, all_reduce_, build_parallel_model, fsdp_replicas, is_fsdp

PHASES = ("forward", "backward", "optimizer", "end")
"""Hook points of a step, in order: before each micro-batch's forward, before its backward, before the
optimizer update (after every backward and the non-finite flag), after the gradients are released."""

Hook = Callable[[str], None]


def _mark(hooks: Iterable[Hook], phase: str) -> None:
    for h in hooks:
        h(phase)


class TrainStep:
    """step(micro_batches[, mask_ratio]) -> (mean loss, finite flag): 0-d device tensors, no host sync.

    micro_batches: an iterable of (imgs [B, C, H, W], noise [B, L]) pairs, exactly accum_steps of them; it is
    consumed lazily (each micro-batch is drawn just before its forward). The second item is whatever `forward`
    takes after the mask ratio: the MAE's mask noise, or a classifier's targets (engine/classify.py).
    scaler: engine.mixed.LossScaler under train.precision=fp16 (dynamic loss scaling; an overflow is a bad step).
    model: the module whose parameters the optimizer updates; forward: what the step calls (the model, or the
    model compiled whole); compute: engine.mixed.Bf16Compute under bf16-pure (then it is called instead).
    hooks: callables called with each phase name of PHASES (phase timing, fault injection, memory accounting).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 amp_dtype: torch.dtype | None = None, attention: str = "auto", compute=None, forward=None,
                 accum_steps: int = 1, mask_ratio: float = 0.75, scaler=None):
        self.model, self.optimizer = model, optimizer
        self.scaler = scaler  # engine.mixed.LossScaler under train.precision=fp16
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.attention = attention
        self.compute = compute
        self.forward = forward if forward is not None else model
        self.accum_steps = accum_steps
        self.mask_ratio = mask_ratio
        self.fsdp = is_fsdp(model)
        self.replicas = fsdp_replicas(model)  # HSDP: each shard lives on this many ranks (summed once, not R times)
        self.hooks: list[Hook] = []
        self.grad_norm = torch.zeros((), device=self.device)
        """The last step's total gradient norm (fp32, over every rank's shard), a device tensor."""

    def autocast(self, cache: bool = True):
        """The step's autocast (none under fp32 and bf16-pure); `cache` False for a captured step."""
        return autocast(self.device, self.amp_dtype, cache)

    def body(self, micro_batches, mask_ratio: float, *, hooks: Iterable[Hook] = (), skip: torch.Tensor | None = None,
             autocast_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of every micro-batch, then the optimizer step unless the mean loss is non-finite
        (or `skip` is set). Returns (mean loss, bad flag as fp32 0/1). Gradients are left in .grad: the caller
        releases them (a captured step keeps them in the graph's memory)."""
        k = self.accum_steps
        fwd = self.forward
        if self.compute is not None:
            self.compute.refresh()
            fwd = self.compute
        acc = torch.zeros((), device=self.device, dtype=torch.float32)
        n = 0
        for i, (imgs, noise) in enumerate(micro_batches):
            if i >= k:
                raise ValueError(f"a step takes accum_steps={k} micro-batches; got more")
            if self.fsdp:  # reduce-scatter gradients only on the last micro-batch
                self.model.set_requires_gradient_sync(i == k - 1)
            _mark(hooks, "forward")
            with attention_context(self.attention):
                with self.autocast(autocast_cache):
                    loss, _, _ = fwd(imgs, mask_ratio, noise)
                _mark(hooks, "backward")
                ((loss / k) * self.scaler.scale if self.scaler is not None else loss / k).backward()
            if self.compute is not None:
                self.compute.collect(first=i == 0)
            acc += loss.detach().float()
            n += 1
        if n != k:
            raise ValueError(f"a step takes accum_steps={k} micro-batches; got {n}")
        acc /= k
        if self.scaler is not None:  # fp16: the gradients back to their true size; an overflow makes the norm inf
            self.scaler.unscale([p.grad for p in self.model.parameters() if p.grad is not None])
        self.grad_norm = self._grad_norm()
        bad = ~torch.isfinite(acc) | ~torch.isfinite(self.grad_norm)
        if skip is not None:
            bad = bad | skip
        bad = bad.to(torch.float32)
        all_reduce_(bad, "max")  # every rank skips together (async on NCCL: no host sync)
        if self.scaler is not None:
            self.scaler.update(bad)  # halve the scale after an overflow, grow it after a run of good steps
        _mark(hooks, "optimizer")
        if supports_found_inf(self.optimizer):
            # the fused optimizer reads found_inf on the device and skips the whole update when it is 1
            self.optimizer.found_inf = bad
            self.optimizer.step()
            self.optimizer.found_inf = None  # read by this step only; nothing is kept alive between steps
        elif bad.item() == 0:  # note: a host sync, only for optimizers that cannot skip on the device
            self.optimizer.step()
        return acc, bad

    def param_norm(self) -> torch.Tensor:
        """The L2 norm of all parameters (sharded ones over every rank), fp32 on the device; a collective under
        FSDP2, so every rank calls it at the same step."""
        return self._total_norm([p.detach() for p in self.model.parameters()])

    def _grad_norm(self) -> torch.Tensor:
        """The L2 norm of all gradients, fp32 on the device (zero before any backward)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return self._total_norm(grads) if grads else torch.zeros((), device=self.device)

    def _total_norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The L2 norm of `tensors` together, in fp32: a sharded tensor (DTensor) counts its local part and the
        squares are summed over the ranks (FSDP2), each shard once however many ranks hold it (HSDP)."""
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
        sq = torch.stack(torch._foreach_norm(local, 2, dtype=torch.float32)).square().sum()
        if self.fsdp:
            all_reduce_(sq, "sum")
            sq = sq / self.replicas
        return sq.sqrt()

    def __call__(self, micro_batches, mask_ratio: float | None = None, hooks: Iterable[Hook] | None = None):
        hooks = self.hooks if hooks is None else hooks
        loss, bad = self.body(micro_batches, self.mask_ratio if mask_ratio is None else mask_ratio, hooks=hooks)
        self.optimizer.zero_grad(set_to_none=True)
        _mark(hooks, "end")
        return loss, bad == 0


@dataclass
class Training:
    """What build_training returns: the model (the module checkpoints and evaluation use), its optimizer, the
    callable to run per optimizer step (`step_fn`: the TrainStep, or its captured form under train.cuda_graph) and
    the TrainStep itself (`plain`). (`step`, elsewhere, is always a count of optimizer steps.)"""

    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    plain: TrainStep
    step_fn: Callable
    compute: object
    lr: float
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def graphed(self):
        return self.step_fn if self.step_fn is not self.plain else None

    def enable_graph(self, capture: bool = True, max_graphs: int = 2, warmup: int = 2):
        """Route the step through engine.graphstep (capture=False runs the graph's body eagerly: what the CPU
        tests and `mae bench agreement` hold to the plain step)."""
        from .graphstep import GraphedStep

        self.step_fn = GraphedStep(self.plain, self.cfg.model.mask_ratio, capture=capture, max_graphs=max_graphs,
                                warmup=warmup)
        return self.step_fn


MEASURED_DEFAULT = ("the fastest single-GPU setting measured: ViT-H b256 1,045 img/s eager -> 1,278 compiled -> 1,280 "
                    "captured, H100 (benchmarks/results/speedup_h100_2026-11-26.md)")
"""Why train.compile and train.cuda_graph default to on in one CUDA process (the `fast` lever set)."""


def resolve_auto_levers(cfg: Config, ctx: DistContext, device: torch.device, *,
                        fault_injection: bool = False) -> tuple[Config, str]:
    """train.compile and train.cuda_graph left at auto (None) -> their value for this run, and one line for the
    banner naming what is on and how to turn it off.

    auto is on in one CUDA process (MEASURED_DEFAULT) and off on the CPU (compiling costs more than it saves at
    CPU sizes) and under FSDP2 (compile and capture with FSDP2 are not measured on a GPU yet: PENDING.md). The
    capture also stays off where it cannot run: an optimizer that cannot skip a step on the device (apex),
    fault injection (MAE_FAULT_STEP), apex LayerNorm (compile refused too). A value given explicitly is kept."""
    import dataclasses

    from .optim import apex_fused_adam

    t = cfg.train
    one_gpu = device.type == "cuda" and not ctx.distributed and t.fsdp != "always"
    where = None if one_gpu else ("on the CPU" if device.type != "cuda" else "under FSDP2: not measured on GPUs yet")
    apex_adam = cfg.optim.fused == "apex" or (cfg.optim.fused == "auto" and one_gpu and apex_fused_adam() is not None)
    why = {"compile": where or ("apex LayerNorm" if t.layer_norm != "torch" else
                                "bf16-pure with compile_scope model" if (t.compile_scope == "model"
                                                                         and t.precision == "bf16-pure") else None),
           "cuda_graph": where or ("apex LayerNorm" if t.layer_norm != "torch" else "fp16 loss scaling" if
                                   t.precision == "fp16" else "apex FusedAdam cannot skip a "
                                   "step on the device" if apex_adam else "fault injection (MAE_FAULT_STEP)"
                                   if fault_injection else None)}
    given = {"compile": t.compile, "cuda_graph": t.cuda_graph}
    value = {n: (why[n] is None if v is None else v) for n, v in given.items()}
    resolved = dataclasses.replace(cfg, train=dataclasses.replace(t, compile=value["compile"],
                                                                  cuda_graph=value["cuda_graph"]))
    on = [f"train.{n}" + (" (auto)" if given[n] is None else "") for n in given if value[n]]
    line = "levers: " + (", ".join(on) + " on" if on else "train.compile and train.cuda_graph off")
    if any(given[n] is None and value[n] for n in given):
        line += f"; auto = {MEASURED_DEFAULT}"
    off = [n for n in given if given[n] is None and not value[n]]
    if off and where:  # one reason for both
        line += f"; auto is off {where}" if len(off) == 2 else f"; train.{off[0]} auto is off {where}"
    elif off:
        line += "; " + "; ".join(f"train.{n} auto is off ({why[n]})" for n in off)
    if on:
        line += f"; turn off with {' '.join(f'--train.{n} false' for n in given if value[n])}"
    return resolved, line


def build_training(cfg: Config, ctx: DistContext | None = None, device: torch.device | None = None, *,
                   model: torch.nn.Module | None = None, strict: bool = True, max_graphs: int = 2,
                   graph_warmup: int = 2) -> Training:
    """Config -> model (meta build, checkpointing, attention path, regional compile, FSDP2, materialise, layer
    norm: engine.parallel), optimizer (at the lr scaled to the effective batch), bf16 copies (bf16-pure), the
    forward (the model, or compiled whole with train.compile_scope=model), the step and its capture.

    model: a finished module to train instead of the MAE the config describes (the dense ViT baseline of the
    benchmarks, behind the MAE's call signature); the attention, layer-norm and compile levers apply to it."""
    t = cfg.train
    ctx = ctx or DistContext()
    device = torch.device(device) if device is not None else resolve_device(t.device)
    check_levers(cfg, ctx, device, strict)
    if model is None:
        model = build_parallel_model(cfg, ctx, device)
    else:
        apply_to_given_model(model, cfg, ctx)
    lr = cfg.optim.scaled_lr(t.batch_size * t.accum_steps * ctx.world)
    optimizer = build_optimizer(model, cfg.optim, lr, device)
    if strict and t.cuda_graph and not supports_found_inf(optimizer):
        raise ConfigError(f"train.cuda_graph=true: the optimizer ({type(optimizer).__name__}) cannot skip a step on "
                          "the device; use optim.fused=torch; set --train.cuda_graph false")
    compute = None
    if t.precision == "bf16-pure":  # bf16 copies of the weights, fp32 masters; no autocast
        from .mixed import Bf16Compute

        compute = Bf16Compute(model)
    forward = torch.compile(model) if t.compile and t.compile_scope == "model" else model
    amp_dtype = resolve_dtype(t.precision, device)
    plain = TrainStep(model, optimizer, device=device, amp_dtype=amp_dtype, attention=t.attention, compute=compute,
                      forward=forward, accum_steps=t.accum_steps, mask_ratio=cfg.model.mask_ratio,
                      scaler=loss_scaler(t.precision, device))
    tr = Training(cfg, model, optimizer, plain, plain, compute, lr, device, amp_dtype)
    if t.cuda_graph:
        tr.enable_graph(capture=device.type == "cuda", max_graphs=max_graphs, warmup=graph_warmup)
    return tr


def loss_scaler(precision: str, device: torch.device):
    """A LossScaler for train.precision=fp16, else None."""
    if precision != "fp16":
        return None
    from .mixed import LossScaler

    return LossScaler(device)

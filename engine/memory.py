"""The peak GPU memory of a training step, estimated on any machine (no GPU needed): the estimator behind
`mae bench memory` (benchmarks/memory.py, its report) and `mae pretrain --dry-run` (engine/dryrun.py).

Two full training steps (forward, backward, torch's fused AdamW; the second has the optimizer's state) run on
fake tensors (torch's FakeTensorMode: shapes, dtypes and autograd, no data and no arithmetic) under bf16
autocast with CUDA's casting policy, while a dispatch mode counts every storage the step allocates and frees,
rounded up to the CUDA caching allocator's 512-byte blocks. See benchmarks/memory.py for what it answers and what
it does not model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BLOCK = 512  # the CUDA caching allocator rounds every request up to a multiple of 512 bytes
GIB = 2**30
MODES = ("mae", "mae_dense")


class AllocTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages: each storage an op returns is added once (views share it) and
    taken off when it is freed; `peak` is the most bytes alive at once, `peak_phase` the phase then running."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self.phase = "setup"
        self.peak_phase = "setup"
        self.phase_peak: dict[str, int] = {}
        self._seen: dict[int, int] = {}  # id(storage) -> bytes, while the storage lives

    def track(self, *tensors) -> None:
        """Count tensors made before the tracker was entered (parameters, inputs)."""
        for t in tensors:
            self._add(t)

    def set_phase(self, name: str) -> None:
        self.phase = name
        self.phase_peak[name] = max(self.phase_peak.get(name, 0), self.current)

    def _add(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._seen:
            return
        nbytes = math.ceil(st.nbytes() / BLOCK) * BLOCK
        self._seen[key] = nbytes
        weakref.finalize(st, self._free, key)
        self.current += nbytes
        self.phase_peak[self.phase] = max(self.phase_peak.get(self.phase, 0), self.current)
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase

    def _free(self, key: int) -> None:
        self.current -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        return out


# ops that CUDA autocast runs in fp32 and CPU autocast leaves in bf16 (the only ones of these models' steps)
FP32_UNDER_CUDA_AUTOCAST = ("softmax.int", "layer_norm")


@contextlib.contextmanager
def cuda_autocast_policy():
    """Inside: CPU autocast follows CUDA's fp32 policy for softmax and layer_norm, so that the tensors a step
    keeps have the dtypes they have on the GPU (fake CUDA tensors cannot run backward without a CUDA context;
    fake CPU tensors under this policy keep the same bytes). Registered for the context only; it must cover
    backward too, where activation checkpointing recomputes blocks under the forward's autocast state."""
    lib = torch.library.Library("aten", "IMPL")
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def fp32_kernel(op):
        def kernel(*args, **kwargs):
            def up(a):
                return a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) else a

            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return op(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        return kernel

    for name in FP32_UNDER_CUDA_AUTOCAST:
        base, _, overload = name.partition(".")
        packet = getattr(torch.ops.aten, base)
        lib.impl(name, fp32_kernel(getattr(packet, overload or "default")), "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


@contextlib.contextmanager
def fused_sdpa(attention: str):
    """On the CPU scaled_dot_product_attention may take the math path and keep the score matrices for
    backward; route it to a fused kernel, which keeps q, k, v, the output and its log-sum-exp, as the GPU's
    fused kernels do (cuDNN, flash and memory-efficient alike)."""
    if attention == "math":
        yield
        return
    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or dropout_p or is_causal or kw:
            return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


@dataclasses.dataclass
class Estimate:
    peak_gib: float
    peak_phase: str
    resident_gib: float  # before a step: parameters (and their bf16 copies), optimizer state, the input batch
    activations_gib: float  # alive at the end of forward, beyond the resident bytes
    forward_peak_gib: float
    backward_peak_gib: float
    optimizer_peak_gib: float
    seconds: float


def estimate_step(m, mode: str = "mae", batch: int = 256, mask_ratio: float = 0.75, *, precision: str = "autocast",
                  attention: str = "auto", checkpoint_blocks: int = 0, checkpoint_decoder_blocks: int = 0,
                  activation_checkpointing: bool = False, fake: bool = True, fp8_recipe: str = "tensorwise") -> Estimate:
    """Peak bytes of an eager training step of `m` (a ModelConfig) on a CUDA device, without one.
    fake=False runs the same step for real on the CPU (small models: how the tests hold the fake count to it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from engine.config import Config, OptimConfig, TrainConfig
    from engine.step import build_training
    from engine.levers import config_with_levers

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if precision not in ("autocast", "bf16-pure", "fp8"):
        raise ValueError(f"precision must be autocast, bf16-pure or fp8, got {precision!r}")
    t0 = time.perf_counter()
    dev = torch.device("cpu")  # fake: no bytes are allocated on it
    # the trainer's own model, optimizer and step (engine.step), built from the same config fields; bf16 autocast
    # on the CPU stands in for CUDA's (its casting policy is registered below); the Triton masking / loss kernels
    # and torch.compile are estimated by their eager torch path
    base = Config(model=dataclasses.replace(m, encoder_mask_tokens=(mode == "mae_dense"), kernels="auto",
                                            mask_ratio=mask_ratio),
                  optim=OptimConfig(fused="torch", lr=1e-4), train=TrainConfig(batch_size=batch, device="cpu"))
    cfg = config_with_levers(base, {"precision": {"autocast": "bf16"}.get(precision, precision),
                                    "fp8_recipe": fp8_recipe,
                                    "attention": attention, "checkpoint_blocks": min(checkpoint_blocks, m.depth),
                                    "checkpoint_decoder_blocks": min(checkpoint_decoder_blocks, m.decoder_depth),
                                    "activation_checkpointing": activation_checkpointing})
    tracker = AllocTracker()
    activations = [0]
    resident = 0

    def phases(phase: str) -> None:  # a step hook (engine.step.PHASES)
        if phase == "backward":  # the forward's outputs and saved tensors are all alive here
            activations[0] = tracker.current - resident
        tracker.set_phase({"end": "setup"}.get(phase, phase))

    mode_ctx = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode_ctx, fused_sdpa(attention), cuda_autocast_policy():
        training = build_training(cfg, device=dev, strict=False)
        model, compute = training.model, training.compute
        imgs = torch.randn(batch, m.in_chans, m.img_size, m.img_size, device=dev)
        tracker.track(imgs, *model.parameters(), *model.buffers(), *(compute.copies if compute else ()))
        with tracker:
            for step in range(2):  # the first step creates the optimizer's state; the second is the steady one
                if step == 1:
                    resident = tracker.current
                    tracker.phase_peak.clear()
                    tracker.peak = 0
                noise = torch.rand(batch, m.num_patches, device=dev)
                training.step_fn([(imgs, noise)], mask_ratio, hooks=[phases])
                del noise
    activations = activations[0]
    pp = tracker.phase_peak
    return Estimate(peak_gib=tracker.peak / GIB, peak_phase=tracker.peak_phase, resident_gib=resident / GIB,
                    activations_gib=activations / GIB, forward_peak_gib=pp.get("forward", 0) / GIB,
                    backward_peak_gib=pp.get("backward", 0) / GIB, optimizer_peak_gib=pp.get("optimizer", 0) / GIB,
                    seconds=time.perf_counter() - t0)


def largest_batch(m, mode: str, mask_ratio: float, budget_gib: float, multiple: int = 8, cap: int = 65536,
                  **levers) -> tuple[int, Estimate | None]:
    """The largest batch (a multiple of `multiple`, at most `cap`) whose estimated peak fits `budget_gib`, and its
    estimate; (0, None) when even `multiple` does not fit. The peak is close to linear in the batch (resident
    bytes plus activations per image): secant steps through two estimates place the answer, a gallop upwards finds a
    batch over the budget when none was met yet, and a bisection between the last batch that fits and the first that
    does not settles it (at most 6 estimates for an affine peak)."""
    cache: dict[int, Estimate] = {}

    def peak(b):
        if b not in cache:
            cache[b] = estimate_step(m, mode, b, mask_ratio, **levers)
        return cache[b].peak_gib

    def snap(x):
        return max(multiple, min(cap // multiple * multiple, int(x) // multiple * multiple))

    if peak(multiple) > budget_gib:
        return 0, None
    a, b = multiple, snap(2 * multiple)
    for _ in range(4):  # secant steps on (batch, peak)
        if a == b:
            break
        slope = (peak(b) - peak(a)) / (b - a)
        nxt = snap(b + (budget_gib - peak(b)) / slope) if slope > 0 else snap(cap)
        a, b = b, nxt
    fits = [x for x in cache if peak(x) <= budget_gib]
    over = [x for x in cache if peak(x) > budget_gib]
    lo, hi = max(fits), min([x for x in over if x > max(fits)], default=None)
    if hi is None:
        # nothing estimated over the budget above lo: gallop up from it, one multiple, two, four... (a secant step
        # lands on the answer or just below it); once the cap fits, hi == lo
        step = multiple
        hi = snap(lo + step)
        while hi > lo and peak(hi) <= budget_gib:
            lo, step = hi, 2 * step
            hi = snap(lo + step)
    while hi - lo > multiple:  # bisection on multiples
        mid = snap((lo + hi) // 2)
        if peak(mid) <= budget_gib:
            lo = mid
        else:
            hi = mid
    return lo, cache[lo]


# ----------------------------------------------------------------------------------------------------------

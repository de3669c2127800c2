"""Timed training steps (forward, backward, optimizer) of an MAE or of timm's dense supervised ViT through the
trainer's own step (engine.step), split into phases by the step's hooks with CUDA events, plus pynvml sampling
of utilisation and power over the timed steps."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.config import ModelConfig
from engine.metrics import train_flops_per_image, vit_train_flops_per_image
from engine.model import build_model

MODES = ("mae", "mae_dense", "vit")
MODE_LABELS = {"mae": "MAE (visible only)", "mae_dense": "MAE, encoder with mask tokens", "vit": "dense ViT (timm)"}


def build_for_mode(m: ModelConfig, mode: str, device, num_classes: int = 1000):
    """The model a mode times: the MAE, the MAE with the encoder on all patches, or timm's ViT of that size."""
    if mode == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans,
                                 embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                                 num_classes=num_classes, qkv_bias=True).to(device)
    import dataclasses

    from engine.parallel import materialize

    cfg = dataclasses.replace(m, encoder_mask_tokens=(mode == "mae_dense"))
    with torch.device("meta"):  # no default init pass on the host: each parameter gets its initial value once
        model = build_model(cfg)
    materialize(model, torch.device(device), seed=0)
    return model


def flops_for_mode(m: ModelConfig, mode: str, mask_ratio: float, num_classes: int = 1000) -> float:
    if mode == "vit":
        return vit_train_flops_per_image(m, num_classes)
    return train_flops_per_image(m, mask_ratio, encoder_all=(mode == "mae_dense"))


class NvmlSampler:
    """Samples GPU utilisation (%) and power (W) every `period` s in a thread; no-op without pynvml/CUDA."""

    def __init__(self, device_index: int = 0, period: float = 0.05):
        self.samples: list[tuple[float, float]] = []
        self.period = period
        self._stop = threading.Event()
        self._thread = None
        self._h = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv = pynvml
            self._h = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:
            self._h = None

    def _run(self):
        while not self._stop.is_set():
            try:
                u = self._nv.nvmlDeviceGetUtilizationRates(self._h).gpu
                pw = self._nv.nvmlDeviceGetPowerUsage(self._h) / 1000.0
                self.samples.append((float(u), float(pw)))
            except Exception:
                pass
            time.sleep(self.period)

    def __enter__(self):
        if self._h is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict:
        """Mean utilisation and power over the samples taken (the timed steps only, when passed to
        StepRunner.run), and how many samples that is."""
        if not self.samples:
            return {"gpu_util_pct": None, "power_w": None}
        us, ps = zip(*self.samples)
        return {"gpu_util_pct": round(sum(us) / len(us), 1), "power_w": round(sum(ps) / len(ps), 1),
                "nvml_samples": len(self.samples)}


@dataclass
class StepStats:
    step_ms: float
    fwd_ms: float | None
    bwd_ms: float | None
    opt_ms: float | None
    p20_ms: float
    p80_ms: float
    reps: int
    first_step_s: float
    extra: dict = field(default_factory=dict)


class ClassifierStep(torch.nn.Module):
    """timm's supervised ViT behind the MAE's step signature: (imgs, mask_ratio, noise) -> (cross-entropy, None, None)."""

    def __init__(self, vit: torch.nn.Module, labels: torch.Tensor):
        super().__init__()
        self.vit = vit
        self.register_buffer("labels", labels, persistent=False)

    @property
    def blocks(self):
        """The ViT's blocks: the levers applied per block (regional compile, attention path) find them here."""
        return self.vit.blocks

    def forward(self, imgs, mask_ratio=None, noise=None):
        logits = self.vit(imgs)
        return torch.nn.functional.cross_entropy(logits.float(), self.labels[: imgs.shape[0]]), None, None


COMPILE_MODES = ("none", "regional", "model")


class PhaseTimer:
    """A step hook (engine.step.PHASES) that stamps each phase boundary: CUDA events on the GPU (read after one
    synchronize at the end), perf_counter on the CPU. One record per step: start, forward, backward, optimizer,
    end; phases() turns them into (forward, backward, optimizer, total) ms."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.steps: list[list[tuple[str, object]]] = []

    def _stamp(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        self.steps.append([("start", self._stamp())])

    def __call__(self, phase: str) -> None:
        if self.steps:
            self.steps[-1].append((phase, self._stamp()))

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)

    def phases(self) -> tuple[list[float], list[float], list[float], list[float]]:
        """Per step: forward (start to the first backward: inputs, weight copies, forward), backward (to the
        update), optimizer (update and gradient release), total. Steps without phase marks (a graph replay)
        contribute their total only."""
        fwd, bwd, opt, tot = [], [], [], []
        for marks in self.steps:
            d = dict(marks)  # accum 1: one mark per phase
            tot.append(self._ms(d["start"], d["end"]))
            if "backward" in d and "optimizer" in d:
                fwd.append(self._ms(d["start"], d["backward"]))
                bwd.append(self._ms(d["backward"], d["optimizer"]))
                opt.append(self._ms(d["optimizer"], d["end"]))
        return fwd, bwd, opt, tot


class StepRunner:
    """Times full training steps of one model on synthetic on-device input (or a loader's stream), through the
    same step `mae pretrain` runs (engine.step.build_training): the lever keywords below are mapped onto the
    config fields the trainer reads (engine.levers.LEVERS), so a row measures what a run with those overrides does.

    Levers (all default off, i.e. the reference's way of training): kernels "torch" | "triton" | "auto" for the
    MAE's masking / unshuffle / loss; compile "none" | "regional" (each block compiled once, reused by every
    layer) | "model" (whole-model torch.compile: the paper's code compiled); graph=True captures forward +
    backward + optimizer in one CUDA graph (engine.graphstep) and replays it (on the CPU its body runs eagerly);
    precision "autocast" | "bf16-pure" (engine.mixed); attention picks the SDPA kernel or an encoder path
    (engine.attention); checkpoint_blocks / checkpoint_decoder_blocks recompute the first N encoder / decoder
    blocks in backward; compile_mode is the regional compile's torch.compile mode (engine.config.COMPILE_MODES);
    layer_norm="apex" swaps in apex's FusedLayerNorm (eager); optimizer "torch" (fused AdamW, the default) | "apex"
    (FusedAdam); ctx: an engine.parallel.DistContext (distributed=True: FSDP2 on the process group).
    """

    def __init__(self, m: ModelConfig, mode: str, batch: int, device, mask_ratio: float = 0.75,
                 amp: bool | None = None, compile: bool | str = False, stream=None, num_classes: int = 1000,
                 seed: int = 0, model: torch.nn.Module | None = None, kernels: str | None = None,
                 graph: bool = False, precision: str = "autocast", attention: str = "auto",
                 checkpoint_blocks: int = 0, compile_mode: str = "default", layer_norm: str = "torch",
                 optimizer: str = "torch", checkpoint_decoder_blocks: int = 0, ctx=None, **levers):
        import dataclasses

        from engine.config import Config, OptimConfig, TrainConfig
        from engine.parallel import DistContext
        from engine.step import build_training
        from engine.levers import config_with_levers

        self.t_build = time.perf_counter()
        self.device = torch.device(device)
        self.m, self.mode, self.batch, self.mask_ratio = m, mode, batch, mask_ratio
        compile = {True: "model", False: "none"}.get(compile, compile)
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        if precision not in ("autocast", "bf16-pure", "fp8"):
            raise ValueError(f"precision must be autocast, bf16-pure or fp8, got {precision!r}")
        if amp is not None and precision == "autocast":
            precision = "bf16" if amp else "fp32"
        levers = dict(levers, compile=compile, graph=graph, precision=precision, attention=attention,
                      checkpoint_blocks=checkpoint_blocks, checkpoint_decoder_blocks=checkpoint_decoder_blocks,
                      compile_mode=compile_mode, layer_norm=layer_norm, optimizer=optimizer)
        if kernels is not None:
            levers["kernels"] = kernels
        # a lever set sized for ViT-H (recompute 6 encoder blocks) on a shallower model recomputes all of them
        levers["checkpoint_blocks"] = min(checkpoint_blocks, m.depth)
        levers["checkpoint_decoder_blocks"] = min(checkpoint_decoder_blocks, m.decoder_depth)
        mc = dataclasses.replace(m, encoder_mask_tokens=(mode == "mae_dense"), mask_ratio=mask_ratio)
        # the lr does not change the speed; 1e-4 absolute keeps the numbers of every row comparable
        base = Config(model=mc, optim=OptimConfig(lr=1e-4), train=TrainConfig(batch_size=batch, seed=seed,
                                                                             device=str(self.device)))
        self.cfg = config_with_levers(base, levers)  # invalid combinations are refused here, before building
        torch.manual_seed(seed)
        g = torch.Generator(device=self.device).manual_seed(seed)
        self.gen = g
        self.stream = stream
        self.imgs = torch.randn(batch, m.in_chans, m.img_size, m.img_size, device=self.device, generator=g)
        self.labels = torch.randint(0, num_classes, (batch,), device=self.device, generator=g)
        self.num_classes = num_classes
        if model is None and mode == "vit":
            model = ClassifierStep(build_for_mode(m, mode, self.device, num_classes), self.labels)
        if compile != "none":
            # forget earlier rows' traces: dynamo does not guard on the attention-kernel choice, so a block traced
            # under another backend would be reused (the on-disk compile cache still spares most of the work)
            torch._dynamo.reset()
        self.training = build_training(self.cfg, ctx or DistContext(), self.device, model=model, strict=False,
                                       max_graphs=1)
        self.model = self.training.model
        self.opt = self.training.optimizer
        self.compute = self.training.compute
        self.amp = self.training.amp_dtype is not None
        self.attention = attention

    @property
    def graphed(self):
        return self.training.graphed

    def _inputs(self):
        imgs = next(self.stream) if self.stream is not None else self.imgs
        noise = torch.rand(imgs.shape[0], self.m.num_patches, device=self.device, generator=self.gen)
        return imgs, noise

    def step(self, hooks=None):
        """One training step (the trainer's, engine.step); returns the loss (a device tensor)."""
        batch = [self._inputs()]
        if self.graphed is not None:
            return self.training.step_fn(batch, self.mask_ratio)[0]
        return self.training.step_fn(batch, self.mask_ratio, hooks=hooks)[0]

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, warmup: int = 5, reps: int = 20, sampler=None) -> StepStats:
        """Build-to-first-step time, `warmup` untimed steps, then `reps` timed steps (phase split through the
        step's hooks; a captured step is one replay, timed whole). `sampler` (an NvmlSampler) runs over the timed
        steps only, so utilisation and power are not averaged over compilation and warm-up."""
        self.step()
        self._sync()
        first_step_s = time.perf_counter() - self.t_build
        for _ in range(max(0, warmup - 1)):
            self.step()
        self._sync()
        timer = PhaseTimer(self.device)
        with (sampler if sampler is not None else contextlib.nullcontext()):
            for _ in range(reps):
                timer.start()
                self.step(hooks=[timer])
                if self.graphed is not None:
                    timer("end")
            self._sync()
        fwd, bwd, opt, tot = timer.phases()
        from .common import quantiles

        med, p20, p80 = quantiles(tot)

        def q(xs):
            return quantiles(xs)[0] if xs else None

        return StepStats(med, q(fwd), q(bwd), q(opt), p20, p80, reps, first_step_s)


def matmul_ceiling(device, n: int = 8192, reps: int = 20) -> float | None:
    """Measured bf16 dense matmul FLOP/s on this GPU (the practical ceiling MFU is also reported against)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    from .common import time_fn

    t = time_fn(lambda: torch.mm(a, b), device, warmup=5, reps=reps)
    return 2 * n**3 / (t.median_ms / 1000)

"""One timed training step (forward, backward, optimizer) of an MAE or of timm's dense supervised ViT,
split into phases with CUDA events, plus pynvml sampling of utilisation and power while it runs."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.config import ModelConfig
from engine.metrics import train_flops_per_image, vit_train_flops_per_image
from engine.model import build_model
from engine.optim import build_optimizer

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
        if not self.samples:
            return {"gpu_util_pct": None, "power_w": None}
        us, ps = zip(*self.samples)
        return {"gpu_util_pct": round(sum(us) / len(us), 1), "power_w": round(sum(ps) / len(ps), 1)}


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

    def forward(self, imgs, mask_ratio=None, noise=None):
        logits = self.vit(imgs)
        return torch.nn.functional.cross_entropy(logits.float(), self.labels[: imgs.shape[0]]), None, None


COMPILE_MODES = ("none", "regional", "model")


class StepRunner:
    """Times full training steps of one model on synthetic on-device input (or a loader's stream).

    Levers (all default off, i.e. the reference's way of training): kernels "torch" | "triton" | "auto" for the
    MAE's masking / unshuffle / loss; compile "none" | "regional" (each block compiled once, reused by every
    layer) | "model" (whole-model torch.compile); graph=True captures forward + backward + optimizer in one
    CUDA graph (engine.graphstep) and replays it; precision "bf16-pure" (engine.mixed); attention picks the
    SDPA kernel or, with encoder-math, the encoder's attention as batched matmuls (engine.attention);
    checkpoint_blocks / checkpoint_decoder_blocks recompute the first N encoder / decoder blocks in backward;
    compile_mode is the regional compile's torch.compile mode (engine.config.COMPILE_MODES); layer_norm="apex"
    swaps in apex's FusedLayerNorm (eager); optimizer "torch" (fused AdamW, the default) | "apex" (FusedAdam).
    """

    def __init__(self, m: ModelConfig, mode: str, batch: int, device, mask_ratio: float = 0.75,
                 amp: bool | None = None, compile: bool | str = False, stream=None, num_classes: int = 1000,
                 seed: int = 0, model: torch.nn.Module | None = None, kernels: str | None = None,
                 graph: bool = False, precision: str = "autocast", attention: str = "auto",
                 checkpoint_blocks: int = 0, compile_mode: str = "default", layer_norm: str = "torch",
                 optimizer: str = "torch", checkpoint_decoder_blocks: int = 0):
        self.t_build = time.perf_counter()
        self.device = torch.device(device)
        self.m, self.mode, self.batch, self.mask_ratio = m, mode, batch, mask_ratio
        self.amp = (self.device.type == "cuda") if amp is None else amp
        compile = {True: "model", False: "none"}.get(compile, compile)
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        if layer_norm != "torch" and compile != "none":  # refused before anything is built
            raise ValueError("layer_norm=apex is for eager blocks (torch.compile fuses LayerNorm itself)")
        torch.manual_seed(seed)
        g = torch.Generator(device=self.device).manual_seed(seed)
        self.gen = g
        self.stream = stream
        self.imgs = torch.randn(batch, m.in_chans, m.img_size, m.img_size, device=self.device, generator=g)
        self.labels = torch.randint(0, num_classes, (batch,), device=self.device, generator=g)
        self.num_classes = num_classes
        self.model = model if model is not None else build_for_mode(m, mode, self.device, num_classes)
        if kernels is not None and hasattr(self.model, "kernels"):
            self.model.kernels = kernels
        if checkpoint_blocks or checkpoint_decoder_blocks:
            from engine.parallel import apply_activation_checkpointing

            apply_activation_checkpointing(self.model, first=checkpoint_blocks, decoder_first=checkpoint_decoder_blocks)
        from engine.attention import apply_attention
        from engine.layernorm import apply_layer_norm

        apply_layer_norm(self.model, layer_norm)  # after the values are set (the Parameters are kept)
        apply_attention(self.model, attention)  # encoder-math: the blocks' own path, set before any trace
        if compile != "none":
            # forget earlier rows' traces: dynamo does not guard on the attention-kernel choice, so a block traced
            # under another backend would be reused (the on-disk compile cache still spares most of the work)
            torch._dynamo.reset()
        if compile == "regional":
            from engine.parallel import apply_regional_compile

            apply_regional_compile(self.model, compile_mode)
        self.step_model = ClassifierStep(self.model, self.labels) if mode == "vit" else self.model
        if compile == "model":
            self.step_model = torch.compile(self.step_model)
        from engine.config import OptimConfig

        # torch's fused AdamW unless a lever set asks for apex (optim.fused=auto would pick apex where installed)
        self.opt = build_optimizer(self.model, OptimConfig(fused=optimizer), 1e-4, self.device)
        if precision not in ("autocast", "bf16-pure"):
            raise ValueError(f"precision must be autocast or bf16-pure, got {precision!r}")
        self.compute = None
        if precision == "bf16-pure":  # bf16 copies of the weights, fp32 masters; no autocast
            from engine.mixed import Bf16Compute

            self.compute = Bf16Compute(self.step_model)
            self.amp = False
        self.attention = attention
        self.graphed = None
        if graph:
            from engine.graphstep import GraphedStep

            self.graphed = GraphedStep(self.step_model, self.opt, mask_ratio,
                                       torch.bfloat16 if self.amp else None, capture=self.device.type == "cuda",
                                       max_graphs=1, compute=self.compute, attention=attention)

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _inputs(self):
        imgs = next(self.stream) if self.stream is not None else self.imgs
        noise = torch.rand(imgs.shape[0], self.m.num_patches, device=self.device, generator=self.gen)
        return imgs, noise

    def forward(self):
        from engine.attention import attention_context

        imgs, noise = self._inputs()
        fwd = self.step_model
        if self.compute is not None:
            self.compute.refresh()
            fwd = self.compute
        with attention_context(self.attention), self.autocast():
            loss, _, _ = fwd(imgs, self.mask_ratio, noise)
            return loss

    def backward(self, loss):
        from engine.attention import attention_context

        with attention_context(self.attention):
            loss.backward()
        if self.compute is not None:
            self.compute.collect(first=True)

    def step(self):
        """One training step; returns the loss (a device tensor)."""
        if self.graphed is not None:
            imgs, noise = self._inputs()
            return self.graphed([imgs], [noise])[0]
        loss = self.forward()
        self.backward(loss)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, warmup: int = 5, reps: int = 20) -> StepStats:
        self.step()
        self._sync()
        first_step_s = time.perf_counter() - self.t_build
        for _ in range(max(0, warmup - 1)):
            self.step()
        self._sync()
        fwd, bwd, opt, tot = [], [], [], []
        if self.device.type == "cuda" and self.graphed is not None:  # one replay: no phase split
            ev = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(reps)]
            for e in ev:
                e[0].record()
                self.step()
                e[1].record()
            self._sync()
            tot = [e[0].elapsed_time(e[1]) for e in ev]
        elif self.device.type == "cuda":
            ev = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(reps)]
            for e in ev:
                e[0].record()
                loss = self.forward()
                e[1].record()
                self.backward(loss)
                e[2].record()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                e[3].record()
            self._sync()
            for e in ev:
                fwd.append(e[0].elapsed_time(e[1]))
                bwd.append(e[1].elapsed_time(e[2]))
                opt.append(e[2].elapsed_time(e[3]))
                tot.append(e[0].elapsed_time(e[3]))
        else:
            for _ in range(reps):
                if self.graphed is not None:
                    t0 = time.perf_counter()
                    self.step()
                    tot.append(1000 * (time.perf_counter() - t0))
                    continue
                t0 = time.perf_counter()
                loss = self.forward()
                t1 = time.perf_counter()
                self.backward(loss)
                t2 = time.perf_counter()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                t3 = time.perf_counter()
                fwd.append(1000 * (t1 - t0))
                bwd.append(1000 * (t2 - t1))
                opt.append(1000 * (t3 - t2))
                tot.append(1000 * (t3 - t0))
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

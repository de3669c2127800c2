"""Typed configuration: dataclasses, presets, dotted command-line overrides.

Every field carries a one-line docstring (the string literal after it); `__post_init__` validates, so a
bad value fails at start-up with a message that names the field, the value and the limit.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the limit."""


class UnavailableError(ConfigError, RuntimeError):
    """A lever asks for something this machine does not have (apex not installed, ...): a configuration error for
    the command line, a RuntimeError for code that calls the lever directly."""


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # train.compile_mode
ATTENTION = ("auto", "flash", "efficient", "cudnn", "math", "encoder-math", "encoder-triton")  # train.attention


MODEL_LIMITS = {"img_size": 16384, "patch_size": 1024, "in_chans": 1024, "embed_dim": 32768, "depth": 1024,
                "num_heads": 1024, "decoder_embed_dim": 32768, "decoder_depth": 1024, "decoder_num_heads": 1024}
"""The largest value each architecture field accepts (far above any published ViT: ViT-22B has width 6144, depth
48): a typo or a hostile config file is refused at once instead of growing memory until the process is killed."""
MAX_PATCHES = 65536
MAX_PARAMS = 100e9


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    img_size: int = 224
    """Input image side in pixels (square images)."""
    patch_size: int = 16
    """Patch side in pixels; img_size must be a multiple of it."""
    in_chans: int = 3
    """Input channels."""
    embed_dim: int = 1024
    """Encoder width."""
    depth: int = 24
    """Encoder blocks."""
    num_heads: int = 16
    """Encoder attention heads."""
    decoder_embed_dim: int = 512
    """Decoder width (the paper: 512)."""
    decoder_depth: int = 8
    """Decoder blocks (the paper: 8)."""
    decoder_num_heads: int = 16
    """Decoder attention heads (the paper: 16)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / block width."""
    norm_pix_loss: bool = True
    """Regress per-patch normalised pixels (the paper's default)."""
    mask_ratio: float = 0.75
    """Fraction of patches removed per image; in [0, 1) with at least one patch kept."""
    mask_strategy: str = "random"
    """Mask sampling (the paper's Figure 6): random | block (BEiT-style) | grid (regular grid sampling)."""
    encoder_mask_tokens: bool = False
    """Dense baseline (the paper's Table 1 'w/ [M]'): the encoder sees all patches, mask tokens at removed ones."""
    kernels: str = "auto"
    """Masking/unshuffle/loss implementation: auto (Triton on CUDA, torch elsewhere) | triton | torch."""

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def len_keep(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))

    def param_estimate(self) -> int:
        """Parameters of the model these settings build (encoder, decoder, pixel head; within a few per cent),
        computed before anything is allocated."""
        d, dd, r, c, p = self.embed_dim, self.decoder_embed_dim, self.mlp_ratio, self.in_chans, self.patch_size
        block = lambda w: int((4 + 2 * r) * w * w + (9 + 2 * r) * w)  # noqa: E731 - qkv, proj, MLP, 2 norms
        n = (self.img_size // p) ** 2 + 1  # patches and the cls token: the (fixed) position embeddings
        return int(p * p * c * d + d + self.depth * block(d) + 2 * d + d * dd + dd
                   + self.decoder_depth * block(dd) + 2 * dd + dd * (p * p * c + 1) + n * (d + dd) + d + dd)

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                     "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            v, hi = getattr(self, name), MODEL_LIMITS[name]
            _check(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi,
                   f"model.{name} must be an integer in [1, {hi}], got {v!r}"
                   + (f" ({type(v).__name__})" if not isinstance(v, int) or isinstance(v, bool) else ""))
        _check(isinstance(self.mlp_ratio, (int, float)) and not isinstance(self.mlp_ratio, bool)
               and 0 < self.mlp_ratio <= 64, f"model.mlp_ratio must be a number in (0, 64], got {self.mlp_ratio!r}")
        _check(isinstance(self.mask_ratio, (int, float)) and not isinstance(self.mask_ratio, bool),
               f"model.mask_ratio must be a number, got {self.mask_ratio!r}")
        _check(self.img_size % self.patch_size == 0,
               f"model.img_size={self.img_size} is not divisible by model.patch_size={self.patch_size}")
        _check(self.embed_dim % self.num_heads == 0,
               f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads={self.num_heads}")
        _check(self.decoder_embed_dim % self.decoder_num_heads == 0,
               f"model.decoder_embed_dim={self.decoder_embed_dim} is not divisible by "
               f"model.decoder_num_heads={self.decoder_num_heads}")
        for name in ("embed_dim", "decoder_embed_dim"):
            _check(getattr(self, name) % 4 == 0,
                   f"model.{name}={getattr(self, name)} must be divisible by 4 (2-D sin-cos position embedding)")
        _check(self.num_patches <= MAX_PATCHES,
               f"model.img_size={self.img_size} with model.patch_size={self.patch_size} makes {self.num_patches} "
               f"patches per image, over the limit of {MAX_PATCHES} (a {int(MAX_PATCHES ** 0.5)}^2 grid)")
        n = self.param_estimate()
        _check(n <= MAX_PARAMS, f"these model settings build about {n / 1e9:.3g}B parameters, over the limit of "
                                f"{MAX_PARAMS / 1e9:g}B (embed_dim={self.embed_dim}, depth={self.depth}, "
                                f"decoder_embed_dim={self.decoder_embed_dim}, decoder_depth={self.decoder_depth})")
        check_mask_ratio(self.mask_ratio, self.num_patches)
        _check(self.mask_strategy in ("random", "block", "grid"),
               f"model.mask_strategy must be random, block or grid, got {self.mask_strategy!r}")
        _check(self.kernels in ("auto", "triton", "torch"),
               f"model.kernels must be auto, triton or torch, got {self.kernels!r}")


def check_mask_ratio(mask_ratio: float, num_patches: int) -> None:
    """Mask ratio in [0, 1) and at least one visible patch out of `num_patches`."""
    _check(0.0 <= mask_ratio < 1.0, f"mask ratio must be in [0, 1), got {mask_ratio}")
    _check(int(num_patches * (1 - mask_ratio)) >= 1,
           f"mask ratio {mask_ratio} leaves no visible patch out of {num_patches} "
           f"(at most {1 - 1 / num_patches:.4f} for this image/patch size)")


@dataclass
class DataConfig:
    path: str = ""
    """Image directory (class subfolders optional, labels ignored); empty = the embedded sample photographs."""
    backend: str = "auto"
    """auto | dali | torchvision | synthetic (auto = DALI when importable, else torchvision)."""
    num_workers: int = -1
    """Decode workers: DataLoader processes (torchvision) or DALI threads; -1 = one per core up to 16 (divided
    among the ranks of a node); 0 loads in the main process."""
    scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range (the paper: 0.2-1.0)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    hflip: float = 0.5
    """Horizontal flip probability."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel normalisation mean."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel normalisation std."""
    dtype: str = "float32"
    """Batch dtype handed to the model: float32, or bfloat16 to halve the copy (the loss target is then bf16)."""
    hw_decoder_load: float = 0.65
    """DALI on a GPU: the share of JPEGs sent to the GPU's hardware JPEG decoder (A100/H100 have one; DALI's default
    0.65); 0 = nvJPEG on the CUDA cores (and the CPU) only."""
    transfer: str = "uint8"
    """torchvision backend: what workers hand over: uint8 (decoded pixels, pinned, normalised on the device: a quarter
    of float32's bytes and no float work in the workers; the same values bit for bit) or float32 (normalised in
    the workers, as the paper's code does)."""
    repeat: int = 0
    """Times the file list is repeated per epoch; 0 = 1 for a directory, enough for 256 samples when embedded."""
    knn_train: str = ""
    """Labelled folder (class subfolders) for the kNN monitor's memory bank (with train.knn_every)."""
    knn_val: str = ""
    """Labelled folder the kNN monitor classifies."""
    quarantine: str = ""
    """File listing paths to exclude (as written by `mae data check`); empty = DIR/.mae_quarantine.txt if present."""

    def workers(self) -> int:
        """The number of decode workers to use (resolving -1 = auto: the cores, split over this node's ranks)."""
        if self.num_workers >= 0:
            return self.num_workers
        import os

        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(1, min(16, (os.cpu_count() or 2) // max(1, local_world)))

    def __post_init__(self) -> None:
        self.scale = tuple(float(s) for s in self.scale)
        self.ratio = tuple(float(r) for r in self.ratio)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        _check(self.backend in ("auto", "dali", "torchvision", "synthetic"),
               f"data.backend must be auto, dali, torchvision or synthetic, got {self.backend!r}")
        _check(self.dtype in ("float32", "bfloat16"), f"data.dtype must be float32 or bfloat16, got {self.dtype!r}")
        _check(0.0 <= self.hw_decoder_load <= 1.0, f"data.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        _check(self.transfer in ("uint8", "float32"), f"data.transfer must be uint8 or float32, got {self.transfer!r}")
        _check(self.num_workers >= -1, f"data.num_workers must be >= 0 (or -1 = auto), got {self.num_workers}")
        _check(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
               f"data.scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.scale}")
        _check(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1],
               f"data.ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio}")
        _check(0.0 <= self.hflip <= 1.0, f"data.hflip must be in [0, 1], got {self.hflip}")
        _check(all(s > 0 for s in self.std), f"data.std must be positive, got {self.std}")
        _check(self.repeat >= 0, f"data.repeat must be >= 0, got {self.repeat}")


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4
    """Learning rate per 256 images; the lr used is base_lr * effective_batch / 256 (the paper's rule)."""
    lr: float = 0.0
    """Absolute learning rate; when > 0 it replaces the scaled base_lr."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to norms, biases, tokens, position embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (the paper: 0.9, 0.95)."""
    warmup_epochs: float = 40.0
    """Linear warm-up length in epochs."""
    fused: str = "auto"
    """Optimizer: auto (apex FusedAdam when importable on CUDA, else torch fused AdamW) | torch | apex."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        _check(self.base_lr > 0, f"optim.base_lr must be > 0, got {self.base_lr}")
        _check(self.lr >= 0, f"optim.lr must be >= 0, got {self.lr}")
        _check(self.min_lr >= 0, f"optim.min_lr must be >= 0, got {self.min_lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas must be two values in [0, 1), got {self.betas}")
        _check(self.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.fused in ("auto", "torch", "apex"), f"optim.fused must be auto, torch or apex, got {self.fused!r}")

    def scaled_lr(self, effective_batch: int) -> float:
        return self.lr if self.lr > 0 else self.base_lr * effective_batch / 256


FP8_RECIPES = ("tensorwise", "rowwise")  # torchao's float8 scaling recipes (train.fp8_recipe; engine/fp8.py)


@dataclass
class TrainConfig:
    batch_size: int = 64
    """Images per micro-batch per device."""
    accum_steps: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    epochs: int = 800
    """Training length in epochs."""
    max_steps: int = 0
    """When > 0, stop after this many optimizer steps (the schedule still spans `epochs`)."""
    seed: int = 0
    """Seed of data order, augmentation, initialisation and masking."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:N."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 (autocast) | bf16-pure (bf16 copies of the weights and
    bf16 activations, fp32 master weights and optimizer; no autocast; one process) | fp32 | fp8 (the encoder's
    linear layers as float8 GEMMs through torchao, bf16 autocast elsewhere; engine/fp8.py) | fp16 (fp16 autocast with
    dynamic loss scaling, for GPUs without bf16 such as V100 and T4, as the paper's own code trains; the loss and
    softmax in fp32; an overflow step is skipped, counted in the log's `skipped` and `loss_scale`)."""
    fp8_recipe: str = "tensorwise"
    """train.precision=fp8: torchao's scaling recipe, tensorwise (fastest) or rowwise (closer to bf16)."""
    fp8_decoder: bool = False
    """train.precision=fp8: the decoder blocks' linear layers in float8 too (default bf16: width 512 is small)."""
    attention: str = "auto"
    """Attention: auto (PyTorch chooses the fused kernel) | flash | efficient | cudnn | math | encoder-math (the
    encoder's short sequences as batched matmuls + softmax, fused by train.compile; the decoder as auto) |
    encoder-triton (the encoder's attention in this project's Triton kernel, straight from the qkv projection,
    per model.kernels; the decoder as auto)."""
    layer_norm: str = "torch"
    """LayerNorm kernels: torch | apex (NVIDIA apex's FusedLayerNorm, when installed; eager blocks, one CUDA
    process: train.compile fuses LayerNorm itself)."""
    run_dir: str = "runs/mae"
    """Where metrics, checkpoints and reconstructions go."""
    log_every: int = 10
    """Optimizer steps between metric logs (the only host syncs of the loop)."""
    ckpt_every: int = 500
    """Optimizer steps between checkpoints (one is always written at the end)."""
    keep_last: int = 3
    """Checkpoints kept in the run directory."""
    vis_every: int = 500
    """Optimizer steps between reconstruction grids (0 = only at the end)."""
    max_bad_steps: int = 10
    """Consecutive bad steps (non-finite: skipped; or a loss / gradient-norm spike, see spike_factor) after which
    training stops with an error naming the last checkpoint written before them (or rolls back, on_divergence)."""
    spike_factor: float = 3.0
    """A step whose loss exceeds this many times the median of the recent good losses is bad (divergence)."""
    grad_spike_factor: float = 10.0
    """A step whose gradient norm exceeds this many times the median of the recent good norms is bad."""
    on_divergence: str = "stop"
    """stop (an error naming the last good checkpoint) | rollback (reload it, skip the batches since, go on; at
    most train.max_rollbacks times)."""
    max_rollbacks: int = 3
    """Rollbacks after which a diverging run stops (on_divergence=rollback)."""
    on_world_change: str = "keep"
    """A resume on another number of ranks: keep (the checkpoint's global batch, hence its lr and schedule: the
    accumulation, or else the per-device batch, is adjusted and printed; refused with the override that fits when
    no split exists) or follow (this run's batch settings as given: the global batch, lr and schedule change)."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = True
    """Write TensorBoard event files next to metrics.jsonl."""
    knn_every: int = 0
    """Epochs between kNN monitor evaluations (0 = off; needs data.knn_train and data.knn_val)."""
    fsdp: str = "auto"
    """auto (FSDP2 under torchrun) | always (FSDP2 also in a single process: bf16 parameters, fp32 master
    weights) | never (single process only)."""
    activation_checkpointing: bool = False
    """Recompute each encoder/decoder block in backward (less memory, about a third more compute)."""
    checkpoint_blocks: int = 0
    """Recompute only the first N encoder blocks in backward: memory for compute in steps of one block."""
    checkpoint_decoder_blocks: int = 0
    """Recompute only the first N decoder blocks in backward. At mask 0.75 a decoder block saves ~1.6x the
    activations of an encoder block for about two thirds of its compute (ViT-H): the cheaper memory lever."""
    compile: bool | None = None
    """torch.compile: each block compiled once and reused by every layer (train.compile_scope blocks), or the
    whole model as a user of the paper's code would compile it (model). auto (the default): on in one CUDA
    process (the fastest single-GPU setting measured, engine.step.resolve_auto_levers), off on the CPU and under
    FSDP2; config.toml records what auto chose."""
    compile_scope: str = "blocks"
    """What train.compile compiles: blocks (regional: one compile per block shape) | model (the whole forward,
    the paper's code compiled; the benchmarks' reference+compile baseline)."""
    compile_mode: str = "default"
    """torch.compile mode of the blocks: default | max-autotune-no-cudagraphs (inductor benchmarks Triton GEMM
    templates against cuBLAS and fuses bias / GELU into the chosen GEMM: faster steps, minutes of compile)."""
    cuda_graph: bool | None = None
    """Capture forward + backward + optimizer of a step in one CUDA graph and replay it (one GPU, no FSDP;
    torch fused AdamW). One capture per batch shape and mask ratio. auto (the default): on in one CUDA process
    with torch's fused AdamW, off elsewhere; config.toml records what auto chose."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "accum_steps", "epochs", "log_every", "ckpt_every", "keep_last", "max_bad_steps"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"train.{name} must be a positive integer, got {v!r}")
        _check(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _check(self.spike_factor > 1 and self.grad_spike_factor > 1,
               f"train.spike_factor and train.grad_spike_factor must be > 1, got {self.spike_factor}, "
               f"{self.grad_spike_factor}")
        _check(self.on_divergence in ("stop", "rollback"),
               f"train.on_divergence must be stop or rollback, got {self.on_divergence!r}")
        _check(self.max_rollbacks >= 0, f"train.max_rollbacks must be >= 0, got {self.max_rollbacks}")
        _check(self.on_world_change in ("keep", "follow"),
               f"train.on_world_change must be keep or follow, got {self.on_world_change!r}")
        _check(self.vis_every >= 0, f"train.vis_every must be >= 0, got {self.vis_every}")
        _check(self.knn_every >= 0, f"train.knn_every must be >= 0, got {self.knn_every}")
        for name in ("checkpoint_blocks", "checkpoint_decoder_blocks"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"train.{name} must be an integer >= 0, got {v!r}")
        _check(self.fsdp in ("auto", "always", "never"), f"train.fsdp must be auto, always or never, got {self.fsdp!r}")
        _check(self.precision in ("auto", "bf16", "bf16-pure", "fp32", "fp8", "fp16"),
               f"train.precision must be auto, bf16, bf16-pure, fp32, fp8 or fp16, got {self.precision!r}")
        _check(self.fp8_recipe in FP8_RECIPES,
               f"train.fp8_recipe must be {' or '.join(FP8_RECIPES)}, got {self.fp8_recipe!r}")

        _check(self.attention in ATTENTION,
               f"train.attention must be {', '.join(ATTENTION[:-1])} or {ATTENTION[-1]}, got {self.attention!r}")
        _check(self.layer_norm in ("torch", "apex"), f"train.layer_norm must be torch or apex, got {self.layer_norm!r}")
        _check(not (self.layer_norm == "apex" and self.compile),
               "train.layer_norm=apex is for eager blocks: torch.compile cannot trace apex's extension and fuses "
               "LayerNorm itself; set --train.compile false or --train.layer_norm torch")
        _check(self.compile_scope in ("blocks", "model"),
               f"train.compile_scope must be blocks or model, got {self.compile_scope!r}")
        _check(not (self.compile and self.compile_scope == "model" and self.precision == "bf16-pure"),
               "train.compile_scope=model compiles the fp32 module; bf16-pure computes on bf16 copies outside it: "
               "use --train.compile_scope blocks")
        _check(self.compile_mode in COMPILE_MODES,
               f"train.compile_mode must be {' or '.join(COMPILE_MODES)}, got {self.compile_mode!r} (modes with "
               f"their own CUDA graphs are not offered: train.cuda_graph captures the whole step)")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class ParallelConfig:
    replicate: int = 1
    """Hybrid sharding (HSDP): the ranks form `replicate` groups of world / replicate ranks; every block is sharded
    within a group and replicated across groups (FSDP2 on a 2-D device mesh: all-gathers stay inside a group, e.g.
    a node's NVLink, and only the gradient all-reduce crosses groups). 1 = plain FSDP2 over all ranks."""

    def __post_init__(self) -> None:
        _check(self.replicate >= 1, f"parallel.replicate must be >= 1, got {self.replicate}")


SECTIONS = ("model", "data", "optim", "train", "parallel")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    preset: str = "custom"
    """Name of the preset this config started from."""

    def __post_init__(self) -> None:
        _check(self.train.checkpoint_blocks <= self.model.depth,
               f"train.checkpoint_blocks={self.train.checkpoint_blocks} is more than the encoder's "
               f"{self.model.depth} blocks (model.depth)")
        _check(self.train.checkpoint_decoder_blocks <= self.model.decoder_depth,
               f"train.checkpoint_decoder_blocks={self.train.checkpoint_decoder_blocks} is more than the decoder's "
               f"{self.model.decoder_depth} blocks (model.decoder_depth)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(model=ModelConfig(**d["model"]), data=DataConfig(**d["data"]),
                   optim=OptimConfig(**d["optim"]), train=TrainConfig(**d["train"]),
                   parallel=ParallelConfig(**d.get("parallel", {})), preset=d.get("preset", "custom"))


# ----------------------------------------------------------------------------------------------------------
# Presets (functions, as in the paper's model factories)


def debug() -> Config:
    """A depth-2, width-64, 32-pixel MAE that trains, checkpoints and resumes on a CPU in seconds."""
    return Config(
        model=ModelConfig(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                          decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4),
        optim=OptimConfig(base_lr=1e-2, warmup_epochs=2),
        train=TrainConfig(batch_size=32, epochs=20, log_every=5, ckpt_every=50, vis_every=50,
                          run_dir="runs/debug", device="auto"),
        preset="debug",
    )


def tiny() -> Config:
    """A 64-pixel ViT-Tiny-width MAE with 4-pixel patches (256 of them, 64 visible): learns structure, not only
    colour, on a CPU in about two minutes (held-out masked-patch error ~0.68; 8-pixel patches stay near 0.95)."""
    return Config(
        model=ModelConfig(img_size=64, patch_size=4, embed_dim=192, depth=4, num_heads=3,
                          decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
        optim=OptimConfig(base_lr=4e-3, warmup_epochs=3),
        train=TrainConfig(batch_size=32, epochs=15, log_every=10, ckpt_every=60, vis_every=40,
                          run_dir="runs/tiny"),
        preset="tiny",
    )


def _paper(embed_dim: int, depth: int, num_heads: int, patch_size: int, name: str) -> Config:
    return Config(
        model=ModelConfig(img_size=224, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                          num_heads=num_heads, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
        optim=OptimConfig(base_lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=40),
        train=TrainConfig(batch_size=64, accum_steps=1, epochs=800, run_dir=f"runs/{name}"),
        preset=name,
    )


def mae_vit_base_patch16() -> Config:
    """ViT-B/16 MAE, the paper's recipe (4096 effective batch in the paper: set batch/accum/world to match)."""
    return _paper(768, 12, 12, 16, "mae_vit_base_patch16")


def mae_vit_large_patch16() -> Config:
    """ViT-L/16 MAE, the paper's recipe."""
    return _paper(1024, 24, 16, 16, "mae_vit_large_patch16")


def mae_vit_huge_patch14() -> Config:
    """ViT-H/14 MAE, the paper's recipe."""
    return _paper(1280, 32, 16, 14, "mae_vit_huge_patch14")


PRESETS = {
    "debug": debug,
    "tiny": tiny,
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
}
ALIASES = {"vit-b": "mae_vit_base_patch16", "vit-l": "mae_vit_large_patch16", "vit-h": "mae_vit_huge_patch14"}


def get_preset(name: str) -> Config:
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} "
                          f"(aliases: {', '.join(ALIASES)})")
    return PRESETS[key]()


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning and linear probing (`mae finetune`, `mae linprobe`; engine/classify.py): the same sections as
# pretraining (model: the encoder's architecture at the fine-tuning resolution; data: normalisation, workers, the
# probe's crop; optim; train: batch, epochs, precision, run directory, checkpoints, levers; parallel) plus `task`.


ARCH_KEYS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
"""The fields that make an encoder's architecture (its weights' shapes, the position embeddings aside): what a
fine-tuning preset is matched to a pretrained checkpoint by."""

AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
"""The reference fine-tuning recipe's RandAugment (timm's auto_augment string)."""


@dataclass
class TaskConfig:
    protocol: str = "finetune"
    """finetune (every block trains, or the last task.last_blocks: the paper's partial fine-tuning) | linprobe
    (frozen encoder, BatchNorm without affine + linear head, LARS)."""
    checkpoint: str = ""
    """The pretrained encoder: an engine checkpoint, the paper's release, timm ViT weights or a Hugging Face
    directory; empty = a randomly initialised encoder (the baseline a pretraining is judged against)."""
    train: str = ""
    """Labelled training images: a folder with one subfolder per class, or a set packed with `mae data pack --labels`."""
    val: str = ""
    """Labelled validation images (a folder or a packed set with the same classes)."""
    pool: str = "gap"
    """Features: gap (the mean of the patch tokens, then fc_norm: the paper's fine-tuning) | cls (the cls token after
    the encoder's final norm: the paper's linear probe)."""
    last_blocks: int = -1
    """finetune: train only the last k blocks and the head (the paper's Figure 9); -1 = every block."""
    drop_path: float = 0.1
    """Stochastic depth, rising linearly with depth to this rate (finetune)."""
    layer_decay: float = 0.75
    """Layer-wise lr decay: block i trains at layer_decay ** (depth + 1 - (i + 1)) of the lr (finetune)."""
    smoothing: float = 0.1
    """Label smoothing."""
    mixup: float = 0.8
    """Mixup alpha (0 = off)."""
    cutmix: float = 1.0
    """CutMix alpha (0 = off)."""
    auto_augment: str = AUTO_AUGMENT
    """Training augmentation: a timm auto_augment string (RandAugment) through timm's create_transform, with bicubic
    RandomResizedCrop, flip and random erasing; empty = the linear probe's RandomResizedCrop + flip only."""
    reprob: float = 0.25
    """Random erasing probability (with task.auto_augment)."""
    height: int = 0
    """Non-square inputs: the image height in pixels, model.img_size being the width (both multiples of
    model.patch_size); the position embeddings are resampled to the rectangular grid. 0 = square."""
    crop_pct: float = 0.875
    """Evaluation: resize the shorter side to img_size / crop_pct (256 for 224), then a center crop of img_size."""
    optimizer: str = "adamw"
    """adamw (betas optim.betas, layer-wise decay) | lars (the linear probe's: momentum 0.9, trust 0.001)."""
    eval_every: int = 1
    """Epochs between validations (top-1 / top-5 in metrics.jsonl, and the best checkpoint); the last epoch always."""

    def __post_init__(self) -> None:
        _check(self.protocol in ("finetune", "linprobe"),
               f"task.protocol must be finetune or linprobe, got {self.protocol!r}")
        _check(self.pool in ("gap", "cls"), f"task.pool must be gap or cls, got {self.pool!r}")
        _check(self.optimizer in ("adamw", "lars"), f"task.optimizer must be adamw or lars, got {self.optimizer!r}")
        _check(isinstance(self.last_blocks, int) and self.last_blocks >= -1,
               f"task.last_blocks must be -1 (every block) or a number of blocks >= 0, got {self.last_blocks!r}")
        for name in ("drop_path", "smoothing", "reprob"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"task.{name} must be in [0, 1), got {v}")
        _check(0.0 < self.layer_decay <= 1.0, f"task.layer_decay must be in (0, 1], got {self.layer_decay}")
        _check(self.mixup >= 0 and self.cutmix >= 0,
               f"task.mixup and task.cutmix must be >= 0, got {self.mixup}, {self.cutmix}")
        _check(0.0 < self.crop_pct <= 1.0, f"task.crop_pct must be in (0, 1], got {self.crop_pct}")
        _check(self.eval_every >= 1, f"task.eval_every must be a positive number of epochs, got {self.eval_every}")
        _check(isinstance(self.height, int) and 0 <= self.height <= MODEL_LIMITS["img_size"],
               f"task.height must be 0 (square) or a height in pixels up to {MODEL_LIMITS['img_size']}, got "
               f"{self.height!r}")


@dataclass
class ClassifyConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    preset: str = "custom"
    """Name of the preset this config started from."""

    @property
    def command(self) -> str:
        """The command that runs this config again (to_toml's header): finetune or linprobe."""
        return self.task.protocol

    def __post_init__(self) -> None:
        _check(self.task.height % self.model.patch_size == 0,
               f"task.height={self.task.height} is not divisible by model.patch_size={self.model.patch_size}")
        _check(self.task.last_blocks <= self.model.depth,
               f"task.last_blocks={self.task.last_blocks} is more than the encoder's {self.model.depth} blocks "
               "(model.depth)")
        t = self.train
        for name, default in CLASSIFY_FIXED.items():  # pretraining's levers that a classifier run does not have
            _check(getattr(t, name) in default, f"train.{name}={getattr(t, name)!r} does not apply to fine-tuning or "
                                                f"linear probing; leave it at {default[0]!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifyConfig":
        return cls(model=ModelConfig(**d["model"]), data=DataConfig(**d["data"]), optim=OptimConfig(**d["optim"]),
                   train=TrainConfig(**d["train"]), parallel=ParallelConfig(**d.get("parallel", {})),
                   task=TaskConfig(**d["task"]), preset=d.get("preset", "custom"))


CLASSIFY_FIXED = {"precision": ("auto", "bf16", "fp32", "fp16"), "cuda_graph": (None, False), "attention": ("auto",),
                  "layer_norm": ("torch",), "fp8_decoder": (False,), "on_divergence": ("stop",),
                  "compile_scope": ("blocks",), "checkpoint_blocks": (0,), "checkpoint_decoder_blocks": (0,),
                  "knn_every": (0,)}
"""The train fields of pretraining that fine-tuning and probing do not take, with the values they accept."""

PAPER_DIFFERS = {"finetune_vit_b16": {"optim.base_lr": 1e-3, "task.layer_decay": 0.75}}
"""Where the paper's text (Table 9) and the reference code's FINETUNE.md differ: the presets follow the code (the
README's 83.6 was reproduced with it, facebookresearch/mae#7, #80, #130); --help names the paper's value."""


def _classify(protocol: str, arch: ModelConfig, name: str, *, epochs: int, base_lr: float, batch_size: int,
              accum_steps: int = 1, layer_decay: float = 0.75, drop_path: float = 0.1, **train) -> ClassifyConfig:
    if protocol == "finetune":
        task = TaskConfig(protocol="finetune", pool="gap", drop_path=drop_path, layer_decay=layer_decay)
        optim = OptimConfig(base_lr=base_lr, min_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999), warmup_epochs=5)
        data = DataConfig(scale=(0.08, 1.0))
    else:  # linprobe: the paper's Table 10 and the reference code's LINPROBE.md agree
        task = TaskConfig(protocol="linprobe", pool="cls", drop_path=0.0, layer_decay=1.0, smoothing=0.0, mixup=0.0,
                          cutmix=0.0, auto_augment="", reprob=0.0, optimizer="lars")
        optim = OptimConfig(base_lr=base_lr, weight_decay=0.0, warmup_epochs=10)
        data = DataConfig(scale=(0.08, 1.0))
    return ClassifyConfig(model=arch, data=data, optim=optim, task=task, preset=name,
                          train=TrainConfig(batch_size=batch_size, accum_steps=accum_steps, epochs=epochs,
                                            run_dir=f"runs/{name}", **train))


def _arch(preset: str, img_size: int | None = None) -> ModelConfig:
    m = PRESETS[preset]().model
    return m if img_size is None else dataclasses.replace(m, img_size=img_size)


CLASSIFY_PRESETS = {
    # the reference code's FINETUNE.md recipes: global batch 1024 (the per-device batch here is for 8 GPUs),
    # warm-up 5, AdamW (0.9, 0.999), weight decay 0.05, RandAugment m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8,
    # cutmix 1.0, label smoothing 0.1, global-pool head, evaluation resize 256 / center crop 224
    "finetune_vit_b16": lambda: _classify("finetune", _arch("mae_vit_base_patch16"), "finetune_vit_b16", epochs=100,
                                          base_lr=5e-4, batch_size=128, layer_decay=0.65, drop_path=0.1,
                                          log_every=50, ckpt_every=1000),
    "finetune_vit_l16": lambda: _classify("finetune", _arch("mae_vit_large_patch16"), "finetune_vit_l16", epochs=50,
                                          base_lr=1e-3, batch_size=64, accum_steps=2, layer_decay=0.75, drop_path=0.2,
                                          log_every=50, ckpt_every=1000),
    "finetune_vit_h14": lambda: _classify("finetune", _arch("mae_vit_huge_patch14"), "finetune_vit_h14", epochs=50,
                                          base_lr=1e-3, batch_size=32, accum_steps=4, layer_decay=0.75, drop_path=0.3,
                                          log_every=50, ckpt_every=1000),
    # the paper's 87.8% row: ViT-H/14 fine-tuned at 448 pixels (position embeddings interpolated at load)
    "finetune_vit_h14_448": lambda: _classify("finetune", _arch("mae_vit_huge_patch14", 448), "finetune_vit_h14_448",
                                              epochs=50, base_lr=1e-3, batch_size=8, accum_steps=16, layer_decay=0.75,
                                              drop_path=0.3, log_every=50, ckpt_every=1000, activation_checkpointing=True),
    # LINPROBE.md: LARS, base lr 0.1, global batch 16384 (8 GPUs x 512 x accumulation 4), 90 epochs, warm-up 10
    "linprobe_vit_b16": lambda: _classify("linprobe", _arch("mae_vit_base_patch16"), "linprobe_vit_b16", epochs=90,
                                          base_lr=0.1, batch_size=512, accum_steps=4, log_every=20, ckpt_every=500),
    "linprobe_vit_l16": lambda: _classify("linprobe", _arch("mae_vit_large_patch16"), "linprobe_vit_l16", epochs=90,
                                          base_lr=0.1, batch_size=512, accum_steps=4, log_every=20, ckpt_every=500),
    "linprobe_vit_h14": lambda: _classify("linprobe", _arch("mae_vit_huge_patch14"), "linprobe_vit_h14", epochs=90,
                                          base_lr=0.1, batch_size=512, accum_steps=4, log_every=20, ckpt_every=500),
    # the debug encoder on a small labelled set (digits, `mae data digits`), on a CPU in a minute or two
    "finetune_debug": lambda: _debug_data(_classify(
        "finetune", _arch("debug"), "finetune_debug", epochs=20, base_lr=5e-3, batch_size=32, layer_decay=0.75,
        drop_path=0.1, log_every=39, ckpt_every=195, device="auto")),
    "linprobe_debug": lambda: _debug_data(_classify(
        "linprobe", _arch("debug"), "linprobe_debug", epochs=20, base_lr=20.0, batch_size=128, log_every=9,
        ckpt_every=45, device="auto")),
}


def _debug_data(c: ClassifyConfig) -> ClassifyConfig:
    """The debug presets' data: 32-pixel digits keep their digit in crops of 20-100% of the image (pretraining's
    range), not in ImageNet's 8%; the recipe's RandAugment, random erasing, mixup and cutmix regularise for 1.28M
    images and leave 1,258 digits under-fitted in 20 epochs (72.7% against 90.7% with crop + flip, measured in
    benchmarks/results/demo_digits_cpu_2026-12-03.md), so the debug fine-tune keeps crop + flip and label smoothing;
    --task.auto_augment rand-m9-mstd0.5-inc1 --task.mixup 0.8 ... turn the recipe's on."""
    task = c.task if c.task.protocol == "linprobe" else dataclasses.replace(
        c.task, auto_augment="", reprob=0.0, mixup=0.0, cutmix=0.0)
    return dataclasses.replace(c, data=dataclasses.replace(c.data, scale=(0.2, 1.0)), task=task)
CLASSIFY_ALIASES = {f"{p}_{a}": f"{p}_vit_{b}" for p in ("finetune", "linprobe")
                    for a, b in (("vit-b", "b16"), ("vit-l", "l16"), ("vit-h", "h14"))}


def get_classify_preset(name: str, protocol: str | None = None) -> ClassifyConfig:
    """A fine-tuning / probing preset by name; with `protocol`, the short architecture names (debug, vit-b, vit-l,
    vit-h, b16, ...) are read as that protocol's preset."""
    key = CLASSIFY_ALIASES.get(name, name)
    if protocol and key not in CLASSIFY_PRESETS:
        short = {"vit-b": "vit_b16", "vit-l": "vit_l16", "vit-h": "vit_h14", "b16": "vit_b16", "l16": "vit_l16",
                 "h14": "vit_h14"}.get(name, name)
        key = f"{protocol}_{short}"
    if key not in CLASSIFY_PRESETS:
        names = [n for n in CLASSIFY_PRESETS if protocol is None or n.startswith(protocol)]
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(names)}")
    return CLASSIFY_PRESETS[key]()


# ----------------------------------------------------------------------------------------------------------
# Dotted overrides: --optim.lr 1e-3 --model.mask_ratio 0.9


AUTO = "auto"
"""How a tri-state switch (a `bool | None` field: None = decided where the run starts) is written: --train.compile
auto, `compile = "auto"` in a config file."""


def _optional_bool(typ) -> bool:
    return set(typing.get_args(typ)) == {bool, type(None)}


def _convert(text: str, typ, key: str):
    origin = typing.get_origin(typ)
    tri = _optional_bool(typ)
    if tri:
        if text.lower() == AUTO:
            return None
        typ, origin = bool, None
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false" + (" or auto" if tri else ""))
        if origin is tuple:
            parts = [p for p in text.replace(",", " ").split() if p]
            args = typing.get_args(typ)
            n = len(args)
            if len(parts) != n:
                raise ValueError(f"expected {n} comma-separated values")
            return tuple(_convert(p, a, key) for p, a in zip(parts, args))
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        return str(text)
    except ValueError as e:
        raise ConfigError(f"bad value {text!r} for --{key}: {e}") from None


def apply_overrides(cfg: Config, overrides: dict[str, str]) -> Config:
    """Apply {"optim.lr": "1e-3", ...} to a config, converting by field type; validate the result."""
    sections = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    changes: dict[str, dict] = {s: {} for s in sections}
    for key, text in overrides.items():
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in sections:
            near = _nearest(parts[0], sections)
            raise ConfigError(f"unknown option --{key}" + (f" (did you mean --{near}.{'.'.join(parts[1:])}?)" if near
                              else "") + f"; options look like --SECTION.FIELD with SECTION one of "
                              f"{', '.join(sorted(sections))}")
        sec, name = parts
        sub = getattr(cfg, sec)
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            near = _nearest(name, hints)
            raise ConfigError(f"unknown option --{key}" + (f" (did you mean --{sec}.{near}?)" if near else "")
                              + f"; {sec} has: {', '.join(f.name for f in dataclasses.fields(sub))}")
        changes[sec][name] = _convert(text, hints[name], key)
    kwargs = {s: dataclasses.replace(getattr(cfg, s), **changes[s]) for s in sections}
    return dataclasses.replace(cfg, **kwargs)


def _nearest(name: str, choices) -> str | None:
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------------------
# Config files (TOML): every run writes its resolved config; `mae pretrain --config FILE` reads one


def sections_of(cfg) -> list[str]:
    """The section names of a config (Config, ClassifyConfig), in declaration order."""
    return [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]


def to_toml(cfg) -> str:
    """The whole config as TOML: `preset`, then one table per section, every field."""
    def value(v):
        if v is None:
            return f'"{AUTO}"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
        if isinstance(v, (tuple, list)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        import json

        return json.dumps(str(v))

    command = getattr(cfg, "command", "pretrain")
    lines = [f"# resolved configuration of this run: `mae {command} --config FILE` runs it again (dotted overrides",
             "# on the command line still win)", f"preset = {value(cfg.preset)}"]
    for sec in sections_of(cfg):
        lines += ["", f"[{sec}]"]
        sub = getattr(cfg, sec)
        lines += [f"{f.name} = {value(getattr(sub, f.name))}" for f in dataclasses.fields(sub)]
    return "\n".join(lines) + "\n"


def read_toml(path) -> dict:
    """A config file as a dict; a ConfigError naming the file and the line for bad TOML."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from pathlib import Path

    p = Path(path)
    try:
        data = p.read_bytes()
        if len(data) > 1 << 20:
            raise ConfigError(f"config file {p} is {len(data)} bytes; a config file is a few KB (limit 1 MiB)")
        return tomllib.loads(data.decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not text (byte {e.start} is not UTF-8); a config file is TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} nests too deeply to be a config file (preset and one table per "
                          "section)") from None


def file_overrides(data: dict, path, kind=None) -> tuple[str | None, dict[str, str]]:
    """(preset, dotted overrides) of a config file's dict for a config of class `kind` (default Config); unknown
    sections and keys are errors naming the key and the nearest valid one."""
    example = (kind or Config)()
    sections = {name: type(getattr(example, name)) for name in sections_of(example)}
    preset = data.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"{path}: preset must be a name (a string), got {preset!r}")
    out: dict[str, str] = {}
    for sec, body in data.items():
        if sec == "preset":
            continue
        if sec not in sections or not isinstance(body, dict):
            near = _nearest(sec, [*sections, "preset"])
            raise ConfigError(f"{path}: unknown key {sec!r}" + (f" (did you mean {near!r}?)" if near else "")
                              + f"; a config file has preset and the tables {', '.join(sections)}")
        fields = {f.name for f in dataclasses.fields(sections[sec])}
        for k, v in body.items():
            if k not in fields:
                near = _nearest(k, fields)
                raise ConfigError(f"{path}: unknown key {sec}.{k}" + (f" (did you mean {sec}.{near}?)" if near else ""))
            if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, (list, dict)) for x in v)):
                raise ConfigError(f"{path}: {sec}.{k} is a {'table' if isinstance(v, dict) else 'nested list'}; "
                                  "settings are numbers, strings, booleans or flat lists")
            if isinstance(v, bool):
                out[f"{sec}.{k}"] = "true" if v else "false"
            elif isinstance(v, list):
                out[f"{sec}.{k}"] = ",".join(str(x) for x in v)
            else:
                out[f"{sec}.{k}"] = str(v)
    return preset, out


def describe_fields(cfg: Config) -> str:
    """Help text listing every dotted option with its default and docstring."""
    import ast
    import inspect

    lines = []
    for sec in sections_of(cfg):
        sub = getattr(cfg, sec)
        docs = _field_docs(type(sub), ast, inspect)
        for f in dataclasses.fields(sub):
            v = getattr(sub, f.name)
            lines.append(f"  --{sec}.{f.name} (default {AUTO if v is None else repr(v)}): {docs.get(f.name, '')}")
    return "\n".join(lines)


def _field_docs(cls, ast, inspect) -> dict[str, str]:
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    out = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            out[a.target.id] = str(b.value.value)
    return out

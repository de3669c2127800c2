"""`mae pretrain ... --dry-run --world-size N [--parallel.replicate R] [--rank K]`: a sharded job rehearsed on a CPU.

The run is built exactly as torchrun would build it on rank K of N: the same config checks, the model on the meta
device, activation checkpointing, the attention path, float8 conversion where asked, `fully_shard` on the same
(1-D FSDP2 or 2-D HSDP) mesh, this rank's shard materialised with its initial values, the optimizer over it. The
process group is torch's fake one (no other process exists: collectives return at once and move no data). One
training step then runs on fake tensors (shapes, dtypes and autograd; no arithmetic), so a ViT-H step at any world
size takes seconds, and every collective it issues is counted with its bytes and the mesh dimension it runs on.

The config is validated as for a launch; the checks that need the GPU itself (a lever that needs CUDA, apex or
float8 tensor cores) are left to the launch, since this machine cannot answer them.

What the rehearsal checks: the batch arithmetic, the mesh, that every parameter shards and every gradient comes
back the shape of its shard, each rank's parameter / gradient / optimizer bytes, the collectives of one step and
their volume, and (from `mae bench memory`'s estimator) the step's peak memory per GPU against the GPU's memory.
What it cannot: losses and numerics (no data moves), speed, NCCL or cuBLAS behaviour, torch.compile (the
rehearsal runs the eager blocks: compilation changes kernels, not the sharding or the collectives).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from .config import Config, ConfigError

GIB = 2**30


@dataclass
class Collectives:
    """Calls and bytes per collective kind and mesh dimension, for one training step of this rank."""

    calls: dict = field(default_factory=dict)
    bytes: dict = field(default_factory=dict)

    def add(self, kind: str, dim: str, nbytes: int) -> None:
        key = f"{kind}@{dim}"
        self.calls[key] = self.calls.get(key, 0) + 1
        self.bytes[key] = self.bytes.get(key, 0) + int(nbytes)

    def total(self, kind: str) -> int:
        return sum(v for k, v in self.bytes.items() if k.startswith(kind + "@"))


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class CollectiveCounter:
    """A dispatch mode that records every c10d collective of a step: all-gather (the gathered output's bytes),
    reduce-scatter (the input's: the unsharded gradient), all-reduce (the tensors'), by the mesh dimension of its
    process group."""

    def __init__(self, groups: dict[str, object]):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.counts = Collectives()
        counter = self
        names = {self._group_key(g): name for name, g in groups.items()}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                if getattr(func, "namespace", "") == "c10d" or str(func).startswith("c10d."):
                    dim = names.get(counter._group_key(_find_group(args)), "other")
                    if name.startswith("_allgather_base_"):
                        counter.counts.add("all_gather", dim, _nbytes(args[0]))
                    elif name.startswith("_reduce_scatter_base_"):
                        counter.counts.add("reduce_scatter", dim, _nbytes(args[1]))
                    elif name.startswith("allreduce_"):
                        counter.counts.add("all_reduce", dim, sum(_nbytes(t) for t in args[0]))
                    elif name.startswith(("allgather", "reduce_scatter", "broadcast", "alltoall")):
                        counter.counts.add(name.rstrip("_"), dim, sum(_nbytes(t) for t in _tensors(args)))
                return func(*args, **kwargs)

        self.mode = _Mode()

    @staticmethod
    def _group_key(g) -> str:
        if g is None:
            return ""
        try:
            from torch.distributed import ProcessGroup

            if not isinstance(g, ProcessGroup):
                g = ProcessGroup.unbox(g)
            return g.group_name
        except Exception:  # noqa: BLE001 - a group object of another torch version: by identity
            return str(id(g))

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _tensors(args):
    from torch.utils._pytree import tree_flatten

    return [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]


def _find_group(args):
    from torch.utils._pytree import tree_flatten

    for a in tree_flatten(args)[0]:
        if isinstance(a, torch.ScriptObject) or type(a).__name__ in ("ProcessGroup", "ScriptObject"):
            return a
    return None


@dataclass
class Plan:
    world: int
    rank: int
    replicate: int
    shard: int
    per_rank_batch: int
    accum_steps: int
    global_batch: int
    lr: float
    steps_per_epoch: tuple | None
    """(optimizer steps, samples) of one epoch, when the data set is on this machine."""
    params_total: int
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    gathered_param_bytes: int
    trainable_padded: int
    padded_total: int
    collectives: Collectives
    shard_shapes_ok: bool
    peak_gib: float | None
    gpu_memory_gib: float
    param_dtype: str
    shard_elements: list = field(default_factory=list)
    """Elements each shard index (a rank of the shard group) holds: they add up to the model."""
    local_elements: int = 0
    seconds: float = 0.0
    notes: list = field(default_factory=list)


_REHEARSED: dict[tuple[int, int], int] = {}  # (world, replicate) -> the rank this process rehearsed


def _cuda_config(cfg: Config) -> Config:
    """The config as the GPU job runs it, on this CPU: device cpu, the CUDA precision resolved (auto = bf16), no
    compile (not rehearsed), no CUDA graph capture."""
    t = cfg.train
    precision = "bf16" if t.precision == "auto" else t.precision
    return dataclasses.replace(cfg, train=dataclasses.replace(t, device="cpu", precision=precision, compile=False,
                                                              cuda_graph=False, fsdp="auto"))


def rehearse(cfg: Config, world: int, rank: int = 0, gpu_memory_gib: float = 80.0, gpus_per_node: int = 8,
             estimate_memory: bool = True) -> Plan:
    """Build rank `rank` of a `world`-rank job on a fake process group and run one step on fake tensors."""
    import time

    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from kernels.noise import make_noise

    from .parallel import DistContext, fsdp_replicas
    from .step import build_training

    t0 = time.perf_counter()
    if world < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ConfigError(f"--rank must be in [0, {world - 1}] for --world-size {world}, got {rank}")
    r = cfg.parallel.replicate
    if world % r:
        raise ConfigError(f"parallel.replicate={r} does not divide the world size {world}: HSDP needs replicas of "
                          "equal shards")
    if dist.is_initialized():
        raise ConfigError("a process group is already up in this process; the rehearsal starts its own")
    key = (world, r)
    if _REHEARSED.get(key, rank) != rank:  # torch keeps per-process state of a mesh of that shape (its coordinates)
        raise ConfigError(f"this process already rehearsed rank {_REHEARSED[key]} of a {world}-rank job with "
                          f"parallel.replicate={r}; rehearse rank {rank} in a new process (as `mae pretrain --dry-run "
                          "--rank K` does)")
    _REHEARSED[key] = rank
    rcfg = _cuda_config(cfg)
    t = rcfg.train
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % gpus_per_node),
           "LOCAL_WORLD_SIZE": str(min(gpus_per_node, world))}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ctx = DistContext(rank, world, rank % gpus_per_node, True)
        device = torch.device("cpu")
        training = build_training(rcfg, ctx, device, strict=False)
        model, opt = training.model, training.optimizer
        from torch.distributed.tensor import DTensor

        params = list(model.parameters())
        mesh = next((p.device_mesh for p in params if isinstance(p, DTensor)), None)
        groups = {}
        if mesh is not None:
            names = mesh.mesh_dim_names or (("shard",) if mesh.ndim == 1 else tuple(f"dim{i}" for i in range(mesh.ndim)))
            groups = {n: mesh.get_group(i) for i, n in enumerate(names)}
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        shard = world // r
        # FSDP2 splits each parameter's first dimension as torch.chunk does: ceil(d0 / shard) rows a rank, the last
        # ranks short or empty; what every shard index holds, in elements (the rehearsed rank's is measured)
        per_shard = [0] * shard
        for prm in params:
            d0 = prm.shape[0] if prm.dim() else 1
            rest, c = prm.numel() // max(1, d0), -(-d0 // shard)
            for i in range(shard):
                per_shard[i] += max(0, min(c, d0 - i * c)) * rest
        mine = sum(x.numel() for x in local)
        if mine != per_shard[(rank % shard) if r > 1 else rank]:
            shapes_note = f"this rank holds {mine} elements, the chunk rule says {per_shard[rank % shard]}"
        else:
            shapes_note = None
        param_bytes = sum(_nbytes(x) for x in local)
        padded = sum(-(-p.shape[0] // shard) * shard * (p.numel() // max(1, p.shape[0])) if p.dim() else p.numel()
                     for p in params)
        trainable_padded = sum(-(-p.shape[0] // shard) * shard * (p.numel() // max(1, p.shape[0])) if p.dim()
                               else p.numel() for p in params if p.requires_grad)
        pdtype = torch.bfloat16 if t.precision in ("bf16", "bf16-pure", "fp8") else torch.float32
        m = rcfg.model
        b = t.batch_size
        counter = CollectiveCounter({"world": dist.group.WORLD, **groups})  # a mesh dimension names its group
        shapes_ok = True
        with FakeTensorMode(allow_non_fake_inputs=True):
            imgs = torch.randn(b, m.in_chans, m.img_size, m.img_size, dtype=getattr(torch, rcfg.data.dtype))
            gen = torch.Generator().manual_seed(0)
            noise = make_noise(m.mask_strategy, b, m.grid_size, m.mask_ratio, gen, "cpu")
            with counter:
                training.plain.body([(imgs, noise)] * t.accum_steps, m.mask_ratio)
            for p in params:  # every gradient the shape of its shard (FSDP2's reduce-scatter output)
                if p.requires_grad:
                    g = p.grad
                    if g is None or tuple((g.to_local() if isinstance(g, DTensor) else g).shape) != tuple(
                            (p.to_local() if isinstance(p, DTensor) else p).shape):
                        shapes_ok = False
            opt.zero_grad(set_to_none=True)
        grad_bytes = sum(x.numel() * 4 for p, x in zip(params, local) if p.requires_grad)  # fp32 gradient shards
        optim_bytes = sum(x.numel() * 4 * 2 for p, x in zip(params, local) if p.requires_grad)  # AdamW: 2 fp32
        steps = _steps_per_epoch(rcfg, world)
        peak = None
        notes = []
        if estimate_memory:
            peak, note = _peak_per_gpu(rcfg, param_bytes + grad_bytes + optim_bytes, model, pdtype)
            notes.append(note)
        plan = Plan(world, rank, r, shard, b, t.accum_steps, b * t.accum_steps * world,
                    rcfg.optim.scaled_lr(b * t.accum_steps * world), steps, sum(p.numel() for p in params),
                    param_bytes, grad_bytes, optim_bytes, padded * pdtype.itemsize, trainable_padded, padded,
                    counter.counts, shapes_ok and shapes_note is None, peak, gpu_memory_gib,
                    str(pdtype).replace("torch.", ""), per_shard, mine, notes=notes + ([shapes_note] if shapes_note
                                                                                         else []))
        assert fsdp_replicas(model) == r or not dist.is_initialized()
    finally:
        dist.destroy_process_group()
        # the fake groups stay registered by name after destroy: a later rehearsal in this process (another rank
        # of the same world size) would be handed this one's group, with this rank's coordinates
        unregister = getattr(torch._C._distributed_c10d, "_unregister_all_process_groups", None)
        if unregister is not None:
            unregister()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    plan.seconds = time.perf_counter() - t0
    return plan


def _steps_per_epoch(cfg: Config, world: int) -> tuple[int, int] | None:
    """Optimizer steps per epoch when the data set can be counted here (a folder or a packed dataset that exists on
    this machine, or the embedded photographs); None otherwise."""
    from pipelines.common import EMBEDDED_SAMPLES_PER_EPOCH, DataError, list_images

    d = cfg.data
    per_step = cfg.train.batch_size * cfg.train.accum_steps * world
    try:
        if not d.path:
            n = EMBEDDED_SAMPLES_PER_EPOCH
        else:
            from pipelines.shards import find_manifest, open_shards

            n = len(open_shards(d.path)) if find_manifest(d.path) else len(list_images(d.path, d.quarantine)[0])
            n *= max(1, d.repeat)
    except (DataError, OSError):
        return None
    return n // per_step, n


def _peak_per_gpu(cfg: Config, sharded_resident: int, model, pdtype) -> tuple[float, str]:
    """The single-device eager step's activations from `mae bench memory`'s estimator at the per-rank batch, plus
    this rank's sharded parameters, gradients and optimizer state, plus two unsharded blocks in the compute dtype
    (FSDP2 gathers one unit while the next is prefetched)."""
    from .memory import estimate_step

    t = cfg.train
    est = estimate_step(cfg.model, "mae", t.batch_size, cfg.model.mask_ratio,
                        precision={"bf16": "autocast"}.get(t.precision, t.precision if t.precision in (
                            "bf16-pure", "fp8") else "autocast"),
                        attention=t.attention if t.attention in ("auto", "math", "encoder-math") else "auto",
                        checkpoint_blocks=t.checkpoint_blocks, checkpoint_decoder_blocks=t.checkpoint_decoder_blocks,
                        activation_checkpointing=t.activation_checkpointing)
    unit = max(sum(p.numel() for p in blk.parameters()) for blk in list(model.blocks) + list(model.decoder_blocks))
    peak = est.peak_gib - est.resident_gib + sharded_resident / GIB + 2 * unit * pdtype.itemsize / GIB
    return peak, ("peak per GPU = the single-device step's peak less its resident bytes (estimator, "
                  f"{est.peak_gib:.2f} - {est.resident_gib:.2f} GiB) + this rank's shards + two gathered blocks")


def describe(plan: Plan, cfg: Config) -> str:
    """The plan, as `mae pretrain --dry-run` prints it."""
    mesh = (f"HSDP {plan.replicate} replicas x {plan.shard} shards (2-D mesh replicate x shard)" if plan.replicate > 1
            else f"FSDP2 over {plan.world} ranks (1-D mesh)")
    c = plan.collectives
    lines = [f"dry run of rank {plan.rank} of {plan.world} ({cfg.preset}); nothing touched a GPU; {plan.seconds:.0f} s",
             f"  mesh: {mesh}",
             f"  batch: {plan.per_rank_batch} per rank x {plan.accum_steps} accumulation x {plan.world} ranks = "
             f"global {plan.global_batch}; lr {plan.lr:.3g}"
             + ("" if cfg.optim.lr > 0 else f" (= base {cfg.optim.base_lr:g} x {plan.global_batch}/256)"),
             "  steps per epoch: " + (
                 "unknown (the data set is not on this machine)" if plan.steps_per_epoch is None else
                 f"{plan.steps_per_epoch[0]} ({plan.steps_per_epoch[1]} samples"
                 + (", fewer than one global batch" if not plan.steps_per_epoch[0] else "") + ")"),
             f"  parameters: {plan.params_total / 1e6:.1f}M; this rank holds {plan.param_bytes / GIB:.3f} GiB of "
             f"parameters (fp32 shards), {plan.grad_bytes / GIB:.3f} GiB of gradients, {plan.optim_bytes / GIB:.3f} "
             f"GiB of AdamW state; computes in {plan.param_dtype}",
             f"  gradients: every one the shape of its shard: {'yes' if plan.shard_shapes_ok else 'NO'}",
             "  collectives of one step (this rank, as issued; a collective moves (n-1)/n of its bytes per rank):"]
    for key in sorted(c.calls):
        lines.append(f"    {key:28s} {c.calls[key]:5d} calls  {c.bytes[key] / GIB:9.3f} GiB")
    pad = plan.padded_total - plan.params_total
    if pad:
        lines.append(f"  padding: FSDP2 pads each parameter's first dimension to a multiple of {plan.shard}: "
                     f"{pad / plan.padded_total:.1%} of the gathered elements are padding ({pad / 1e6:.1f}M; a "
                     "parameter whose first dimension is 1, such as the position embeddings [1, L, D], is padded "
                     f"{plan.shard}-fold)")
    if plan.peak_gib is not None:
        fits = plan.peak_gib <= plan.gpu_memory_gib
        lines.append(f"  peak memory per GPU (estimate): {plan.peak_gib:.1f} GiB of {plan.gpu_memory_gib:g} GiB: "
                     + ("fits" if fits else "DOES NOT FIT"))
    lines += [f"  note: {n}" for n in plan.notes]
    lines.append("  not rehearsed: losses and numerics (a fake group moves no data), speed, NCCL / cuBLAS behaviour, "
                 "torch.compile")
    return "\n".join(lines)


def run_dry(cfg: Config, world: int, rank: int, gpu_memory_gib: float) -> int:
    plan = rehearse(cfg, world, rank, gpu_memory_gib)
    print(describe(plan, cfg), flush=True)
    if not plan.shard_shapes_ok:
        raise ConfigError("the rehearsal found a gradient that is not the shape of its parameter's shard")
    if plan.peak_gib is not None and plan.peak_gib > gpu_memory_gib:
        raise ConfigError(f"the step's estimated peak of {plan.peak_gib:.1f} GiB per GPU is over the GPU's "
                          f"{gpu_memory_gib:g} GiB (--gpu-memory-gib); lower train.batch_size (with "
                          "train.accum_steps to keep the global batch) or recompute blocks "
                          "(train.checkpoint_blocks)")
    return 0

"""Building the model a run trains (build_parallel_model): on the meta device, then the levers of engine/levers.py
(activation checkpointing, the attention path, the float8 GEMMs, regional torch.compile), FSDP2 `fully_shard` per
block and the root, materialisation, the layer norm; plus the process-group set-up for torchrun. The model file knows
nothing of any of it.

The model is built on the meta device and materialised after sharding, so ViT-H and larger never exist
whole in fp32 on one rank: each parameter's initial value is computed alone and only this rank's shard
is kept. Everything distributed lives here.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import Config
from .device import resolve_device, resolve_dtype
from .levers import apply_levers
from .model import MaskedAutoencoderViT, build_model


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False
    """True under torchrun (any world size): FSDP2 and sharded (DCP) checkpoints."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_distributed(device_pref: str = "auto", timeout_s: int = 600, fsdp: str = "auto") -> tuple[DistContext, torch.device]:
    """Initialise the default process group from torchrun's environment (nccl on CUDA, gloo on CPU).

    fsdp="always" without torchrun starts a one-process group, so a single device trains through FSDP2 too
    (bf16 parameters with fp32 master weights and sharded checkpoints); "never" refuses torchrun.
    """
    from .config import ConfigError

    if not launched_by_torchrun():
        if fsdp != "always":
            return DistContext(), resolve_device(device_pref)
        one = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        one.update({k: v for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())))
                    if k not in os.environ})  # a rendezvous address the user set is kept
        _ONE_PROCESS_ENV.update({k: os.environ.get(k) for k in one if k not in _ONE_PROCESS_ENV})
        os.environ.update(one)
    elif fsdp == "never":
        raise ConfigError("train.fsdp=never, but this is a torchrun job: multi-process training here is FSDP2; "
                          "use --train.fsdp auto")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_pref)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return DistContext(rank, world, local, True), device


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(device_pref: str, fsdp: str, build, done) -> int:
    """A run from start to exit status: the process group (torchrun's, or none), the run `build(ctx, device)` makes,
    its fit(), `done(result)` on rank 0 when it finished, 128 + the signal's number when a signal stopped it (143,
    138, 130), and the teardown (`mae pretrain`, `mae finetune`, `mae linprobe`)."""
    ctx, device = init_distributed(device_pref, fsdp=fsdp)
    run = None
    try:
        run = build(ctx, device)
        result = run.fit()
        if result.interrupted:
            import signal

            sig = getattr(signal, result.interrupted, None) if result.interrupted.startswith("SIG") else None
            return 128 + int(sig if sig is not None else signal.SIGTERM)
        if ctx.is_main:
            done(result)
    finally:
        # free the model, optimizer and loader (FSDP2 state sits in reference cycles) while the interpreter and
        # the process group are alive: collective work objects left for interpreter shutdown can take the
        # process down in the communication library's threads after a successful run
        run = None
        import gc

        gc.collect()
        destroy_distributed()
    return 0


# what the environment held before a one-process group (train.fsdp always) set torchrun's variables: restored at
# teardown, so that a later run in this process (the Python API, a test) is not taken for a torchrun job
_ONE_PROCESS_ENV: dict[str, str | None] = {}


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in _ONE_PROCESS_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _ONE_PROCESS_ENV.clear()


# ----------------------------------------------------------------------------------------------------------


def device_mesh(device: torch.device, world: int, replicate: int = 1):
    """The ranks' mesh: 1-D (plain FSDP2) or, with replicate R > 1, 2-D (R, world / R) named ("replicate", "shard"):
    consecutive ranks (a node's GPUs under torchrun) form one shard group."""
    from torch.distributed.device_mesh import init_device_mesh

    from .config import ConfigError

    if replicate < 1 or world % replicate:
        raise ConfigError(f"parallel.replicate={replicate} must divide the world size {world} (the ranks form "
                          f"{replicate} groups of equal size)")
    if replicate == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def fsdp_replicas(model: nn.Module) -> int:
    """On how many ranks each shard of the model lives: 1 under plain FSDP2 (and without FSDP), R under HSDP."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor):
            n = 1
            for size, placement in zip(p.device_mesh.shape, p.placements):
                if placement.is_replicate():
                    n *= size
            return n
    return 1


def apply_fsdp(model: MaskedAutoencoderViT, param_dtype: torch.dtype | None, reshard_after_forward: bool = True,
               mesh=None):
    """fully_shard every encoder and decoder block, then the root, over `mesh` (default: every rank; a 2-D mesh
    from device_mesh(..., replicate=R) gives hybrid sharding: shard within a group, replicate across groups,
    gradients reduce-scattered in the group and all-reduced across groups).

    param_dtype=bfloat16 gives MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): blocks compute
    with bf16 weights gathered once per step, gradients are reduced in fp32 into fp32 master shards.
    The root does not cast its inputs (images stay fp32 for the loss target; the noise stays fp32).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False) if param_dtype else MixedPrecisionPolicy(
        cast_forward_inputs=False)
    kw = {} if mesh is None else {"mesh": mesh}
    for blk in list(model.blocks) + list(model.decoder_blocks):
        fully_shard(blk, mp_policy=mp, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, mp_policy=root_mp, reshard_after_forward=reshard_after_forward, **kw)
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(model, "forward_features")  # evaluation (kNN monitor) outside forward()
    return model


@torch.no_grad()
def materialize(model: MaskedAutoencoderViT, device: torch.device, seed: int) -> None:
    """Allocate a meta-built (possibly sharded) model on `device` and give every parameter its initial
    value; for a DTensor only this rank's shard is written (no communication, no full-model tensor)."""
    from torch.distributed.tensor import DTensor

    model.to_empty(device=device)
    for name, p in model.named_parameters():
        full = model.initial_value(name, tuple(p.shape), seed)
        if isinstance(p, DTensor):
            p.copy_(_distribute_local(full.to(device=device, dtype=p.dtype), p))
        else:
            p.copy_(full.to(p.dtype))


def _distribute_local(full: torch.Tensor, like):
    """`full` (identical on every rank) as a DTensor with `like`'s mesh and placements, split locally."""
    from torch.distributed.tensor import distribute_tensor

    try:
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    except TypeError:  # older torch without src_data_rank: scatters from rank 0 (same values everywhere)
        return distribute_tensor(full, like.device_mesh, like.placements)


def build_parallel_model(cfg: Config, ctx: DistContext, device: torch.device) -> nn.Module:
    """Meta build -> the levers of engine/levers.py's `model` stage in table order (activation checkpointing,
    attention path, float8, regional compile) -> FSDP2 (under torchrun) -> materialise -> the `after` stage (apex
    LayerNorm). engine.step.build_training adds the optimizer and
    the step; call that unless only the module is wanted."""
    t = cfg.train
    with _outside_dispatch_modes(), torch.device("meta"):  # shapes only: no mode needs to see the skeleton
        model = build_model(cfg.model)
    apply_levers(model, cfg, ctx, "model")  # checkpointing, attention path, float8, regional compile (engine/levers.py)
    if ctx.distributed:
        mesh = device_mesh(device, ctx.world, cfg.parallel.replicate) if cfg.parallel.replicate > 1 else None
        apply_fsdp(model, resolve_dtype(t.precision, device), mesh=mesh)
    materialize(model, device, t.seed)
    apply_levers(model, cfg, ctx, "after")  # apex LayerNorm (where it may run: engine.levers.check_levers)
    return model


def _outside_dispatch_modes():
    """Leave active dispatch modes for the meta build (the memory estimator runs the build under a fake-tensor
    mode, whose meta tensors could not be swapped for real-device ones by `to_empty`)."""
    import contextlib

    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:  # pragma: no cover - a torch without it: nothing to leave
        return contextlib.nullcontext()
    return _disable_current_modes()


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce when a process group is up (no host sync on NCCL); identity otherwise."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

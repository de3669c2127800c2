import os
import random
import sys
import types
from pathlib import Path

import torch

# Triton kernels run on the CPU under the interpreter when there is no GPU; the flag must be set before
# `kernels` is imported (kernels are decorated at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from torch import nn

from engine.config import apply_overrides, debug

if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite's workers share the cores: one thread each, and their runs too
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_environ():
    """Whatever a test sets in os.environ (a monkeypatch-free setenv, a run that failed before its teardown gave back
    the torchrun variables of a one-process group) must not reach later tests or their subprocesses."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def debug_cfg(run_dir, **overrides):
    """The debug preset for tests: embedded photographs, main-process loading, no TensorBoard, CPU."""
    base = {"train.run_dir": str(run_dir), "data.num_workers": "0", "train.tensorboard": "false",
            "train.device": "cpu", "train.progress": "false", "data.backend": "torchvision"}
    base.update({k: str(v) for k, v in overrides.items()})
    return apply_overrides(debug(), base)


class StandInFusedLayerNorm(nn.Module):
    """apex.normalization.FusedLayerNorm's constructor and parameters, computed with torch ops."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape = tuple(shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape))
            self.bias = nn.Parameter(torch.empty(self.normalized_shape))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        dims = tuple(range(-len(self.normalized_shape), 0))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, keepdim=True, unbiased=False)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.elementwise_affine else y


@pytest.fixture
def stand_in_apex(monkeypatch):
    apex = types.ModuleType("apex")
    norm = types.ModuleType("apex.normalization")
    norm.FusedLayerNorm = StandInFusedLayerNorm
    apex.normalization = norm
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.normalization", norm)
    return StandInFusedLayerNorm


def spike_loss(trainer, from_call: int, until_call: int, factor: float = 100.0):
    """Scale the loss on forward calls [from_call, until_call): a finite spike the optimizer applies (divergence
    tests)."""
    model, calls, orig = trainer.model, {"n": 0}, trainer.model.forward_loss

    def forward_loss(imgs, pred, mask, **kw):
        calls["n"] += 1
        loss = orig(imgs, pred, mask, **kw)
        return loss * factor if from_call <= calls["n"] < until_call else loss

    model.forward_loss = forward_loss


def sitecustomize_env(tmp_path, code: str, **env) -> dict:
    """os.environ for a Python run that executes `code` before anything else (a sitecustomize.py in a shim directory
    ahead of the project's root on its PYTHONPATH), plus `env`."""
    shim = Path(tmp_path) / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(code)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(Path(__file__).resolve().parents[1])]), **env)


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group in this process (the code path of every rank of a torchrun job), torn down
    after the test."""
    import torch.distributed as dist

    from engine.parallel import _free_port

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()

import os
import random

import torch

# Triton kernels run on the CPU under the interpreter when there is no GPU; the flag must be set before
# `kernels` is imported (kernels are decorated at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from engine.config import apply_overrides, debug

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def debug_cfg(run_dir, **overrides):
    """The debug preset for tests: embedded photographs, main-process loading, no TensorBoard, CPU."""
    base = {"train.run_dir": str(run_dir), "data.num_workers": "0", "train.tensorboard": "false",
            "train.device": "cpu", "train.progress": "false", "data.backend": "torchvision"}
    base.update({k: str(v) for k, v in overrides.items()})
    return apply_overrides(debug(), base)

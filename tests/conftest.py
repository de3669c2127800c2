import os
import random

import numpy as np
import pytest
import torch

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

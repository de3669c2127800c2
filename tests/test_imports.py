"""`kernels` is also the name of an unrelated PyPI package: make sure the project's own modules win."""

from pathlib import Path

import engine
import kernels
import pipelines

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_packages_are_this_project():
    for mod in (engine, kernels, pipelines):
        assert Path(mod.__file__).resolve().parent.parent == ROOT, mod.__file__
    assert kernels.MAE_ENGINE_KERNELS and pipelines.MAE_ENGINE_PIPELINES
    assert callable(kernels.random_masking) and callable(kernels.norm_pix_mse)


def test_kernels_does_not_import_engine_or_pipelines():
    # data flows one way: engine imports kernels and pipelines, never the reverse
    for pkg in ("kernels", "pipelines"):
        for f in (ROOT / pkg).glob("*.py"):
            text = f.read_text()
            assert "from engine" not in text and "import engine" not in text, f

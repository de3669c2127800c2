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


def _imports(path: Path, pkg: str) -> set[str]:
    """Project modules a file imports, at module level or inside functions ('engine.x', 'kernels', ...)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import y
                names = [f"{pkg}.{node.module}"] if node.module else [f"{pkg}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            out.update(n for n in names if n.split(".")[0] in ("engine", "kernels", "pipelines", "benchmarks"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] in ("engine", "kernels", "pipelines",
                                                                             "benchmarks"))
    return out


def _graph() -> dict[str, set[str]]:
    g = {}
    for pkg in ("engine", "kernels", "pipelines", "benchmarks"):
        for f in (ROOT / pkg).glob("*.py"):
            mod = pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"
            g[mod] = {m for m in _imports(f, pkg) if m != mod}
    return g


def test_the_house_reads_one_way():
    """kernels <- pipelines <- engine <- benchmarks, and no module of a package imports, at any depth (function
    bodies included), a module that imports it back."""
    g = _graph()
    rank = {"kernels": 0, "pipelines": 1, "engine": 2, "benchmarks": 3}
    for mod, deps in g.items():
        for d in deps:
            assert rank[d.split(".")[0]] <= rank[mod.split(".")[0]], f"{mod} imports {d}, a layer above it"
    # no cycles among modules (package __init__ re-exports of its own modules excepted)
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in g.get(m, ()):
            if d not in g or d == m.split(".")[0]:
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [d]))
            if not state.get(d):
                visit(d, path + [d])
        state[m] = 2

    for m in g:
        if not state.get(m):
            visit(m, [m])


def test_layering_check_catches_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: a function-level import back into a module that imports it is a cycle."""
    g = _graph()
    g["engine.config"] = g["engine.config"] | {"engine.trainer"}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: g)
    import pytest

    with pytest.raises(AssertionError, match="import cycle"):
        test_the_house_reads_one_way()

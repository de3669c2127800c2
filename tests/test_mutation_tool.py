"""tools/mutation.py (issue 28) stays runnable: every target and its tests exist, and the configuration it writes
is the [tool.mutmut] table mutmut reads (one source file, its tests, forkserver isolation)."""

import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("mutation_tool", ROOT / "tools" / "mutation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_target_and_its_tests_exist():
    tool = _tool()
    for target, tests in tool.TARGETS.items():
        assert (ROOT / target).is_file(), target
        files = [t.split("::")[0] for t in tests if t.startswith("tests/")]
        assert files and all((ROOT / t).is_file() for t in files), (target, tests)
    assert set(tool.TARGETS_WANTED) <= set(tool.TARGETS)


def test_the_written_configuration_is_what_mutmut_reads(tmp_path):
    tool = _tool()
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    tool.configure(tmp_path, "kernels/noise.py", ["tests/test_mask_strategies.py"])
    conf = tomllib.loads((tmp_path / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert conf["source_paths"] == ["kernels/noise.py"]
    assert conf["pytest_add_cli_args_test_selection"] == ["tests/test_mask_strategies.py"]
    assert conf["process_isolation"] == "forkserver"
    assert tomllib.loads((tmp_path / "pyproject.toml").read_text())["project"]["name"] == "mae-engine"

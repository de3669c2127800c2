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


def test_a_run_of_some_files_keeps_the_days_rows_of_the_others(tmp_path):
    tool = _tool()

    def row(f, killed):
        return {"file": f, "tests": [], "made": 10, "killed": killed, "survived": 10 - killed, "equivalent": 0,
                "timeout": 0, "no tests": 0, "not checked": 0, "kill_rate": killed / 10, "kill_rate_cpu": None,
                "wanted": 0.85, "seconds": 60, "finished": True, "survivors": {}}

    tool.write_report([row("engine/health.py", 9)], tmp_path)
    tool.write_report([row("kernels/masking.py", 8)], tmp_path)
    tool.write_report([row("kernels/noise.py", 7), row("engine/health.py", 10)], tmp_path)
    (day,) = tmp_path.glob("mutation_*.json")
    import json

    rows = json.loads(day.read_text())
    assert [(r["file"], r["killed"]) for r in rows] == [("kernels/noise.py", 7), ("engine/health.py", 10),
                                                         ("kernels/masking.py", 8)]  # TARGETS' order, newest kept
    md = day.with_suffix(".md").read_text()
    assert "`kernels/masking.py`" in md and "`engine/health.py`" in md

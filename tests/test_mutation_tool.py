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


def test_a_recheck_moves_the_survivors_new_tests_kill_and_keeps_the_rest(monkeypatch):
    tool = _tool()
    eq = next(n for n in tool.EQUIVALENT if n.startswith("engine.checkpoint."))
    row = tool.rates({"file": "engine/checkpoint.py", "tests": [], "made": 10, "killed": 5, "survived": 4,
                      "timeout": 1, "no tests": 0, "not checked": 0, "seconds": 600, "finished": True,
                      "survivors": {"a": "-x", "b": "-y", "c": "-z", eq: "-w"}})
    assert row["kill_rate"] == 0.7  # 5 killed + 1 timed out + 1 equivalent of 10
    asked = []

    def run_file(target, tests, max_children, timeout_s, only=None):
        asked.append(list(only))
        return {"outcome": {"a": "killed", "b": "survived", "c": "timeout", "u1": "killed", "u2": "survived"},
                "seconds": 90, "survivors": {"b": "-y", "u2": "-v"}}

    monkeypatch.setattr(tool, "run_file", run_file)
    again = tool.recheck({**row, "unchecked": ["u1", "u2", "u3"], "not checked": 3}, 2, 60)
    assert asked == [["a", "b", "c", "u1", "u2", "u3"]]  # the equivalent survivor is not run again
    assert (again["killed"], again["timeout"], again["survived"], again["not checked"]) == (7, 2, 3, 1)
    assert set(again["survivors"]) == {"b", eq, "u2"} and again["survivors"]["u2"] == "-v"
    assert again["kill_rate"] == round(10 / 12, 4) and again["unchecked"] == ["u3"] and not again["finished"]
    assert again["rechecked"] == {"mutants": 3, "killed now": 2, "unchecked run": 2} and again["seconds"] == 690
    older = tool.recheck({**row, "not checked": 5}, 2, 60)  # an older row names none of its 5 unchecked mutants
    assert older["not checked"] == 5 and not older["finished"]


def test_a_new_days_report_carries_the_files_not_run_with_the_day_they_ran(tmp_path):
    import json

    tool = _tool()
    old = tool.rates({"file": "engine/health.py", "tests": [], "made": 4, "killed": 4, "survived": 0, "timeout": 0,
                      "no tests": 0, "not checked": 0, "seconds": 60, "finished": True, "survivors": {}})
    (tmp_path / "mutation_2026-01-01.json").write_text(json.dumps([old]))
    new = {**old, "file": "kernels/noise.py", "killed": 3, "survived": 1, "survivors": {"n": "-x"}}
    path = tool.write_report([tool.rates(new)], tmp_path)
    rows = json.loads(path.with_suffix(".json").read_text())
    assert [(r["file"], r["date"]) for r in rows] == [("kernels/noise.py", path.stem.removeprefix("mutation_")),
                                                      ("engine/health.py", "2026-01-01")]
    assert "| `engine/health.py` | 2026-01-01 |" in path.read_text()


def test_a_scoped_file_counts_the_mutants_of_its_named_functions_only():
    import ast

    tool = _tool()
    assert set(tool.SCOPE) <= set(tool.TARGETS)
    for target, patterns in tool.SCOPE.items():  # every function a pattern names is in its file
        tree = ast.parse((ROOT / target).read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
            f"{c.name}.{f.name}" for c in tree.body if isinstance(c, ast.ClassDef) for f in c.body
            if isinstance(f, ast.FunctionDef)}
        assert {tool._function(p) for p in patterns} <= defined, target
    assert tool.in_scope("pipelines/common.py", "pipelines.common.xǁEpochPlanǁbatches__mutmut_3")
    assert tool.in_scope("pipelines/common.py", "pipelines.common.x_sample_crop__mutmut_12")
    assert not tool.in_scope("pipelines/common.py", "pipelines.common.x_list_images__mutmut_3")
    assert not tool.in_scope("pipelines/common.py", "pipelines.common.x_sample_crop_other__mutmut_1")
    assert tool.in_scope("kernels/noise.py", "kernels.noise.x_anything__mutmut_1")  # not scoped: all of it


def test_every_hand_planted_bug_of_tests_mutate_still_finds_its_line_and_its_tests():
    """tests/mutate.py plants each bug by replacing an exact line: the line must still be there, and the tests
    named to catch it must exist (a moved function would otherwise leave the entry planting nothing)."""
    import sys

    spec = importlib.util.spec_from_file_location("mutate_by_hand", ROOT / "tests" / "mutate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mutate_by_hand"] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules["mutate_by_hand"]
    for m in mod.MUTANTS:
        src = (ROOT / m.file).read_text()
        assert m.old in src, (m.name, m.file)  # every occurrence is replaced
        for t in m.tests:
            path, _, name = t.partition("::")
            assert (ROOT / path).is_file(), (m.name, t)
            assert not name or f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), (m.name, t)

"""benchmarks/device_check.sh runs only on a GPU machine, where a typo costs device time: hold every name it uses
(modules, speed suites, lever sets, CUDA-check filters, presets) to what exists, and each section to its budget."""

import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "benchmarks" / "device_check.sh").read_text()


def test_the_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_name_it_uses_exists():
    from benchmarks.cuda_checks import CHECKS
    from benchmarks.levers import CONFIGS, SPEED_SUITES
    from engine.config import ALIASES, PRESETS

    for mod in set(re.findall(r"-m (benchmarks\.\w+)", SCRIPT)):
        assert hasattr(importlib.import_module(mod), "main"), mod
    for suite in re.findall(r"--speed-suite (\S+)", SCRIPT):
        assert suite in SPEED_SUITES, suite
    for cfg in re.findall(r"--config (\S+)", SCRIPT):
        assert cfg in CONFIGS, cfg
    for preset in re.findall(r"--(?:models|preset) (\S+)", SCRIPT):
        for p in preset.split(","):
            assert p in PRESETS or p in ALIASES, p
    names = [c[0] for c in CHECKS]
    for only in re.findall(r'--only "([^"]+)"', SCRIPT):
        for part in only.split(","):
            assert any(part in n for n in names) or part == "apex", part  # apex: only where it is installed


def _limits(section: str) -> int:
    """The sum of the step limits inside `if has <section>` blocks (and `has <section> && step ...` lines)."""
    total = 0
    for block in re.findall(r"if [^\n]*has " + re.escape(section) + r"\b[^\n]*\n(.*?)\nfi", SCRIPT, re.S):
        total += sum(int(x) for x in re.findall(r"\bstep \S+ (\d+)", block))
    total += sum(int(x) for x in re.findall(r"has " + re.escape(section) + r" && [^\n]*?\bstep \S+ (\d+)", SCRIPT))
    return total


@pytest.mark.parametrize("section,budget", [("trust-1", 540), ("trust-2", 540), ("dali", 420), ("fsdp-cuda", 110),
                                            ("fsdp-bench", 190), ("checks-new", 90), ("fp8", 540)])
def test_sections_fit_a_nine_minute_call(section, budget):
    assert 0 < _limits(section) <= budget, (section, _limits(section))

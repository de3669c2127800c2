"""A committed CPU figure names its machine and is regenerated when the code it measures changes (issue 29, "numbers
that match"): each CPU report records the digest of the code it ran (engine.report.code_digest over the benchmark's
MEASURED sources), and the newest report of each kind must carry the digest of the code as it is now. GPU reports
cannot be regenerated without a GPU; they carry their date and versions and are re-measured from PENDING.md."""

import json
from pathlib import Path

import pytest

from benchmarks import first_run, speedup
from engine import report

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
CPU_REPORTS = {
    "speedup_cpu_*.json": (speedup.MEASURED, "mae bench speedup --out benchmarks/results"),
    "first_run_cpu_*.json": (first_run.MEASURED, "mae bench first-run --out benchmarks/results"),
}


@pytest.mark.parametrize("pattern", sorted(CPU_REPORTS))
def test_the_newest_cpu_report_measured_this_code(pattern):
    measured, command = CPU_REPORTS[pattern]
    found = sorted(RESULTS.glob(pattern))
    assert found, f"no {pattern} in {RESULTS}: run `{command}`"
    env = json.loads(found[-1].read_text())["environment"]
    now = report.code_digest(measured)
    assert env.get("code") == now, (f"{found[-1].name} measured other code (digest {env.get('code')}, now {now}): "
                                    f"the code it measures changed; regenerate it with `{command}`")
    assert env.get("cpu_model") and env.get("torch_threads") and env.get("cpu_count"), "a CPU figure names its machine"


def test_the_digest_follows_every_byte_and_name(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "ROOT", tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    first = report.code_digest(["pkg", "b.py"])
    assert report.code_digest(["b.py", "pkg"]) == first  # the order of the list does not matter
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    second = report.code_digest(["pkg", "b.py"])
    assert second != first
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "c.py")
    third = report.code_digest(["pkg", "b.py"])
    assert third != second  # a renamed file is another program
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    assert report.code_digest(["pkg", "b.py"]) == third  # only Python sources count

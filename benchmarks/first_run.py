"""`mae bench first-run`: the README's first command timed on this machine, beside the training step alone.

Runs `mae pretrain --preset tiny` (the embedded photographs, every default) in a fresh run directory as its own
process and reports the wall time from launch to exit, the time to its first log line, the run's img/s (the median
of its log lines), the held-out masked-patch error and the untrained model's; then, in the same call, the tiny
model's training step alone on synthetic input (`mae bench speedup --models tiny --modes mae`), so both figures come
from one machine at one time. The gap between them is what a run does besides the step: decoding and augmenting
the photographs on the same cores, the reconstruction grids and held-out scoring, start-up and the end.

Output: first_run_<device>_<date>.{json,md} in --out. The README's timing of the first run quotes this report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS
from engine.report import code_digest, env_block, environment, today, write_json

MEASURED = ("kernels", "pipelines", "engine/model.py", "engine/step.py", "engine/optim.py", "engine/trainer.py",
            "engine/config.py", "engine/visualize.py", "engine/attention.py", "engine/parallel.py",
            "engine/graphstep.py", "engine/mixed.py", "engine/device.py", "engine/health.py", "engine/metrics.py",
            "engine/loop.py", "engine/cli")
"""The code a first run executes: the report is stale when its digest changes (tests/test_reports_current.py)."""


def timed_run(argv: list[str], cwd: Path) -> dict:
    """Run `mae ARGV` in cwd: wall seconds to exit, seconds to the first 'step ' line, the output, the exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if first is None and line.startswith("step "):
            first = time.perf_counter() - start
    code = proc.wait()
    return {"code": code, "wall_s": round(time.perf_counter() - start, 1),
            "first_log_s": None if first is None else round(first, 1), "output": lines}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mae bench first-run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--work", default="", help="where the run directory goes (default: a temporary directory)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    env = environment("cpu")
    env["code"] = code_digest(MEASURED)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        run_dir = work / "runs" / "tiny"
        run = timed_run(["pretrain", "--preset", "tiny", "--run-dir", str(run_dir), "--train.progress", "false"],
                        work)
        if run["code"] != 0:
            print("\n".join(run["output"][-20:]), file=sys.stderr)
            print(f"mae bench first-run: error: the run exited with {run['code']}", file=sys.stderr)
            return 1
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        held = json.loads((run_dir / "recon" / "heldout.json").read_text())
        step = timed_run(["bench", "speedup", "--models", "tiny", "--modes", "mae", "--ratios", "0.75", "--batch",
                          "32", "--out", str(work / "speedup")], work)
        if step["code"] != 0:
            print("\n".join(step["output"][-20:]), file=sys.stderr)
            return 1
        rows = json.loads(next((work / "speedup").glob("speedup_*.json")).read_text())["rows"]
    step_row = next(r for r in rows if r.get("status") == "ok")
    rates = [r["img_per_s"] for r in recs if "img_per_s" in r]
    res = {"environment": env, "command": "mae pretrain --preset tiny", "wall_s": run["wall_s"],
           "first_log_s": run["first_log_s"], "steps": recs[-1]["step"], "run_img_per_s": statistics.median(rates),
           "heldout_error": held["heldout_error"], "untrained_heldout_error": held.get("untrained"),
           "step_alone_img_per_s": step_row["img_per_s"], "step_alone_batch": step_row["batch"],
           "step_alone_command": "mae bench speedup --models tiny --modes mae --ratios 0.75 --batch 32"}
    tag = f"first_run_{'cpu' if env['device'] == 'CPU' else env['device']}_{today()}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(res, out / f"{tag}.json")
    share = res["run_img_per_s"] / res["step_alone_img_per_s"]
    md = [f"# The first run, timed ({env['device']}, {env['date']})", "", env_block(env), "",
          "The README's first command, `mae pretrain --preset tiny` (embedded photographs, every default), in a fresh "
          "run directory, and in the same call the tiny model's training step alone on synthetic input.", "",
          "| figure | value |", "|---|---|",
          f"| wall time, launch to exit | {res['wall_s']} s |",
          f"| time to the first log line (step {recs[0]['step']}) | {res['first_log_s']} s |",
          f"| steps | {res['steps']} |",
          f"| the run's img/s (median of its log lines) | {res['run_img_per_s']:.1f} |",
          f"| held-out masked-patch error, trained / untrained | {res['heldout_error']:.3f} / "
          f"{res['untrained_heldout_error']:.3f} |",
          f"| the training step alone, synthetic input, batch {res['step_alone_batch']} (`{res['step_alone_command']}`)"
          f" | {res['step_alone_img_per_s']:.1f} img/s |", "",
          f"The run trains at {share:.0%} of the step-alone rate: the rest of each step's time goes to decoding and "
          "augmenting the photographs on the same cores (the loader's workers share them with the step), and the "
          "log interval also carries the reconstruction grids and the held-out scoring. The step-alone figure is "
          "the one `mae bench speedup` reports; the run's figure is what a user sees. Figures from another machine "
          "are not comparable with these.", "",
          f"Command: `mae bench first-run --out {args.out}`."]
    path = out / f"{tag}.md"
    path.write_text("\n".join(md) + "\n")
    print(f"first run: {res['wall_s']} s, {res['run_img_per_s']:.1f} img/s (the step alone: "
          f"{res['step_alone_img_per_s']:.1f}), held-out {res['heldout_error']:.3f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reports: the environment a figure was taken in, and the markdown / CSV / JSON / JSONL writers. Below both the
engine (ablations, run directories) and the benchmarks, which import it from here."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]


def code_digest(paths) -> str:
    """sha256 (16 hex digits) of the Python sources under `paths` (files or folders, relative to the repository
    root), names and bytes: a committed figure records the digest of the code it measured, and a test holds the
    CPU reports to the code as it is (tests/test_reports_current.py)."""
    import hashlib

    h = hashlib.sha256()
    files = []
    for rel in paths:
        p = ROOT / rel
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    for f in sorted(set(files)):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform's word for it): a CPU figure names its machine."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str | None = None) -> dict:
    """GPU (or 'CPU'), versions and date: what a reported figure must carry."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env["device"] = torch.cuda.get_device_name(dev)
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    else:
        env["device"] = "CPU"
    return env


def device_tag(env: dict) -> str:
    name = env.get("device", "CPU")
    for key in ("H200", "H100", "A100", "L40S", "B200"):
        if key in name:
            return key.lower()
    return "cpu" if name == "CPU" else name.lower().replace(" ", "-")[:20]


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def read_jsonl(path) -> list[dict]:
    """The records of a .jsonl file (blank lines skipped); ValueError naming the file and line of a bad one."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i}: not JSON ({e.msg})") from None
    return out


def write_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    return path


def md_table(rows: list[dict], cols: list[str], fmt: dict | None = None) -> str:
    fmt = fmt or {}

    def cell(r, c):
        v = r.get(c)
        if v is None or v == "":
            return "-"
        if c in fmt and isinstance(v, (int, float)):
            return fmt[c].format(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def env_block(env: dict) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in env.items() if v is not None)


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")

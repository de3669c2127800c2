"""Registers `mae bench {speedup,kernels,loader,dali-parity,fsdp,scaling,agreement,memory}` and `mae profile` with the `mae` command (for its
help; engine.cli.COMMANDS names this module); `dispatch` hands their arguments to the module untouched."""

from __future__ import annotations

import argparse
import sys

BENCHES = {"speedup": "benchmarks.speedup", "kernels": "benchmarks.kernels", "loader": "benchmarks.loader",
           "dali-parity": "benchmarks.dali_parity",
           "fsdp": "benchmarks.fsdp", "scaling": "benchmarks.scaling", "agreement": "benchmarks.agreement", "memory": "benchmarks.memory"}


def _run_module(module: str, argv: list[str]) -> int:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise SystemExit(f"mae: {module} is not available in this version")
        raise
    return int(mod.main(argv) or 0)


def register(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: speedup (visible-only vs dense), kernels, loader, dali-parity (GPU vs CPU "
                       "decode statistics), fsdp, scaling (a model of FSDP2 / HSDP at 8-1,024 GPUs), agreement (fast vs reference loss "
                       "curves), memory (a step's peak GPU memory, estimated without a GPU)",
                       add_help=False)
    b.add_argument("bench", choices=sorted(BENCHES), help="which benchmark (then its own --help)")
    b.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("profile", help="throughput, memory and top kernels per mask ratio for one config",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)


def dispatch(argv: list[str]) -> int | None:
    """`mae bench X ...` / `mae profile ...`: run the module with the rest of argv; None for other commands."""
    if not argv or argv[0] not in ("bench", "profile"):
        return None
    if argv[0] == "profile":
        return _run_module("benchmarks.profile", argv[1:])
    if len(argv) < 2 or argv[1] not in BENCHES:
        print(f"usage: mae bench {{{','.join(sorted(BENCHES))}}} [options]   (each with its own --help)",
              file=sys.stderr)
        return 0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2
    return _run_module(BENCHES[argv[1]], argv[2:])

"""Registers `mae bench {speedup,kernels,loader,fsdp,agreement,memory}` and `mae profile` with the `mae` command (for its
help); `engine.cli.main` hands their arguments to the module untouched."""

from __future__ import annotations

import argparse

BENCHES = {"speedup": "benchmarks.speedup", "kernels": "benchmarks.kernels", "loader": "benchmarks.loader",
           "fsdp": "benchmarks.fsdp", "agreement": "benchmarks.agreement", "memory": "benchmarks.memory"}


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
    b = sub.add_parser("bench", help="benchmarks: speedup (visible-only vs dense), kernels, loader, fsdp, agreement (fast vs reference loss "
                       "curves), memory (a step's peak GPU memory, estimated without a GPU)",
                       add_help=False)
    b.add_argument("bench", choices=sorted(BENCHES), help="which benchmark (then its own --help)")
    b.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("profile", help="throughput, memory and top kernels per mask ratio for one config",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)


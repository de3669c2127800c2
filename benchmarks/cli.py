"""Registers `mae bench {speedup,kernels,loader,dali-parity,fsdp,scaling,agreement,memory,first-run,finetune}` and `mae profile` with the `mae` command (for its
help; registered as the "mae.commands" entry point in pyproject.toml); `dispatch` hands their arguments to the module untouched."""

from __future__ import annotations

import argparse
import sys

BENCHES = {"speedup": "benchmarks.speedup", "kernels": "benchmarks.kernels", "loader": "benchmarks.loader",
           "dali-parity": "benchmarks.dali_parity",
           "fsdp": "benchmarks.fsdp", "scaling": "benchmarks.scaling", "agreement": "benchmarks.agreement", "memory": "benchmarks.memory",
           "first-run": "benchmarks.first_run", "finetune": "benchmarks.finetune_speed"}
SUMMARY = {
    "agreement": "fast path vs the paper's path: loss curves over the same steps, within a noise band",
    "dali-parity": "DALI GPU vs CPU decode: statistics of the same batches",
    "finetune": "fine-tuning / linear-probe steps of the published recipes: the engine vs the reference code's way",
    "first-run": "the README's first command timed on this machine, beside the training step alone (CPU)",
    "fsdp": "FSDP2 / HSDP: measured peak memory and step time beside the memory estimator's figures",
    "kernels": "masking, unshuffle, loss and attention kernels against their torch references (GPU time); "
               "--compile-only: compiled for sm_80 / sm_90 / sm_100 without a GPU (registers, spills, occupancy)",
    "loader": "images/s of DALI (GPU, CPU) and torchvision, from files and packed shards",
    "memory": "a step's peak GPU memory, estimated without a GPU (and the largest batch under a budget)",
    "scaling": "a model of FSDP2 vs HSDP at 8-1,024 GPUs from a measured step",
    "speedup": "visible-only encoding vs the dense baseline and the paper's code, per mask ratio",
}


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
                       "curves), memory (a step's peak GPU memory, estimated without a GPU), first-run (the README's first command, timed), "
                       "finetune (fine-tuning / probe steps vs the reference code's)",
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
        asked = len(argv) > 1 and argv[1] in ("-h", "--help")
        lines = [f"usage: mae bench {{{','.join(sorted(BENCHES))}}} [options]", "",
                 "benchmarks (each with its own --help; reports go to ./bench-results/ unless --out says "
                 "otherwise; the committed ones are in benchmarks/results/):", *(f"  {name:12s} {SUMMARY[name]}" for name in sorted(BENCHES))]
        if len(argv) > 1 and not asked:
            lines.insert(0, f"mae bench: unknown benchmark {argv[1]!r}")
        print("\n".join(lines), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    return _run_module(BENCHES[argv[1]], argv[2:])

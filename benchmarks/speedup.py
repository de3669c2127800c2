"""`mae bench speedup`: what encoding only the visible patches buys, per model and mask ratio.

For each model and mask ratio, a full training step (forward, backward, fused AdamW) of
  mae        the MAE, encoder on the visible patches only;
  mae_dense  the same MAE with the encoder on all patches and mask tokens (the paper's baseline);
  vit        timm's dense supervised ViT of the same size (cross-entropy on random labels),
all at the same batch (and, with --max-batch, at the largest batch that fits), in one process, on
synthetic on-device input unless --data is given. Per row: img/s, step ms split into forward / backward
/ optimizer, peak memory (torch allocator and the device's used memory from pynvml), GPU utilisation and
power (pynvml), training FLOPs per image, MFU against the datasheet peak and against a matmul ceiling
measured in the same run, and the measured speedup next to its FLOP-ratio ceiling.

FLOPs: training = 6 x forward MACs per image; a ViT block of width d on T tokens costs
T*d*d*(4 + 2*mlp_ratio) + 2*T*T*d MACs (qkv, proj, MLP; QK^T and AV). The MAE encoder runs on
len_keep + 1 tokens (L + 1 in mae_dense), the decoder on L + 1; patch embedding, decoder embedding and the
pixel head are added. See engine/metrics.py.

Outputs: speedup_<gpu>_<date>.{csv,json,md} and .._imgs.png / .._memory.png in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.config import ConfigError, get_preset
from engine.report import code_digest

from .common import RESULTS, environment, parse_choices, pick_device
from .levers import CONFIGS, RATIOS, SPEED_SUITES
from .speedup_report import merge, speedup_rows, write_report
from .step_runner import MODES
from .sweep import build_plan, run_sweep


MEASURED = ("kernels", "engine/model.py", "engine/step.py", "engine/optim.py", "engine/config.py",
            "engine/attention.py", "engine/parallel.py", "engine/graphstep.py", "engine/mixed.py", "engine/device.py",
            "engine/layernorm.py", "engine/fp8.py", "benchmarks/step_runner.py", "benchmarks/sweep.py", "benchmarks/levers.py")
"""The code a row of this benchmark runs: a CPU report is stale when its digest changes (tests/test_reports_current.py)."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mae bench speedup", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma list of presets (default: debug,tiny on CPU; vit-b,vit-l,vit-h on GPU)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--batch", type=int, default=0, help="same batch for every model and mode (default 32 CPU, 128 GPU)")
    ap.add_argument("--max-batch", type=int, default=0, help="also find the largest batch that fits, up to this (GPU)")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--compile", nargs="?", const="model", default="none", choices=("none", "regional", "model"),
                    help="torch.compile: the whole model (bare --compile) or each block (regional)")
    ap.add_argument("--config", default="", help=f"a lever set for every row: {', '.join(CONFIGS)} "
                    "(overrides --compile)")
    ap.add_argument("--speed-suite", nargs="?", const="full", default=None, choices=sorted(SPEED_SUITES),
                    help="rows per model (GPU): full (the lever ladder and the speed targets, default), new (the "
                    "newest levers), baselines (the fast path beside the paper's code eager and compiled whole and the "
                    "dense ViT eager and compiled), ratios (throughput and memory per mask ratio, fast and reference "
                    "paths, same batch) or autotune (GEMM autotuning, minutes of compile)")
    ap.add_argument("--jsonl", default="", help="append each row here as it is measured")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSONL",
                    help="write one report from the --jsonl files of earlier runs, measuring nothing")
    ap.add_argument("--data", default="", help="an image directory: include the data loader in the step")
    ap.add_argument("--max-spread", type=float, default=None,
                    help="p80/p20 of the step times above which a row is marked unstable and left out of derived "
                    "claims (default 1.15 on a GPU, 1.5 on a CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--device-suite", action="store_true", help="the GPU suite of benchmarks/device_check.sh")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.merge:
        try:
            path = merge(args.merge, Path(args.out))
        except (OSError, ValueError, KeyError) as e:
            print(f"mae bench speedup: error: cannot merge: {e}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
        return 0
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    try:
        from engine.config import ALIASES

        models = [ALIASES.get(x, x) for x in (args.models or ("vit-b,vit-l,vit-h" if gpu else "debug,tiny")).split(",")]
        for mname in models:
            get_preset(mname)
        modes = parse_choices(args.modes, MODES, "mode(s)")
        if args.config and args.config not in CONFIGS:
            raise ConfigError(f"--config must be one of {', '.join(CONFIGS)}, got {args.config!r}")
        ratios = [float(x) for x in args.ratios.split(",") if x]
        for r in ratios:
            if not 0 <= r < 1:
                raise ConfigError(f"mask ratio {r} is outside [0, 1)")
    except (ConfigError, ValueError) as e:
        print(f"mae bench speedup: error: {e}", file=sys.stderr)
        return 2
    batch = args.batch or (128 if gpu else 32)
    warmup = args.warmup or (5 if gpu else 2)
    reps = args.reps or (20 if gpu else 5)
    plan = build_plan(models, modes, ratios, batch, args.device_suite and gpu, args.speed_suite,
                      args.config or None)
    env = environment(device)
    env["code"] = code_digest(MEASURED)
    jsonl = Path(args.jsonl) if args.jsonl else None
    if jsonl is not None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(jsonl, "a") as f:
            f.write(json.dumps({"environment": env}) + "\n")
    compile_mode = {"none": False}.get(args.compile, args.compile)
    rows, models_cfg, peak, ceiling = run_sweep(plan, device, warmup, reps, compile_mode, args.data or None,
                                                args.max_batch, jsonl, args.max_spread)
    sp = speedup_rows(rows, models_cfg)
    path = write_report(rows, sp, env, Path(args.out), peak, ceiling)
    unstable = [r for r in rows if r.get("status") == "ok" and r.get("timing", "ok") != "ok"]
    if unstable:
        print(f"note: {len(unstable)} row(s) with unstable timing are left out of the speedups and targets "
              f"({unstable[0]['timing']}); raise --warmup / --reps", file=sys.stderr)
    for x in sp:
        if "speedup_vs_dense" in x:
            print(f"{x['model']} r={x['mask_ratio']} batch {x['batch']}: {x['speedup_vs_dense']:.2f}x vs encoder with "
                  f"mask tokens (FLOP ceiling {x['flop_ceiling_vs_dense']:.2f}x)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

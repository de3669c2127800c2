#!/usr/bin/env bash
# One run on a GPU machine: CUDA correctness checks of every fast path, then the benchmarks, with all
# reports written to the folder named on the command line (default benchmarks/results/).
#   bash benchmarks/device_check.sh [OUT_DIR] [SECTIONS]
# SECTIONS (comma list, default checks,kernels,speedup,fsdp,loader):
#   checks   CUDA correctness of every fast path (Triton kernels, captured step, trainer with a graph)
#   checks-new  only the paths new since the last GPU run (the attention kernel, encoder-triton, encoder-math,
#            partial checkpointing, apex where installed), 1.5 minutes
#   speed    the speed targets in under 8 minutes (limits add to 475 s): the lever ladder per model
#            (reference -> triton -> regional compile -> CUDA graph -> the other levers), same-batch speedups,
#            time to first step with a cold compile cache, ViT-H batch-256 memory, ViT-B fast (encoder-triton)
#            vs reference loss curves; rows go to OUT/speed.jsonl as measured
#   speed-new  the newest levers' rows and the checks of their paths only, for a short call
#   speed-extra  a profile of the compiled ViT-H step by kernel category, and inductor's GEMM autotuning
#            (train.compile_mode=max-autotune-no-cudagraphs) and its CUDA check, limits 250 s
#   trust-1  (limits 470 s) numbers users can trust, part 1: the per-mask-ratio sweep at ViT-L/16 (fast and reference
#            paths, mask 0-0.9, same batch), the ViT-H baselines in one run (fast vs the paper's code eager and
#            compiled whole, the dense ViT eager and compiled; cold compile cache), the compiled fast ViT-H profile
#   trust-2  (limits 430 s) part 2: the ViT-H/14 mask-ratio sweep, the kernels' CUDA checks and their GPU timing
#   trust    both parts in one call (only with a whole call's time to spare)
#   fsdp-cuda  (limits 110 s) FSDP2 on CUDA: the step, regional compile and activation checkpointing under FSDP2
#            against the single-device step, a DCP save / reload / export on the GPU
#   fsdp-bench (limits 190 s) `mae bench fsdp`: ViT-H FSDP2 vs single device at batch 128, peak memory at 256-2048
#            with and without checkpointing, beside the CPU memory estimates
#   dali     (limits 420 s) DALI on the GPU: decode parity with DALI's CPU pipeline, then the loader rows and the
#            training fed by each loader (benchmarks/loader.py); the third call of the three-part DALI install
#   fp8      (limits 540 s) past the bf16 wall: the fp8 CUDA checks, then speed suite fp8 (ViT-H/L/B: fast, fast+fp8
#            tensorwise and rowwise, the padding-free attention kernel, decoder recompute for memory; the paper's
#            code compiled whole and the dense baseline in the same call), then 200 ViT-B steps fp8 vs bf16 loss
#            curves; needs torchao (carry its wheel: PENDING.md)
#   kernels, speedup (mask-ratio sweep), fsdp, loader (needs DALI), pytest (the Triton kernel tests on CUDA)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
SECTIONS=${2:-checks,kernels,speedup,fsdp,loader}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
status=0
has() { [[ ",$SECTIONS," == *",$1,"* ]]; }
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s): $*"
  local t0=$SECONDS
  timeout "$secs" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  [ $rc -eq 0 ] || status=1
}
$PY - <<'PY' || { echo "no CUDA device"; exit 2; }
import torch, sys
assert torch.cuda.is_available()
print(torch.cuda.get_device_name(), "torch", torch.__version__)
PY
has checks && step cuda_checks 110 $PY -m benchmarks.cuda_checks --out "$OUT"
if has pytest && $PY -c "import pytest" 2>/dev/null; then
  step pytest_kernels 120 $PY -m pytest -q -o addopts= -p no:cacheprovider tests/test_kernels_triton.py
fi
PARTS=${PARTS:-$OUT/parts}  # per-process reports (merged into one at the end of section speed)
# the paths not yet run on a GPU, with a compile cache of their own (section speed measures a cold compile)
has checks-new && TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) step checks_new 90 $PY -m benchmarks.cuda_checks \
  --only "attention kernel,encoder-triton,encoder-math,checkpoint_blocks,patchify,apex" --out "$OUT"
if has speed; then
  # a fresh compile cache, so the first compiled ViT-H row's time to first step includes compilation
  export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
  sp=(-m benchmarks.speedup --speed-suite full --jsonl "$OUT/speed.jsonl" --out "$PARTS" --warmup 3 --reps 10)
  step speed_vit-h 225 $PY "${sp[@]}" --models vit-h
  step speed_vit-l 135 $PY "${sp[@]}" --models vit-l
  step speed_vit-b 60 $PY "${sp[@]}" --models vit-b
  step agreement 55 $PY -m benchmarks.agreement --preset vit-b --steps 50 --batch 64 --attention encoder-triton \
    --out "$OUT"
  [ -f "$OUT/speed.jsonl" ] && $PY -m benchmarks.speedup --merge "$OUT/speed.jsonl" --out "$OUT"
fi
if has speed-new; then  # the newest levers and the targets' rows only (about 4 minutes); merge elsewhere
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}
  sp=(-m benchmarks.speedup --speed-suite new --jsonl "$OUT/speed.jsonl" --out "$PARTS" --warmup 3 --reps 8)
  step checks_new 60 $PY -m benchmarks.cuda_checks --only "attention kernel,encoder-triton,encoder-math" --out "$OUT"
  step speed_vit-h 120 $PY "${sp[@]}" --models vit-h
  step agreement 50 $PY -m benchmarks.agreement --preset vit-b --steps 50 --batch 64 --attention encoder-triton \
    --out "$OUT"
  step speed_vit-l 35 $PY "${sp[@]}" --models vit-l
  step speed_vit-b 30 $PY "${sp[@]}" --models vit-b
fi
if has speed-extra; then  # where the compiled step's time goes, then inductor's GEMM autotuning (limits: 250 s)
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}
  step profile_compiled 70 $PY -m benchmarks.profile --preset vit-h --ratios 0.75 --batch 256 --steps 5 --warmup 3 \
    --config triton+compile --trace /tmp/mae_trace --top 25 --out "$OUT"
  step speed_autotune 140 $PY -m benchmarks.speedup --speed-suite autotune --models vit-h \
    --jsonl "$OUT/speed_autotune.jsonl" --out "$PARTS" --warmup 3 --reps 10
  step checks_autotune 40 $PY -m benchmarks.cuda_checks --only max-autotune --out "$PARTS"
fi
if has trust || has trust-1; then
  sp=(-m benchmarks.speedup --jsonl "$OUT/trust.jsonl" --out "$PARTS" --warmup 3 --reps 8)
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}
  step ratios_vit-l 120 $PY "${sp[@]}" --speed-suite ratios --models vit-l
  # a fresh compile cache: the compiled rows' time to first step is a cold start
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) step baselines_vit-h 260 $PY "${sp[@]}" --speed-suite baselines --models vit-h
  step profile_fast 90 $PY -m benchmarks.profile --preset vit-h --ratios 0.75 --batch 256 --steps 5 --warmup 3 \
    --config fast --trace /tmp/mae_trace --top 25 --out "$OUT"
  [ -f "$OUT/trust.jsonl" ] && $PY -m benchmarks.speedup --merge "$OUT/trust.jsonl" --out "$OUT"
fi
if has trust || has trust-2; then
  sp=(-m benchmarks.speedup --jsonl "$OUT/trust2.jsonl" --out "$PARTS" --warmup 3 --reps 8)
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}
  step ratios_vit-h 200 $PY "${sp[@]}" --speed-suite ratios --models vit-h
  step checks_kernels 60 $PY -m benchmarks.cuda_checks --only "masking,unshuffle,loss" --out "$OUT"
  step kernels 170 $PY -m benchmarks.kernels --shapes vit-l,vit-h --out "$OUT" --reps 20
  # one report of every trust run in this call (part 1's rows too when both ran here)
  [ -f "$OUT/trust2.jsonl" ] && $PY -m benchmarks.speedup --merge $(ls "$OUT"/trust*.jsonl) --out "$OUT"
fi
has kernels && step kernels 170 $PY -m benchmarks.kernels --out "$OUT" --reps 20
if has speedup && [ -f benchmarks/speedup.py ]; then
  step speedup 420 $PY -m benchmarks.speedup --device-suite --out "$OUT"
fi
if has fsdp && [ -f benchmarks/fsdp.py ]; then
  step fsdp 240 $PY -m benchmarks.fsdp --out "$OUT"
fi
if has loader && [ -f benchmarks/loader.py ] && $PY -c "import nvidia.dali" 2>/dev/null; then
  step loader 240 $PY -m benchmarks.loader --out "$OUT"
fi
if has fsdp-cuda; then  # FSDP2 on CUDA (limits 110 s): the checks against the single-device step
  step fsdp_checks 110 $PY -m benchmarks.fsdp_checks --out "$OUT"
fi
if has fsdp-bench; then  # (limits 190 s) ViT-H FSDP2 vs one device, peak memory per batch beside the estimates
  step fsdp 190 $PY -m benchmarks.fsdp --out "$OUT" --warmup 2 --reps 5 --memory-batches 256,512,1024,2048 \
    --estimates benchmarks/results/memory_estimate_vit-h_fsdp_2026-11-28.json
fi
if has fp8; then  # float8 encoder GEMMs and the other issue-16 levers (limits 540 s); rows to OUT/fp8.jsonl as measured
  if $PY -c "import torchao.float8" 2>/dev/null; then
    export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}
    step checks_fp8 80 $PY -m benchmarks.cuda_checks --only "fp8 ,attention kernel N=256" --out "$OUT"
    sp=(-m benchmarks.speedup --speed-suite fp8 --jsonl "$OUT/fp8.jsonl" --out "$PARTS" --warmup 3 --reps 8)
    step fp8_vit-h 270 $PY "${sp[@]}" --models vit-h
    step agreement_fp8 90 $PY -m benchmarks.agreement --preset vit-b --steps 200 --batch 64 --precision fp8 \
      --out "$OUT"
    step fp8_vit-l 55 $PY "${sp[@]}" --models vit-l
    step fp8_vit-b 45 $PY "${sp[@]}" --models vit-b
    [ -f "$OUT/fp8.jsonl" ] && $PY -m benchmarks.speedup --merge "$OUT/fp8.jsonl" --out "$OUT"
  else
    echo "=== fp8: torchao is not importable (install the carried wheel first: PENDING.md)"; status=1
  fi
fi
if has dali; then  # the third of the three DALI calls, after .device/dali/p2/install.sh (limits 420 s)
  if $PY -c "import nvidia.dali" 2>/dev/null; then
    step dali_parity 70 $PY -m benchmarks.dali_parity --out "$OUT"
    # loader rows (files and shards, both sets, every backend) then ViT-B/16 and ViT-L/16 fed by each loader;
    # the report is rewritten after every row, so a time limit keeps what was measured
    export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}
    step loader 350 $PY -m benchmarks.loader --out "$OUT" --files-dir /tmp/mae_bench_jpegs --train-steps 15
  else
    echo "=== dali: DALI is not importable (run .device/dali/p2/install.sh first)"; status=1
  fi
fi
echo "reports in $OUT"; ls -1 "$OUT"
exit $status

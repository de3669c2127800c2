#!/usr/bin/env bash
# The CPU demonstration of the README: pretrain the debug preset on scikit-learn's handwritten digits,
# then kNN and linear-probe the pretrained encoder and a randomly initialised one.
#   bash benchmarks/demo_digits.sh [WORK_DIR] [REPORT_DIR]   (default runs/demo_digits, and the report beside it)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/demo_digits}
R=${2:-$W}
mkdir -p "$W" "$R"
mae data digits "$W/digits"
t0=$SECONDS
mae pretrain --preset debug --data "$W/digits/train" --run-dir "$W/pretrain" --train.epochs 60 \
  --train.log_every 390 --data.backend torchvision
pre_s=$((SECONDS - t0))
ck=$(ls "$W"/pretrain/ckpt_*.pt | tail -n 1)
ev() { mae eval "$@" --train "$W/digits/train" --val "$W/digits/val" --pool gap; }
ev knn --checkpoint "$ck" --out "$W/knn_pretrained.json"
ev knn --random --preset debug --out "$W/knn_random.json"
ev linprobe --checkpoint "$ck" --epochs 20 --batch-size 128 --lr 40 --out "$W/lin_pretrained.json"
ev linprobe --random --preset debug --epochs 20 --batch-size 128 --lr 40 --out "$W/lin_random.json"
python3 - "$W" "$R" "$pre_s" <<'PY'
import json, sys, datetime, platform, torch
w, r, pre_s = sys.argv[1], sys.argv[2], sys.argv[3]
get = lambda n: json.load(open(f"{w}/{n}.json"))["top1"] * 100
day = datetime.date.today().isoformat()
rows = [("kNN (k=20, cosine, T=0.07)", get("knn_pretrained"), get("knn_random")),
        ("linear probe (BN + linear, LARS, 20 epochs)", get("lin_pretrained"), get("lin_random"))]
text = [f"# Digits demonstration (CPU, {day})", "",
        f"- CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}; fp32",
        f"- pretraining: debug preset (0.13M parameters, 32 px, patch 4), 60 epochs of the 1,258 training "
        f"digits, batch 32, {pre_s} s", "- features: mean of the patch tokens (--pool gap); 539 validation digits", "",
        "| protocol | pretrained | random init |", "|---|---|---|"]
text += [f"| {n} | {a:.1f}% | {b:.1f}% |" for n, a, b in rows]
open(f"{r}/demo_digits_cpu_{day}.md", "w").write("\n".join(text) + "\n")
print("\n".join(text))
PY

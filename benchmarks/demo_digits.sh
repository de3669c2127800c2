#!/usr/bin/env bash
# The CPU demonstration of the README, the paper's three stages on scikit-learn's handwritten digits: pretrain the
# debug preset, then `mae finetune` and `mae linprobe` the pretrained encoder and a randomly initialised one (the
# baseline), each pretrained run also stopped midway and resumed (its final metrics and weights must equal the
# uninterrupted run's), kNN of both encoders, and a 32 -> 48 pixel fine-tune through the resampled position
# embeddings against a random-init one at 48.
#   bash benchmarks/demo_digits.sh [WORK_DIR] [REPORT_DIR]   (default runs/demo_digits, and the report beside it)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/demo_digits}
R=${2:-$W}
mkdir -p "$W" "$R"
mae data digits "$W/digits"
t0=$SECONDS
mae pretrain --preset debug --data "$W/digits/train" --run-dir "$W/pretrain" --train.epochs 60 \
  --train.log_every 390 --data.backend torchvision --train.progress false
pre_s=$((SECONDS - t0))
ck=$(ls "$W"/pretrain/ckpt_*.pt | tail -n 1)
data=(--train "$W/digits/train" --val "$W/digits/val" --train.progress false --train.tensorboard false)
ev() { mae eval "$@" --train "$W/digits/train" --val "$W/digits/val" --pool gap; }
ev knn --checkpoint "$ck" --out "$W/knn_pretrained.json"
ev knn --random --preset debug --out "$W/knn_random.json"
run() {  # run PROTOCOL NAME SOURCE... -- each run's wall time in NAME.s
  local p=$1 name=$2; shift 2
  local t=$SECONDS
  rm -rf "$W/$name"
  mae "$p" "$@" "${data[@]}" --run-dir "$W/$name"
  echo $((SECONDS - t)) > "$W/$name.s"
}
run finetune ft_pretrained --checkpoint "$ck"
run finetune ft_random --random
# the ImageNet recipe's regularisation (RandAugment, random erasing, mixup, cutmix) on the same 20 epochs
run finetune ft_recipe --checkpoint "$ck" --task.auto_augment rand-m9-mstd0.5-inc1 --task.reprob 0.25 \
  --task.mixup 0.8 --task.cutmix 1.0
run linprobe lin_pretrained --checkpoint "$ck" --task.pool gap
run linprobe lin_random --random --task.pool gap
# the same pretrained runs, stopped halfway (a pre-emption) and resumed
run finetune ft_resumed --checkpoint "$ck" --train.max_steps 390
mae finetune --run-dir "$W/ft_resumed" --resume --train.max_steps 0
run linprobe lin_resumed --checkpoint "$ck" --task.pool gap --train.max_steps 90
mae linprobe --run-dir "$W/lin_resumed" --resume --train.max_steps 0
# another resolution: 32 -> 48 pixels (position embeddings resampled bicubically at load)
run finetune ft48_pretrained --checkpoint "$ck" --model.img_size 48
run finetune ft48_random --random --model.img_size 48
python3 - "$W" "$R" "$pre_s" <<'PY'
import datetime, json, sys
from pathlib import Path

import torch
from engine.report import cpu_model

w, r, pre_s = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
res = lambda n: json.loads((w / n / "result.json").read_text())
top = lambda n: res(n)["top1"] * 100
knn = lambda n: json.loads((w / f"{n}.json").read_text())["top1"] * 100
secs = lambda n: (w / f"{n}.s").read_text().strip()


def same(a, b):
    ra, rb = res(a), res(b)
    last = lambda n: sorted((w / n).glob("ckpt_*.pt"))[-1]
    ma, mb = (torch.load(last(n), map_location="cpu", weights_only=True)["model"] for n in (a, b))
    weights = ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    return ((ra["top1"], ra["top5"], ra["history"]) == (rb["top1"], rb["top5"], rb["history"])) and weights


day = datetime.date.today().isoformat()
rows = [("kNN (k=20, cosine, T=0.07), 32 px", f"{knn('knn_pretrained'):.1f}%", f"{knn('knn_random'):.1f}%", "-"),
        ("`mae linprobe` (BN + linear, LARS, 20 epochs), 32 px", f"{top('lin_pretrained'):.1f}%",
         f"{top('lin_random'):.1f}%", f"{secs('lin_pretrained')} s"),
        ("`mae finetune` (every block, layer decay 0.75, 20 epochs), 32 px", f"{top('ft_pretrained'):.1f}%",
         f"{top('ft_random'):.1f}%", f"{secs('ft_pretrained')} s"),
        ("`mae finetune` with the recipe's RandAugment, random erasing, mixup, cutmix, 32 px",
         f"{top('ft_recipe'):.1f}%", "-", f"{secs('ft_recipe')} s"),
        ("`mae finetune --model.img_size 48` (pretrained at 32 px)", f"{top('ft48_pretrained'):.1f}%",
         f"{top('ft48_random'):.1f}%", f"{secs('ft48_pretrained')} s")]
text = [f"# Digits demonstration: pretrain, fine-tune, linear probe (CPU, {day})", "",
        f"- CPU: {cpu_model()}, torch {torch.__version__}; fp32; "
        "`bash benchmarks/demo_digits.sh`",
        f"- pretraining: debug preset (0.13M parameters, 32 px, patch 4), 60 epochs of the 1,258 training digits, "
        f"batch 32, {pre_s} s",
        "- fine-tuning and probing: the `finetune_debug` and `linprobe_debug` presets (mean-pooled patch tokens); "
        "top-1 on the 539 validation digits at the last epoch", "",
        "| protocol | pretrained | random init | wall time (pretrained) |", "|---|---|---|---|"]
text += [f"| {n} | {a} | {b} | {t} |" for n, a, b, t in rows]
text += ["", "Stopped halfway (`--train.max_steps`, as a pre-emption would) and resumed with `--resume`:", "",
         "| run | final top-1, top-5, validation history and weights equal to the uninterrupted run's |", "|---|---|",
         f"| `mae finetune` (stopped at step 390 of 780) | {'yes' if same('ft_pretrained', 'ft_resumed') else 'NO'} |",
         f"| `mae linprobe` (stopped at step 90 of 180) | {'yes' if same('lin_pretrained', 'lin_resumed') else 'NO'} |"]
out = r / f"demo_digits_cpu_{day}.md"
out.write_text("\n".join(text) + "\n")
print("\n".join(text))
PY

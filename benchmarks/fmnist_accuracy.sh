#!/usr/bin/env bash
# The paper's finding at small scale, on real data: MAE pre-training vs random initialisation on Fashion-MNIST.
#   1. MAE-Tiny pre-training on all 60,000 training images (labels unused), 4 epochs;
#   2. fine-tuning on a 10% label budget (600 images per class) from the MAE encoder and from scratch;
#   3. k-NN and linear probe of the frozen MAE encoder against random-init encoders (same 10% labels).
# Every step is resumable / cached; the table is benchmarks/results/fmnist_accuracy.md.
#   bash benchmarks/fmnist_accuracy.sh            (about 90 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
FASTVIT=${FASTVIT:-.venv/bin/fastvit}
SEEDS=${SEEDS:-"0 1"}
OUT=${OUT:-runs/fmnist_acc}
RESULT=${RESULT:-benchmarks/results/fmnist_accuracy.md}
TRAIN=data/fmnist_10pct/train TEST=data/fmnist/test
mkdir -p "$OUT"
: > "$OUT/commands.txt"
run() { echo "$*" >> "$OUT/commands.txt"; echo "+ $*" >&2; "$@"; }
# run unless FILE exists; either way the command goes into the list
once() { local file=$1; shift; if [ -e "$file" ]; then echo "$*   # skipped: $file exists" >> "$OUT/commands.txt"; else run "$@"; fi; }

run $FASTVIT data fashion-mnist data/fmnist
once data/fmnist/train.beton $FASTVIT convert data/fmnist/train data/fmnist/train.beton --mode raw --strict
run $FASTVIT data fashion-mnist data/fmnist_10pct --per-class 600
run $FASTVIT train recipes/demo/mae_fmnist_4ep.yaml --out "$OUT/mae_pretrain" --resume

PROBE=(--train "$TRAIN" --test "$TEST" --model vit_tiny_patch16 --img-size 28 --patch-size 4 --workers 0)
LINPROBE=(--optimizer sgd --blr 0.1 --epochs 90)
for seed in $SEEDS; do
  for init in mae scratch; do
    src=$([ $init = mae ] && echo "$OUT/mae_pretrain" || echo scratch)
    run $FASTVIT finetune recipes/demo/finetune_fmnist.yaml init="$src" train.seed="$seed" \
      --out "$OUT/ft_${init}_s$seed" --resume
    once "$OUT/linprobe_${init}_s$seed.json" $FASTVIT linprobe "$src" "${PROBE[@]}" "${LINPROBE[@]}" \
      --seed "$seed" --json "$OUT/linprobe_${init}_s$seed.json"
    # k-NN has no randomness of its own: one run for MAE, one per seed for the random encoders
    if [ $init = scratch ] || [ "$seed" = "$(echo $SEEDS | cut -d' ' -f1)" ]; then
      once "$OUT/knn_${init}_s$seed.json" $FASTVIT knn "$src" "${PROBE[@]}" --seed "$seed" \
        --json "$OUT/knn_${init}_s$seed.json"
    fi
  done
done
.venv/bin/python benchmarks/fmnist_table.py "$OUT" > "$RESULT"
echo "wrote $RESULT" >&2

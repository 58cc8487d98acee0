#!/usr/bin/env bash
# The paper's findings at small scale, on real data (Fashion-MNIST):
#   1. MAE-Tiny pre-training on all 60,000 training images (labels unused), 4 epochs;
#   2. an MAE-Small teacher ($TEACHER_EPOCHS epochs), then D-MAE and D2-MAE Tiny students distilling its
#      last-layer attention, at the MAE student's 4 epochs;
#   3. fine-tuning on a 10% label budget (600 images per class) from each pre-trained encoder and from scratch;
#   4. k-NN and linear probe of the frozen encoders against random-init encoders (same 10% labels).
# Every step is resumable / cached; the table is benchmarks/results/fmnist_accuracy.md.
#   bash benchmarks/fmnist_accuracy.sh            (about 5 hours on 2 cores)
#   PRETRAINED=mae bash benchmarks/fmnist_accuracy.sh    (MAE vs scratch only: about 90 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
FASTVIT=${FASTVIT:-.venv/bin/fastvit}
SEEDS=${SEEDS:-"0 1"}
PRETRAINED=${PRETRAINED:-"mae dmae d2mae"}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-2}
OUT=${OUT:-runs/fmnist_acc}
RESULT=${RESULT:-benchmarks/results/fmnist_accuracy.md}
TRAIN=data/fmnist_10pct/train TEST=data/fmnist/test
mkdir -p "$OUT"
# every invocation appends its commands (runs already complete are resumed as no-ops or skipped)
echo "# $(date -u +%FT%TZ): PRETRAINED='$PRETRAINED' SEEDS='$SEEDS' TEACHER_EPOCHS=$TEACHER_EPOCHS" >> "$OUT/commands.txt"
run() { echo "$*" >> "$OUT/commands.txt"; echo "+ $*" >&2; "$@"; }
# run unless FILE exists; either way the command goes into the list
once() { local file=$1; shift; if [ -e "$file" ]; then echo "$*   # skipped: $file exists" >> "$OUT/commands.txt"; else run "$@"; fi; }

run $FASTVIT data fashion-mnist data/fmnist
once data/fmnist/train.beton $FASTVIT convert data/fmnist/train data/fmnist/train.beton --mode raw --strict
run $FASTVIT data fashion-mnist data/fmnist_10pct --per-class 600
run $FASTVIT train recipes/demo/mae_fmnist_4ep.yaml --out "$OUT/mae_pretrain" --resume
DISTILLED=$(for m in $PRETRAINED; do [ "$m" = mae ] || echo "$m"; done)
if [ -n "$DISTILLED" ]; then
  run $FASTVIT train recipes/demo/mae_small_fmnist_teacher.yaml train.epochs="$TEACHER_EPOCHS" --out "$OUT/teacher" --resume
fi
for method in $DISTILLED; do
  run $FASTVIT train "recipes/demo/${method}_fmnist.yaml" method.teacher="$OUT/teacher" --out "$OUT/${method}_pretrain" --resume
done

# the probes read images as each encoder was pre-trained (its run's 28-px geometry and Fashion-MNIST mean/std);
# the random encoders have no run: the pre-training recipe stands in for it
PROBE=(--train "$TRAIN" --test "$TEST" data.workers=0)
SCRATCH=(--recipe recipes/demo/mae_fmnist_4ep.yaml)
LINPROBE=(linprobe.optimizer=sgd linprobe.blr=0.1 linprobe.epochs=90)
for seed in $SEEDS; do
  for init in $PRETRAINED scratch; do
    src=$([ $init = scratch ] && echo scratch || echo "$OUT/${init}_pretrain")
    base=(); [ $init = scratch ] && base=("${SCRATCH[@]}")
    run $FASTVIT finetune recipes/demo/finetune_fmnist.yaml init="$src" train.seed="$seed" \
      --out "$OUT/ft_${init}_s$seed" --resume
    once "$OUT/linprobe_${init}_s$seed.json" $FASTVIT linprobe "$src" "${PROBE[@]}" "${base[@]}" "${LINPROBE[@]}" \
      train.seed="$seed" --json "$OUT/linprobe_${init}_s$seed.json"
    # k-NN has no randomness of its own: one run per pre-trained encoder, one per seed for the random encoders
    if [ $init = scratch ] || [ "$seed" = "$(echo $SEEDS | cut -d' ' -f1)" ]; then
      once "$OUT/knn_${init}_s$seed.json" $FASTVIT knn "$src" "${PROBE[@]}" "${base[@]}" train.seed="$seed" \
        --json "$OUT/knn_${init}_s$seed.json"
    fi
  done
done
.venv/bin/python benchmarks/fmnist_table.py "$OUT" > "$RESULT"
echo "wrote $RESULT" >&2

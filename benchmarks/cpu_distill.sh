#!/usr/bin/env bash
# What the frozen teacher costs D-MAE and D2-MAE on this CPU, with and without it in one run each:
#   1. model only, ImageNet geometry (224 px, batch 64, fp32): MAE-Tiny, then D-MAE and D2-MAE with a ViT-Base
#      teacher (the paper's pairing; random weights, the cost does not depend on them), timed in turns;
#   2. end to end on the Fashion-MNIST D-MAE / D2-MAE recipes with the MAE-Small teacher of
#      benchmarks/fmnist_accuracy.sh: real training steps with the teacher, beside the same recipe as plain MAE,
#      in alternating windows.
# Results: benchmarks/results/cpu_distill.md. Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
fastvit=${FASTVIT:-.venv/bin/fastvit}
teacher=${TEACHER:-runs/fmnist_acc/teacher}
methods=${METHODS:-dmae d2mae}
$fastvit bench model --method mae,dmae,d2mae --teacher vit_base_patch16 --attn sdpa --precision fp32 --batch 64 --steps 8 --warmup 2 \
  --timm-ref none --json "$out/cpu_distill_model.json"
for method in $methods; do
  $fastvit bench e2e recipes/demo/${method}_fmnist.yaml method.teacher="$teacher" --steps 10 --warmup 3 --windows 3 \
    --json "$out/cpu_distill_e2e_$method.json"
done

#!/usr/bin/env bash
# Issue 18's figures (benchmarks/results/cpu_policy.md), one process per command, on an idle machine:
#   1. the step-policy ablation: SDPA, fused AdamW, bf16 and torch.compile, all 16 combinations, MAE-Tiny 224 px;
#   2. the default before `auto` measured against what `auto` now resolves to for a long run (through
#      engine/policy.py itself, from an empty cache), for MAE-Tiny and for D-MAE-Tiny with a ViT-Base teacher.
# About 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FASTVIT:-.venv/bin/fastvit}
OUT=${OUT:-runs/policy}
RES=benchmarks/results
mkdir -p "$OUT"
export FASTVIT_CACHE_DIR=$OUT/cache   # the probe runs here, not from a cache a developer's runs filled
rm -rf "$FASTVIT_CACHE_DIR"
lscpu | grep -E "Model name|Flags" > $OUT/lscpu.txt

$F bench model --ablate --batch 64 --steps 6 --warmup 2 --timm-ref none --json $RES/cpu_policy_ablation.json \
  | tee $OUT/ablation.txt
$F bench model --policy --batch 64 --steps 6 --warmup 2 --timm-ref none --json $RES/cpu_policy_mae.json \
  | tee $OUT/policy_mae.txt
$F bench model --policy --method dmae --teacher vit_base_patch16 --batch 64 --steps 6 --warmup 2 --timm-ref none \
  --json $RES/cpu_policy_dmae.json | tee $OUT/policy_dmae.txt

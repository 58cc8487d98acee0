#!/usr/bin/env bash
# Model-only train-step throughput of MAE-Tiny (both attention paths) beside timm's vit_tiny_patch16_224
# (12 heads, all 196 tokens), batch 64, 224 px, in fp32 and in bf16. Results: benchmarks/results/cpu_model.md.
# Run on an otherwise idle machine: every case of one precision runs side by side in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
fastvit=${FASTVIT:-.venv/bin/fastvit}
$fastvit bench model --precision fp32 --batch 64 --steps 10 --warmup 3 --json "$out/cpu_model_fp32.json"
# bf16 is emulated on AVX2-only CPUs (~25 s a step): fewer steps, no timm reference
$fastvit bench model --precision bf16 --batch 64 --steps 3 --warmup 1 --timm-ref none --json "$out/cpu_model_bf16.json"

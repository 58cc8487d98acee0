#!/usr/bin/env bash
# The torch and deepspeed engines side by side on this CPU (MAE-Tiny, 224 px, batch 64, fp32: the engine's
# real step = forward + backward + AdamW), then end to end on the Fashion-MNIST demo recipe with each engine
# (loader, model and real training steps measured in one process each), and the fused-kernel ablation.
# Results: benchmarks/results/cpu_engines.md. Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
fastvit=${FASTVIT:-.venv/bin/fastvit}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
$fastvit bench model --engine torch,deepspeed --attn sdpa,math --precision fp32 --batch 64 --steps 10 --warmup 3 \
  --timm-ref none --json "$out/cpu_engines_model.json"
for engine in torch deepspeed; do
  $fastvit bench e2e recipes/demo/mae_fmnist_ffcv.yaml engine.kind=$engine --steps 20 --warmup 5 --windows 3 \
    --json "$out/cpu_engines_e2e_$engine.json"
done
# bf16 is emulated on AVX2-only CPUs (~16x slower than fp32): few steps
$fastvit bench model --ablate --precision fp32 --batch 64 --steps 3 --warmup 1 --timm-ref none \
  --json "$out/cpu_ablation.json"

#!/usr/bin/env bash
# ViT-Tiny MAE on one GPU (written for an H100; the figures go to benchmarks/results/gpu_h100.md):
#   1. model-only bf16 train steps with MFU, torch and deepspeed engines side by side (goal >= 50k img/s);
#   2. the fused-kernel ablation: SDPA, fused AdamW, bf16 autocast, torch.compile off, each on alone, all on;
#   3. what the frozen ViT-Base teacher costs D-MAE and D2-MAE (bf16, model only; goal: <= 10% of MAE's img/s);
#   4. end to end with DALI mixed (nvJPEG + the hardware decoder) and with FFCV, on an ImageNet-like tree
#      derived from the shared photographs (goal >= 15k img/s).
# Not yet run: no GPU was lent to the session that wrote it. Needs `make setup` and ../shared/data/photos.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
fastvit=${FASTVIT:-.venv/bin/fastvit}
py=${PYTHON:-.venv/bin/python}
data=${DATA:-data/bench_imagenet}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$fastvit bench model --device cuda --precision bf16 --batch 512 --steps 50 --warmup 10 --engine torch,deepspeed \
  --attn sdpa,math --json "$out/gpu_h100_model.json"
$fastvit bench model --device cuda --ablate --batch 512 --steps 50 --warmup 10 --timm-ref none \
  --json "$out/gpu_h100_ablation.json"
$fastvit bench model --device cuda --precision bf16 --batch 512 --steps 50 --warmup 10 --attn sdpa --timm-ref none \
  --teacher vit_base_patch16 --json "$out/gpu_h100_distill_model.json"
[ -d "$data/train" ] || $py benchmarks/make_imagenet_like.py --src ../shared/data/photos --out "$data/train" --n 20000
[ -f "$data/train.beton" ] || $fastvit convert "$data/train" "$data/train.beton" --max-res 512
common=(data.path="$data/train" train.global_batch=512 train.micro_batch=512 engine.device=cuda engine.precision=bf16)
$fastvit bench e2e recipes/mae_tiny_400ep.yaml "${common[@]}" data.backend=dali data.workers=12 \
  --steps 50 --warmup 10 --json "$out/gpu_h100_e2e_dali.json"
$fastvit bench e2e recipes/mae_tiny_400ep.yaml "${common[@]}" data.backend=ffcv data.path="$data/train.beton" \
  data.workers=16 data.interpolation=bilinear --steps 50 --warmup 10 --json "$out/gpu_h100_e2e_ffcv.json"

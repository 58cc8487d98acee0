#!/usr/bin/env bash
# Loader-only img/s of torchvision, FFCV and DALI (CPU operators) on 2,000 ImageNet-like JPEGs, beside the
# decode-only ceiling, at the stored 500 px and with a 256-px .beton. Results: benchmarks/results/cpu_loader.md.
# The images come from `fastvit data photos` (the sample photographs installed packages ship, then random crops
# of them); FASTVIT_PHOTOS=DIR adds a folder of your own photographs to the sources. Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
fastvit=${FASTVIT:-.venv/bin/fastvit}
data=${DATA:-data/bench_imagenet}
[ -d "$data" ] || $fastvit data photos "$data" --n 2000 --max-side 500
[ -f "$data.beton" ] || $fastvit convert "$data" "$data.beton" --workers 2
[ -f "${data}_256.beton" ] || $fastvit convert "$data" "${data}_256.beton" --max-res 256 --workers 2
$fastvit bench loader --data "$data" --beton "$data.beton" --workers 2 --epochs 3 --json "$out/cpu_loader.json"
$fastvit bench loader --data "$data" --beton "${data}_256.beton" --backends torchvision,ffcv --workers 2 --epochs 3 \
  --json "$out/cpu_loader_ffcv256.json"

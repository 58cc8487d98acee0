#!/usr/bin/env bash
# Training img/s of the demo (MAE-Tiny, Fashion-MNIST 28 px, batch 256) with the torchvision and the ffcv
# recipe, alternating, SECONDS_PER_RUN each; medians of the logged intervals, the first (warm-up, numba
# compilation) left out. Needs data/fmnist/train and data/fmnist/train.beton (`make demo-ffcv` makes both).
set -euo pipefail
cd "$(dirname "$0")/.."
fastvit=${FASTVIT:-.venv/bin/fastvit}
secs=${SECONDS_PER_RUN:-90}
for round in 1 2; do
  for recipe in mae_fmnist mae_fmnist_ffcv; do
    out=runs/bench_demo_${recipe}_$round
    rm -rf "$out"
    timeout "$secs" $fastvit train recipes/demo/$recipe.yaml train.log_every=10 --out "$out" >/dev/null 2>&1 || true
    python3 - "$out/metrics.jsonl" "$recipe" "$round" <<'PY'
import json, statistics, sys
rates = [json.loads(l)["img_per_s"] for l in open(sys.argv[1])][1:]
print(f"round {sys.argv[3]} {sys.argv[2]:16s} median {statistics.median(rates):6.1f} img/s over {len(rates)} intervals: "
      + " ".join(f"{r:.0f}" for r in rates))
PY
  done
done

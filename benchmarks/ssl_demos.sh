#!/usr/bin/env bash
# The self-supervised methods side by side on Fashion-MNIST (6,000 training images at 28 px, 3 epochs, batch 256),
# each scored after every epoch by the online k-NN monitor on 1,000 held-out images (bank: the 6,000 training
# images), then the curves plotted. Results: benchmarks/results/cpu_dino_simmim.md and cpu_ssl_knn.png.
#   benchmarks/ssl_demos.sh            (RUNS=runs/ssl_demos METHODS="mae dino simmim mocov3" to choose)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-runs/ssl_demos}
fastvit=${FASTVIT:-.venv/bin/fastvit}
python=${PYTHON:-.venv/bin/python}
knn="eval.path=data/fmnist_10pct/test eval.knn_every_epochs=1"
for method in ${METHODS:-mae dino simmim}; do
  case $method in
    # MAE's demo recipe on the same 6,000 images and schedule as the others
    mae) recipe=recipes/demo/mae_fmnist.yaml
         extra="data.path=data/fmnist_10pct/train train.epochs=3 train.log_every=5 optim.warmup_epochs=1" ;;
    *)   recipe=recipes/demo/${method}_fmnist.yaml; extra="" ;;
  esac
  $fastvit train "$recipe" $knn $extra --out "$runs/$method" --resume
done
# each encoder as its method initialises it (seed 0), scored by fastvit knn on the same bank and queries: epoch 0
starts=()
for method in ${METHODS:-mae dino simmim}; do
  recipe=recipes/demo/${method}_fmnist.yaml
  $python benchmarks/init_encoder.py "$recipe" "$runs/init_$method.pt"
  top1=$($fastvit knn "$runs/init_$method.pt" --recipe "$recipe" --train data/fmnist_10pct/train \
           --test data/fmnist_10pct/test --json "$runs/init_$method.json" > /dev/null &&
         $python -c 'import json, sys; print(json.load(open(sys.argv[1]))["top1"])' "$runs/init_$method.json")
  starts+=(--start "$method=$top1")
done
$python benchmarks/knn_curves.py "$runs" "${starts[@]}" --png benchmarks/results/cpu_ssl_knn.png

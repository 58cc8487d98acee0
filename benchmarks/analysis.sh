#!/usr/bin/env bash
# Issue 17's analyses at Fashion-MNIST scale (benchmarks/results/cpu_analysis.md), every step resumable:
#   1. an MAE-Small teacher and an MAE-Tiny, 1 epoch each on all 60,000 training images (the demo's schedule);
#   2. D-MAE-Tiny distilling that teacher (the adapter starts as mae-lite's Conv2d default; the identity start was
#      run beside it with an option this change then removed: cpu_analysis.md);
#   3. k-NN of the three Tiny encoders (10% labels as the bank, the 10,000 test images scored);
#   4. CKA of MAE-Tiny against its teacher and against a random init; attention of MAE-Tiny, D-MAE-Tiny and a
#      random init; the runs' curves (report --plot); the loader benchmark's bars (bench loader --plot);
#   5. the one-batch losses before and after the three fidelity changes (benchmarks/fidelity.py; BEFORE=tree).
# About 20 minutes on 2 cores of a Xeon with AMX (about 45 on an EPYC with avx512_bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FASTVIT:-.venv/bin/fastvit}
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/analysis}
RES=benchmarks/results
TEST=data/fmnist/test
mkdir -p "$OUT"
[ -e data/fmnist/train.beton ] || { $F data fashion-mnist data/fmnist; $F convert data/fmnist/train data/fmnist/train.beton --mode raw --strict; }
[ -d data/fmnist_10pct ] || $F data fashion-mnist data/fmnist_10pct --per-class 600

$F train recipes/demo/mae_small_fmnist_teacher.yaml train.epochs=1 optim.warmup_epochs=0.25 --out $OUT/teacher --resume
$F train recipes/demo/mae_fmnist_ffcv.yaml --out $OUT/mae --resume
D=(recipes/demo/dmae_fmnist.yaml train.epochs=1 optim.warmup_epochs=0.25 method.teacher=$OUT/teacher)
$F train "${D[@]}" --out $OUT/dmae --resume
for r in mae dmae; do
  [ -e $OUT/knn_$r.json ] || $F knn $OUT/$r --train data/fmnist_10pct/train --test $TEST data.workers=0 --json $OUT/knn_$r.json
done

$F analyze cka $OUT/mae $OUT/teacher --data $TEST --labels "MAE-Tiny,MAE-Small teacher" --out $RES/cka_mae_tiny_vs_teacher.png
$F analyze cka $OUT/mae scratch --data $TEST --labels "MAE-Tiny,random init" --out $RES/cka_mae_tiny_vs_random.png
$F analyze attention $OUT/mae $OUT/dmae scratch --data $TEST --labels "MAE-Tiny,D-MAE-Tiny,random init" \
  --out $RES/attention_fmnist.png
$F report $OUT/mae $OUT/dmae $OUT/teacher --plot $RES/report_analysis_runs.png
[ -d $OUT/photos ] || $F data photos $OUT/photos --n 500 --max-side 256
$F bench loader --data $OUT/photos --workers 2 --epochs 3 --json $OUT/bench_loader.json --plot $RES/bench_loader.png

if [ -n "${BEFORE:-}" ]; then  # a worktree of the commit before the change: git worktree add /tmp/before <commit>
  ROOT=$PWD
  ARGS=(--mae $ROOT/$OUT/mae --teacher $ROOT/$OUT/teacher --data $ROOT/$TEST)
  # run from outside the repository so PYTHONPATH's tree, not this one, is imported
  (cd /tmp && PYTHONPATH=$BEFORE $ROOT/$PY $ROOT/benchmarks/fidelity.py "${ARGS[@]}" --json $ROOT/$OUT/fidelity_before.json)
  $PY benchmarks/fidelity.py "${ARGS[@]}" --json $OUT/fidelity_after.json
  $PY benchmarks/fidelity.py --table $OUT/fidelity_before.json $OUT/fidelity_after.json
fi

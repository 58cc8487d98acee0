#!/usr/bin/env bash
# The paper's comparison at small scale, on real data (Fashion-MNIST): benchmarks/results/paper_table_fmnist.md.
#   1. ViT-Tiny students pre-trained by MAE, MoCo-v3, DINO, SimMIM, D-MAE and D²-MAE on the same images (20,000
#      unlabelled, recipes/paper_fmnist/*.yaml; PT_EPOCHS scales the budget), after an MAE-Small teacher
#      (TEACHER_EPOCHS over the same 20,000) that the table checks beats the MAE-Tiny student;
#   2. each student and a random init (scratch): fine-tuned on 10% of the labels, linear probe, k-NN, SEEDS;
#   3. the convergence check: the fine-tunes of CHECK_INITS again at twice FT_EPOCHS (seeds CHECK_SEEDS), and at
#      each of CURVE_EPOCHS (shorter lengths: top-1 against the fine-tune's length, paper_ft_length_fmnist.png);
#   4. CKA of the MAE, D-MAE and D²-MAE students against the teacher, attention distance and entropy of the
#      students (PNGs in benchmarks/results/).
# Every step skips what is done (a finished run is not started again, a written JSON is kept), so the script can run
# over several sittings: STOP_AFTER=1 ends each pre-training after one epoch of this invocation.
#   bash benchmarks/paper_table.sh      (about 4.3 CPU-hours on an avx512_bf16 Xeon in bf16: pre-training 0.6 with
#                                        the teacher's 21 min, 21 fine-tunes of 6 min, 4 checks of 12, the probes;
#                                        over two sittings as two invocations of one thread each, see below)
#   SEEDS=0 METHODS="mae dino" bash benchmarks/paper_table.sh   (a subset; the table shows what is there)
# Two invocations can share the work on disjoint METHODS (OMP_NUM_THREADS=1 each): give all but one SCRATCH=0
# (the random-init rows) and all but the last ANALYSIS=0 (the CKA, attention and table steps).
# The step policy is not probed (FASTVIT_PROBE=0: its cache or the fallback rules): a probe per method and model
# would cost minutes of a budget that short runs cannot repay.
set -euo pipefail
{  # the whole script is read before it runs: editing it while a sitting runs cannot change that sitting
cd "$(dirname "$0")/.."
F=${FASTVIT:-.venv/bin/fastvit}
PY=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"mae mocov3 dino simmim dmae d2mae"}
PT_EPOCHS=${PT_EPOCHS:-1}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-16}
FT_EPOCHS=${FT_EPOCHS:-16}
CHECK_INITS=${CHECK_INITS:-"mae mocov3 dmae scratch"}
CHECK_SEEDS=${CHECK_SEEDS:-0}
CURVE_EPOCHS=${CURVE_EPOCHS:-8}
OUT=${OUT:-runs/paper_fmnist}
SCRATCH_ROWS=${SCRATCH:-1}
ANALYSIS=${ANALYSIS:-1}
export FASTVIT_PROBE=${FASTVIT_PROBE:-0}
RES=${RES:-benchmarks/results}
R=recipes/paper_fmnist
TRAIN=data/fmnist_10pct/train TEST=data/fmnist/test
mkdir -p "$OUT"
echo "# $(date -u +%FT%TZ): METHODS='$METHODS' SEEDS='$SEEDS' PT_EPOCHS=$PT_EPOCHS TEACHER_EPOCHS=$TEACHER_EPOCHS" \
  "FT_EPOCHS=$FT_EPOCHS CHECK_INITS='$CHECK_INITS' CHECK_SEEDS='$CHECK_SEEDS' CURVE_EPOCHS='$CURVE_EPOCHS'" \
  "OMP_NUM_THREADS=${OMP_NUM_THREADS:-} cores=$(taskset -cp $$ 2>/dev/null | sed 's/.*: //')" >> "$OUT/commands.txt"
# run a command: into commands.txt, and its wall / user / system seconds into times.tsv (the table's totals)
run() {
  echo "$*" >> "$OUT/commands.txt"; echo "+ $*" >&2
  local TIMEFORMAT="%R %U %S"
  { time "$@" 2>&4; } 4>&2 2> "$OUT/.time.$$"
  printf '%s\t%s\n' "$(cat "$OUT/.time.$$")" "$*" >> "$OUT/times.tsv"
}
# run unless FILE exists; either way the command goes into the list
once() { local file=$1; shift; if [ -e "$file" ]; then echo "$*   # skipped: $file exists" >> "$OUT/commands.txt"; else run "$@"; fi; }
# the export a finished run (pre-training or fine-tune) of N epochs leaves: a run that has it is not started again
fin() { echo "$1/model-$(printf %04d "$2").pt"; }
STOP=(); [ -n "${STOP_AFTER:-}" ] && STOP=(train.stop_after_epochs="$STOP_AFTER")

[ -d data/fmnist/test ] || run $F data fashion-mnist data/fmnist
[ -d $TRAIN ] || run $F data fashion-mnist data/fmnist_10pct --per-class 600
[ -d data/fmnist_pt/train ] || run $F data fashion-mnist data/fmnist_pt --per-class 2000

# pre-training: the teacher first (finished before any student distils it), then the students
done_at() { [ -e "$1/model-$(printf %04d "$2").pt" ] || { echo "$1 is not finished: run this script again" >&2; exit 0; }; }
case " $METHODS " in *" dmae "*|*" d2mae "*)
  once "$(fin $OUT/teacher "$TEACHER_EPOCHS")" \
    $F train $R/mae_small_teacher.yaml train.epochs="$TEACHER_EPOCHS" "${STOP[@]}" --out $OUT/teacher --resume
  done_at $OUT/teacher "$TEACHER_EPOCHS" ;;
esac
for m in $METHODS; do
  extra=(); case $m in dmae|d2mae) extra=(method.teacher=$OUT/teacher) ;; esac
  once "$(fin $OUT/$m "$PT_EPOCHS")" \
    $F train $R/${m}_tiny.yaml train.epochs="$PT_EPOCHS" "${extra[@]}" "${STOP[@]}" --out $OUT/$m --resume
done
# an unfinished pre-training (STOP_AFTER) ends this sitting here
for m in $METHODS; do done_at $OUT/$m "$PT_EPOCHS"; done

# evaluation: the probes read images as each encoder was pre-trained (its run's geometry and statistics), whole
# (data.crop_pct=1.0, as the fine-tunes score them: a 0.875 centre crop cuts the borders of 28-px clothes); the
# random encoders have no run: the MAE student's recipe stands in for it
PROBE=(--train $TRAIN --test $TEST data.workers=0 data.crop_pct=1.0)
RANDOM_INIT=(--recipe $R/mae_tiny.yaml)
LINPROBE=(linprobe.optimizer=sgd linprobe.blr=0.1 linprobe.epochs=90)
first=${SEEDS%% *}
evaluate() {  # init seed
  local init=$1 seed=$2 src base=()
  src=$([ "$init" = scratch ] && echo scratch || echo $OUT/$init)
  [ "$init" = scratch ] && base=("${RANDOM_INIT[@]}")
  once $OUT/linprobe_${init}_s$seed.json $F linprobe "$src" "${PROBE[@]}" "${base[@]}" "${LINPROBE[@]}" \
    train.seed="$seed" --json $OUT/linprobe_${init}_s$seed.json
  # k-NN has no randomness of its own: one run per pre-trained encoder, one per seed for the random encoders
  if [ "$init" = scratch ] || [ "$seed" = "$first" ]; then
    once $OUT/knn_${init}_s$seed.json $F knn "$src" "${PROBE[@]}" "${base[@]}" train.seed="$seed" \
      --json $OUT/knn_${init}_s$seed.json
  fi
}
case " $METHODS " in *" dmae "*|*" d2mae "*) for seed in $SEEDS; do evaluate teacher "$seed"; done ;; esac
INITS="$METHODS"; [ "$SCRATCH_ROWS" = 1 ] && INITS="$INITS scratch"
for seed in $SEEDS; do
  for init in $INITS; do
    src=$([ $init = scratch ] && echo scratch || echo $OUT/$init)
    once "$(fin $OUT/ft_${init}_s$seed "$FT_EPOCHS")" \
      $F finetune $R/finetune.yaml init="$src" train.epochs="$FT_EPOCHS" eval.every_epochs="$FT_EPOCHS" \
      train.seed="$seed" --out $OUT/ft_${init}_s$seed --resume
    evaluate "$init" "$seed"
  done
done
# convergence: one more doubling of the fine-tune must move top-1 by less than the seed spread
for seed in $CHECK_SEEDS; do
  for init in $CHECK_INITS; do
    case " $INITS " in *" $init "*) ;; *) continue ;; esac
    src=$([ $init = scratch ] && echo scratch || echo $OUT/$init)
    once "$(fin $OUT/ft2x_${init}_s$seed $((2 * FT_EPOCHS)))" \
      $F finetune $R/finetune.yaml init="$src" train.epochs=$((2 * FT_EPOCHS)) eval.every_epochs="$FT_EPOCHS" \
      train.seed="$seed" --out $OUT/ft2x_${init}_s$seed --resume
    for n in $CURVE_EPOCHS; do  # the lengths FT_EPOCHS and twice it are the runs above
      [ "$n" = "$FT_EPOCHS" ] || [ "$n" = $((2 * FT_EPOCHS)) ] && continue
      once "$(fin $OUT/ftlen${n}_${init}_s$seed "$n")" \
        $F finetune $R/finetune.yaml init="$src" train.epochs="$n" eval.every_epochs="$n" \
        train.seed="$seed" --out $OUT/ftlen${n}_${init}_s$seed --resume
    done
  done
done

[ "$ANALYSIS" = 1 ] || exit 0
label() { case $1 in mae) echo MAE;; mocov3) echo MoCo-v3;; dino) echo DINO;; simmim) echo SimMIM;;
  dmae) echo D-MAE;; d2mae) echo D²-MAE;; teacher) echo "MAE-Small teacher";; *) echo "$1";; esac; }
# analysis: CKA of each MAE-family student against the teacher; attention of the students (and the teacher)
if [ -d $OUT/teacher ]; then
  for m in mae dmae d2mae; do
    [ -d $OUT/$m ] && once $OUT/cka_${m}_vs_teacher.json $F analyze cka $OUT/$m $OUT/teacher --data $TEST \
      --images 1000 --labels "$(label $m)-Tiny,MAE-Small teacher" --out $OUT/cka_${m}_vs_teacher.png
  done
fi
ATT=() LAB=()
for m in mae mocov3 dino simmim dmae d2mae teacher; do
  [ -d $OUT/$m ] && { ATT+=($OUT/$m); LAB+=("$(label $m)"); }
done
once $OUT/attention.json $F analyze attention "${ATT[@]}" --data $TEST --images 1000 \
  --labels "$(IFS=,; echo "${LAB[*]}")" --out $OUT/attention.png

$PY benchmarks/paper_table.py "$OUT" --res "$RES" > "$RES/paper_table_fmnist.md"
echo "wrote $RES/paper_table_fmnist.md" >&2
exit
}

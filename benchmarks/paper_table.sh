#!/usr/bin/env bash
# The paper's comparison at small scale, on real data (Fashion-MNIST): benchmarks/results/paper_table_fmnist.md.
#   1. ViT-Tiny students pre-trained by MAE, MoCo-v3, DINO, SimMIM, D-MAE and D²-MAE on the same images (20,000
#      unlabelled, recipes/paper_fmnist/*.yaml; PT_EPOCHS scales the budget), after an MAE-Small teacher
#      (TEACHER_EPOCHS over the same 20,000) that the table checks beats the MAE-Tiny student;
#   2. each student and a random init (scratch): fine-tuned on 10% of the labels, linear probe, k-NN, SEEDS;
#   3. the convergence check: the fine-tunes of CHECK_INITS again at twice FT_EPOCHS (seeds CHECK_SEEDS), and at
#      each of CURVE_EPOCHS (shorter lengths: top-1 against the fine-tune's length, paper_ft_length_fmnist.png);
#   4. CKA of the MAE, D-MAE and D²-MAE students against the teacher, attention distance and entropy of every
#      encoder (PNGs in benchmarks/results/).
# The work goes one column at a time (a method: its pre-training, every seed's evaluations, its checks), so that a
# sitting that ends leaves whole columns behind.
#
# Sittings. Every step skips what is done, and what is done outlives the machine: each finished step's small files
# (logs, configs, probe and analysis JSONs, finished.json; never weights) go into REC, benchmarks/results/paper_fmnist/,
# which is committed, and a new checkout's first invocation brings them back into OUT. Weights do not travel: a
# step that needs an encoder whose weights are gone pre-trains it again (recipe and seed as recorded; the teacher
# too, first), and the made-again weights must have the digest recorded in finished.json (sha256 over the tensors:
# same recipe, seed and CPU kind with one thread give the same weights) for the evaluations recorded from the old
# ones to stand with the new. Where they differ (another CPU kind or precision), the script stops and says so:
# finish that column on a CPU like the recorded one, or set REDO="<method>..." to set the method's recorded
# evaluations aside (REC/superseded/) and make them all again. STOP_AFTER=1 ends each pre-training after one epoch.
#   bash benchmarks/paper_table.sh      (about 7 CPU-hours on an avx512_bf16 Xeon in bf16, 10 on an AVX2 EPYC in
#                                        fp32: fine-tunes of 6 / 17 min are most of it; so several sittings, as two
#                                        invocations of one thread each, see below)
#   SEEDS=0 METHODS="mae dino" bash benchmarks/paper_table.sh   (a subset; the table shows what is there)
# Two invocations can share the work on disjoint METHODS (OMP_NUM_THREADS=1 each, pinned with taskset): give all but
# one SCRATCH=0 (the random-init rows) and the methods that distil the teacher (dmae, d2mae) to one of them; TABLE=0
# to all but the last (it writes the table from REC).
# The step policy is not probed (FASTVIT_PROBE=0: its cache or the fallback rules): a probe per method and model
# would cost minutes of a budget that short runs cannot repay.
set -euo pipefail
{  # the whole script is read before it runs: editing it while a sitting runs cannot change that sitting
cd "$(dirname "$0")/.."
F=${FASTVIT:-.venv/bin/fastvit}
PY=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS-"mae mocov3 dino simmim dmae d2mae"}   # may be empty (SCRATCH=1 alone: the random-init rows)
PT_EPOCHS=${PT_EPOCHS:-1}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-16}
FT_EPOCHS=${FT_EPOCHS:-16}
CHECK_INITS=${CHECK_INITS-"mae mocov3 scratch"}   # may be empty (no checks)
CHECK_SEEDS=${CHECK_SEEDS:-0}
CURVE_EPOCHS=${CURVE_EPOCHS-8}
OUT=${OUT:-runs/paper_fmnist}
SCRATCH_ROWS=${SCRATCH:-1}
TABLE=${TABLE:-1}
REDO=${REDO:-}
export FASTVIT_PROBE=${FASTVIT_PROBE:-0}
RES=${RES:-benchmarks/results}
REC=${REC:-$RES/paper_fmnist}
R=recipes/paper_fmnist
TRAIN=${TRAIN:-data/fmnist_10pct/train}   # the labelled 10% (fine-tunes, probes' training set)
TEST=${TEST:-data/fmnist/test}            # all 10,000 test images
PT_DATA=${PT_DATA:-data/fmnist_pt/train}  # the 20,000 unlabelled images of every pre-training
read -ra PT_ARGS <<< "${PT_ARGS:-}"       # more overrides for every pre-training (engine.precision=fp32, ...)
read -ra FT_ARGS <<< "${FT_ARGS:-}"       # and for every fine-tune
mkdir -p "$OUT" "$REC"

# ------------------------------------------------------------------------------------------------ the record (REC)
# what is finished goes into REC: every file of OUT but weights and TensorBoard logs, and of the run directories only
# the finished ones (finished.json)
record() {
  (cd "$OUT" && for f in *; do
     if [ -d "$f" ]; then if [ -e "$f/finished.json" ]; then find "$f" -type f ! -name '*.pt' ! -path '*/tb/*'; fi
     elif [ -f "$f" ]; then echo "$f"; fi
   done) | tar -C "$OUT" -cf - -T - | tar -C "$REC" -xf -
}
# a new checkout: what earlier sittings finished comes back (never over this sitting's own files)
cp -rn "$REC/." "$OUT/"
trap record EXIT
TIMES=times.tsv
echo "# $(date -u +%FT%TZ): METHODS='$METHODS' SEEDS='$SEEDS' PT_EPOCHS=$PT_EPOCHS TEACHER_EPOCHS=$TEACHER_EPOCHS" \
  "FT_EPOCHS=$FT_EPOCHS CHECK_INITS='$CHECK_INITS' CHECK_SEEDS='$CHECK_SEEDS' CURVE_EPOCHS='$CURVE_EPOCHS'" \
  "OMP_NUM_THREADS=${OMP_NUM_THREADS:-} cores=$(taskset -cp $$ 2>/dev/null | sed 's/.*: //')" >> "$OUT/commands.txt"
# run a command: into commands.txt, and its wall / user / system seconds into TIMES (the table's totals)
run() {
  echo "$*" >> "$OUT/commands.txt"; echo "+ $*" >&2
  local TIMEFORMAT="%R %U %S"
  { time "$@" 2>&4; } 4>&2 2> "$OUT/.time.$$"
  printf '%s\t%s\n' "$(cat "$OUT/.time.$$")" "$*" >> "$OUT/$TIMES"
}
skipped() { echo "$*   # skipped: done" >> "$OUT/commands.txt"; }
# run a command holding the lock NAME: what two invocations both reach (an encoder, a step) is made once, by the
# first; the second waits for it and finds it done
locked() {
  local name=$1 fd; shift
  mkdir -p "$OUT/.lock"; exec {fd}>"$OUT/.lock/$name"; flock "$fd"
  "$@"  # (set -e: a failure ends the script, and the lock with it)
  exec {fd}>&-
}
# the export a finished run (pre-training or fine-tune) of N epochs leaves
fin() { echo "$1/model-$(printf %04d "$2").pt"; }
teacher_of() { case $1 in */dmae|*/d2mae) echo --teacher "$OUT/teacher" ;; esac; }
# finished.json of a run of N epochs: when, on what CPU, the digest of its weights; written after the run
mark() { $PY benchmarks/paper_table.py --mark "$1" --epochs "$2" $(teacher_of "$1") > /dev/null; record; }
# a run is done when it has its finished.json (or its export, from before the script wrote them: it gets one now)
is_done() { [ -e "$1/finished.json" ] || { [ -e "$(fin "$1" "$2")" ] && mark "$1" "$2"; }; }
digest() { sed -n 's/.*"weights": "\([0-9a-f]*\)".*/\1/p' "$1/finished.json" 2>/dev/null; }
STOP=(); [ -n "${STOP_AFTER:-}" ] && STOP=(train.stop_after_epochs="$STOP_AFTER")
done_at() { [ -e "$(fin "$1" "$2")" ] || { echo "$1 is not finished: run this script again" >&2; exit 0; }; }

# (a failure inside a function called as `a || f` would not end the script: steps go in if-statements)
if [ ! -d "$TEST" ]; then run $F data fashion-mnist "$(dirname "$TEST")"; fi
if [ ! -d "$TRAIN" ]; then run $F data fashion-mnist "$(dirname "$TRAIN")" --per-class 600; fi
if [ ! -d "$PT_DATA" ]; then run $F data fashion-mnist "$(dirname "$PT_DATA")" --per-class 2000; fi

# ----------------------------------------------------------------------------------------------------- encoders
# the evaluations of one method: what REDO sets aside
evaluations() { (cd "$OUT" && ls -d ft_$1_s* ft2x_$1_s* ftlen*_$1_s* linprobe_$1_s*.json knn_$1_s*.json \
  cka_$1_vs_teacher.* attention_$1.* $([ "$1" = teacher ] && echo 'cka_*_vs_teacher.*') 2>/dev/null) || true; }
redo() {  # method: its recorded pre-training and evaluations to REC/superseded/<method>-<time>/ (REDO=teacher: the
  # CKAs against it too; the students that distilled it need their own REDO)
  local to=$REC/superseded/$1-$(date -u +%Y%m%dT%H%M%SZ) f
  mkdir -p "$to"
  for f in $1 $(evaluations $1); do
    [ -e "$REC/$f" ] && mv "$REC/$f" "$to/"
    rm -rf "${OUT:?}/$f"
  done
  echo "# $(date -u +%FT%TZ): REDO $1: its recorded runs moved to $to" >> "$OUT/commands.txt"
}
for m in $REDO; do redo $m; done
# the weights of a pre-trained encoder on disk: pre-trained by this sitting, or pre-trained again where an earlier
# sitting recorded it (into TIMES times_remade.tsv) and checked against the recorded digest
encoder() { locked "$1" encoder_ "$1"; }
encoder_() {  # method|teacher
  local m=$1 dir=$OUT/$1 n=$PT_EPOCHS recipe=$R/${1}_tiny.yaml extra=() old=""
  [ "$m" = teacher ] && n=$TEACHER_EPOCHS recipe=$R/mae_small_teacher.yaml
  if [ -e "$(fin "$dir" $n)" ]; then is_done "$dir" $n; return; fi
  case $m in dmae|d2mae) encoder teacher; extra=(method.teacher=$OUT/teacher) ;; esac
  if [ -e "$dir/finished.json" ]; then rm -rf "$OUT/.$m.recorded"; mv "$dir" "$OUT/.$m.recorded"; fi
  if [ -d "$OUT/.$m.recorded" ]; then
    old=$(digest "$OUT/.$m.recorded"); TIMES=times_remade.tsv
    echo "# $m: recorded by an earlier sitting, its weights are not here: pre-trained again" >> "$OUT/commands.txt"
  fi
  run $F train "$recipe" data.path="$PT_DATA" train.epochs=$n "${extra[@]}" "${PT_ARGS[@]}" "${STOP[@]}" \
    --out "$dir" --resume
  TIMES=times.tsv
  done_at "$dir" $n
  if [ -z "$old" ]; then mark "$dir" $n; return; fi
  $PY benchmarks/paper_table.py --mark "$dir" --epochs $n $(teacher_of "$dir") > /dev/null
  local new; new=$(digest "$dir")
  if [ "$new" != "$old" ]; then
    mv "$dir" "$OUT/.$m.remade"; mv "$OUT/.$m.recorded" "$dir"
    cat >&2 <<MSG
$m pre-trained again on this machine gave other weights than the ones its recorded evaluations came from
(sha256 $new here, $old recorded, $(sed -n 's/.*"cpu": "\(.*\)".*/\1/p' "$dir/finished.json")): the rows would mix two encoders.
Finish its column on a CPU like the recorded one, or run again with REDO="$m" to set its recorded runs aside
(REC/superseded/) and make them all again. The new weights are in $OUT/.$m.remade.
MSG
    exit 1
  fi
  # the same weights: the recorded run stands (its log and times), with this sitting's weights in it
  mv "$dir"/*.pt "$OUT/.$m.recorded/"; rm -rf "$dir"; mv "$OUT/.$m.recorded" "$dir"
}
# run a step unless FILE exists, with the encoders it reads on disk first
step() { locked "$(basename "$2")" step_ "$@"; }
step_() {  # "encoders" file command...
  local encs=$1 file=$2 e; shift 2
  if [ -e "$file" ]; then skipped "$@"; return; fi
  for e in $encs; do if [ "$e" != scratch ]; then encoder "$e"; fi; done
  run "$@"; record
}

# --------------------------------------------------------------------------------------------------- evaluation
# the probes read images as each encoder was pre-trained (its run's geometry and statistics), whole
# (data.crop_pct=1.0, as the fine-tunes score them: a 0.875 centre crop cuts the borders of 28-px clothes); the
# random encoders have no run: the MAE student's recipe stands in for it
PROBE=(--train $TRAIN --test $TEST data.workers=0 data.crop_pct=1.0)
LINPROBE=(linprobe.optimizer=sgd linprobe.blr=0.1 linprobe.epochs=90)
src() { [ "$1" = scratch ] && echo scratch || echo "$OUT/$1"; }
evaluate() {  # init seed
  local init=$1 seed=$2 base=()
  [ "$init" = scratch ] && base=(--recipe $R/mae_tiny.yaml)
  step $init $OUT/linprobe_${init}_s$seed.json $F linprobe "$(src $init)" "${PROBE[@]}" "${base[@]}" "${LINPROBE[@]}" \
    train.seed="$seed" --json $OUT/linprobe_${init}_s$seed.json
  # k-NN has no randomness of its own: one run per pre-trained encoder (whichever seed a sitting reaches first:
  # a sitting may start at seed 1), one per seed for the random encoders
  if [ "$init" = scratch ] || ! compgen -G "$OUT/knn_${init}_s*.json" > /dev/null; then
    step $init $OUT/knn_${init}_s$seed.json $F knn "$(src $init)" "${PROBE[@]}" "${base[@]}" train.seed="$seed" \
      --json $OUT/knn_${init}_s$seed.json
  fi
}
finetune() { locked "$4" finetune_ "$@"; }
finetune_() {  # init seed epochs run-name
  local init=$1 seed=$2 n=$3 dir=$OUT/$4
  if is_done "$dir" "$n"; then skipped "fine-tune $dir"; return; fi
  if [ "$init" != scratch ]; then encoder "$init"; fi
  run $F finetune $R/finetune.yaml init="$(src $init)" data.path="$TRAIN" eval.path="$TEST" train.epochs="$n" \
    eval.every_epochs="$n" train.seed="$seed" "${FT_ARGS[@]}" --out "$dir" --resume
  mark "$dir" "$n"
}
label() { case $1 in mae) echo MAE;; mocov3) echo MoCo-v3;; dino) echo DINO;; simmim) echo SimMIM;;
  dmae) echo D-MAE;; d2mae) echo D²-MAE;; teacher) echo "MAE-Small teacher";; *) echo "$1";; esac; }
# the analyses of one encoder, while its weights are on disk: attention distance and entropy, and CKA against
# the teacher for the MAE family (the teacher's column makes them: it is the one that has the teacher)
attention() {
  step $1 $OUT/attention_$1.json $F analyze attention $OUT/$1 --data $TEST --images 1000 --labels "$(label $1)" \
    --out $OUT/attention_$1.png
}
cka() {
  step "$1 teacher" $OUT/cka_$1_vs_teacher.json $F analyze cka $OUT/$1 $OUT/teacher --data $TEST --images 1000 \
    --labels "$(label $1)-Tiny,MAE-Small teacher" --out $OUT/cka_$1_vs_teacher.png
}

# -------------------------------------------------------------------------------------------------- the columns
# the teacher first (finished before any student distils it), the distilled students' pre-training, the CKA of the
# MAE family against it and its own probes: what needs the teacher's weights, together
# (two invocations, one with each distilled student, share these steps: each starts with its own student)
case " $METHODS " in *" dmae "*|*" d2mae "*)
  if ! is_done $OUT/teacher "$TEACHER_EPOCHS"; then encoder teacher; fi
  distilled="dmae d2mae"; case " $METHODS " in *" dmae "*) ;; *) distilled="d2mae dmae" ;; esac
  for m in $distilled; do if ! is_done $OUT/$m "$PT_EPOCHS"; then encoder $m; fi; done
  for m in $distilled mae; do cka $m; done
  for seed in $SEEDS; do evaluate teacher "$seed"; done
  attention teacher ;;
esac
INITS="$METHODS"; [ "$SCRATCH_ROWS" = 1 ] && INITS="$INITS scratch"
for init in $INITS; do
  if [ "$init" != scratch ] && ! is_done "$OUT/$init" "$PT_EPOCHS"; then encoder "$init"; fi
  for seed in $SEEDS; do
    finetune "$init" "$seed" "$FT_EPOCHS" ft_${init}_s$seed
    evaluate "$init" "$seed"
  done
  if [ "$init" != scratch ]; then attention "$init"; fi
  # convergence: one more doubling of the fine-tune must move top-1 by less than the seed spread
  case " $CHECK_INITS " in *" $init "*)
    for seed in $CHECK_SEEDS; do
      finetune "$init" "$seed" $((2 * FT_EPOCHS)) ft2x_${init}_s$seed
      for n in $CURVE_EPOCHS; do  # the lengths FT_EPOCHS and twice it are the runs above
        [ "$n" = "$FT_EPOCHS" ] || [ "$n" = $((2 * FT_EPOCHS)) ] && continue
        finetune "$init" "$seed" "$n" ftlen${n}_${init}_s$seed
      done
    done ;;
  esac
done

record
[ "$TABLE" = 1 ] || exit 0
$PY benchmarks/paper_table.py "$REC" --res "$RES" > "$RES/paper_table_fmnist.md"
echo "wrote $RES/paper_table_fmnist.md" >&2
exit
}

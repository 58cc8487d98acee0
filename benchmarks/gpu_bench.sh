#!/usr/bin/env bash
# MAE ViT-Tiny throughput on one GPU (written for the lent H200; the write-up goes to benchmarks/results/gpu_h200.md):
#   model      bench model: bf16 train steps at batch 512, attention sdpa vs math, torch engine (and deepspeed
#              beside it when it imports), timm's ViT-Tiny as the reference, with MFU
#   e2e_*      bench e2e recipes/mae_tiny_400ep.yaml on a 12,800-photo class-folder tree: loader, model and end to
#              end img/s with the torchvision loader (12 workers); deepspeed, dali and ffcv variants when they import
#   loader     bench loader: tv-decode (torchvision.io.decode_jpeg batched on the GPU, i.e. nvJPEG, then
#              RandomResizedCrop + flip on the GPU into a normalised bf16 batch) and turbo (the crop decoder in 12
#              threads, uint8 to the GPU; built first where gcc and libjpeg's headers exist) beside the torchvision
#              reference loader (PIL in 12 workers) and PIL decode-only, all in one run
#   teacher    bench model --method mae,dmae,d2mae,mocov3,dino,simmim --teacher vit_base_patch16: what D-MAE's and
#              D2-MAE's frozen ViT-Base costs, MoCo-v3's two views and momentum encoder, DINO's 2 + 10 crops and
#              SimMIM's full-token encoder, beside MAE
#   ablation   bench model --ablate: SDPA, fused AdamW, bf16, torch.compile: all 16 combinations (8 compiles)
#              (~8 min on its own with its compiles: in a second call, `--only ablation --budget 540`)
# Each step runs under its own timeout and the overall --budget, writes OUT/<step>.json the moment it ends, and
# appends one line to OUT/steps.log (a failed step also its output's last lines); a failed step never stops the
# rest. Not yet run on a GPU (the session that wrote it had none): ~6 min on the H200 is an estimate (each
# process ~10 s to start and warm up, the compiles ~1 min each); the budget (420 s) ends the script by itself
# inside the command's limit, skipping (and logging) what no longer fits.
#
# On the device machine (Python 3.12, torch 2.11, no DALI, FFCV or DeepSpeed, no network): first, here,
# `bash benchmarks/gpu_wheels.sh` (DeepSpeed and its missing requirements as wheels in .whl/, ~5 MiB), then
#   run(command="bash benchmarks/gpu_bench.sh", carry=[".whl"], timeout_s=480)
# which leaves ~5 of the session's 15 device minutes to rerun what failed, e.g.
#   run(command="bash benchmarks/gpu_bench.sh --only e2e_torchvision,loader --budget 150", carry=[".whl"], timeout_s=200)
# The JSONs and steps.log come back from $OUT (8 files at most: env, model, e2e_torchvision, e2e_deepspeed, loader,
# teacher, ablation, steps.log). Write them up, with the hardware and versions from env.json, in
# benchmarks/results/gpu_h200.md.
#
# usage: bash benchmarks/gpu_bench.sh [--device cuda|cpu] [--tiny] [--out DIR] [--only STEP,...] [--budget SECONDS]
#   --tiny: seconds per step (test-size model, 32 px, batch 4-8, 1-2 steps, 64 photos); with --device cpu this is
#   the dry run tests/test_gpu_script.py makes. PYTHON (default python3) runs everything, from this checkout.
cd "$(dirname "$0")/.." || exit 1
device=cuda tiny="" only="" budget=420 out_dir=${OUT:-benchmarks/results/gpu}
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --tiny) tiny=1; shift ;;
    --out) out_dir=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    *) echo "gpu_bench.sh: unknown argument '$1' (expected --device cuda|cpu, --tiny, --out DIR, --only STEP,..., --budget S)" >&2
       exit 2 ;;
  esac
done
case $device in cuda|cpu) ;; *) echo "gpu_bench.sh: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;; esac
measurements=",model,e2e_torchvision,loader,teacher,ablation,e2e_deepspeed,e2e_dali,e2e_ffcv,"
for name in ${only//,/ }; do
  [[ $measurements == *",$name,"* ]] || { echo "gpu_bench.sh: --only: unknown step '$name' (known: ${measurements:1:-1})" >&2; exit 2; }
done
PY=${PYTHON:-python3}
"$PY" -c 'import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ("torch", "torchvision", "timm"))))' \
  2> /dev/null || { echo "gpu_bench.sh: $PY has no torch, torchvision or timm; set PYTHON (here: PYTHON=.venv/bin/python)" >&2; exit 2; }
FV=("$PY" -m fastvit_pt.cli)
SITE=${SITE:-/tmp/site}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DS_ACCELERATOR=$device  # DeepSpeed's accelerator is the benchmarked device, not its own guess
mkdir -p "$out_dir" || exit 1
LOG=$out_dir/steps.log
: > "$LOG"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
data=${DATA:-$scratch/photos}  # DATA=DIR reuses a tree from an earlier run
deadline=$(( $(date +%s) + budget ))

skip() { printf '%-18s skipped: %s\n' "$1" "$2" | tee -a "$LOG"; }
selected() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }  # selected STEP: by --only, or all without it

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, what is left of --budget); log start, end, seconds, ok or
# FAILED; return CMD's exit code (0 when skipped). Removes OUT/NAME.json first: a failed step leaves no stale
# result. --only filters the measurements; env, wheels, data and beton are what they need.
step() {
  local name=$1 limit=$2; shift 2
  case $name in
    env|wheels|data|beton|cropdecode) ;;
    *) selected "${name%_torch_only}" || return 0 ;;
  esac
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    skip "$name" "only $left s of the $budget s budget left"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  rm -f "$out_dir/$name.json"
  echo "=== $name (limit ${limit} s): $*"
  local start t0 rc
  start=$(date +%H:%M:%S) t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$scratch/$name.log"
  rc=${PIPESTATUS[0]}
  local secs status=ok
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  [ "$rc" -ne 0 ] && status="FAILED rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="$status (timed out at $limit s)"
  printf '%-18s start %s  end %s  %7s s  %s\n' "$name" "$start" "$(date +%H:%M:%S)" "$secs" "$status" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then  # the error itself, for a run whose console output is cut
    tr '\r' '\n' < "$scratch/$name.log" | grep -v '^\s*$' | tail -n 12 | sed 's/^/    | /' >> "$LOG"
  fi
  return "$rc"
}

# imports MODULE: does it import with $PY? env.json's answer (the env step tried each), else a fresh try
imports() {
  if [ -f "$out_dir/env.json" ]; then
    "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["imports"].get(sys.argv[2]) != "ok")' \
      "$out_dir/env.json" "$1"
  else
    "$PY" -c "import $1" > /dev/null 2>&1
  fi
}

if [ -n "$tiny" ]; then  # seconds per step: same commands, test sizes
  n_photos=64 workers=2 teacher=vit_test
  size=(--model mae_vit_test --img-size 32 --patch-size 8 --batch 4)
  # settings of the methods that have them, at test size (DINO's local crops: 16 px of a 32-px model)
  method_set=(decoder_block=1 mlp_dim=64 local_size=16 out_dim=64 hidden_dim=32 bottleneck_dim=16)
  timed=(--steps 1 --warmup 1) ablation_timed=(--steps 1 --warmup 1)
  e2e=(model.name=mae_vit_test model.img_size=32 model.patch_size=8 train.global_batch=4 train.micro_batch=4
       --steps 2 --warmup 1 --windows 2)
  loader=(--batch 8 --img-size 32 --epochs 1)
else
  # 12,800 photos: ~10 s to write on 16 cores, 25 batches of 512 per epoch, ~0.8 GB in the page cache
  n_photos=12800 workers=12 teacher=vit_base_patch16  # 12 of the 16 cores decode; the rest feed the GPU
  size=(--batch 512)
  method_set=()
  timed=(--steps 50 --warmup 10)
  ablation_timed=(--steps 10 --warmup 2)  # 16 cases; the warm-up holds the 8 torch.compile builds (~30-60 s each)
  e2e=(train.global_batch=512 train.micro_batch=512 --steps 15 --warmup 5 --windows 3)
  loader=(--batch 512 --img-size 224 --epochs 2)
fi
# eager: under `auto` a 400-epoch recipe would first time compile (a minute or more of this step's budget); the
# ablation step times compile
e2e+=("data.path=$data" "data.workers=$workers" "engine.device=$device" engine.precision=bf16 engine.compile=false)
# CPU dry run: inductor's C++ build of the two compiled cases alone takes minutes on 2 cores; the compiled
# variants then run eagerly (TORCHDYNAMO_DISABLE), so the step's code path is checked, not the compiler
no_compile=()
[ -n "$tiny" ] && [ "$device" = cpu ] && no_compile=(env TORCHDYNAMO_DISABLE=1)

# carried wheels (benchmarks/gpu_wheels.sh): the ones whose package is missing here or older go into $SITE, as the
# device README installs them; the deepspeed steps below then import it
if ls .whl/*.whl > /dev/null 2>&1; then
  wanted=$("$PY" - .whl/*.whl <<'EOF'
import importlib.metadata as md, sys
from packaging.version import Version

for path in sys.argv[1:]:
    name, version = path.rsplit("/", 1)[-1].split("-")[:2]
    try:
        if Version(md.version(name)) >= Version(version):
            continue
    except md.PackageNotFoundError:
        pass
    print(path)
EOF
) || wanted=$(ls .whl/*.whl)  # no packaging to compare versions with: all of them
  if [ -n "$wanted" ]; then
    # shellcheck disable=SC2086  # one wheel path per word
    step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      $wanted && export PYTHONPATH="$SITE:$PYTHONPATH"
  else
    skip wheels "every package in .whl/ is already installed at that version or newer"
  fi
else
  skip wheels "no .whl/ (bash benchmarks/gpu_wheels.sh makes it)"
fi
# environment: versions, the GPU as nvidia-smi reports it, which optional libraries import (those the selected
# steps use: importing ffcv alone takes ~8 s of a CPU)
optional=(deepspeed)
selected e2e_dali && optional+=(nvidia.dali)
selected e2e_ffcv && optional+=(ffcv)
step env 120 env GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "$PY" - "$out_dir/env.json" "${optional[@]}" <<'EOF'
import importlib, json, os, platform, shutil, subprocess, sys

env = {"python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count(),
       "git_rev": os.environ.get("GIT_REV")}
# DataLoader workers hand batches over in /dev/shm: 12 workers x 2 prefetched x 77 MB at batch 512, 224 px
env["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1) if os.path.isdir("/dev/shm") else None
for mod in ("torch", "torchvision", "timm", "numpy", "PIL"):
    env[mod] = importlib.import_module(mod).__version__
import torch

env["cuda"] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
if torch.cuda.is_available():
    env["cuda"]["device"] = torch.cuda.get_device_name()
    env["cuda"]["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit"
try:
    smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=60)
    env["nvidia_smi"] = {"query": query, "answer": (smi.stdout or smi.stderr).strip()}
except (FileNotFoundError, subprocess.TimeoutExpired) as err:
    env["nvidia_smi"] = {"query": query, "answer": f"{type(err).__name__}: {err}"}
env["imports"] = {}
for mod in sys.argv[2:]:
    try:
        importlib.import_module(mod)
        env["imports"][mod] = "ok"
    except Exception as err:  # any failure counts as "does not import", with its reason kept
        env["imports"][mod] = f"{type(err).__name__}: {err}"
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
EOF

imports deepspeed && ds=1 || ds=""

if [ -f "$data/.photos.json" ]; then  # written last: the tree is complete
  skip data "reusing $data"
else
  step data 180 "${FV[@]}" data photos "$data" --n "$n_photos" --max-side 500 --workers 0
fi

engines=torch${ds:+,deepspeed}
if ! step model 240 "${FV[@]}" bench model "${size[@]}" "${timed[@]}" --device "$device" --precision bf16 \
  --attn sdpa,math --engine "$engines" --json "$out_dir/model.json" && [ -n "$ds" ]; then
  # a deepspeed failure must not cost the torch rows
  step model_torch_only 180 "${FV[@]}" bench model "${size[@]}" "${timed[@]}" --device "$device" --precision bf16 \
    --attn sdpa,math --json "$out_dir/model.json"
fi

step e2e_torchvision 240 "${FV[@]}" bench e2e recipes/mae_tiny_400ep.yaml "${e2e[@]}" data.backend=torchvision \
  --json "$out_dir/e2e_torchvision.json"

# the crop decoder (pipelines/_cropdecode.c) for the turbo backend: built in place where this machine has a C
# compiler and libjpeg-turbo's headers (nvcc's host gcc; the headers may be missing: then the loader step goes on
# without turbo)
loader_backends=torchvision,tv-decode
if selected loader; then
  if "$PY" -c 'import pipelines.cropdecode' > /dev/null 2>&1; then
    loader_backends+=,turbo
  elif [ -f /usr/include/jpeglib.h ] && command -v gcc > /dev/null; then
    step cropdecode 120 "$PY" setup.py -q build_ext --inplace && loader_backends+=,turbo
  else
    skip cropdecode "no gcc or no /usr/include/jpeglib.h (libjpeg62-turbo-dev) here: no turbo backend"
  fi
fi
step loader 240 "${FV[@]}" bench loader --data "$data" --backends "$loader_backends" --workers "$workers" \
  "${loader[@]}" --device "$device" --precision bf16 --json "$out_dir/loader.json"

step teacher 360 "${FV[@]}" bench model "${size[@]}" "${timed[@]}" --device "$device" --precision bf16 --attn sdpa \
  --timm-ref none --method mae,dmae,d2mae,mocov3,dino,simmim --teacher "$teacher" --json "$out_dir/teacher.json" \
  "${method_set[@]}"

selected ablation && [ ${#no_compile[@]} -gt 0 ] \
  && echo "    note: the ablation's torch.compile rows below run eagerly (TORCHDYNAMO_DISABLE=1, CPU dry run)" >> "$LOG"
step ablation 540 "${no_compile[@]}" "${FV[@]}" bench model "${size[@]}" "${ablation_timed[@]}" --device "$device" \
  --ablate --timm-ref none --json "$out_dir/ablation.json"

# the optional libraries' variants: a log line instead where one does not import
if ! selected e2e_deepspeed; then :
elif [ -n "$ds" ]; then
  step e2e_deepspeed 240 "${FV[@]}" bench e2e recipes/mae_tiny_400ep.yaml "${e2e[@]}" engine.kind=deepspeed \
    --json "$out_dir/e2e_deepspeed.json"
else
  skip e2e_deepspeed "deepspeed does not import (carry .whl from benchmarks/gpu_wheels.sh)"
fi
if ! selected e2e_dali; then :
elif imports nvidia.dali; then
  step e2e_dali 240 "${FV[@]}" bench e2e recipes/mae_tiny_400ep.yaml "${e2e[@]}" data.backend=dali \
    --json "$out_dir/e2e_dali.json"
else
  skip e2e_dali "nvidia.dali does not import"
fi
if ! selected e2e_ffcv; then :
elif imports ffcv; then
  step beton 240 "${FV[@]}" convert "$data" "$scratch/photos.beton" --max-res 512 \
    && step e2e_ffcv 240 "${FV[@]}" bench e2e recipes/mae_tiny_400ep.yaml "${e2e[@]}" data.backend=ffcv \
      data.path="$scratch/photos.beton" data.interpolation=bilinear --json "$out_dir/e2e_ffcv.json"
else
  skip e2e_ffcv "ffcv does not import"
fi

echo "=== steps ($out_dir/steps.log)"
cat "$LOG"
! grep -q FAILED "$LOG"  # the exit status: 1 when any step failed

#!/usr/bin/env bash
# Writes .whl/: the wheels benchmarks/gpu_bench.sh carries to the GPU machine (run(..., carry=[".whl"])) so that
# DeepSpeed runs there. That machine has Python 3.12 and torch but no DeepSpeed and no network; gpu_bench.sh
# installs the wheels whose package it lacks (or has older) into /tmp/site, as the device README does.
#   - deepspeed: an sdist on PyPI, built here into a pure-python wheel with no ops (DS_BUILD_OPS=0: an op would
#     JIT-build on first use, and our engine uses none: torch's fused AdamW, ZeRO-1 through torch.distributed);
#   - its requirements that machine's image lacks (device KINDS.md): hjson, pydantic, pydantic-core (compiled,
#     cp312 manylinux x86_64), annotated-types, typing-inspection, and typing-extensions (pydantic needs a
#     recent one; installed there only if the image's is older). The rest (einops, msgpack, ninja, numpy,
#     packaging, psutil, py-cpuinfo, torch, tqdm) is in the image.
# Versions: those this venv runs DeepSpeed with, so the tests here vouch for the combination.
# ~5 MiB; .whl/ is git-ignored, and the 64 MiB a run may carry also holds the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}  # needs torch, setuptools and wheel: deepspeed's setup.py imports torch
git check-ignore -q .whl/ || { echo "gpu_wheels.sh: .whl/ is not git-ignored; add it to .gitignore first" >&2; exit 1; }
pins=$("$PY" - <<'EOF'
import importlib.metadata as md

for dist in ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"):
    try:
        print(f"{dist}=={md.version(dist)}")
    except md.PackageNotFoundError:
        raise SystemExit(f"gpu_wheels.sh: {dist} is not installed in this python; run make setup (or pip install deepspeed)")
EOF
)
rm -rf .whl && mkdir .whl
# --no-cache-dir: built by these settings, not taken from a wheel an earlier build left in pip's cache (~20 s)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation -w .whl "$(grep '^deepspeed==' <<< "$pins")"
ls .whl/deepspeed-*-py3-none-any.whl > /dev/null 2>&1 \
  || { echo "gpu_wheels.sh: the deepspeed wheel is not pure python: $(ls .whl)" >&2; exit 1; }
# shellcheck disable=SC2046  # one requirement per word
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $(grep -v '^deepspeed==' <<< "$pins")
stat -c '%s %n' .whl/*.whl | awk '{ printf "%8.2f MiB  %s\n", $1 / 1048576, $2 }'
echo "total: $(du -sh .whl | cut -f1) in .whl/ (the checkout that travels with it: $(git ls-files -z --cached --others --exclude-standard | du -ch --files0-from=- | tail -1 | cut -f1)); carry: [\".whl\"]"

#!/usr/bin/env bash
# The wheels bench/gpu.py needs on a GPU machine whose image lacks them (Python 3.12, x86-64,
# no registry reachable there), downloaded here into .whl/ (git-ignored), at the versions
# requirements.lock pins. Install them there with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# What the image already has (torch, accelerate, pyarrow, pandas, xxhash, fsspec, sympy, ...)
# is not fetched; transformers and peft are, so the versions match what CI tests (the image's
# huggingface_hub, tokenizers and safetensors already satisfy them).
#
#   bash bench/gpu_wheels.sh            # needs pip and a registry; ~30 MB
#   LIGER=0 bash bench/gpu_wheels.sh    # without liger-kernel (then gpu.py records 'unavailable')
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements.lock
DEST=.whl
LIGER_VERSION=${LIGER_VERSION:-0.8.5} # not in the lock: an optional kernel, pure Python (Triton)

# locked: trl and datasets with the requirements the image lacks, pydantic (upstack's recipes),
# math-verify (the eval stage's grader), and the transformers/peft CI runs with
LOCKED=(
  trl datasets dill multiprocess
  pydantic pydantic_core annotated-types typing-inspection typing_extensions
  math-verify latex2sympy2_extended antlr4-python3-runtime
  transformers peft
  # the tiny recipe end to end (bench/gpu_session.sh): merges, the teacher client, the eval sets
  mergekit immutables openai jiter sniffio httpx2 httpcore2 truststore champ-dataset natsort
)

pinned() { # NAME -> NAME==VERSION from the lock (names compared as pip does: case, - _ .)
  local key line
  key=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  line=$(awk -F'==' -v k="$key" '{n=tolower($1); gsub(/[_.]/, "-", n)} n==k {print; exit}' "$LOCK")
  [ -n "$line" ] || { echo "gpu_wheels: $1 is not in $LOCK" >&2; exit 1; }
  echo "${line%%;*}" | tr -d ' '
}

download() {
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "$@"
}

mkdir -p "$DEST"
specs=()
for name in "${LOCKED[@]}"; do specs+=("$(pinned "$name")"); done
download "${specs[@]}"
if [ "${LIGER:-1}" != 0 ]; then
  download "liger-kernel==$LIGER_VERSION" || echo "gpu_wheels: no liger-kernel; gpu.py runs without it" >&2
fi
# two versions of one package stop the whole install there
dupes=$(ls "$DEST" | sed -E 's/-[0-9].*//' | tr 'A-Z_' 'a-z-' | sort | uniq -d)
[ -z "$dupes" ] || { echo "gpu_wheels: several versions in $DEST of: $dupes" >&2; exit 1; }
du -sh "$DEST"

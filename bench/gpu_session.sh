#!/usr/bin/env bash
# One device lease, one command: bench/gpu.py's most telling runs, then the tiny recipe end to
# end on the GPU, inside a deadline (this workplace lends a GPU for ~15 minutes, 10 per command).
# Everything it learns lands in $OUT (at most 8 files): gpu.log, gpu.json, gpu.png, tiny.log,
# tiny-status.txt, tiny-report.md, tiny-eval.png, env.txt.
#
# Here, once: bash bench/gpu_wheels.sh (the wheels below, .whl/ is git-ignored). There:
#   BUDGET=560 bash bench/gpu_session.sh          # with .whl carried
#
# Runs are ordered by what they tell: upstack vs TRL on plain padded and packed SFT, DPO with the
# reference precomputed vs inline, Liger and checkpointing on packed SFT (upstack's GPU default),
# the teacher and eval rates; then the tiny recipe with whatever time is left. Each gpu.py call
# merges into bench/out/gpu.json, so a deadline that cuts one keeps the runs before it.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${BUDGET:-560}
OUT=${OUT:-/tmp/gpu-session-out}
mkdir -p "$OUT"
left() { echo $((BUDGET - ($(date +%s) - START))); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "
import importlib
for name in ('torch','transformers','trl','peft','datasets','accelerate','mergekit','pyarrow','fsspec','liger_kernel','flash_attn'):
    try: print(name, importlib.import_module(name).__version__)
    except Exception as err: print(name, 'MISSING', type(err).__name__, err)
"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

bench() { # regex, reserve seconds kept for what follows
  local t=$(($(left) - $2))
  [ "$t" -gt 30 ] || { echo "gpu_session: no time for $1" >&2; return; }
  echo "== gpu.py --only '$1' (${t}s)" >&2
  timeout -k 5 "$t" python3 bench/gpu.py --only "$1" 2>&1 | tee -a "$OUT/gpu.log"
  cp bench/out/gpu.json bench/out/gpu.png "$OUT/" 2>/dev/null
}
TINY=${TINY:-200} # seconds kept for the tiny recipe
bench '^sft/(padded|bfd)/liger-off/ckpt-off' $((TINY + 180))
bench '^dpo/ref-(precomputed|inline)/ckpt-off' $((TINY + 90))
bench '^sft/bfd/liger-on/ckpt-(off|on)' $((TINY + 40))
bench 'generation' "$TINY"

t=$(($(left) - 15))
if [ "$t" -gt 30 ]; then
  echo "== tiny recipe (${t}s)" >&2
  timeout -k 5 "$t" python3 -m upstack run recipes/tiny.yaml >"$OUT/tiny.log" 2>&1
  echo "tiny rc=$?" >>"$OUT/tiny.log"
  tail -40 "$OUT/tiny.log"
fi
python3 -m upstack status recipes/tiny.yaml >"$OUT/tiny-status.txt" 2>&1
cat "$OUT/tiny-status.txt"
cp runs/tiny/eval/report.md "$OUT/tiny-report.md" 2>/dev/null && cat "$OUT/tiny-report.md"
cp runs/tiny/eval/eval.png "$OUT/tiny-eval.png" 2>/dev/null
echo "gpu_session: $(($(date +%s) - START)) s"

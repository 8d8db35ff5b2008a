#!/usr/bin/env bash
# The README's main job: set up pyops, then
#   * on a CUDA machine: every benchmark's default run (bench/bench_*.py: the headline shapes
#     and the key providers, about a minute or less each, ~4 minutes in all on an H100/H200 by
#     the scripts' own estimates); tables and JSON land in bench/out/ (BENCH_ARGS="--full" runs
#     every shape and provider, BENCH_ARGS="--out DIR" writes elsewhere);
#   * without a GPU: the CPU demo, which quantizes the embedded DiT's weights (FP8 per channel,
#     FP8 128x128, NVFP4) and prints the error per layer and for the whole model. Benchmarks
#     are not run there: on a CPU their times are no performance numbers (each script still
#     runs as a smoke test: python bench/bench_<op>.py --device cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== installing torch (${PYOPS_TORCH_SPEC:-torch==2.13.0})"
  pip_install "${PYOPS_TORCH_SPEC:-torch==2.13.0}"
fi
echo "== installing pyops (pip install --no-build-isolation -e .)"
pip_install --no-build-isolation -e .
"$PY" -m pyops info
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  covered=""
  for b in bench/bench_*.py; do covered+=" $(sed -n 's/^# bench-covers://p' "$b")"; done
  rc=0
  ran=()
  for b in bench/bench_*.py; do
    case " $covered " in *" $(basename "$b") "*) continue ;; esac  # run by another script
    echo "=== $b"
    # shellcheck disable=SC2086
    if "$PY" "$b" ${BENCH_ARGS:-}; then ran+=("$b"); else rc=1; echo "=== $b FAILED"; fi
  done
  echo "done: ran ${#ran[@]} benchmarks on the GPU; tables in bench/out/*.md (unless BENCH_ARGS sets --out)"
  exit $rc
else
  echo "== no CUDA GPU: running the CPU demo instead of the benchmarks (on a CPU their times"
  echo "   are no performance numbers; bash bench/gpu_check.sh on a GPU machine runs them)"
  "$PY" -m pyops demo
  echo "done: ran the CPU demo (weight quantization error of the embedded DiT); no benchmark ran"
fi

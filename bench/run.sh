#!/usr/bin/env bash
# The README's main job: set up pyops, then
#   * on a CUDA machine: run every benchmark (bench/bench_*.py, full sizes) on the embedded
#     defaults; tables and JSON land in bench/out/ (override with --out DIR via BENCH_ARGS);
#   * without a GPU: the CPU demo, which quantizes the embedded DiT's weights (FP8 per channel,
#     FP8 128x128, NVFP4) and prints the error per layer and for the whole model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "${PYOPS_TORCH_SPEC:-torch==2.13.0}"
fi
pip_install --no-build-isolation -e .
"$PY" -m pyops info
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  rc=0
  for b in bench/bench_*.py; do
    echo "=== $b"
    "$PY" "$b" ${BENCH_ARGS:-} || rc=1
  done
  exit $rc
else
  echo "no CUDA GPU: running the CPU demo (benchmarks need a GPU)"
  exec "$PY" -m pyops demo
fi

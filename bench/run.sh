#!/usr/bin/env bash
# The README's main job: set up pyops (with the 'bench' extra: diffusers, accelerate, matplotlib,
# tqdm, scikit-learn), then
#   * on a CUDA machine: every benchmark's default run (bench/bench_*.py: the headline shapes
#     and the key providers), bench_e2e.py first: whole Flux-dev- and Wan-2.1-14B-size
#     transformers, bf16 vs torch.compile vs pyops.patch vs torchao, and a 4-step generation vs
#     50 bf16 steps (~3 minutes; the others about a minute or less each, ~11 minutes in all on an
#     H100/H200 by the scripts' own estimates); tables and JSON land in bench/out/, the speed-up
#     plot in bench/out/e2e.png (BENCH_ARGS="--full" runs every shape and provider,
#     BENCH_ARGS="--out DIR" writes elsewhere);
#   * without a GPU: the CPU demo (python -m pyops demo): a small Flux trained on digits samples
#     uncached, cached, with FP8 linears and in 4 steps; quality table, samples in demo.png in
#     the same folder (bench/out or BENCH_ARGS' --out DIR); then python bench/bench_e2e.py
#     --quick: the same end-to-end pipeline on tiny Flux and Wan models with the reference
#     backends (a check that it runs; its times are no performance numbers: the speed numbers
#     need a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== installing torch (${PYOPS_TORCH_SPEC:-torch==2.13.0})"
  pip_install "${PYOPS_TORCH_SPEC:-torch==2.13.0}"
fi
echo "== installing pyops (pip install --no-build-isolation -e \".[bench]\")"
pip_install --no-build-isolation -e ".[bench]"
"$PY" -m pyops info
# where bench_e2e writes its table and plot: --out DIR (or --out=DIR) in BENCH_ARGS, else bench/out
out=bench/out
read -r -a bench_args <<<"${BENCH_ARGS:-}"
for ((i = 0; i < ${#bench_args[@]}; i++)); do
  case "${bench_args[i]}" in
    --out) out=${bench_args[i + 1]:-$out} ;;
    --out=*) out=${bench_args[i]#--out=} ;;
  esac
done
where_e2e() {
  if [ -f "$out/e2e.md" ]; then echo "   table: $out/e2e.md (data: $out/e2e.json)"; fi
  if [ -f "$out/e2e.png" ]; then
    echo "   plot:  $out/e2e.png"
  else
    # bench_e2e writes no PNG without matplotlib or on a plotting error; its table notes say which
    echo "   plot:  none (see the notes in $out/e2e.md)"
  fi
}
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  covered=""
  for b in bench/bench_*.py; do covered+=" $(sed -n 's/^# bench-covers://p' "$b")"; done
  rc=0
  seen=" "
  ok=0
  for b in bench/bench_e2e.py bench/bench_*.py; do  # the whole-model benchmark first
    case "$seen $covered " in *" $b "*|*" $(basename "$b") "*) continue ;; esac
    [ -f "$b" ] || continue
    seen+="$b "
    echo "=== $b"
    # shellcheck disable=SC2086
    if "$PY" "$b" ${BENCH_ARGS:-}; then ok=$((ok + 1)); else rc=1; echo "=== $b FAILED"; fi
  done
  echo "done: ran $ok benchmarks on the GPU without error; tables in $out/*.md"
  echo "== the main result, the whole models end to end (bench_e2e.py):"
  where_e2e
  exit $rc
else
  echo "== no CUDA GPU: running the CPU demo and the end-to-end pipeline check instead of the"
  echo "   benchmarks (on a CPU their times are no performance numbers; bash bench/gpu_check.sh"
  echo "   on a GPU machine runs them)"
  "$PY" -m pyops demo --out "$out"
  echo "== python bench/bench_e2e.py --quick: the end-to-end pipeline on tiny Flux and Wan models"
  echo "   (reference backends); it checks that every step runs, its times mean nothing"
  "$PY" bench/bench_e2e.py --quick --out "$out"
  echo "done: ran the CPU demo (digits samples uncached / cached / FP8 / 4 steps; grid in"
  echo "      $out/demo.png) and the"
  echo "      end-to-end pipeline check on tiny models:"
  where_e2e
  echo "      The speed numbers need a CUDA GPU: run bash bench/run.sh there."
fi

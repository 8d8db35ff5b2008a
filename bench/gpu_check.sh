#!/usr/bin/env bash
# The one script a GPU session runs, on a bare lent GPU machine, through the device tool:
#
#   run(command="bash bench/gpu_check.sh", timeout_s=600)                  # no peer wheels
#   run(command="bash bench/gpu_check.sh", timeout_s=600, carry=[".whl"])  # after bench/fetch_wheels.sh
#
# Stages, each time-boxed with `timeout` so a failing or hanging stage never stops the rest, and
# the whole run ends within GPU_CHECK_TOTAL_S (default 530 s, under 9 minutes):
#   env      nvidia-smi, python/torch/triton versions, ninja
#   wheels   peers from .whl/ (sageattention, torchao) into /tmp/site + PYTHONPATH, if present
#   install  pip install --no-index --no-build-isolation --no-deps -e .  (builds pyops._C)
#   info     python -m pyops info
#   gpu      pytest -m gpu (every GPU test)
#   bench    every bench/bench_*.py, full sizes (a script naming others on a
#            '# bench-covers:' line runs them, so those are not run again)
#   suite    pytest -m "not gpu" (the rest of the test suite)
# Files back (device README: at most 8, at most 2 folders down), all in $OUT:
#   results.md   stage summary + environment + every benchmark's markdown tables
#   results.json {"stages": [...], "benches": {name: {env, tables, records}}}
#   log.txt      everything printed, pip/ninja/pytest output included
# GPU_CHECK_BENCH="quantize linear" runs only those benchmarks (bench_<name>.py), so the
# 30 minutes of device time a session gets can be split over several calls.
# Without the device tool, OUT defaults to bench/out/gpu_check. GPU_CHECK_SKIP_INSTALL=1 skips the
# install (to try the script on a machine whose Python environment must not change).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-530}
SUITE_RESERVE_S=${GPU_CHECK_SUITE_S:-60}
T0=$(date +%s)
WORK=$(mktemp -d /tmp/pyops_gpu_check.XXXXXX)
BENCH_OUT=$WORK/bench
STAGES=$WORK/stages.tsv
mkdir -p "$BENCH_OUT"
: >"$STAGES"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}

left() { echo $((TOTAL_S - ($(date +%s) - T0))); }

# stage NAME MAX_SECONDS RESERVE_SECONDS cmd...: run cmd with a limit of
# min(MAX_SECONDS, time left - RESERVE_SECONDS); record status, seconds, rc.
stage() {
    local name=$1 max=$2 reserve=$3
    shift 3
    local l lim s rc d st
    l=$(left)
    lim=$((l - reserve < max ? l - reserve : max))
    if ((lim < 5)); then
        echo "=== [$name] SKIPPED: no time left (${l}s left)"
        printf '%s\tskipped (no time left)\t0\t-\n' "$name" >>"$STAGES"
        return 0
    fi
    echo "=== [$name] start, limit ${lim}s, $(date -u +%H:%M:%S): $*"
    s=$(date +%s)
    timeout -k 10 "$lim" "$@"
    rc=$?
    d=$(($(date +%s) - s))
    if ((rc == 0)); then st=ok; elif ((rc == 124 || rc == 137)); then st="timeout (${lim}s)"; else st=failed; fi
    echo "=== [$name] $st rc=$rc ${d}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$st" "$d" "$rc" >>"$STAGES"
    return 0
}

main() {
    echo "pyops gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) host $(hostname) in $ROOT, budget ${TOTAL_S}s"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'n/a (no .git)')"

    # ---- env ----------------------------------------------------------------------------------
    stage env 30 0 bash -c "nvidia-smi; $PY -c 'import sys, torch; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())'; \
$PY -c 'import triton; print(\"triton\", triton.__version__)'; nvcc --version | tail -2; \
command -v ninja && ninja --version || echo 'ninja: not on PATH'"
    if ! command -v ninja >/dev/null 2>&1; then
        # the pip package 'ninja' ships the binary; torch's builder falls back to setuptools without it
        nb=$($PY -c 'import ninja, os; print(ninja.BIN_DIR)' 2>/dev/null) && [ -x "$nb/ninja" ] &&
            export PATH="$nb:$PATH" && echo "ninja: using $nb/ninja"
        command -v ninja >/dev/null 2>&1 || echo "ninja: none; the extension builds serially (slow)"
    fi

    # ---- peer wheels --------------------------------------------------------------------------
    if compgen -G ".whl/*.whl" >/dev/null; then
        stage wheels 90 0 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl
        if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
        ls .whl
    else
        echo "=== [wheels] none in .whl/ (run bench/fetch_wheels.sh here and carry .whl): peers skipped"
        printf 'wheels\tskipped (no .whl/)\t0\t-\n' >>"$STAGES"
    fi

    # ---- install (builds the CUDA extension) --------------------------------------------------
    if [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
        echo "=== [install] skipped: GPU_CHECK_SKIP_INSTALL is set"
        printf 'install\tskipped (GPU_CHECK_SKIP_INSTALL)\t0\t-\n' >>"$STAGES"
    elif [ -f setup.py ] || [ -f pyproject.toml ]; then
        stage install 240 200 "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .
    else
        echo "=== [install] no setup.py/pyproject.toml: running from the source tree"
        printf 'install\tskipped (no setup.py)\t0\t-\n' >>"$STAGES"
    fi
    if ! (cd /tmp && "$PY" -c 'import pyops' 2>/dev/null); then
        echo "pyops not importable after install: using PYTHONPATH=$ROOT"
        export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    fi
    [ -f pyops/_build_info.json ] && { echo "--- pyops/_build_info.json"; cat pyops/_build_info.json; echo; }

    stage info 60 150 "$PY" -m pyops info

    # ---- GPU tests ----------------------------------------------------------------------------
    PYTEST_ARGS=(-q -rfEs --durations=15 -p no:cacheprovider)
    if "$PY" -c 'import pytest_timeout' 2>/dev/null; then PYTEST_ARGS+=(--timeout=120); fi
    stage gpu-tests 150 $((SUITE_RESERVE_S + 90)) "$PY" -m pytest -m gpu "${PYTEST_ARGS[@]}" tests

    # ---- benchmarks ---------------------------------------------------------------------------
    local covered="" f b scripts=() n i lim
    for f in bench/bench_*.py; do
        covered+=" $(sed -n 's/^# bench-covers://p' "$f")"
    done
    for f in bench/bench_*.py; do
        b=$(basename "$f")
        case " $covered " in *" $b "*) echo "bench: $b is run by another script"; continue ;; esac
        if [ -n "${GPU_CHECK_BENCH:-}" ]; then
            n=${b#bench_}
            case " $GPU_CHECK_BENCH " in *" ${n%.py} "*) ;; *) continue ;; esac
        fi
        scripts+=("$f")
    done
    n=${#scripts[@]}
    i=0
    for f in "${scripts[@]}"; do
        lim=$((($(left) - SUITE_RESERVE_S) / (n - i)))
        i=$((i + 1))
        # soft budget inside the script (skips slow peers once spent), hard limit outside
        stage "bench $(basename "$f" .py)" "$lim" "$SUITE_RESERVE_S" \
            "$PY" "$f" --out "$BENCH_OUT" --budget-s $((lim > 90 ? lim - 45 : lim / 2))
    done

    # ---- the rest of the suite ----------------------------------------------------------------
    stage suite 150 5 "$PY" -m pytest -m "not gpu" "${PYTEST_ARGS[@]}" tests

    echo "=== done in $(($(date +%s) - T0))s"
}

collect() {
    # results.md: stages + every bench's markdown; results.json: stages + every bench's JSON
    "$PY" - "$STAGES" "$BENCH_OUT" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
stages_p, bench, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
stages = []
for line in stages_p.read_text().splitlines():
    parts = line.split("\t")
    if len(parts) == 4:
        stages.append({"stage": parts[0], "status": parts[1], "seconds": parts[2], "rc": parts[3]})
md = ["# pyops gpu_check results", "",
      "Every number below was measured in this run; a blank cell was not measured.", "",
      "| stage | status | seconds | rc |", "|---|---|---|---|"]
md += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['rc']} |" for s in stages]
benches = {}
for j in sorted(bench.glob("*.json")):
    try:
        benches[j.stem] = json.loads(j.read_text())
    except ValueError as e:
        benches[j.stem] = {"error": f"unreadable: {e}"}
for m in sorted(bench.glob("*.md")):
    md += ["", m.read_text()]
if not benches:
    md += ["", "No benchmark wrote results (see log.txt)."]
(out / "results.md").write_text("\n".join(md) + "\n")
(out / "results.json").write_text(json.dumps({"stages": stages, "benches": benches}, indent=1))
print("\n".join(md[:len(stages) + 6]))
EOF
}

main 2>&1 | tee "$OUT/log.txt"
collect 2>&1 | tee -a "$OUT/log.txt"
rm -rf "$WORK"

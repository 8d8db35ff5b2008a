#!/usr/bin/env bash
# pyops GPU check: install pyops, print `python -m pyops info`, run the GPU tests and every
# benchmark's default run on one CUDA machine, and write the results as it goes.
#
#   bash bench/gpu_check.sh                                  # everything; results in bench/out/
#   OUT=/tmp/pyops-check bash bench/gpu_check.sh             # results in another folder
#   GPU_CHECK_BENCH="attention linear" bash bench/gpu_check.sh   # only these benchmarks
#   GPU_CHECK_TESTS="tests/test_quantize_fp8.py tests/test_cache_apply.py" \
#       bash bench/gpu_check.sh                              # only these GPU tests
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh              # print the plan, run nothing
#
# Stages, in this order; each runs under `timeout`, so a stage that fails, crashes or hangs
# never stops the ones after it:
#   env          nvidia-smi; Python, torch, Triton, nvcc and ninja versions
#   wheels       only when ./.whl/ holds wheel files: installed into /tmp/site, which goes on
#                PYTHONPATH (for a machine without internet; bench/fetch_wheels.sh downloads
#                the peers sageattention and torchao into .whl/ on one that has it)
#   install      pip install --no-index --no-build-isolation --no-deps -e .
#                (builds the CUDA extension pyops._C for the GPU present, with ninja)
#   info         python -m pyops info
#   test-deps    only when pytest or numpy is not importable (the GPU tests need both; a fresh
#                CUDA virtual environment has neither): pip install the missing ones, from the
#                wheels in ./.whl/test/ without an index when it holds any (bench/fetch_wheels.sh
#                puts them there), otherwise from your pip index. Nothing is installed, and no
#                index is contacted, when both are importable.
#   bench-deps   only when matplotlib or tqdm is not importable (bench_e2e's plot and progress
#                bar; optional): pip install the missing ones from the wheels in ./.whl/test/
#                without an index; without those wheels nothing is installed and bench_e2e
#                writes no PNG
#   gpu-tests    pytest -m gpu $GPU_CHECK_TESTS (default: tests, i.e. every GPU test; a test
#                that crashes the interpreter ends this stage only; the tests run their
#                bad-argument checks in subprocesses themselves); recorded as skipped, with the
#                reason and the command that fixes it, when pytest or numpy is still not
#                importable, or when GPU_CHECK_TESTS=none
#   bench NAME   python bench/bench_NAME.py, the default run (headline shapes, key providers;
#                about a minute or less each), one stage per benchmark, the memory-bound ones
#                first (quantize, norm_modulate_quant, gelu_quant, block_similarity, cache_apply,
#                sample_step), then e2e (whole Flux- and Wan-size transformers, ~3 minutes, with
#                its own limit: the '# gpu-check-limit-s:' line of bench_e2e.py), then
#                attention, linear, sampler, cache, then any other; a script
#                that names others on a '# bench-covers:' line runs them (bench_quantize.py runs
#                the FP8 and NVFP4 quantizer benchmarks), so those are not run again
#   suite        pytest -m "not gpu" tests, only with GPU_CHECK_SUITE=1
#
# Results, rewritten after every stage (a run cut short keeps every stage that finished):
#   $OUT/results.md    stage table (status, seconds, exit code, GPU test counts), then every
#                      benchmark's environment (card, date, versions, command) and tables
#   $OUT/results.json  {"stages": [...], "gpu_tests": {...}, "benches": {NAME: {env, tables,
#                      records}}}
#   $OUT/log.txt       everything printed (pip, ninja, pytest and benchmark output)
# Each benchmark also writes its own NAME.json and NAME.md after every row it measures, in
# bench/out/gpu_check/ (GPU_CHECK_BENCH_DIR), so a benchmark cut by its limit keeps its rows.
# A blank table cell was not measured; no number is ever filled in otherwise.
#
# Environment variables (all optional):
#   OUT                        results folder (default: bench/out)
#   PYTHON                     the Python to use (default: python3)
#   GPU_CHECK_BENCH            benchmarks to run, by NAME (bench_NAME.py); default: all
#   GPU_CHECK_TESTS            what pytest -m gpu runs: test files, folders or node ids,
#                              space-separated (default: tests); none: skip the GPU tests
#   GPU_CHECK_BENCH_ARGS       extra arguments for every benchmark, e.g. "--full" (every shape
#                              and provider: raise the two limits below too)
#   GPU_CHECK_BENCH_TIMEOUT_S  hard limit per benchmark (default 90 s; a script that names a
#                              larger one on a '# gpu-check-limit-s: N' line gets N)
#   GPU_CHECK_TOTAL_S          hard limit for the whole check (default 540 s); a stage that
#                              would start with too little time left is skipped and marked so
#   GPU_CHECK_SKIP_INSTALL=1   use the pyops already installed (no pip install, neither of
#                              pyops nor of pytest/numpy)
#   GPU_CHECK_SUITE=1          also run the CPU test suite at the end
#   GPU_CHECK_DRY_RUN=1        print the stages, their limits and commands; run nothing
#   MAX_JOBS                   parallel compile jobs for the extension (default: all cores)
#
# Expected run time on an H100 or H200: about 11 minutes for everything, more than the default
# total limit of 540 s (9 minutes, what one call on a time-limited GPU machine allows). These are
# estimates, not measurements of this version: install ~40 s and a (partial) GPU test run of
# ~90 s were measured on an H200 on 2026-11-30 (bench/RESULTS.md); the benchmarks' default runs
# add up to ~7.5 minutes by their own estimates, bench_e2e ~3 of them (the 'estimate-h200-s' line
# at the top of each bench script; the dry run prints them and their sum). Within 540 s the
# limit cuts the benchmarks at the end of the order (the model-size ones after e2e), never the
# memory-bound ones at its start; for a run that fits, choose: GPU_CHECK_TESTS names the tests,
# GPU_CHECK_BENCH the benchmarks (e.g. GPU_CHECK_BENCH=e2e GPU_CHECK_TESTS=tests/test_patch.py
# for the whole-model numbers), or raise GPU_CHECK_TOTAL_S where time allows. On an H100 the
# bandwidth-bound benchmarks take a little longer (~0.7x the bandwidth).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/out}
BENCH_DIR=${GPU_CHECK_BENCH_DIR:-$ROOT/bench/out/gpu_check}
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-540}
BENCH_TIMEOUT_S=${GPU_CHECK_BENCH_TIMEOUT_S:-90}
DRY=${GPU_CHECK_DRY_RUN:-}
# run order: the memory-bound kernels first (short, and what the total limit must not cut),
# then the model-size benchmarks; any other bench_*.py afterwards
ORDER="quantize norm_modulate_quant gelu_quant block_similarity cache_apply sample_step e2e attention linear sampler cache"
# the GPU tests to run (pytest paths or node ids); "none" skips them
TESTS=${GPU_CHECK_TESTS:-tests}
T0=$(date +%s)
# trained test models (pyops.models.digits: bench_cache, the demo) are kept here, inside the
# checkout (git-ignored), so weights trained on a CPU can travel with the checkout to a GPU
# machine that has no scikit-learn: copy ~/.cache/pyops/flux-digits-*.pt into .cache/pyops/
export PYOPS_CACHE_DIR=${PYOPS_CACHE_DIR:-$ROOT/.cache/pyops}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
if [ -z "$DRY" ]; then
    mkdir -p "$OUT" "$BENCH_DIR"
    WORK=$(mktemp -d /tmp/pyops_gpu_check.XXXXXX)
else
    WORK=""
fi
STAGES=${WORK:+$WORK/stages.tsv}
BENCHES_RUN=${WORK:+$WORK/benches.txt}
[ -n "$WORK" ] && : >"$STAGES" && : >"$BENCHES_RUN"

left() { echo $((TOTAL_S - ($(date +%s) - T0))); }

# stage NAME MAX_SECONDS RESERVE_SECONDS cmd...: run cmd under a limit of
# min(MAX_SECONDS, time left - RESERVE_SECONDS); record status, seconds and exit code; update
# the results files. In a dry run: print the stage and its limit.
stage() {
    local name=$1 max=$2 reserve=$3
    shift 3
    local l lim s rc d st
    if [ -n "$DRY" ]; then
        echo "[$name] limit ${max}s: $*"
        return 0
    fi
    l=$(left)
    lim=$((l - reserve < max ? l - reserve : max))
    if ((lim < 5)); then
        echo "=== [$name] SKIPPED: no time left (${l}s of ${TOTAL_S}s left)"
        printf '%s\tskipped (no time left)\t0\t-\n' "$name" >>"$STAGES"
        collect >/dev/null
        return 0
    fi
    echo "=== [$name] start, limit ${lim}s, $(date -u +%H:%M:%S): $*"
    s=$(date +%s)
    timeout -k 10 "$lim" "$@"
    rc=$?
    d=$(($(date +%s) - s))
    if ((rc == 0)); then
        st=ok
    elif ((rc == 124 || rc == 137)); then
        st="timeout (${lim}s)"
    elif ((rc > 128)); then
        st="crashed (signal $((rc - 128)))"
    else
        st=failed
    fi
    echo "=== [$name] $st rc=$rc ${d}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$st" "$d" "$rc" >>"$STAGES"
    collect >/dev/null
    return 0
}

# the benchmark scripts to run, in ORDER, without those another script covers
bench_scripts() {
    local covered="" f b n need ordered=()
    for f in bench/bench_*.py; do
        covered+=" $(sed -n 's/^# bench-covers://p' "$f")"
    done
    for n in $ORDER; do [ -f "bench/bench_$n.py" ] && ordered+=("bench/bench_$n.py"); done
    for f in bench/bench_*.py; do
        case " ${ordered[*]} " in *" $f "*) ;; *) ordered+=("$f") ;; esac
    done
    for f in "${ordered[@]}"; do
        b=$(basename "$f")
        case " $covered " in *" $b "*) continue ;; esac
        # '# needs-gpus: N' (bench_cp): skipped on a machine with fewer GPUs, unless named in
        # GPU_CHECK_BENCH (its one-GPU rows alone are not what it measures)
        need=$(sed -n 's/^# needs-gpus: *\([0-9]*\).*/\1/p' "$f" | head -1)
        if [ -n "$need" ] && [ -z "${GPU_CHECK_BENCH:-}" ] \
            && [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -lt "$need" ]; then
            echo "[bench ${b%.py}] skipped: needs $need GPUs (GPU_CHECK_BENCH=${b#bench_} runs it)" >&2
            continue
        fi
        if [ -n "${GPU_CHECK_BENCH:-}" ]; then
            n=${b#bench_}
            case " $GPU_CHECK_BENCH " in *" ${n%.py} "*) ;; *) continue ;; esac
        fi
        echo "$f"
    done
}

estimate_s() { sed -n 's/^# estimate-h200-s: *\([0-9]*\).*/\1/p' "$1" | head -1; }
# a script's own hard limit ('# gpu-check-limit-s: N'), never below GPU_CHECK_BENCH_TIMEOUT_S
limit_s() {
    local n
    n=$(sed -n 's/^# gpu-check-limit-s: *\([0-9]*\).*/\1/p' "$1" | head -1)
    if [ -n "$n" ] && ((n > BENCH_TIMEOUT_S)); then echo "$n"; else echo "$BENCH_TIMEOUT_S"; fi
}

# the GPU tests' own dependencies that $PY cannot import, space-separated (none: empty)
missing_test_deps() { missing_modules pytest numpy; }

# the modules among "$@" that $PY cannot import, space-separated (none: empty)
missing_modules() {
    local m out=""
    for m in "$@"; do
        "$PY" -c "import $m" >/dev/null 2>&1 || out+="$m "
    done
    echo "${out% }"
}

main() {
    local f n lim est blim total_est=0
    if [ -n "$DRY" ]; then
        echo "pyops gpu_check, dry run: the plan (nothing is run)"
    else
        echo "pyops gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) host $(hostname) in $ROOT, limit ${TOTAL_S}s"
    fi
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'n/a (no .git)')"
    echo "results: $OUT/results.md, $OUT/results.json, $OUT/log.txt; per benchmark: $BENCH_DIR/"

    # ---- env ----------------------------------------------------------------------------------
    stage env 30 0 bash -c "nvidia-smi; $PY -c 'import sys, torch; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())'; \
$PY -c 'import triton; print(\"triton\", triton.__version__)'; nvcc --version | tail -2; \
command -v ninja && ninja --version || echo 'ninja: not on PATH'"
    if [ -z "$DRY" ] && ! command -v ninja >/dev/null 2>&1; then
        # the pip package 'ninja' ships the binary; torch's builder compiles serially without it
        nb=$($PY -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null) && [ -x "$nb/ninja" ] &&
            export PATH="$nb:$PATH" && echo "ninja: using $nb/ninja"
        command -v ninja >/dev/null 2>&1 || echo "ninja: none; the extension builds serially (slow)"
    fi
    if [ -z "$DRY" ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "WARNING: no CUDA GPU visible to torch: the GPU tests will skip and the benchmarks"
        echo "         run their CPU smoke test (tiny shapes; the times are not performance numbers)."
    fi

    # ---- peer wheels (optional) ---------------------------------------------------------------
    if compgen -G ".whl/*.whl" >/dev/null; then
        stage wheels 90 0 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "[wheels] none in .whl/: peers are used only if already installed"
    fi

    # ---- install (builds the CUDA extension) --------------------------------------------------
    if [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
        echo "[install] skipped: GPU_CHECK_SKIP_INSTALL is set"
        [ -n "$DRY" ] || printf 'install\tskipped (GPU_CHECK_SKIP_INSTALL)\t0\t-\n' >>"$STAGES"
    else
        stage install 240 200 "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .
    fi
    if [ -z "$DRY" ] && ! (cd /tmp && "$PY" -c 'import pyops' 2>/dev/null); then
        echo "pyops not importable after install: using PYTHONPATH=$ROOT"
        export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    fi
    [ -z "$DRY" ] && [ -f pyops/_build_info.json ] &&
        { echo "--- pyops/_build_info.json"; cat pyops/_build_info.json; echo; }

    stage info 60 150 "$PY" -m pyops info

    # ---- test dependencies: pytest and numpy, only when missing -------------------------------
    local missing
    if [ -n "$DRY" ]; then
        echo "[test-deps] only if pytest or numpy is not importable: $PY -m pip install" \
            "<the missing ones> (from .whl/test/ without an index when it holds wheels)"
    else
        missing=$(missing_test_deps)
        if [ -z "$missing" ]; then
            echo "[test-deps] pytest and numpy importable: nothing to install"
        elif [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
            echo "[test-deps] not importable: $missing; not installed (GPU_CHECK_SKIP_INSTALL is set)"
        elif compgen -G ".whl/test/*.whl" >/dev/null; then
            # shellcheck disable=SC2086
            stage test-deps 120 150 "$PY" -m pip install -q --disable-pip-version-check \
                --no-index --find-links .whl/test --no-compile --target /tmp/site $missing
            case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *)
                export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ;; esac
        else
            # shellcheck disable=SC2086
            stage test-deps 120 150 "$PY" -m pip install -q --disable-pip-version-check \
                --retries 1 --timeout 20 $missing
        fi
    fi

    # ---- bench_e2e's plot and progress bar: matplotlib and tqdm, only when missing ----------
    # optional (without them bench_e2e writes no PNG and prints plain progress lines); installed
    # only from the wheels in .whl/test/ (bench/fetch_wheels.sh puts them there), no index
    local missing_b
    if [ -n "$DRY" ]; then
        echo "[bench-deps] only if matplotlib or tqdm is not importable and .whl/test/ holds" \
            "wheels: $PY -m pip install <the missing ones> --no-index --find-links .whl/test" \
            "(without them bench_e2e writes no PNG)"
    else
        missing_b=$(missing_modules matplotlib tqdm)
        if [ -z "$missing_b" ]; then
            echo "[bench-deps] matplotlib and tqdm importable: nothing to install"
        elif [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
            echo "[bench-deps] not importable: $missing_b; not installed (GPU_CHECK_SKIP_INSTALL is set)"
        elif compgen -G ".whl/test/*.whl" >/dev/null; then
            # shellcheck disable=SC2086
            stage bench-deps 120 150 "$PY" -m pip install -q --disable-pip-version-check \
                --no-index --find-links .whl/test --no-compile --target /tmp/site $missing_b
            case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *)
                export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ;; esac
        else
            echo "[bench-deps] not importable: $missing_b; bench_e2e writes no PNG ($PY -m pip" \
                "install matplotlib tqdm, or bash bench/fetch_wheels.sh where there is internet)"
        fi
    fi

    # ---- GPU tests ----------------------------------------------------------------------------
    PYTEST_ARGS=(-q -rfEs --durations=15 -p no:cacheprovider)
    if [ -z "$DRY" ] && "$PY" -c 'import pytest_timeout' 2>/dev/null; then
        PYTEST_ARGS+=(--timeout=120)
    fi
    missing=""
    [ -n "$DRY" ] || missing=$(missing_test_deps)
    local tests_sel
    read -r -a tests_sel <<<"$TESTS"
    if [ "$TESTS" = none ]; then
        echo "[gpu-tests] skipped: GPU_CHECK_TESTS=none"
        [ -n "$DRY" ] || { printf 'gpu-tests\tskipped (GPU_CHECK_TESTS=none)\t0\t-\n' >>"$STAGES";
            collect >/dev/null; }
    elif [ -n "$missing" ]; then
        echo "=== [gpu-tests] SKIPPED: the GPU tests need pytest and numpy; not importable by $PY:" \
            "$missing. Install them with: $PY -m pip install pytest numpy (without internet: run" \
            "bash bench/fetch_wheels.sh where there is internet, copy .whl/ here, run this again)"
        printf 'gpu-tests\tskipped (not importable: %s; needs: %s -m pip install pytest numpy)\t0\t-\n' \
            "$missing" "$PY" >>"$STAGES"
        collect >/dev/null
    else
        stage gpu-tests 240 150 "$PY" -m pytest -m gpu "${PYTEST_ARGS[@]}" \
            --junitxml="${WORK:-<work dir>}/gpu-tests.xml" "${tests_sel[@]}"
    fi

    # ---- benchmarks: the default run of each, rows written as they complete -----------------
    for f in $(bench_scripts); do
        n=$(basename "$f" .py)
        n=${n#bench_}
        est=$(estimate_s "$f")
        blim=$(limit_s "$f")
        total_est=$((total_est + ${est:-60}))
        if [ -n "$DRY" ]; then
            echo "[bench $n] limit ${blim}s (estimate on an H200: ${est:-?} s): $PY $f --out $BENCH_DIR ${GPU_CHECK_BENCH_ARGS:-}"
            continue
        fi
        rm -f "$BENCH_DIR/$n.json" "$BENCH_DIR/$n.md"  # no stale rows from an earlier check
        echo "$n" >>"$BENCHES_RUN"
        lim=$(left)
        # squeezed by the total limit: a soft budget inside the script skips its slow peers
        if ((lim < blim)); then
            # shellcheck disable=SC2086
            stage "bench $n" "$blim" 5 "$PY" "$f" --out "$BENCH_DIR" \
                --budget-s $((lim * 2 / 3)) ${GPU_CHECK_BENCH_ARGS:-}
        else
            # shellcheck disable=SC2086
            stage "bench $n" "$blim" 5 "$PY" "$f" --out "$BENCH_DIR" \
                ${GPU_CHECK_BENCH_ARGS:-}
        fi
    done
    echo "benchmarks: estimated ~${total_est} s on an H200 in all (default runs)"

    # ---- the CPU test suite (optional) --------------------------------------------------------
    if [ -n "${GPU_CHECK_SUITE:-}" ]; then
        if [ -n "$missing" ]; then
            echo "=== [suite] SKIPPED: pytest/numpy not importable ($missing), as for the GPU tests"
            printf 'suite\tskipped (not importable: %s)\t0\t-\n' "$missing" >>"$STAGES"
        else
            stage suite 300 5 "$PY" -m pytest -m "not gpu" "${PYTEST_ARGS[@]}" tests
        fi
    fi
    if [ -n "$DRY" ]; then
        echo "total limit: ${TOTAL_S}s (GPU_CHECK_TOTAL_S)"
    else
        echo "=== done in $(($(date +%s) - T0))s; results in $OUT/results.md"
    fi
}

# results.md / results.json from the stages so far and the benchmarks' own files
collect() {
    "$PY" - "$STAGES" "$BENCH_DIR" "$BENCHES_RUN" "$OUT" "$WORK/gpu-tests.xml" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path
stages_p, bench, names_p, out, junit = map(Path, sys.argv[1:6])
stages = []
for line in stages_p.read_text().splitlines():
    parts = line.split("\t")
    if len(parts) == 4:
        stages.append({"stage": parts[0], "status": parts[1], "seconds": parts[2], "rc": parts[3]})
tests = None
if junit.exists():
    try:
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    except Exception as e:  # a crashed run leaves no or a broken file
        tests = {"error": f"unreadable: {type(e).__name__}"}
md = ["# pyops gpu_check results", "",
      "Every number below was measured in this run; a blank cell was not measured.", "",
      "| stage | status | seconds | rc |", "|---|---|---|---|"]
md += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['rc']} |" for s in stages]
if tests and "error" not in tests:
    md += ["", f"GPU tests: {tests['tests']} collected, {tests['failures']} failed, "
               f"{tests['errors']} errors, {tests['skipped']} skipped (log.txt has the details)."]
elif any(s["stage"] == "gpu-tests" and s["status"].startswith("skipped") for s in stages):
    st = next(s["status"] for s in stages if s["stage"] == "gpu-tests")
    md += ["", f"GPU tests: not run, {st}."]
elif any(s["stage"] == "gpu-tests" for s in stages):
    md += ["", "GPU tests: no summary (pytest did not finish; see log.txt)."]
names = names_p.read_text().split() if names_p.exists() else []
benches = {}
for n in names:
    j, m = bench / f"{n}.json", bench / f"{n}.md"
    if j.exists():
        try:
            benches[n] = json.loads(j.read_text())
        except ValueError as e:
            benches[n] = {"error": f"unreadable: {e}"}
    if m.exists():
        md += ["", m.read_text()]
    elif names:
        md += ["", f"## {n}", "", "No rows were written (see log.txt)."]
(out / "results.md").write_text("\n".join(md) + "\n")
(out / "results.json").write_text(json.dumps({"stages": stages, "gpu_tests": tests,
                                              "benches": benches}, indent=1))
print("\n".join(md[:len(stages) + 8]))
EOF
}

if [ -n "$DRY" ]; then
    main
    exit 0
fi
main 2>&1 | tee "$OUT/log.txt"
collect 2>&1 | tee -a "$OUT/log.txt"
rm -rf "$WORK"

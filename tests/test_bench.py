"""CPU tests of the benchmark harness (bench/utils.py), bench/bench_quantize.py, the run sizes
of every bench script and bench/gpu_check.sh.

The benchmark runs as a subprocess on the CPU with TRITON_INTERPRET unset and no size flag, which
on a CPU means the quick run, so only the PyTorch reference and plain-torch providers run (a few
seconds); the CPU numbers mean nothing, the test checks that the files are written, the columns
are there, the reference is bit-exact and the notice says the times are no performance numbers.
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
COLUMNS = ["op", "shape", "config", "provider", "ms", "GB/s", "% copy", "ms graph", "µs",
           "x ideal", "exact", "note"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # no --quick: on a CPU the default is the quick run (before, it ran the GPU shapes for minutes)
    r = subprocess.run([sys.executable, str(BENCH / "bench_quantize.py"), "--device",
                        "cpu", "--out", str(out), "--warmup-ms", "2", "--rep-ms", "10"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def _bench_module(name):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_cpu_without_flags_runs_quick_and_says_so(quick_run):
    out, stdout = quick_run
    notice = [line for line in stdout.splitlines() if "NOT performance numbers" in line]
    assert len(notice) == 1 and "smoke test" in notice[0], stdout[:2000]
    shapes = {r["shape"].split()[0] for r in json.loads((out / "quantize.json").read_text())
              ["records"]}
    assert shapes == {"quick"}
    data = json.loads((out / "quantize.json").read_text())
    assert data["env"]["run"] == "quick"
    assert "- run: --quick (tiny shapes" in (out / "quantize.md").read_text()


def test_files_and_columns(quick_run):
    out, stdout = quick_run
    data = json.loads((out / "quantize.json").read_text())
    md = (out / "quantize.md").read_text()
    env = data["env"]
    for k in ("date", "host", "command", "torch", "triton", "pyops", "copy_gbps", "copy_bytes"):
        assert k in env, k
    assert env["copy_gbps"] > 0
    (table,) = data["tables"]
    assert table["columns"] == COLUMNS
    header = "| " + " | ".join(COLUMNS) + " |"
    assert header in md and header in stdout
    assert "smoke test only, not a performance number" in md
    ops = {r["op"] for r in data["records"]}
    assert ops == {"quantize_fp8", "quantize_nvfp4"}
    configs = {(r["op"], r["config"]) for r in data["records"]}
    for g in ("tensor", "row", "block1x128", "block128x128"):
        assert ("quantize_fp8", g) in configs
    for c in ("global computed, swizzle off", "global static, swizzle on"):
        assert ("quantize_nvfp4", c) in configs


def test_reference_provider_bit_exact(quick_run):
    out, _ = quick_run
    data = json.loads((out / "quantize.json").read_text())
    ref_rows = [r for r in data["records"] if r["provider"] == "pyops reference (eager)"]
    assert len(ref_rows) == 2 * 4 + 2 * 4  # two quick shapes x (4 fp8 + 4 nvfp4 configs)
    for r in ref_rows:
        assert r["exact"] is True, r
        assert r["ms"] > 0 and r["GB/s"] > 0 and r["% copy"] > 0, r
        assert "error" not in r.get("note", ""), r
    md = (out / "quantize.md").read_text()
    for line in md.splitlines():
        if "| pyops reference (eager) |" in line:
            assert line.split("|")[COLUMNS.index("exact") + 1].strip() == "yes", line
    # plain-torch eager peer exists for per-tensor and per-row FP8, and is bit-exact too
    eager = [r for r in data["records"] if r["provider"] == "torch eager"]
    assert {r["config"] for r in eager} == {"tensor", "row"}
    assert all(r["exact"] is True for r in eager)


def test_harness_units():
    sys.path.insert(0, str(BENCH))
    try:
        import utils as U
        from bench_quantize_fp8 import nbytes_moved as fp8_bytes
        from bench_quantize_nvfp4 import nbytes_moved as fp4_bytes
    finally:
        sys.path.remove(str(BENCH))
    assert U.gbps(2e9, 1000.0) == pytest.approx(2.0)
    assert U.gbps(1, None) is None and U.pct(None, 3000.0) is None
    t = U.Table("t", ["a", "b"])
    t.add(a=1.5, b=None)
    assert "| 1.500 |  |" in t.markdown()  # an unmeasured value is blank, never a number
    assert U.time_ms(lambda: sum(range(100)), device="cpu", warmup_ms=1, rep_ms=5) > 0
    # bytes counted honestly: per-tensor reads the input twice (amax pass), then q + scales
    M, K = 256, 384
    assert fp8_bytes(M, K, 2, "tensor") == 2 * M * K * 2 + M * K + 4
    assert fp8_bytes(M, K, 2, "row") == M * K * 2 + M * K + 4 * M
    assert fp8_bytes(M, K, 2, "block128x128") == M * K * 2 + M * K + 4 * 2 * 3
    nb = K // 16
    assert fp4_bytes(M, K, 2, static=True, swizzle=False) == M * K * 2 + M * nb * 8 + M * nb + 4
    assert fp4_bytes(M, K, 2, static=False, swizzle=True) == \
        2 * M * K * 2 + M * nb * 8 + 256 * 24 + 4


def test_per_call_timing_and_ideal():
    """µs per call is the graph replay time when one was measured, else do_bench's; x ideal is
    that time over bytes / copy bandwidth; nothing is filled in that was not measured."""
    U = _bench_module("utils")
    r = U.per_call_timing({"ms": 2.0}, 4e9, 4000.0)  # 4 GB at 4000 GB/s: 1 ms ideal
    assert r["µs"] == pytest.approx(2000.0) and r["µs from"] == "do_bench"
    assert r["ideal µs"] == pytest.approx(1000.0) and r["x ideal"] == pytest.approx(2.0)
    r = U.per_call_timing({"ms": 2.0, "ms graph": 1.5}, 4e9, 4000.0)
    assert r["µs"] == pytest.approx(1500.0) and r["µs from"] == "graph"
    assert r["x ideal"] == pytest.approx(1.5)
    r = U.per_call_timing({"ms": 2.0, "ms graph": None}, 4e9, None)  # no ceiling: no x ideal
    assert r["µs"] == pytest.approx(2000.0) and "x ideal" not in r and "ideal µs" not in r
    assert U.per_call_timing({"note": "error: x"}, 4e9, 4000.0) == {"note": "error: x"}
    assert U.ideal_ms(4e9, 4000.0) == pytest.approx(1.0) and U.ideal_ms(1, None) is None


def test_bench_providers_fills_per_call_columns():
    """Every provider row gets µs and x ideal from its own bytes (Provider.nbytes when the
    provider moves other bytes than the op, e.g. a peer that keeps a reference instead of a
    copy); a provider that raises gets no numbers."""
    U = _bench_module("utils")
    cols = ["provider", "ms", "GB/s", "% copy", "ms graph", "µs", "x ideal", "note"]
    t = U.Table("t", cols)
    dev = __import__("torch").device("cpu")

    def boom():
        raise RuntimeError("no")
    U.bench_providers(t, {}, [U.Provider("a", lambda: None),
                              U.Provider("b", lambda: None, nbytes=500),
                              U.Provider("c", boom)],
                      (), 1000, 2.0, dev, warmup_ms=1, rep_ms=2)
    a, b, c = t.rows
    assert a["bytes"] == 1000 and b["bytes"] == 500
    for r, n in ((a, 1000), (b, 500)):
        assert r["µs"] == pytest.approx(1000.0 * r["ms"]) and r["µs from"] == "do_bench"
        assert r["x ideal"] == pytest.approx(r["ms"] / (n / 2e9 * 1e3))
        assert r["GB/s"] == pytest.approx(n / (r["ms"] * 1e-3) / 1e9)
    assert "µs" not in c and "x ideal" not in c and c["note"].startswith("error:")


def test_graph_timing_applies_below_twice_the_l2():
    """CUDA-graph timing with rotating inputs for calls moving less than 2x the L2, where the
    L2 could flatter a do_bench time; off CUDA none, and the fallback limit where the L2 size
    is unknown."""
    U = _bench_module("utils")
    import torch
    cpu = torch.device("cpu")
    assert U.graph_max_bytes(cpu) == U.GRAPH_MAX_BYTES
    assert U.rotating_inputs(1000, cpu, lambda: ()) is None
    # enough sets that one pass through them exceeds twice a 60 MB L2, even for small calls
    old = U.l2_bytes
    try:
        U.l2_bytes = lambda device: 60 * 2**20
        cuda = torch.device("cuda")
        assert U.graph_max_bytes(cuda) == 120 * 2**20
        for nb in (2 * 2**20, 10 * 2**20, 100 * 2**20):
            assert U.rotation_count(nb, cuda) * nb > 2 * 60 * 2**20
    finally:
        U.l2_bytes = old


MEMORY_BOUND = ("bench_quantize_fp8", "bench_quantize_nvfp4", "bench_norm_modulate_quant",
                "bench_gelu_quant", "bench_block_similarity", "bench_cache_apply",
                "bench_sample_step")


@pytest.mark.parametrize("name", MEMORY_BOUND)
def test_memory_bound_tables_have_per_call_columns(name):
    cols = _bench_module(name).COLUMNS
    for c in ("ms", "GB/s", "% copy", "ms graph", "µs", "x ideal"):
        assert c in cols, (name, c)


def test_new_benches_count_bytes_exactly():
    """cache_apply: the flags, then x + residual read and out written per reusing group;
    sample_step: fp32 state read + written, bf16 cond, bf16 uncond with CFG, fp32 noise, bf16
    x_out."""
    ca = _bench_module("bench_cache_apply")
    B, N, D = 2, 64, 256
    t = B * N * D * 2
    assert ca.nbytes_moved(B, N, D, 2, [1]) == 4 + 3 * t
    assert ca.nbytes_moved(B, N, D, 2, [1, 1]) == 8 + 3 * t
    assert ca.nbytes_moved(B, N, D, 2, [1, 0]) == 8 + 3 * t // 2
    assert ca.nbytes_moved(B, N, D, 2, [0, 0]) == 8
    assert ca.flags("half", 1) is None and ca.flags("half", 4) == [1, 1, 0, 0]
    ss = _bench_module("bench_sample_step")
    n = 1000
    assert ss.nbytes_moved(n, cfg=True, noise=True) == n * (4 + 4 + 2 + 2 + 4 + 2)
    assert ss.nbytes_moved(n, cfg=False, noise=False) == n * (4 + 4 + 2 + 2)
    assert ss.nbytes_moved(n, cfg=False, noise=False, x_out=False) == n * (4 + 4 + 2)
    # the Wan size moves >= 256 MB even without CFG and noise
    assert ss.nbytes_moved(32760 * 5120, cfg=False, noise=False) >= 256 * 2**20
    co = dict((c[0], c[1]) for c in ss.CONFIGS)
    assert co["cfg + noise"].zeta != 0 and co["euler"].zeta == 0 and co["euler"].alpha == 1.0


# ---- run sizes ----------------------------------------------------------------------------------
def _args(*argv):
    U = _bench_module("utils")
    return U, U.add_common_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_resolve_run_cpu_defaults_to_quick_with_notice(capsys):
    U, a = _args("--device", "cpu")
    dev = U.resolve_run(a, default_budget_s=45)
    assert dev.type == "cpu" and a.mode == "quick" and a.quick and not a.full
    assert a.budget_s is None  # the default run's budget applies to the default run only
    out = capsys.readouterr().out
    assert out.strip() == U.CPU_NOTICE and "not performance numbers".upper() in out.upper()


def test_resolve_run_cpu_full_is_allowed_but_warns(capsys):
    U, a = _args("--device", "cpu", "--full")
    U.resolve_run(a)
    assert a.mode == "full" and a.full and not a.quick
    out = capsys.readouterr().out
    assert U.CPU_FULL_WARNING in out


@pytest.mark.parametrize("size", [[], ["--quick"], ["--full"]])
def test_resolve_run_cpu_notice_names_the_run_size(capsys, size):
    """The notice's first line says which shapes run: the tiny --quick ones by default and with
    --quick; with --full it must not claim tiny --quick shapes (the warning after it says the
    shapes are GPU-size: before, the two lines contradicted each other)."""
    U, a = _args("--device", "cpu", *size)
    U.resolve_run(a)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "NOT performance numbers" in lines[0] and "smoke test" in lines[0], lines
    if size == ["--full"]:
        assert "tiny" not in lines[0] and "--quick" not in lines[0], lines[0]
        assert "--full" in lines[0], lines[0]
        assert len(lines) == 2 and lines[1] == U.CPU_FULL_WARNING, lines
        assert "GPU-size" in lines[1]
    else:
        assert "tiny --quick shapes" in lines[0] and "--full" not in lines[0], lines[0]
        assert len(lines) == 1, lines


def test_resolve_run_gpu_default_run_and_budget(capsys):
    U, a = _args("--device", "cuda")  # no GPU is touched: only the device type is read
    U.resolve_run(a, default_budget_s=45)
    assert a.mode == "default" and not a.quick and not a.full and a.budget_s == 45
    assert capsys.readouterr().out == ""
    U, a = _args("--device", "cuda", "--budget-s", "7")
    U.resolve_run(a, default_budget_s=45)
    assert a.budget_s == 7
    U, a = _args("--device", "cuda", "--full")
    U.resolve_run(a, default_budget_s=45)
    assert a.mode == "full" and a.budget_s is None
    with pytest.raises(SystemExit):
        _args("--quick", "--full")


BENCH_SCRIPTS = sorted(p.stem for p in BENCH.glob("bench_*.py"))


# scripts whose default run may take longer than 60 s: (the most it may take, its gpu_check limit)
LONG_DEFAULT_RUNS = {"bench_e2e": (180, 200)}  # two whole models x 8 providers, with compiles


@pytest.mark.parametrize("name", BENCH_SCRIPTS)
def test_every_bench_states_its_default_run_length(name):
    """Each script's first comment estimates its default run on an H200, at most 60 s (the
    whole-model bench_e2e at most 3 minutes, under its own gpu_check limit)."""
    text = (BENCH / f"{name}.py").read_text()
    m = re.search(r"^# estimate-h200-s: (\d+)$", text, re.M)
    assert m, f"{name}: no '# estimate-h200-s: N' line"
    most, limit = LONG_DEFAULT_RUNS.get(name, (60, None))
    assert 0 < int(m.group(1)) <= most
    assert "--full" in text and "Run length on an H200" in text
    lim = re.search(r"^# gpu-check-limit-s: (\d+)$", text, re.M)
    assert (int(lim.group(1)) if lim else None) == limit, name
    if limit is not None:
        assert int(m.group(1)) < limit


@pytest.mark.parametrize("name", [n for n in BENCH_SCRIPTS if n != "bench_quantize"])
def test_default_run_is_a_subset_of_full(name):
    """select(mode): the default run takes fewer shapes (or configurations) than --full, every
    one of them also in --full, and the quick run takes neither."""
    mod = _bench_module(name)
    default, full, quick = (mod.select(m) for m in ("default", "full", "quick"))
    assert default != full and quick != default
    if name == "bench_e2e":  # the same models and providers; the default run keeps fewer blocks
        assert default[0] == full[0] and default[2] == full[2]
        assert all(sum(d) < sum(f) for d, f in zip(default[1], full[1]))
        return
    d_shapes, f_shapes = list(default[0]), list(full[0])
    assert d_shapes and set(map(repr, d_shapes)) <= set(map(repr, f_shapes))
    assert any(len(d) < len(f) for d, f in zip(default, full)
               if isinstance(d, (list, tuple)) and isinstance(f, (list, tuple))), (default, full)
    names = default[-1]
    if isinstance(names, tuple) and names and isinstance(names[0], str) and full[-1] is None:
        assert len(names) >= 2  # pyops' path and a peer at least


def test_headline_shapes_in_default_runs():
    att = _bench_module("bench_attention").select("default")
    assert {s[1:] for s in att[0]} == {(1, 24, 4608, 128), (1, 40, 32760, 128)}
    assert {"cuDNN SDPA", "pyops int8"} <= set(att[1])
    lin = _bench_module("bench_linear").select("default")
    # issue #15: M in {1, 16, 64} at the Flux K, N, and M 4608 (Flux) / 32760 (Wan)
    assert {s[1:] for s in lin[0]} == ({(M, 3072, N) for M in (1, 16, 64) for N in (3072, 12288)}
                                       | {(4608, 3072, 3072), (4608, 3072, 12288),
                                          (32760, 5120, 5120)})
    assert {"bf16 nn.Linear", "pyops fp8 auto", "pyops nvfp4 auto",
            "torchao fp8 rowwise compiled"} <= set(lin[1])
    for q in ("bench_quantize_fp8", "bench_quantize_nvfp4"):
        assert {s[1:] for s in _bench_module(q).select("default")[0]} == {(4608, 3072),
                                                                          (32760, 5120)}
    # the memory-bound ops: the Flux activation and the Wan size (335 MB bf16: the >= 256 MB
    # figure) in every default run; the cache check at the Flux image stream (1x4096x3072)
    flux, wan = (1, 4608, 3072), (1, 32760, 5120)
    for q in ("bench_norm_modulate_quant", "bench_cache_apply"):
        assert {tuple(s[1:4]) for s in _bench_module(q).select("default")[0]} == {flux, wan}, q
    # GELU + quant at the MLP hidden states: Flux (4 x 3072) and Wan2.1-14B's ffn (13824)
    gq = _bench_module("bench_gelu_quant").select("default")
    assert {tuple(s[1:4]) for s in gq[0]} == {(1, 4608, 12288), (1, 32760, 13824)}
    bs = _bench_module("bench_block_similarity").select("default")
    assert {s[1:] for s in bs[0]} == {(1, 4096, 3072), wan}
    ss = _bench_module("bench_sample_step").select("default")
    assert {s[1] for s in ss[0]} == {(1, 4096, 64), flux, wan}  # the Flux latent too
    assert [c[0] for c in ss[1]] == ["cfg + noise"]  # every operand of the fused step
    for q in ("bench_cache_apply", "bench_sample_step"):
        names = _bench_module(q).select("default")[-1]
        assert {"pyops cuda", "pyops triton", "torch.compile(reference)", "torch eager"} == \
            set(names), q


def test_rows_are_written_as_they_complete(tmp_path):
    U = _bench_module("utils")
    t = U.Table("t", ["a", "b"])
    U.autosave([t], tmp_path, "x", {"date": "d", "host": "h", "command": "c", "python": "p",
                                    "torch": "t", "triton": None, "cuda_runtime": None})
    t.add(a=1, b=2.0)
    assert len(json.loads((tmp_path / "x.json").read_text())["records"]) == 1
    assert "| 1 | 2.000 |" in (tmp_path / "x.md").read_text()
    t.add(a=3, b=None)
    assert len(json.loads((tmp_path / "x.json").read_text())["records"]) == 2
    assert not list(tmp_path.glob(".*.tmp"))  # written through a rename, nothing left over


# ---- bench/gpu_check.sh ---------------------------------------------------------------------------
def test_gpu_check_syntax():
    r = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _dry_run(tmp_path, **env_extra):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path / "out"), **env_extra)
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_gpu_check_dry_run_plan(tmp_path):
    out = _dry_run(tmp_path)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    lines = out.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(f"[{s}]"))
             for s in ("install", "info", "gpu-tests", "bench attention")]
    assert order == sorted(order)
    assert "pip install --no-index --no-build-isolation --no-deps -v -e ." in out
    assert "-m pyops info" in out and "-m pytest -m gpu" in out
    bench_lines = [line for line in lines if line.startswith("[bench ")]
    names = {line.split()[1].rstrip("]") for line in bench_lines}
    # every benchmark once; the FP8 / NVFP4 quantizer scripts run inside bench_quantize.py
    every = {n[len("bench_"):] for n in BENCH_SCRIPTS} - {"quantize_fp8", "quantize_nvfp4"}
    # '# needs-gpus: N' scripts (bench_cp) are left out on a machine with fewer GPUs
    multi = {n[len("bench_"):] for n in BENCH_SCRIPTS
             if re.search(r"^# needs-gpus: \d+$", (BENCH / f"{n}.py").read_text(), re.M)}
    assert multi == {"cp"}
    assert names in (every, every - multi), names
    if names == every - multi:  # named explicitly, it runs on any machine
        named = _dry_run(tmp_path, GPU_CHECK_BENCH="cp attention")
        assert {line.split()[1].rstrip("]") for line in named.splitlines()
                if line.startswith("[bench ")} == {"cp", "attention"}
    for line in bench_lines:
        n = "bench_" + line.split()[1].rstrip("]")
        limit = (LONG_DEFAULT_RUNS.get(n) or (None, 90))[1]
        assert f"limit {limit}s" in line and "--out" in line and "--full" not in line, line
    # the memory-bound benchmarks run first, so a total limit cut by long GPU tests only
    # reaches the model-size ones at the end; the whole-model e2e right after them
    ran = [line.split()[1].rstrip("]") for line in bench_lines]
    memory_bound = ["quantize", "norm_modulate_quant", "gelu_quant", "block_similarity",
                    "cache_apply", "sample_step"]
    assert ran[:len(memory_bound) + 1] == memory_bound + ["e2e"], ran
    assert ran.index("attention") > ran.index("e2e")
    gpu_tests = next(line for line in lines if line.startswith("[gpu-tests]"))
    assert gpu_tests.endswith(" tests"), gpu_tests  # default: every GPU test
    assert "[suite]" not in out
    total = int(re.search(r"estimated ~(\d+) s on an H200", out).group(1))
    assert total <= 60 * len(names) + sum(m - 60 for m, _ in LONG_DEFAULT_RUNS.values())


def test_gpu_check_dry_run_test_selection(tmp_path):
    """GPU_CHECK_TESTS picks the GPU tests (a short check runs a few); none skips them."""
    out = _dry_run(tmp_path, GPU_CHECK_TESTS="tests/test_quantize_fp8.py tests/test_cache_apply.py")
    line = next(x for x in out.splitlines() if x.startswith("[gpu-tests]"))
    assert line.endswith("gpu-tests.xml tests/test_quantize_fp8.py tests/test_cache_apply.py"), line
    out = _dry_run(tmp_path, GPU_CHECK_TESTS="none")
    line = next(x for x in out.splitlines() if x.startswith("[gpu-tests]"))
    assert line == "[gpu-tests] skipped: GPU_CHECK_TESTS=none", line
    assert "-m pytest" not in out


def test_gpu_check_dry_run_subset_and_args(tmp_path):
    out = _dry_run(tmp_path, GPU_CHECK_BENCH="linear cache", GPU_CHECK_BENCH_ARGS="--full",
                   GPU_CHECK_SKIP_INSTALL="1", GPU_CHECK_SUITE="1")
    bench_lines = [line for line in out.splitlines() if line.startswith("[bench ")]
    assert [line.split()[1] for line in bench_lines] == ["linear]", "cache]"]
    assert all(line.rstrip().endswith("--full") for line in bench_lines)
    assert "[install] skipped" in out and "[suite]" in out


_FAKE_PYTHON = r"""#!/usr/bin/env bash
# A stand-in for python3 in gpu_check.sh: pytest/numpy importable or not (FAKE_HAS_TEST_DEPS),
# pip and pytest only logged (pip answers FAKE_PIP_RC), pyops info a no-op, the results
# collector (a script on stdin) run by the real Python; any other check fails fast.
if [ "$1" = "-c" ]; then
    case "$2" in
        "import pytest"|"import numpy") [ "$FAKE_HAS_TEST_DEPS" = 1 ]; exit ;;
        "import matplotlib"|"import tqdm") [ "${FAKE_HAS_BENCH_DEPS:-1}" = 1 ]; exit ;;
        *) exit 1 ;;
    esac
fi
case "$1 $2" in
    "-m pip") echo "pip $*" >>"$FAKE_LOG"; exit "$FAKE_PIP_RC" ;;
    "-m pytest") echo "pytest $*" >>"$FAKE_LOG"; exit 0 ;;
    "-m pyops") exit 0 ;;
esac
exec "$REAL_PYTHON" "$@"
"""


def _gpu_check_with_fake_python(tmp_path, has_test_deps, pip_rc=0, **env_extra):
    fake = tmp_path / "python3"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    env = dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, FAKE_LOG=str(log),
               FAKE_HAS_TEST_DEPS="1" if has_test_deps else "0", FAKE_PIP_RC=str(pip_rc),
               OUT=str(tmp_path / "out"), GPU_CHECK_BENCH_DIR=str(tmp_path / "bench"),
               GPU_CHECK_BENCH="none-selected", GPU_CHECK_TOTAL_S="300")
    env.pop("GPU_CHECK_DRY_RUN", None)
    env.pop("GPU_CHECK_SKIP_INSTALL", None)
    env.pop("GPU_CHECK_TESTS", None)
    env.update(env_extra)
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    stages = {s["stage"]: s["status"] for s in results["stages"]}
    return r.stdout, log.read_text().splitlines(), stages, tmp_path / "out" / "results.md"


@pytest.mark.skipif(not (BENCH / "gpu_check.sh").exists() or os.name != "posix",
                    reason="bash script")
def test_gpu_check_installs_missing_pytest_or_says_how(tmp_path):
    """A fresh CUDA venv has no pytest/numpy: gpu_check.sh tries `pip install pytest numpy` and,
    when that fails, records the GPU tests as skipped with the reason and the command, instead of
    running pytest into a confusing failure (before: it never tried and ran `-m pytest`)."""
    out, calls, stages, md = _gpu_check_with_fake_python(tmp_path, has_test_deps=False,
                                                         pip_rc=1)
    pip = [c for c in calls if c.startswith("pip ")]
    assert any(c.split()[-2:] == ["pytest", "numpy"] and " install " in c for c in pip), calls
    assert not [c for c in calls if c.startswith("pytest ")], calls  # pytest never started
    assert stages.get("test-deps") == "failed", stages
    assert stages["gpu-tests"].startswith("skipped (not importable: pytest numpy"), stages
    assert "pip install pytest numpy" in stages["gpu-tests"]
    line = next(x for x in out.splitlines() if x.startswith("=== [gpu-tests] SKIPPED"))
    assert "need pytest and numpy" in line and "-m pip install pytest numpy" in line, line
    assert "GPU tests: not run, skipped (not importable" in md.read_text()


@pytest.mark.skipif(os.name != "posix", reason="bash script")
def test_gpu_check_with_pytest_present_contacts_no_index(tmp_path):
    """Offline machines with pytest installed (the H200 one): no pip call for the test
    dependencies, and the GPU tests run."""
    out, calls, stages, _ = _gpu_check_with_fake_python(tmp_path, has_test_deps=True)
    pip = [c for c in calls if c.startswith("pip ")]
    assert len(pip) == 1 and "--no-index" in pip[0] and pip[0].endswith("-e ."), pip
    assert "test-deps" not in stages and stages["gpu-tests"] == "ok", stages
    assert [c for c in calls if c.startswith("pytest ") and " -m gpu " in c], calls
    assert "[test-deps] pytest and numpy importable: nothing to install" in out


@pytest.mark.skipif(os.name != "posix", reason="bash script")
def test_gpu_check_runs_the_selected_gpu_tests(tmp_path):
    """The real (not dry) run hands GPU_CHECK_TESTS to pytest, word by word; none records the
    stage as skipped and never starts pytest."""
    _, calls, stages, _ = _gpu_check_with_fake_python(
        tmp_path, has_test_deps=True,
        GPU_CHECK_TESTS="tests/test_sample_step.py tests/test_cache_apply.py::test_x")
    (py,) = [c for c in calls if c.startswith("pytest ") and " -m gpu " in c]
    assert py.endswith(".xml tests/test_sample_step.py tests/test_cache_apply.py::test_x"), py
    assert stages["gpu-tests"] == "ok", stages
    _, calls, stages, md = _gpu_check_with_fake_python(tmp_path, has_test_deps=True,
                                                       GPU_CHECK_TESTS="none")
    assert not [c for c in calls if c.startswith("pytest ")], calls
    assert stages["gpu-tests"] == "skipped (GPU_CHECK_TESTS=none)", stages
    assert "GPU tests: not run, skipped (GPU_CHECK_TESTS=none)." in md.read_text()


@pytest.mark.skipif(os.name != "posix", reason="bash script")
@pytest.mark.skipif(any((ROOT / ".whl" / "test").glob("*.whl")),
                    reason="this checkout has wheels in .whl/test/: the install path would run")
def test_gpu_check_without_plot_packages_installs_nothing_and_says_so(tmp_path):
    """matplotlib/tqdm missing and no wheels: bench-deps contacts no index, says the PNG is
    skipped, and the check goes on."""
    out, calls, stages, _ = _gpu_check_with_fake_python(tmp_path, has_test_deps=True,
                                                        FAKE_HAS_BENCH_DEPS="0")
    assert [c for c in calls if c.startswith("pip ")] == [
        c for c in calls if c.startswith("pip ") and c.endswith("-e .")], calls
    line = next(x for x in out.splitlines() if x.startswith("[bench-deps]"))
    assert "not importable: matplotlib tqdm" in line and "writes no PNG" in line, line
    assert "bench-deps" not in stages and stages["gpu-tests"] == "ok", stages
    out, calls, _, _ = _gpu_check_with_fake_python(tmp_path, has_test_deps=True)
    assert "[bench-deps] matplotlib and tqdm importable: nothing to install" in out


def test_gpu_check_dry_run_names_the_test_deps_step(tmp_path):
    out = _dry_run(tmp_path)
    lines = out.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(f"[{s}]"))
             for s in ("install", "info", "test-deps", "gpu-tests")]
    assert order == sorted(order)
    assert "pip install" in lines[order[2]] and "pytest or numpy" in lines[order[2]]


def test_fetch_wheels_fetches_the_test_dependencies():
    """gpu_check.sh installs pytest/numpy offline from .whl/test/: fetch_wheels.sh puts them
    there (with their dependencies, which `pip install --no-index` needs too)."""
    text = (BENCH / "fetch_wheels.sh").read_text()
    assert re.search(r"^TEST_WHEELS=\$\{TEST_WHEELS:-\"pytest numpy\"\}$", text, re.M), text
    assert "-d .whl/test" in text
    assert ".whl/test" in (BENCH / "gpu_check.sh").read_text()


def test_user_docs_cite_what_users_have():
    """Users have neither the project's internal issue numbers nor its private measurement
    notes: bench/RESULTS.md and the comments of bench/ and tests/ cite RESULTS.md sections,
    commit hashes and the targets themselves."""
    results = (BENCH / "RESULTS.md").read_text()
    assert not re.search(r"\(#\d+\)|target \(issue\)", results)
    assert "the commit that adds" not in results
    private = ("shared/" + "measured", "/work" + "/")
    files = [*BENCH.glob("*.py"), *BENCH.glob("*.sh"), BENCH / "RESULTS.md",
             *ROOT.joinpath("tests").glob("*.py"), ROOT / "tests" / "run.sh"]
    for f in files:
        text = f.read_text()
        for bad in private:
            assert bad not in text, (f.name, bad)
        assert not re.search(r"\bissue \d+\b", text, re.I), f.name
    assert "this project's CPU machines" not in (ROOT / "tests" / "run.sh").read_text()


def test_user_docs_speak_shell():
    """gpu_check.sh and RESULTS.md are for a user at a shell: no tool-call syntax."""
    for f in (BENCH / "gpu_check.sh", BENCH / "RESULTS.md", BENCH / "run.sh",
              BENCH / "fetch_wheels.sh"):
        text = f.read_text()
        for bad in ("run(command", "carry=", "timeout_s=", "device minutes", "device time",
                    "session"):
            assert bad not in text, (f.name, bad)

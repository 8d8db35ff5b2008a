"""CPU tests of bench/bench_cp.py, the context-parallel benchmark.

The quick run (the default on a CPU: a tiny diffusers Flux, 2 gloo processes the script starts
itself, diffusers' ``native`` backend and ``pyops_int8_reference``, 1 rank and Ulysses / ring
over 2) runs once as a subprocess with TRITON_INTERPRET unset. The test checks the files, the
columns, every provider and mode, that no row failed, that the outputs under context parallelism
match the 1-process ones, and the notice that CPU times are no performance numbers. The CPU
times themselves mean nothing and are not checked. About 20 s on 2 cores, most of it starting
the processes (importing torch and diffusers).
"""
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _module():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("bench_cp")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp_out")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # not under torchrun: the script spawns
        env.pop(k, None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(BENCH / "bench_cp.py"), "--device", "cpu", "--out",
                        str(out), "--warmup-ms", "2", "--rep-ms", "10"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return out, r.stdout, time.monotonic() - t0


def test_cpu_run_is_quick_and_says_so(quick):
    out, stdout, seconds = quick
    lines = stdout.splitlines()
    assert "NOT performance numbers" in lines[0], stdout[:1000]
    assert sum("NOT performance numbers" in x for x in lines) == 1  # rank 0 only
    data = json.loads((out / "cp.json").read_text())
    assert data["env"]["run"] == "quick" and data["env"]["world_size"] == 2
    assert seconds < 120, seconds


def test_files_columns_and_rows(quick):
    out, stdout, _ = quick
    mod = _module()
    data = json.loads((out / "cp.json").read_text())
    (table,) = data["tables"]
    assert table["columns"] == mod.COLUMNS
    header = "| " + " | ".join(mod.COLUMNS) + " |"
    assert header in (out / "cp.md").read_text() and header in stdout
    rows = data["records"]
    got = {(r["world size"], r["mode"], r["provider"]) for r in rows}
    provs = ("native", "pyops_int8_reference")
    assert got == {(n, m, p) for n, m in ((1, "single"), (2, "ulysses"), (2, "ring"))
                   for p in provs}
    assert len(rows) == len(got)
    for r in rows:
        assert "error" not in (r.get("note") or ""), r
        if (r["mode"], r["provider"]) == ("ring", "native"):  # no lse: diffusers cannot ring it
            assert r.get("ms") is None and r["note"].startswith("not measured"), r
            continue
        assert r["ms"] > 0 and r["tokens/s"] > 0 and r["calls"] >= 3, r
        assert r["tokens"] == 24
        if r["world size"] == 2:
            assert r["speed-up vs 1 GPU"] > 0
            assert r["scaling efficiency"] == pytest.approx(r["speed-up vs 1 GPU"] / 2)
        else:
            assert r.get("speed-up vs 1 GPU") is None  # the baseline: nothing to divide by


def test_context_parallel_outputs_match_one_process(quick):
    """rel L2 vs the 1-process native output: native Ulysses equals it up to summation order;
    pyops int8 under Ulysses / ring stays near its own 1-process quantization error (a wrong
    shard or gather would be ~1)."""
    out, _, _ = quick
    rows = {(r["world size"], r["mode"], r["provider"]): r
            for r in json.loads((out / "cp.json").read_text())["records"]}
    ref = rows[1, "single", "native"]
    assert ref.get("rel L2 vs 1-GPU bf16") is None and ref["note"] == "the reference output"
    assert rows[2, "ulysses", "native"]["rel L2 vs 1-GPU bf16"] <= 1e-2
    single = rows[1, "single", "pyops_int8_reference"]["rel L2 vs 1-GPU bf16"]
    assert 0 < single < 0.05
    for mode in ("ulysses", "ring"):
        assert rows[2, mode, "pyops_int8_reference"]["rel L2 vs 1-GPU bf16"] <= 2 * single + 1e-3
    assert rows[2, "ulysses", "pyops_int8_reference"]["x bf16"] > 0


def test_run_sizes_and_skip_reasons():
    mod = _module()
    shapes, provs = mod.select("default")
    assert [s.image_tokens for s in shapes] == [4096, 16384] and {s.text for s in shapes} == {512}
    assert provs == ("_native_cudnn", "pyops_int8")
    full_shapes, full_provs = mod.select("full")
    assert mod.WAN_480P in full_shapes and mod.WAN_480P.image_tokens == 32760
    assert set(provs) < set(full_provs) and "pyops_fp8" in full_provs
    assert mod.FLUX["num_layers"] == 2 and mod.FLUX["num_single_layers"] == 4

    class M:  # what why_not reads of a model
        class config:
            num_attention_heads = 24
    import pyops
    pyops.register_diffusers_backends()
    assert mod.why_not(mod.FLUX_1K, M, "ulysses", 8, "pyops_int8") is None
    assert "equal shards" in mod.why_not(mod.FLUX_1K, M, "ring", 3, "pyops_int8")
    assert "heads" in mod.why_not(mod.Shape("flux", "x", (64, 80), 510), M, "ulysses", 5,
                                  "pyops_int8")
    assert "cannot ring" in mod.why_not(mod.FLUX_1K, M, "ring", 2, "native")
    assert mod.why_not(mod.FLUX_1K, M, "ring", 2, "_native_cudnn") is None

"""CPU smoke runs of the one-table memory-bound benchmarks (bench_norm_modulate_quant,
bench_gelu_quant, bench_block_similarity, bench_cache_apply, bench_sample_step): each runs as a
subprocess with ``--device cpu`` and no size flag (on a CPU: the quick run), TRITON_INTERPRET
unset, so the PyTorch reference and plain-torch providers run in a few seconds. The CPU times
mean nothing; the tests check the files, the columns (µs and x ideal next to GB/s and % copy),
that every row that ran has its per-call figures, and that the bit-exact checks hold.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PER_CALL = ("ms", "GB/s", "% copy", "ms graph", "µs", "x ideal")


_RUNS: dict = {}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """quick(name) -> (json data, markdown) of that benchmark's CPU quick run (run once)."""
    def get(name):
        if name not in _RUNS:
            _RUNS[name] = _quick(name, tmp_path_factory.mktemp(name))
        return _RUNS[name]
    return get


def _quick(name, out):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(BENCH / f"bench_{name}.py"), "--device", "cpu",
                        "--out", str(out), "--warmup-ms", "1", "--rep-ms", "3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith("NOTE: CPU run: these times are NOT performance")
    data = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    return data, md


@pytest.mark.parametrize("name", ["norm_modulate_quant", "gelu_quant", "block_similarity",
                                  "cache_apply", "sample_step"])
def test_quick_run_has_per_call_columns(quick, name):
    data, md = quick(name)
    assert data["env"]["run"] == "quick" and data["env"]["copy_gbps"] > 0
    (table,) = data["tables"]
    for c in PER_CALL:
        assert c in table["columns"], c
    assert "| " + " | ".join(table["columns"]) + " |" in md
    assert any(n.startswith("µs: per call, the CUDA-graph replay time") for n in table["notes"])
    assert data["records"], "no rows"
    for r in data["records"]:
        assert "error" not in r.get("note", ""), r
        assert r["ms"] > 0 and r["µs"] == pytest.approx(1000 * r["ms"]), r
        assert r["µs from"] == "do_bench" and r.get("ms graph") is None, r  # no graphs on CPU
        if r.get("x ideal") is not None:
            ideal_ms = r["bytes"] / (data["env"]["copy_gbps"] * 1e9) * 1e3
            assert r["x ideal"] == pytest.approx(r["ms"] / ideal_ms), r
        if "exact" in r:
            assert r["exact"] is True, r


def test_cache_apply_quick_rows(quick):
    data, _ = quick("cache_apply")
    recs = data["records"]
    assert {r["shape"].split()[0] for r in recs} == {"quick"}
    got = {(r["shape"], r["case"], r["provider"]) for r in recs}
    for shape in ("quick 2x64x256", "quick odd 1x33x1000"):
        assert (shape, "reuse", "torch eager") in got
        assert (shape, "reuse", "pyops reference (eager)") in got
        assert (shape, "compute", "pyops reference (eager)") in got
    assert ("quick 2x64x256", "half", "torch eager") in got  # two groups: flags 1, 0
    assert not [r for r in recs if r["case"] == "compute" and r["provider"] == "torch eager"]
    for r in recs:
        assert r["exact"] is True, r
        if r["case"] == "compute":  # only the flags move: no bandwidth figure, µs only
            assert r.get("GB/s") is None and r.get("x ideal") is None and r["µs"] > 0, r
        else:
            assert r["GB/s"] > 0 and r["x ideal"] > 0, r


def test_sample_step_quick_rows(quick):
    data, _ = quick("sample_step")
    recs = data["records"]
    got = {(r["shape"], r["config"], r["provider"]) for r in recs}
    for shape in ("quick 2x64x33", "quick odd 1x1000x7"):
        for config in ("cfg + noise", "euler"):
            for p in ("torch eager", "pyops reference (eager)"):
                assert (shape, config, p) in got
    for r in recs:
        per = 18 if r["config"] == "cfg + noise" else 12  # bytes per element, see the docstring
        assert r["bytes"] == per * r["elements"], r
        assert r["exact"] is True and r["GB/s"] > 0 and r["x ideal"] > 0, r


def test_gelu_quant_quick_rows(quick):
    data, _ = quick("gelu_quant")
    recs = data["records"]
    got = {(r["shape"], r["provider"]) for r in recs}
    for shape in ("quick 2x64x256", "quick odd 1x33x1000"):
        assert (shape, "pyops reference (eager)") in got and (shape, "unfused eager") in got
    for r in recs:
        assert r["bytes"] == r["B"] * r["N"] * r["K"] * 3 + 4 * r["B"] * r["N"], r
        if r["provider"].startswith("pyops"):
            assert r["ok"] is True, r  # q/scale are quantize_fp8 of the op's own fp32 y

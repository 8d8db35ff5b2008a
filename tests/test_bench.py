"""CPU smoke test of the benchmark harness and bench/bench_quantize.py --quick.

The benchmark runs as a subprocess on the CPU with TRITON_INTERPRET unset, so only the PyTorch
reference and plain-torch providers run (a few seconds); the CPU numbers mean nothing, the test
checks that the files are written, the columns are there and the reference is bit-exact.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
COLUMNS = ["op", "shape", "config", "provider", "ms", "GB/s", "% copy", "ms graph", "exact",
           "note"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(BENCH / "bench_quantize.py"), "--quick", "--device",
                        "cpu", "--out", str(out), "--warmup-ms", "2", "--rep-ms", "10"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


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

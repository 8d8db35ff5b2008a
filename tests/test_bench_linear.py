"""CPU smoke test of bench/bench_linear.py --quick (subprocess, references only; the numbers mean
nothing on a CPU: the test checks files, columns, providers and that no provider errored)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_linear_quick(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_linear.py"), "--quick",
                        "--device", "cpu", "--out", str(tmp_path), "--warmup-ms", "1",
                        "--rep-ms", "3"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "linear.json").read_text())
    (table,) = data["tables"]
    assert table["columns"][:5] == ["shape", "M", "K", "N", "provider"]
    provs = {rec["provider"] for rec in data["records"]}
    assert {"bf16 nn.Linear", "pyops fp8 auto", "pyops nvfp4 auto"} <= provs
    for rec in data["records"]:
        assert not str(rec.get("note", "")).startswith("error"), rec
        if rec["provider"] in ("pyops fp8 auto", "pyops nvfp4 auto"):
            assert rec["ms"] > 0 and 10 < rec["SQNR dB"] < 40  # quantized, not broken
    assert "smoke test only" in (tmp_path / "linear.md").read_text()

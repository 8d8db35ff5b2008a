"""CPU smoke test of bench/bench_attention.py (subprocess; pyops through the Triton
interpreter: the numbers mean nothing on a CPU; checks files, providers, accuracy columns).
Run with ``--device cpu`` and no size flag: on a CPU that is the quick run, with a notice."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_attention_quick(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # no --quick: before, a CPU run without it refused to run (exit 2)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_attention.py"),
                        "--device", "cpu", "--out", str(tmp_path), "--warmup-ms", "1",
                        "--rep-ms", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith("NOTE: CPU run: these times are NOT performance")
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["env"]["run"] == "quick"
    assert {rec["shape"] for rec in data["records"]} == {"quick"}
    recs = {rec["provider"]: rec for rec in data["records"]}
    want = {"F.sdpa (CPU)", "pyops int8", "pyops fp8", "pyops int8_fp16pv", "pyops nvfp4",
            "pyops bf16"}
    assert want <= set(recs)
    for name in want:
        rec = recs[name]
        assert "note" not in rec, rec
        assert rec["ms"] > 0 and rec["cos random"] > 0.98 and rec["cos outlier"] > 0.95
    assert recs["pyops int8"]["kernel ms"] > 0 and recs["pyops int8"]["prepass ms"] > 0
    assert "smoke test only" in (tmp_path / "attention.md").read_text()


def test_bench_attention_recipe(tmp_path):
    """The recipe study behind the defaults (bench/RESULTS.md): int8 meets SageAttention2's
    random-input accuracy, fp8 does not, and each outlier transform helps at D=128."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_attention.py"), "--recipe",
                        "--device", "cpu", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = json.loads((tmp_path / "attention_recipe.json").read_text())["records"]
    get = {(x["D"], x["inputs"], x["precision"], x["variant"]): x for x in recs}
    for D in (64, 128):
        assert float(get[(D, "random", "int8", "default")]["rel L1"]) <= 0.038
        assert float(get[(D, "random", "fp8", "default")]["rel L1"]) > 0.038
        assert float(get[(D, "random", "int8_fp16pv", "default")]["rel L1"]) <= 0.015
        assert float(get[(D, "outlier", "int8", "default")]["cos"]) >= 0.995
    steps = ["no transforms", "K smoothing", "+ Q/K channel smoothing", "default"]
    cos = [float(get[(128, "outlier", "int8", s)]["cos"]) for s in steps]
    assert cos == sorted(cos) and cos[0] < 0.99 < cos[-1]

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
    assert "NOTE: CPU run: these times are NOT performance numbers" in r.stdout
    data = json.loads((tmp_path / "linear.json").read_text())
    assert {rec["shape"] for rec in data["records"]} == {"quick"}
    (table,) = data["tables"]
    assert table["columns"][:5] == ["shape", "M", "K", "N", "provider"]
    provs = {rec["provider"] for rec in data["records"]}
    assert {"bf16 nn.Linear", "pyops fp8 auto", "pyops nvfp4 auto"} <= provs
    for rec in data["records"]:
        assert not str(rec.get("note", "")).startswith("error"), rec
        if rec["provider"] in ("pyops fp8 auto", "pyops nvfp4 auto"):
            assert rec["ms"] > 0 and 10 < rec["SQNR dB"] < 40  # quantized, not broken
    assert "smoke test only" in (tmp_path / "linear.md").read_text()


def test_bench_linear_default_run_path(tmp_path, monkeypatch):
    """The default run's provider selection, exercised on the CPU with tiny shapes (the default
    run itself is for a GPU): only the default providers run, in order, on the default shapes."""
    import torch
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_linear as bl
    finally:
        sys.path.remove(str(ROOT / "bench"))

    def as_default(args, default_budget_s=None):
        args.quick, args.full, args.mode = False, False, "default"
        args.budget_s = default_budget_s if args.budget_s is None else args.budget_s
        return torch.device("cpu")
    monkeypatch.setattr(bl.U, "resolve_run", as_default)
    monkeypatch.setattr(bl, "DEFAULT", [("Flux", 32, 64, 48), ("small M", 1, 64, 64)])
    assert bl.main(["--out", str(tmp_path), "--warmup-ms", "1", "--rep-ms", "2"]) == 0
    data = json.loads((tmp_path / "linear.json").read_text())
    assert data["env"]["run"] == "default"
    recs = data["records"]
    assert {(r["M"], r["K"], r["N"]) for r in recs} == {(32, 64, 48), (1, 64, 64)}
    provs = [r["provider"] for r in recs if r["M"] == 32]
    # on a CPU only the providers that run there; never one outside the default list
    assert provs == ["bf16 nn.Linear", "pyops fp8 auto", "pyops nvfp4 auto"]
    assert all(p in bl.DEFAULT_PROVIDERS for p in provs)
    assert all(r.get("ms") for r in recs)


def test_bench_linear_provider_names_say_who_runs():
    """Provider labels use the backend names of pyops/_backend.py (torch = a vendor GEMM through
    torch, triton = ours): no "pyops ... cuda" label, since pyops has no CUDA GEMM of its own."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_linear as bl
    finally:
        sys.path.remove(str(ROOT / "bench"))
    src = (ROOT / "bench" / "bench_linear.py").read_text()
    assert "pyops fp8 torch._scaled_mm" in bl.DEFAULT_PROVIDERS
    assert not any(p.startswith("pyops") and "cuda" in p.split() for p in bl.DEFAULT_PROVIDERS)
    for label in ("pyops nvfp4 triton fused", "pyops nvfp4 torch dequant+cuBLAS",
                  "pyops nvfp4 torch w4a4 (cuBLASLt FP4)"):
        assert label.split("pyops nvfp4 ")[1] in src, label
    assert '"pyops fp8 {be}"' not in src and "pyops nvfp4 {var}" not in src

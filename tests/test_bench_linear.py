"""CPU tests of bench/bench_linear.py: the --quick smoke run (subprocess, references only; the
numbers mean nothing on a CPU: files, columns, providers, no provider errored), the default run's
shapes and providers, and its provider loop (the unverified CUDA kernel's rows last, an error
recorded per row) exercised on the CPU with tiny shapes and stand-ins for the GPU backends."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bl():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_linear
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return bench_linear


def test_bench_linear_quick(tmp_path, bl):
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
    assert "GB/s" in table["columns"] and "weight MB" in table["columns"]
    provs = {rec["provider"] for rec in data["records"]}
    # off CUDA the weight-only rows run the op's reference backend (Triton: no interpreter here)
    assert {"bf16 nn.Linear", "pyops fp8 auto", "pyops nvfp4 auto",
            "pyops fp8 weight-only reference", "pyops nvfp4 weight-only reference"} <= provs
    assert not any("weight-only cuda" in p or "weight-only triton" in p for p in provs)
    fp8_chain = "pyops nvfp4 reference fp8 (convert + _scaled_mm)"
    assert fp8_chain in provs
    for rec in data["records"]:
        assert not str(rec.get("note", "")).startswith("error"), rec
        assert rec["weight MB"] > 0, rec  # filled for every provider
        if rec["provider"] == fp8_chain and rec.get("note", "").startswith("skipped"):
            assert "variant 'fp8'" in rec["note"], rec  # a pyops without that variant
            continue
        assert rec["ms"] > 0 and rec["GB/s"] > 0, rec
        if rec["provider"] in ("pyops fp8 auto", "pyops nvfp4 auto") or "weight-only" in \
                rec["provider"]:
            assert 10 < rec["SQNR dB"] < 40  # quantized, not broken
    M, K, N = 16, 128, 256  # weight MB: bf16 N*K*2; fp8 data + fp32 scales; nvfp4 + global
    mb = {rec["provider"]: rec["weight MB"] for rec in data["records"] if rec["M"] == M}
    assert mb["bf16 nn.Linear"] == pytest.approx(N * K * 2 / 1e6)
    assert mb["pyops fp8 auto"] == pytest.approx((N * K + 4 * N) / 1e6)
    nv4 = (N * K // 2 + N * K // 16 + 4) / 1e6
    assert mb["pyops nvfp4 auto"] == mb[fp8_chain] == pytest.approx(nv4)
    assert "smoke test only" in (tmp_path / "linear.md").read_text()


def test_default_run_shapes_and_providers(bl):
    """Small M in {1, 16, 64} at the Flux (K, N), large M at Flux 1024² and Wan 480p; bf16
    beside every pyops path; weight-only rows at small M only; one torchao compile."""
    shapes, names = bl.select("default")
    assert [s[1:] for s in shapes] == [(M, 3072, N) for M in (1, 16, 64) for N in (3072, 12288)] \
        + [(4608, 3072, 3072), (4608, 3072, 12288), (32760, 5120, 5120)]
    assert {s[0] for s in shapes} == {"small M", "Flux", "Wan"}
    full = bl.select("full")
    assert full[1] is None and set(map(repr, shapes)) <= set(map(repr, full[0]))
    peer_at = []
    for _, M, K, N in shapes:
        at = bl.default_providers(M, K, N)
        assert at[0] == "bf16 nn.Linear" and set(at) <= set(names)
        assert {"pyops fp8 auto", "pyops nvfp4 auto"} <= set(at)
        wo = {p for p in at if "weight-only" in p}
        if M <= 64:
            assert wo == {f"pyops {f} weight-only {b}" for f in ("fp8", "nvfp4")
                          for b in ("cuda", "triton")}
        else:
            assert not wo and bl.NV4_FP8 in at and "_scaled_mm rowwise (pre-quantized)" in at
        if bl.PEER in at:
            peer_at.append((M, K, N))
    assert peer_at == [bl.PEER_AT]
    # --only: the group's default shapes, with the default providers
    assert [s[1:] for s in bl.select("default", "wan")[0]] == [(32760, 5120, 5120)]
    text = (ROOT / "bench" / "bench_linear.py").read_text()
    assert 0 < int(re.search(r"^# estimate-h200-s: (\d+)$", text, re.M).group(1)) <= 60
    assert "ESTIMATE" in text and len(text.splitlines()) <= 420


def test_bench_linear_default_run_path(tmp_path, monkeypatch, bl):
    """The default run's loop on the CPU with tiny shapes and stand-ins for the GPU backends
    (cuda: a kernel that fails, triton: the reference): only the default providers run; the
    unverified cuda rows come after every other row, each with its error in the note, and the
    run goes on; the other weight-only rows carry their difference to the reference."""
    real = bl.weight_only_linear

    def fake(x, q, b=None, *, backend=None):
        if backend == "cuda":
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return real(x, q, b, backend="reference")

    def as_default(args, default_budget_s=None):
        args.quick, args.full, args.mode = False, False, "default"
        args.budget_s = default_budget_s if args.budget_s is None else args.budget_s
        return torch.device("cpu")
    monkeypatch.setattr(bl.U, "resolve_run", as_default)
    monkeypatch.setattr(bl, "weight_only_backends", lambda device: ("cuda", "triton"))
    monkeypatch.setattr(bl, "_runs", lambda *a, **k: (True, "stand-in"))
    monkeypatch.setattr(bl, "weight_only_linear", fake)
    monkeypatch.setattr(bl, "DEFAULT", [("small M", 1, 64, 64), ("Flux", 96, 64, 48)])
    assert bl.main(["--out", str(tmp_path), "--warmup-ms", "1", "--rep-ms", "2"]) == 0
    data = json.loads((tmp_path / "linear.json").read_text())
    assert data["env"]["run"] == "default"
    recs = data["records"]
    order = [(r["M"], r["provider"]) for r in recs]
    assert order == [(1, "bf16 nn.Linear"), (1, "pyops fp8 auto"),
                     (1, "pyops fp8 weight-only triton"), (1, "pyops nvfp4 weight-only triton"),
                     (1, "pyops nvfp4 auto"),
                     # on a CPU only the large-M providers that run there
                     (96, "bf16 nn.Linear"), (96, "pyops fp8 auto"), (96, "pyops nvfp4 auto"),
                     (1, "pyops fp8 weight-only cuda"), (1, "pyops nvfp4 weight-only cuda")]
    assert all(r["provider"] in bl.DEFAULT_PROVIDERS for r in recs)
    for r in recs:
        if r["provider"].endswith("weight-only cuda"):
            assert r["note"].startswith("unverified kernel; error: RuntimeError: CUDA error")
            assert "ms" not in r and r["weight MB"] > 0
            continue
        assert r["ms"] > 0 and r["x bf16"] > 0 and r["GB/s"] > 0, r
        if "weight-only" in r["provider"]:
            assert "vs reference backend: rel diff 0.00e+00" in r["note"], r


def test_nvfp4_fp8_provider_is_skipped_without_the_variant(monkeypatch, bl):
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    q = bl.quantize_weight(torch.randn(32, 64, dtype=torch.bfloat16), "nvfp4")
    monkeypatch.setattr(bl._nv4, "VARIANTS", ("fused", "dequant", "w4a4"))
    p = bl._nvfp4_fp8(x, None, q, 64, torch.device("cuda"))  # nothing touches the GPU
    assert p.name == bl.NV4_FP8 and p.fn is None and p.note.startswith("skipped")
    assert p.wbytes == q.nbytes


def test_bench_linear_provider_names_say_who_runs(bl):
    """Provider labels use the backend names of pyops/_backend.py (torch = a vendor GEMM through
    torch, triton = ours, cuda = pyops' own kernel): "cuda" only on the weight-only rows, whose
    CUDA kernel is pyops' own; the GEMMs of the other paths are torch's."""
    src = (ROOT / "bench" / "bench_linear.py").read_text()
    assert '("torch._scaled_mm", "torch")' in src  # the label "pyops fp8 torch._scaled_mm"
    cuda = {p for p in bl.DEFAULT_PROVIDERS if p.startswith("pyops") and "cuda" in p.split()}
    assert cuda == set(bl.UNVERIFIED) == {"pyops fp8 weight-only cuda",
                                          "pyops nvfp4 weight-only cuda"}
    for label in ("pyops nvfp4 triton fused", "pyops nvfp4 torch dequant+cuBLAS",
                  "pyops nvfp4 torch w4a4 (cuBLASLt FP4)"):
        assert label.split("pyops nvfp4 ")[1] in src, label
    assert '"pyops fp8 {be}"' not in src and "pyops nvfp4 {var}" not in src
    assert 'note = "unverified kernel"' in src

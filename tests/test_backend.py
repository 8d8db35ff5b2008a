"""Backend resolution (pyops/_backend.py): the path a CUDA device takes, exercised on the CPU with
a fake "extension present, sm_90" state, eagerly and inside torch.compile(fullgraph=True).

On an H200 (GPU test run of 2026-11-30, not in bench/RESULTS.md) torch.compile(fullgraph=True)
broke because resolution imported ``pyops._C`` while Dynamo traced it; CPU tensors never reached
that code."""
import dataclasses

import pytest
import torch

from pyops import _backend


@pytest.fixture
def fake_sm90(monkeypatch):
    """pyops._C 'loaded' for sm_90a with a binding for every op, device 0 is sm_90, and every op
    has a 'cuda' implementation registered (a stub: resolution never calls it)."""
    impls = {op: dict(v) for op, v in _backend._IMPLS.items()}
    for op in impls:
        impls[op].setdefault("cuda", lambda *a, **k: None)
    monkeypatch.setattr(_backend, "_IMPLS", impls)
    monkeypatch.setattr(_backend, "_EXTENSION", _backend.ExtensionFacts(
        True, "fake pyops._C", ("90a",), frozenset(impls)))
    monkeypatch.setattr(_backend, "_CAPABILITY", {0: (9, 0)})

    def no_query(*a, **k):
        raise AssertionError("the device was queried again; facts must be cached")
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_query)
    monkeypatch.delenv("PYOPS_BACKEND", raising=False)
    for op in impls:
        monkeypatch.delenv(f"PYOPS_BACKEND_{op.upper()}", raising=False)
    return impls


def _codes(device):
    """Resolve every op on ``device``; encode each choice as a number so a compiled function can
    return it as a tensor."""
    out = []
    for op in sorted(_backend._IMPLS):
        b = _backend.resolve(op, device)
        out.append(float(_backend.BACKENDS.index(b)))
    return out


def test_gpu_resolution_eager(fake_sm90):
    dev = torch.device("cuda", 0)
    for op in fake_sm90:
        # An op with a measured policy (fp8_linear, nvfp4_linear: no pyops CUDA kernel, the
        # fixture's "cuda" stub stands in) runs its preference, which beats the fixed order;
        # its own test file checks the per-shape choices.
        pol = _backend._POLICY.get(op)
        if pol is not None:
            pref = pol[0]((9, 0))
            if _backend.available(op, pref, dev)[0]:
                assert pref != "cuda" and _backend.resolve(op, dev) == pref, op
                continue
        assert _backend.resolve(op, dev) == "cuda", op
        assert _backend.available(op, "cuda", dev)[0]
    # an explicit request for a backend that cannot run still raises, naming the reason
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        _backend.resolve("quantize_fp8", torch.device("cpu"), "cuda")


def test_gpu_resolution_under_compile_fullgraph(fake_sm90, monkeypatch):
    """The whole resolution path a GPU takes traces without a graph break and without importing or
    querying the device (``fake_sm90`` fails the test on any device query)."""
    imported = []
    real_import = _backend.importlib.import_module
    monkeypatch.setattr(_backend.importlib, "import_module",
                        lambda name, *a: imported.append(name) or real_import(name, *a))
    dev = torch.device("cuda", 0)
    expected = _codes(dev)

    def f(x):
        return x + torch.tensor(_codes(dev))

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(len(expected)))
    assert got.tolist() == expected
    assert "pyops._C" not in imported


def test_capability_first_queried_under_compile(fake_sm90, monkeypatch):
    """A device first seen while tracing: its capability becomes a trace-time constant (one
    query), and the eager cache is left for an eager call to fill."""
    calls = []
    monkeypatch.setattr(_backend, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda i=None: calls.append(i) or (9, 0))
    dev = torch.device("cuda", 0)

    def f(x):
        return x + (1.0 if _backend.resolve("quantize_fp8", dev) == "cuda" else 2.0)

    torch._dynamo.reset()
    assert torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(1)).item() == 1.0
    assert len(calls) >= 1
    assert _backend.device_capability(dev) == (9, 0)
    n = len(calls)
    assert _backend.device_capability(dev) == (9, 0) and len(calls) == n  # cached now


def test_wrong_arch_extension_not_chosen(fake_sm90, monkeypatch):
    monkeypatch.setattr(_backend, "_EXTENSION", dataclasses.replace(
        _backend._EXTENSION, archs=("100a",)))
    ok, why = _backend.available("quantize_fp8", "cuda", torch.device("cuda", 0))
    assert not ok and "sm_100a" in why and "sm_90" in why
    assert _backend.resolve("quantize_fp8", torch.device("cuda", 0)) == "triton"


def test_facts_loaded_once():
    a = _backend.extension_facts()
    assert _backend.extension_facts() is a
    assert _backend.extension_status() == (a.loaded, a.why)


def test_linear_resolution_under_compile_fullgraph(fake_sm90, monkeypatch):
    """pyops.linear's resolution (FP8: _backend.resolve with the shape; NVFP4: backend + variant
    through nvfp4_linear.choose) on the sm_90 path, traced without a graph break and equal to
    eager; the answers are the measured sm_90 policies."""
    from pyops.ops import fp8_linear, nvfp4_linear
    monkeypatch.delenv("PYOPS_NVFP4_LINEAR_VARIANT", raising=False)
    dev = torch.device("cuda", 0)
    shapes = [(1, 3072, 3072), (16, 3072, 3072), (4608, 3072, 3072), (4608, 3072, 12288)]

    def codes():
        out = []
        for M, K, N in shapes:
            b = _backend.resolve(fp8_linear.OP, dev, None, M=M, N=N, K=K,
                                 out_dtype=torch.bfloat16)
            nb, v = nvfp4_linear.choose(dev, None, M, N, K, torch.bfloat16)
            out += [float(_backend.BACKENDS.index(b)), float(_backend.BACKENDS.index(nb)),
                    float(nvfp4_linear.VARIANTS.index(v))]
        return out

    expected = codes()
    torch._dynamo.reset()
    got = torch.compile(lambda x: x + torch.tensor(codes()), fullgraph=True,
                        backend="eager")(torch.zeros(len(expected)))
    assert got.tolist() == expected
    code = {b: float(_backend.BACKENDS.index(b)) for b in _backend.BACKENDS}
    var = {v: float(nvfp4_linear.VARIANTS.index(v)) for v in nvfp4_linear.VARIANTS}
    # sm_90: torch._scaled_mm (backend "torch") at every shape (the measured winner)
    assert expected[0::3] == [code["torch"]] * len(shapes)
    # NVFP4: fused Triton only at M = 1 with K <= N; dequant + cuBLAS ("torch") otherwise
    assert expected[1::3] == [code["triton"], code["torch"], code["torch"], code["torch"]]
    assert expected[2::3] == [var["fused"], var["dequant"], var["dequant"], var["dequant"]]


def test_info_without_triton_says_how_to_get_it(monkeypatch):
    import pyops
    monkeypatch.setattr(_backend, "_TRITON", (False, "triton not importable (test)"))
    d = pyops.info(file=False, device=torch.device("cpu"))
    assert "pip install triton" in d["gpu"] and d["triton"] == "triton not importable (test)"
    monkeypatch.setattr(_backend, "_TRITON", (True, "triton (test)"))
    assert "pip install triton" not in pyops.info(file=False, device=torch.device("cpu"))["gpu"]

"""pyops.linear with FP8 weights (W8A8): backends triton (our kernel), torch (torch._scaled_mm),
reference.

Accuracy: every backend against the fp32 reference on the same (dequantized) operands, with an
error bound scaled by sum_k |x_k w_k| (plus the output dtype's rounding), like an FP8 GEMM test
should; the interpreter runs the Triton kernel on CPU with small tiles (``FORCE_CONFIG``).
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops import _backend
from pyops.ops import fp8_linear as op
from pyops.ops.linear import linear
from pyops.weights import FP8Weight, quantize_weight
from pyops.reference import fp8_linear as ref
from pyops.triton_kernels import fp8_linear as tk

from _util import DEVICE, HAS_CUDA, capture_graph, make_input, non_contiguous

SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-20}


@pytest.fixture
def small_tiles(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setattr(tk, "FORCE_CONFIG", SMALL)


def operands(M, N, K, dtype=torch.bfloat16, bias=True, kind="randn"):
    x = make_input((M, K), dtype, kind)
    w = make_input((N, K), dtype)
    qw = quantize_weight(w, "fp8")
    b = make_input((N,), dtype) if bias else None
    return x, qw, b


def assert_close_to_reference(y, xq, xs, wq, ws, bias, rel=2.0**-14):
    """|y - ref| <= eps_out |ref| + rel * (sum_k |x_k w_k| + |bias|)  (ref in fp64)."""
    xd = xq.double() * xs.double().reshape(-1, 1)
    wd = wq.double() * ws.double().reshape(-1, 1)
    want = xd @ wd.t()
    scale = xd.abs() @ wd.abs().t()
    if bias is not None:
        want = want + bias.double()
        scale = scale + bias.double().abs()
    err = (y.double().reshape(want.shape) - want).abs()
    bound = EPS[y.dtype] * want.abs() + rel * scale + 1e-30
    worst = float((err / bound).max())
    assert worst <= 1.0, f"error {worst:.2f}x the bound (max err {float(err.max()):.3g})"


def quantized_x(x):
    t = pyops.quantize_fp8(x, "row", backend="reference")
    K = x.shape[-1]
    return t.data.reshape(-1, K), t.scale.reshape(-1)


# ---- the reference against independent math -----------------------------------------------------
def test_reference_is_dequantized_matmul():
    x, qw, b = operands(9, 20, 40, torch.float32)
    xq, xs = quantized_x(x)
    y = ref.fp8_linear(xq, xs, qw.data, qw.scale, b, torch.float32)
    want = (xq.float() * xs[:, None]) @ (qw.data.float() * qw.scale).t() + b
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


def test_linear_close_to_unquantized_fp32():
    """End to end: FP8 W8A8 vs the fp32 product of the original operands (quantization error)."""
    x, qw, b = operands(64, 96, 256, torch.float32)
    w = qw.dequantize(torch.float32)
    y = linear(x, qw, b, backend="reference")
    want = x @ w.t() + b
    rel = float((y - want).norm() / want.norm())
    assert rel < 0.05, rel
    cos = torch.nn.functional.cosine_similarity(y.flatten(), want.flatten(), dim=0)
    assert cos > 0.998


# ---- Triton kernel (interpreter on CPU) ----------------------------------------------------------
@pytest.mark.parametrize("M,N,K", [(1, 16, 64), (17, 33, 100), (33, 17, 200), (48, 64, 96)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference(small_tiles, M, N, K, bias, dtype):
    x, qw, b = operands(M, N, K, dtype, bias, kind="outlier")
    y = linear(x, qw, b, backend="triton")
    assert y.shape == (M, N) and y.dtype == dtype
    xq, xs = quantized_x(x)
    assert_close_to_reference(y, xq, xs, qw.data, qw.scale, b)


def test_triton_default_config_small_m():
    """The real config table (BLOCK_K 256, K tail) at decode-like M."""
    x, qw, b = operands(5, 24, 300, torch.bfloat16)
    y = linear(x, qw, b, backend="triton")
    assert_close_to_reference(y, *quantized_x(x), qw.data, qw.scale, b)


def test_long_k_drift():
    """K = 8192 at small M/N: an fp32-accumulating kernel stays at fp32-level relative error."""
    x, qw, b = operands(4, 16, 8192, torch.bfloat16, bias=False)
    y = linear(x, qw, None, backend="triton")
    assert_close_to_reference(y, *quantized_x(x), qw.data, qw.scale, None, rel=2.0**-16)


def test_3d_and_non_contiguous(small_tiles):
    x, qw, b = operands(2 * 9, 40, 72, torch.bfloat16)
    x3 = x.view(2, 9, 72)
    y = linear(x3, qw, b, backend="triton")
    assert y.shape == (2, 9, 40)
    y2 = linear(x, qw, b, backend="triton")
    assert torch.equal(y.reshape(18, 40), y2)
    for how in ("transposed", "col_slice", "row_step"):
        xn = non_contiguous(x, how)
        assert not xn.is_contiguous()
        assert torch.equal(linear(xn, qw, b, backend="triton"), y2), how
    # a non-contiguous weight view (e.g. a slice of a fused weight) works too
    wq = torch.cat([qw.data, qw.data], dim=1)[:, :72]
    qw2 = FP8Weight(wq, qw.scale, qw.dtype)
    assert torch.equal(linear(x, qw2, b, backend="triton"), y2)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_prequantized_fp8tensor_input(small_tiles, backend):
    x, qw, b = operands(2 * 7, 32, 64, torch.bfloat16)
    x3 = x.view(2, 7, 64)
    xt = pyops.quantize_fp8(x3, "row")
    assert xt.scale.shape == (2, 7, 1)
    y = linear(xt, qw, b, backend=backend)
    assert y.shape == (2, 7, 32) and y.dtype == torch.bfloat16
    assert torch.equal(y, linear(x3, qw, b, backend=backend))


def test_scaled_mm_call_on_cpu():
    """Backend "torch"'s torch._scaled_mm call (scales, bias, out=) checked where torch has a
    CPU _scaled_mm; on CUDA the GPU test below covers it."""
    x, qw, b = operands(32, 48, 64, torch.bfloat16)
    xq, xs = quantized_x(x)
    out = torch.full((32, 48), float("nan"), dtype=torch.bfloat16)
    try:
        op._torch(xq, xs, qw.data, qw.scale.reshape(-1), b.float(), out)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no CPU torch._scaled_mm here: {e}")
    assert_close_to_reference(out, xq, xs, qw.data, qw.scale, b)


def test_opcheck():
    x, qw, b = operands(5, 16, 32, torch.bfloat16)
    xq, xs = quantized_x(x)
    # test_schema is left out: SchemaCheckMode multiplies the fp8 inputs, unsupported on CPU
    for backend in ("reference", "triton"):
        for bias in (b, None):
            torch.library.opcheck(
                torch.ops.pyops.fp8_linear.default,
                (xq, xs, qw.data, qw.scale.reshape(-1), bias, torch.bfloat16, backend),
                test_utils=("test_faketensor", "test_autograd_registration",
                            "test_aot_dispatch_dynamic"))


def test_compile_fullgraph():
    x, qw, b = operands(6, 32, 64, torch.bfloat16)

    @torch.compile(fullgraph=True)
    def f(x):
        return linear(x, qw, b, backend="reference")
    assert torch.equal(f(x), linear(x, qw, b, backend="reference"))


# ---- auto policy (fake device capabilities; no GPU needed) ---------------------------------------
# The H200 measurement (bench/RESULTS.md, section 1, "Linear" table, x bf16 incl. the
# activation quantization): (M, K, N): (_scaled_mm, backend "torch" (the table's "cuda" column,
# its name then), "triton"). Copied here so the test checks the policy against the data.
H200_GEMMS = {
    (4608, 3072, 3072): (1.24, 0.51), (4608, 3072, 12288): (1.38, 0.59),
    (4608, 12288, 3072): (1.28, 0.49), (4608, 3072, 15360): (1.52, 0.65),
    (4608, 15360, 3072): (1.28, 0.49), (9216, 3072, 3072): (1.25, 0.62),
    (9216, 3072, 12288): (1.56, 0.64), (9216, 12288, 3072): (1.24, 0.52),
    (32760, 5120, 5120): (1.42, 0.63), (1, 3072, 3072): (0.07, 0.06),
    (1, 3072, 12288): (0.22, 0.23), (1, 12288, 3072): (0.39, 0.29), (16, 3072, 3072): (0.21, 0.15),
}
# (1, 3072, 12288): Triton 0.23 vs 0.22 is inside the same run's spread (its "auto" column, the
# same _scaled_mm path, read 0.20); counted as a tie, which the policy gives to _scaled_mm.
H200_TIES = {(1, 3072, 12288)}
CUDA0 = torch.device("cuda", 0)


def resolve(device, backend, M, N, K, out_dtype):
    """The backend pyops.linear's FP8 path resolves (its call of _backend.resolve)."""
    return _backend.resolve(op.OP, device, backend, M=M, N=N, K=K, out_dtype=out_dtype)


@pytest.fixture
def fake_capability(monkeypatch):
    """``set(cap)``: every capability query (pyops._backend's and the policy's) answers ``cap``;
    no backend is forced by the environment."""
    monkeypatch.delenv("PYOPS_BACKEND", raising=False)
    monkeypatch.delenv("PYOPS_BACKEND_FP8_LINEAR", raising=False)

    def set_cap(cap):
        def query(device):
            assert torch.device(device).type == "cuda", device
            return cap
        monkeypatch.setattr(_backend, "device_capability", query)
    return set_cap


@pytest.mark.parametrize("M,K,N", sorted(H200_GEMMS))
def test_sm90_auto_picks_scaled_mm_at_measured_shapes(fake_capability, M, K, N):
    """On sm_90 auto runs torch._scaled_mm at every measured shape: it won each one (or tied)."""
    torch_x, triton_x = H200_GEMMS[(M, K, N)]
    assert torch_x > triton_x or (M, K, N) in H200_TIES
    fake_capability((9, 0))
    assert op.auto_backend((9, 0), M, N, K) == "torch"
    assert resolve(CUDA0, None, M, N, K, torch.bfloat16) == "torch"  # pyops.linear's call


def test_auto_fallbacks(fake_capability):
    """Where _scaled_mm cannot run, auto takes Triton (sm_89+), else the reference."""
    fake_capability((9, 0))
    assert resolve(CUDA0, None, 4608, 3072, 3072, torch.float16) == "triton"  # bf16 out only
    assert resolve(CUDA0, None, 4608, 3000, 3072, torch.bfloat16) == "triton"  # N % 16
    assert resolve(CUDA0, None, 4608, 3072, 3000, torch.bfloat16) == "triton"  # K % 16
    assert resolve(torch.device("cpu"), None, 4608, 3072, 3072, torch.bfloat16) == "reference"
    fake_capability((8, 9))  # rowwise _scaled_mm needs sm_90
    assert resolve(CUDA0, None, 4608, 3072, 3072, torch.bfloat16) == "triton"
    fake_capability((8, 0))  # and the Triton kernel sm_89 (fp8 operands)
    assert resolve(CUDA0, None, 4608, 3072, 3072, torch.bfloat16) == "reference"


def test_auto_unmeasured_capabilities_unchanged(fake_capability):
    """sm_100/103/120 are unmeasured: _scaled_mm wherever it can run, as before."""
    for cap in [(10, 0), (10, 3), (12, 0)]:
        fake_capability(cap)
        for M, K, N in [(1, 3072, 3072), (16, 3072, 3072), (4608, 3072, 3072)]:
            assert op.auto_backend(cap, M, N, K) == "torch"
            assert resolve(CUDA0, None, M, N, K, torch.bfloat16) == "torch", cap


def test_explicit_backend_beats_the_policy(fake_capability, monkeypatch):
    fake_capability((9, 0))
    for M, K, N in [(4608, 3072, 3072), (1, 12288, 3072)]:
        assert resolve(CUDA0, "triton", M, N, K, torch.bfloat16) == "triton"
        assert resolve(CUDA0, "reference", M, N, K, torch.bfloat16) == "reference"
        assert resolve(CUDA0, "torch", M, N, K, torch.bfloat16) == "torch"
    with pytest.raises(RuntimeError, match="bf16 only"):
        resolve(CUDA0, "torch", 4608, 3072, 3072, torch.float16)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        resolve(CUDA0, "torch", 4608, 3072, 3000, torch.bfloat16)
    monkeypatch.setenv("PYOPS_BACKEND_FP8_LINEAR", "triton")
    assert resolve(CUDA0, None, 4608, 3072, 3072, torch.bfloat16) == "triton"
    assert resolve(CUDA0, "reference", 4608, 3072, 3072, torch.bfloat16) == "reference"


def test_policy_registered_and_general_availability(fake_capability):
    """The policy is the registry's (pyops.info() prints its source), and availability without
    shape keywords (pyops.info()'s question) answers for an aligned bf16 GEMM."""
    assert _backend._POLICY[op.OP][0] is op.auto_backend
    assert "H200" in _backend.policy(op.OP) and "RESULTS.md" in _backend.policy(op.OP)
    fake_capability((9, 0))
    assert _backend.available(op.OP, "torch", CUDA0) == (True, "torch._scaled_mm row-wise")
    assert _backend.resolve(op.OP, CUDA0) == "torch"
    fake_capability((8, 9))
    ok, why = _backend.available(op.OP, "torch", CUDA0)
    assert not ok and "sm_90" in why
    assert _backend.resolve(op.OP, CUDA0) == "triton"
    assert not _backend.available(op.OP, "torch", torch.device("cpu"))[0]
    assert not _backend.available(op.OP, "cuda", CUDA0)[0]  # no pyops FP8 GEMM kernel


def test_cuda_backend_request_is_a_deprecated_alias_of_torch(monkeypatch):
    """backend="cuda" (the old name of the torch._scaled_mm path) still runs it, as "torch", with
    a one-time FutureWarning naming the new name; as an argument and through the environment."""
    from pyops import _backend
    monkeypatch.setattr(_backend, "_WARNED_ALIASES", set())
    monkeypatch.setattr(_backend, "_CAPABILITY", {0: (9, 0)})
    dev = torch.device("cuda", 0)
    with pytest.warns(FutureWarning, match=r"now named 'torch'.*torch\._scaled_mm"):
        assert _backend.resolve("fp8_linear", dev, "cuda", M=16, N=32, K=32,
                                out_dtype=torch.bfloat16) == "torch"
    monkeypatch.setenv("PYOPS_BACKEND_FP8_LINEAR", "cuda")
    assert _backend.resolve("fp8_linear", dev, None, M=16, N=32, K=32,
                            out_dtype=torch.bfloat16) == "torch"
    # on the CPU the renamed backend cannot run, and the error says which backend that is
    x, qw, b = operands(4, 16, 32, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"backend 'torch' requested for fp8_linear"):
        linear(x, qw, b)
    # the alias belongs to fp8_linear only: the quantizers' "cuda" is pyops' own kernel
    assert _backend.requested("quantize_fp8", "cuda") == "cuda"
    assert torch.equal(linear(x, qw, b, backend="reference"),
                       ref.fp8_linear(*quantized_x(x), qw.data, qw.scale, b, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(4608, 3072, 3072), (16, 3072, 3072), (1, 12288, 3072)])
def test_gpu_sm90_auto_runs_scaled_mm(monkeypatch, M, K, N):
    """On a real sm_90 device pyops.linear's auto mode runs torch._scaled_mm (bit-equal to an
    explicit backend="torch"), at the shape where the H200 run read auto 0.60x vs 1.24x."""
    if tuple(torch.cuda.get_device_capability()) != (9, 0):
        pytest.skip("the measured policy is sm_90's")
    monkeypatch.delenv("PYOPS_BACKEND", raising=False)
    monkeypatch.delenv("PYOPS_BACKEND_FP8_LINEAR", raising=False)
    x, qw, b = operands(M, N, K, torch.bfloat16)
    assert resolve(x.device, None, M, N, K, torch.bfloat16) == "torch"
    assert torch.equal(linear(x, qw, b), linear(x, qw, b, backend="torch"))


# ---- errors, before any launch --------------------------------------------------------------------
def test_errors():
    x, qw, b = operands(4, 16, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="in_features is 32"):
        linear(x[:, :31], qw)
    with pytest.raises(TypeError, match="dtype"):
        linear(x.to(torch.int32), qw)
    with pytest.raises(TypeError, match="quantize_weight"):
        linear(x, torch.randn(16, 32))
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize_weight(torch.randn(16, 32), "int4")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(2, 16, 32), "fp8")
    with pytest.raises(ValueError, match="bias"):
        linear(x, qw, torch.randn(17))
    with pytest.raises(ValueError, match="row"):
        linear(pyops.quantize_fp8(x, "tensor"), qw)
    with pytest.raises(ValueError, match="meta"):
        linear(x, qw.to("meta"))
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="cannot run"):
            linear(x, qw, backend="torch")  # torch._scaled_mm needs CUDA tensors


def test_weight_object():
    w = make_input((64, 128), torch.bfloat16)
    qw = quantize_weight(w, "fp8")
    assert qw.nbytes == 64 * 128 + 64 * 4
    r = repr(qw)
    assert "FP8Weight(out_features=64, in_features=128" in r and "nbytes=8448" in r
    d = qw.dequantize()
    assert d.dtype == torch.bfloat16 and d.shape == (64, 128)
    assert float((d.float() - w.float()).norm() / w.float().norm()) < 0.05
    sd, meta = qw.state_dict(), qw.metadata()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    again = FP8Weight.from_state_dict(sd, meta)
    assert torch.equal(again.dequantize(), d) and again.dtype == torch.bfloat16


# ---- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("M,N,K", [(1, 3072, 3072), (64, 3072, 12288), (4608, 3072, 3072),
                                   (333, 1040, 2064), (32760, 5120, 5120)])
def test_gpu_backends_vs_reference(backend, M, N, K):
    x, qw, b = operands(M, N, K, torch.bfloat16)
    y = linear(x, qw, b, backend=backend)
    assert_close_to_reference(y, *quantized_x(x), qw.data, qw.scale, b, rel=2.0**-12)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_long_k_drift(backend):
    """K = 16384: FP8 MMA partial sums must be promoted to fp32 (max_num_imprecise_acc)."""
    x, qw, _ = operands(256, 256, 16384, torch.bfloat16, bias=False)
    y = linear(x, qw, None, backend=backend)
    assert_close_to_reference(y, *quantized_x(x), qw.data, qw.scale, None, rel=2.0**-13)


@pytest.mark.gpu
def test_gpu_auto_policy_and_fp16():
    x, qw, b = operands(256, 512, 512, torch.bfloat16)
    assert resolve(x.device, None, 256, 512, 512, torch.bfloat16) == "torch"
    assert resolve(x.device, None, 256, 500, 512, torch.bfloat16) == "triton"
    assert resolve(x.device, None, 256, 512, 512, torch.float16) == "triton"
    y = linear(x.half(), qw, b.half())
    assert y.dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_compile_and_cuda_graph(backend):
    x, qw, b = operands(512, 1024, 1024, torch.bfloat16)
    f = torch.compile(lambda x: linear(x, qw, b, backend=backend), fullgraph=True)
    torch.testing.assert_close(f(x), linear(x, qw, b, backend=backend), rtol=0, atol=0)
    static_x = x.clone()
    g, static_y = capture_graph(lambda xx: linear(xx, qw, b, backend=backend), static_x)
    for _ in range(2):
        new = make_input(x.shape, torch.bfloat16)
        static_x.copy_(new)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, linear(new, qw, b, backend=backend))

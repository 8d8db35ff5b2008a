"""pyops.weight_only_linear (W8A16 / W4A16) and pyops.linear's small-M routing.

Spec: pyops/reference/weight_only_linear.py. The reference is checked against fp64 math on the
decoded weight; the Triton kernels (interpreter on CPU) and, on a GPU, the CUDA kernel against
the fp64 result within  eps_out |ref| + rel * sum_k |x_k W_nk|  (fp32 accumulation, one
rounding). Shapes: odd M, N; K not a multiple of 16 or 128; bias on/off; fp16/bf16; outlier
channels; split-K forced on.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops import _backend
from pyops.ops import linear as linear_mod
from pyops.ops import weight_only_linear as op
from pyops.reference import weight_only_linear as ref
from pyops.triton_kernels import nvfp4_linear as tk4
from pyops.triton_kernels import weight_only_linear as tk

from _util import DEVICE, HAS_CUDA, capture_graph, make_input, non_contiguous

EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
FMTS = ["fp8", "nvfp4"]
SMALL8 = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, SPLIT_K=1)
SMALL4 = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2, SPLIT_K=1)


@pytest.fixture(params=[1, 3], ids=["nosplit", "split3"])
def small_tiles(request, monkeypatch):
    """Interpreter-sized tiles, with and without split-K (on a GPU: the default configs)."""
    if not HAS_CUDA:
        monkeypatch.setattr(tk, "FORCE_CONFIG", dict(SMALL8, SPLIT_K=request.param))
        monkeypatch.setattr(tk4, "FORCE_CONFIG", dict(SMALL4, SPLIT_K=request.param))
    return request.param


def operands(M, N, K, fmt, dtype=torch.bfloat16, bias=True, kind="randn"):
    x = make_input((M, K), dtype, kind)
    w = make_input((N, K), torch.float32)
    qw = pyops.quantize_weight(w, fmt)
    b = make_input((N,), torch.float32) if bias else None
    return x, qw, b


def decoded(qw):
    data, scales, g, fmt, N, K = op.weight_operands(qw)
    return ref.dequantize(data.cpu(), scales.cpu(), None if g is None else g.cpu(), fmt, K)


def assert_close(y, x, qw, bias, rel=2.0**-14, ulps=0.5):
    """|y - want| <= ulps * 2 * eps_out |want| + rel * (sum_k |x_k W_nk| + |bias|), in fp64."""
    w = decoded(qw).double()
    xd = x.detach().cpu().double().reshape(-1, w.shape[1])
    want = xd @ w.t()
    scale = xd.abs() @ w.abs().t()
    if bias is not None:
        want = want + bias.cpu().double()
        scale = scale + bias.cpu().double().abs()
    err = (y.detach().cpu().double().reshape(want.shape) - want).abs()
    bound = 2 * ulps * EPS[y.dtype] * want.abs() + rel * scale + 1e-30
    worst = float((err / bound).max())
    assert worst <= 1.0, f"error {worst:.2f}x the bound (max err {float(err.max()):.3g})"


# ---- the reference -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
def test_reference_is_decoded_matmul(fmt):
    x, qw, b = operands(7, 24, 200, fmt, torch.float32)
    y = pyops.weight_only_linear(x.cpu(), qw.to("cpu"), b.cpu(), backend="reference")
    assert y.dtype == torch.float32
    assert_close(y, x, qw, b, rel=2.0**-22)
    # the decode itself: the weight containers' own fp32 dequantization
    assert torch.equal(decoded(qw), qw.to("cpu").dequantize(torch.float32))


@pytest.mark.parametrize("fmt", FMTS)
def test_weight_only_is_closer_than_w8a8(fmt):
    """Weight-only keeps the activations: closer to the unquantized product than the W8A8 /
    dequantized paths whenever activations have outlier channels (fp8 weights)."""
    x, qw, b = operands(16, 64, 512, fmt, torch.float32, kind="outlier")
    exact = x.double() @ decoded(qw).double().t() + b.double()
    wo = pyops.weight_only_linear(x, qw, b, backend="reference").double()
    assert float((wo - exact).abs().max()) <= 1e-3 * float(exact.abs().max())
    if fmt == "fp8":
        w8a8 = pyops.linear(x, qw, b, backend="reference").double()
        assert (wo - exact).abs().mean() < (w8a8 - exact).abs().mean()


# ---- Triton against the spec ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,N,K", [(1, 40, 77), (5, 33, 300), (17, 64, 129), (3, 130, 1000)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_spec(small_tiles, fmt, M, N, K, bias, dtype):
    x, qw, b = operands(M, N, K, fmt, dtype, bias, kind="outlier" if M % 2 else "randn")
    y = pyops.weight_only_linear(x, qw, b, backend="triton")
    assert y.dtype == dtype and y.shape == (M, N)
    # the NVFP4 kernel (nvfp4_linear's) stores bf16 with Triton's cast, which the interpreter
    # truncates instead of rounding to nearest: one ulp there (RNE, half an ulp, on a GPU)
    soft_bf16 = fmt == "nvfp4" and dtype == torch.bfloat16 and not HAS_CUDA
    assert_close(y, x, qw, b, ulps=1.0 if soft_bf16 else 0.5)


@pytest.mark.parametrize("fmt", FMTS)
def test_triton_default_config(fmt):
    x, qw, b = operands(2, 64, 256, fmt, torch.float16)
    assert_close(pyops.weight_only_linear(x, qw, b, backend="triton"), x, qw, b)


def test_default_config_splits_small_m():
    """Small M: split-K until about two programs per SM; never more splits than K blocks / 2."""
    c = tk.pick_config(1, 3072, 3072, num_sms=132)
    assert c["SPLIT_K"] > 1 and c["BLOCK_M"] == 16
    assert tk.pick_config(1, 3072, 256, num_sms=132)["SPLIT_K"] == 1
    assert tk.pick_config(64, 12288, 3072, num_sms=132)["BLOCK_M"] == 64


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("how", ["transposed", "col_slice"])
def test_3d_and_non_contiguous(small_tiles, fmt, how):
    x, qw, b = operands(6, 32, 96, fmt, torch.float16)
    xs = non_contiguous(x, how)
    y = pyops.weight_only_linear(xs.reshape(2, 3, 96) if how == "col_slice" else xs, qw, b,
                                 backend="triton")
    assert_close(y.reshape(6, 32), x, qw, b)
    x3 = x.reshape(2, 3, 96)
    y3 = pyops.weight_only_linear(x3, qw, b, backend="triton")
    assert y3.shape == (2, 3, 32)
    bs = torch.stack([b, -b], 1)[:, 0]  # a strided bias (the kernels read bias + n)
    assert_close(pyops.weight_only_linear(x, qw, bs, backend="triton"), x, qw, b)


def test_zero_and_nan_inputs():
    x, qw, b = operands(3, 32, 64, "fp8")
    y = pyops.weight_only_linear(torch.zeros_like(x), qw, b, backend="triton")
    assert torch.equal(y, b.to(y.dtype).expand(3, 32).to(y.device))
    x[1, 5] = float("nan")
    y = pyops.weight_only_linear(x, qw, None, backend="triton")
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()


# ---- the op: fake, opcheck, compile --------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
def test_opcheck(fmt):
    x, qw, b = operands(5, 16, 48, fmt)
    data, scales, g, fmt, N, K = op.weight_operands(qw)
    for backend in ("reference", "triton"):
        for bias in (b, None):
            torch.library.opcheck(
                torch.ops.pyops.weight_only_linear.default,
                (x, data, scales, g, fmt, K, bias, backend),
                test_utils=("test_faketensor", "test_autograd_registration",
                            "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("fmt", FMTS)
def test_compile_fullgraph(fmt):
    x, qw, b = operands(4, 32, 64, fmt)

    @torch.compile(fullgraph=True)
    def f(x):
        return pyops.weight_only_linear(x, qw, b, backend="reference")
    assert torch.equal(f(x), pyops.weight_only_linear(x, qw, b, backend="reference"))


# ---- errors --------------------------------------------------------------------------------------
def test_errors():
    x, qw, b = operands(3, 16, 32, "fp8")
    with pytest.raises(TypeError, match="quantize_weight"):
        pyops.weight_only_linear(x, torch.zeros(16, 32), b)
    with pytest.raises(TypeError, match="dtype"):
        pyops.weight_only_linear(x.to(torch.int32), qw, b)
    with pytest.raises(ValueError, match="in_features"):
        pyops.weight_only_linear(x[:, :31], qw, b)
    with pytest.raises(ValueError, match="bias"):
        pyops.weight_only_linear(x, qw, b[:15])
    with pytest.raises(ValueError, match="on meta"):
        pyops.weight_only_linear(x.to("meta"), qw, b)
    with pytest.raises(RuntimeError, match="bf16/fp16"):
        pyops.weight_only_linear(x.float(), qw, b, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        pyops.weight_only_linear(x, qw, b, backend="fast")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="cannot run"):
            pyops.weight_only_linear(x, qw, b, backend="cuda")


# ---- policies ------------------------------------------------------------------------------------
def test_auto_policy_is_unmeasured_triton(monkeypatch):
    monkeypatch.delenv("PYOPS_BACKEND", raising=False)
    monkeypatch.delenv("PYOPS_BACKEND_WEIGHT_ONLY_LINEAR", raising=False)
    for cap in ((8, 0), (9, 0), (10, 0), (12, 0)):
        assert op.auto_backend(cap, M=1, N=3072, K=3072) == "triton"
    assert "unmeasured" in _backend.policy(op.OP)
    assert _backend.resolve(op.OP, torch.device("cpu")) == "reference"


def test_cuda_split_k_heuristic():
    for fmt in FMTS:
        for M, N, K in [(1, 3072, 3072), (16, 12288, 3072), (1, 3072, 12288), (64, 64, 17),
                        (1, 1, 1), (200, 3072, 3072)]:
            s = op.cuda_split_k(M, N, K, fmt, 132)
            chunks = -(-K // op.CHUNK_K[fmt])
            assert 1 <= s <= max(1, chunks)
    assert op.cuda_split_k(1, 3072, 3072, "fp8", 132) > 1      # 192 CTAs: split
    assert op.cuda_split_k(1, 12288, 3072, "fp8", 132) == 1    # 768 CTAs: enough


def test_linear_routes_small_m_only_when_asked(monkeypatch):
    calls = []
    real = linear_mod.weight_only_linear
    monkeypatch.setattr(linear_mod, "weight_only_linear",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.delenv(linear_mod.WEIGHT_ONLY_ENV, raising=False)
    for fmt in FMTS:
        x, qw, b = operands(4, 32, 64, fmt)
        pyops.linear(x, qw, b)
        assert calls == [], "routed without a measurement"
        monkeypatch.setenv(linear_mod.WEIGHT_ONLY_ENV, "4")
        y = pyops.linear(x, qw, b)
        assert calls == [x.shape]
        assert torch.equal(y, pyops.weight_only_linear(x, qw, b))
        pyops.linear(torch.cat([x, x]), qw, b)  # M = 8 > 4: the GEMM path
        pyops.linear(x.float(), qw, b)  # fp32 activations: the GEMM op's reference
        pyops.linear(x, qw, b, backend="reference")  # an explicit backend: the GEMM op's
        assert len(calls) == 1
        calls.clear()
        monkeypatch.delenv(linear_mod.WEIGHT_ONLY_ENV)
    monkeypatch.setenv(linear_mod.WEIGHT_ONLY_ENV, "-1")
    with pytest.raises(ValueError, match="integer"):
        pyops.linear(x, qw, b)
    assert linear_mod.WEIGHT_ONLY_MAX_M == {} and "unmeasured" in linear_mod.ROUTE_SOURCE


# ---- GPU -----------------------------------------------------------------------------------------
GPU_SHAPES = [(1, 3072, 3072), (5, 12288, 3072), (16, 3072, 12288), (64, 3072, 3072),
              (33, 130, 1000), (7, 96, 17), (130, 512, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M,N,K", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backends_match_spec(backend, fmt, M, N, K, dtype):
    x, qw, b = operands(M, N, K, fmt, dtype, bias=M % 2 == 1, kind="outlier")
    if dtype == torch.float16:  # outlier sums reach fp16's 65504 at K = 12288 (inf != want)
        x = x * 0.125
    y = pyops.weight_only_linear(x, qw, b, backend=backend)
    assert_close(y, x, qw, b)
    # deterministic: same bits on a second call (fixed split-K order)
    assert torch.equal(y, pyops.weight_only_linear(x, qw, b, backend=backend))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("fmt", FMTS)
def test_gpu_compile_and_cuda_graph(backend, fmt):
    x, qw, b = operands(8, 3072, 3072, fmt)
    f = torch.compile(lambda x: pyops.weight_only_linear(x, qw, b, backend=backend),
                      fullgraph=True)
    assert torch.equal(f(x), pyops.weight_only_linear(x, qw, b, backend=backend))
    static_x = x.clone()
    g, static_y = capture_graph(lambda xx: pyops.weight_only_linear(xx, qw, b, backend=backend),
                                static_x)
    for _ in range(2):
        new = make_input(x.shape, torch.bfloat16)
        static_x.copy_(new)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, pyops.weight_only_linear(new, qw, b, backend=backend))


def test_cuda_backend_availability(monkeypatch):
    """The CUDA kernel runs where pyops._C holds it for the device's arch, sm_89+ (its e4m3x2
    conversion); it is never auto's choice (unverified on hardware)."""
    dev = torch.device("cuda", 0)
    for cap, archs, ok in [((9, 0), ("90a",), True), ((10, 0), ("90a", "100a"), True),
                           ((8, 0), ("80",), False), ((8, 9), ("89",), True),
                           ((12, 0), ("90a",), False)]:
        monkeypatch.setattr(_backend, "_EXTENSION", _backend.ExtensionFacts(
            loaded=True, why="fake", archs=archs, cuda_ops=frozenset({op.OP})))
        monkeypatch.setattr(_backend, "device_capability", lambda d, cap=cap: cap)
        got, why = _backend.available(op.OP, "cuda", dev)
        assert got is ok, (cap, archs, why)
        if cap == (8, 0):
            assert "sm_89+" in why
        monkeypatch.setattr(_backend, "triton_runs", lambda d: (True, "fake"))
        assert _backend.resolve(op.OP, dev, M=1, N=3072, K=3072, dtype=torch.bfloat16) == "triton"
        # fp32 x: neither kernel takes it, so auto falls through to the reference
        assert _backend.resolve(op.OP, dev, M=1, N=3072, K=3072, dtype=torch.float32) == \
            "reference"


@pytest.mark.parametrize("fmt", FMTS)
def test_strided_bias_every_linear_path(fmt):
    """A bias that is a strided view (a column of a bigger tensor) gives the same result as its
    contiguous copy on every Triton linear (the kernels read bias + n)."""
    x, qw, b = operands(3, 32, 64, fmt)
    big = torch.stack([torch.zeros_like(b), b], 1)  # (N, 2): column 1 is b, stride 2
    for f in (lambda bb: pyops.linear(x, qw, bb, backend="triton"),
              lambda bb: pyops.weight_only_linear(x, qw, bb, backend="triton")):
        assert torch.equal(f(big[:, 1]), f(b))

"""pyops.quantize_fp8 / dequantize_fp8: spec, backends bit-exact, errors, opcheck, compile."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyops
from pyops.reference import quantize_fp8 as ref

from _util import (BACKENDS, DEVICE, HAS_CUDA, assert_bits_equal, make_input, need_backend,
                   non_contiguous, registered_backends)

GRANS = list(ref.GRANULARITIES)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
FINITE_FP8 = FP8_VALUES[torch.isfinite(FP8_VALUES)]


# ---- the reference against independent computations ---------------------------------------
@pytest.mark.parametrize("gran", GRANS)
def test_reference_scales_are_amax_over_448(gran):
    x = make_input((300, 260), torch.float32, "outlier")
    q, s = ref.quantize_fp8(x, gran)
    xa = np.abs(x.numpy())
    M, K = xa.shape
    if gran == "tensor":
        amax = np.array([xa.max()])
    elif gran == "row":
        amax = xa.max(axis=1)
    elif gran == "block1x128":
        amax = np.stack([xa[:, j:j + 128].max(axis=1) for j in range(0, K, 128)], axis=1)
    else:
        amax = np.array([[xa[i:i + 128, j:j + 128].max() for j in range(0, K, 128)]
                         for i in range(0, M, 128)])
    want = (amax.astype(np.float32) / np.float32(448.0)).astype(np.float32)
    np.testing.assert_array_equal(s.numpy(), want)


@pytest.mark.parametrize("gran", GRANS)
def test_reference_codes_are_nearest_fp8(gran):
    """Each code is the e4m3 value nearest to x/scale (ties to even), found by brute force."""
    x = make_input((130, 200), torch.float32, "wide")
    q, s = ref.quantize_fp8(x, gran)
    v = (x / ref.expand_scale(s, 130, 200, gran)).reshape(-1, 1)
    grid = FINITE_FP8.unique().view(1, -1)
    d = (v - grid).abs()
    best = d.min(dim=1, keepdim=True).values
    got = q.float().reshape(-1, 1)
    # the chosen value is at minimal distance (a tie may pick either neighbour only by RNE)
    assert torch.equal((got - v).abs(), best)
    # the element holding the group's amax maps to exactly +-448
    assert q.float().abs().max() == 448.0


@pytest.mark.parametrize("gran", GRANS)
def test_reference_matches_torch_cast(gran):
    x = make_input((64, 384), torch.bfloat16, "outlier")
    q, s = ref.quantize_fp8(x, gran)
    sf = ref.expand_scale(s, 64, 384, gran)
    torch_q = (x.float() / sf).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert_bits_equal(q, torch_q)


def test_reference_roundtrip_error_bound():
    x = make_input((257, 300), torch.float32, "outlier")
    for gran in GRANS:
        t = pyops.quantize_fp8(x.cpu(), gran, backend="reference")
        d = t.dequantize(torch.float32)
        s = ref.expand_scale(t.scale.reshape(ref.scale_shape_2d(257, 300, gran)), 257, 300, gran)
        # e4m3: relative error <= 2^-4 for normals, absolute <= 2^-10 * scale for subnormals
        bound = torch.maximum(x.cpu().abs() * 2**-4, s * 2**-10) * (1 + 1e-6)
        assert ((d - x.cpu()).abs() <= bound).all(), gran


def test_zero_input():
    x = torch.zeros(5, 130)
    for gran in GRANS:
        t = pyops.quantize_fp8(x, gran, backend="reference")
        assert (t.data.view(torch.uint8) == 0).all()
        assert (t.scale == ref.FLT_MIN).all()
        assert (t.dequantize(torch.float32) == 0).all()


@pytest.mark.parametrize("gran", GRANS)
def test_nonfinite_poisons_only_its_group(gran):
    x = make_input((200, 300), torch.float32)
    clean = pyops.quantize_fp8(x, gran, backend="reference")
    y = x.clone()
    y[130, 5] = float("nan")
    y[3, 290] = float("inf")
    bad = pyops.quantize_fp8(y, gran, backend="reference")
    d = bad.dequantize(torch.float32)
    assert d[130, 5].isnan() and d[3, 290].isnan()
    sfull = ref.expand_scale(bad.scale.reshape(ref.scale_shape_2d(200, 300, gran)), 200, 300,
                             gran)
    poisoned = sfull.isnan()
    assert (bad.data.view(torch.uint8)[poisoned] == 0).all()
    assert torch.equal(bad.data.view(torch.uint8)[~poisoned],
                       clean.data.view(torch.uint8)[~poisoned])
    if gran != "tensor":
        assert not poisoned.all()
    with pytest.raises(ValueError, match="inf or NaN"):
        pyops.quantize_fp8(y, gran, check_finite=True)


def test_scale_shapes_and_aliases():
    x = torch.randn(2, 3, 300)
    assert pyops.quantize_fp8(x, "tensor").scale.shape == (1,)
    assert pyops.quantize_fp8(x, "per_token").scale.shape == (2, 3, 1)
    assert pyops.quantize_fp8(x, "1x128").scale.shape == (2, 3, 3)
    assert pyops.quantize_fp8(x, "128x128").scale.shape == (1, 3)
    t = pyops.quantize_fp8(x, "row")
    assert t.data.shape == x.shape and t.data.dtype == torch.float8_e4m3fn
    assert t.dequantize().dtype == torch.float32 and t.dequantize().shape == x.shape


# ---- backends: bit-exact with the reference -------------------------------------------------
SHAPES = [(1, 1), (1, 17), (3, 129), (130, 300), (257, 33)]
# Each bit-exact test runs every (input dtype, make_input kind) pair.
DTYPE_KINDS = [(torch.bfloat16, "randn"), (torch.float16, "outlier"), (torch.float32, "wide")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_bit_exact(backend, gran, shape):
    need_backend("quantize_fp8", backend)
    for dtype, kind in DTYPE_KINDS:
        x = make_input(shape, dtype, kind)
        got = pyops.quantize_fp8(x, gran, backend=backend)
        want = pyops.quantize_fp8(x.cpu(), gran, backend="reference")
        assert_bits_equal(got.data, want.data, f"q {dtype} {kind}")
        assert_bits_equal(got.scale, want.scale, f"scale {dtype} {kind}")


# Only the backends dequantize_fp8 registers (a "cuda" one is picked up once it exists).
@pytest.mark.parametrize("backend", registered_backends("dequantize_fp8"))
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_backend_bit_exact(backend, gran, shape):
    need_backend("dequantize_fp8", backend)
    for dtype, kind in DTYPE_KINDS:
        t = pyops.quantize_fp8(make_input(shape, dtype, kind, device="cpu"), gran,
                               backend="reference")
        data, scale = t.data.to(DEVICE), t.scale.to(DEVICE)
        for out in DTYPES:
            assert_bits_equal(pyops.dequantize_fp8(data, scale, gran, out, backend=backend),
                              t.dequantize(out, backend="reference"), f"deq {dtype} {out}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["transposed", "col_slice", "row_step"])
@pytest.mark.parametrize("gran", GRANS)
def test_backend_non_contiguous(backend, how, gran):
    need_backend("quantize_fp8", backend)
    x = make_input((131, 160), torch.bfloat16, "outlier")
    xn = non_contiguous(x, how)
    assert not xn.is_contiguous()
    got = pyops.quantize_fp8(xn, gran, backend=backend)
    want = pyops.quantize_fp8(x.cpu(), gran, backend="reference")
    assert_bits_equal(got.data, want.data)
    assert_bits_equal(got.scale, want.scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gran", GRANS)
def test_backend_zero_and_nonfinite(backend, gran):
    need_backend("quantize_fp8", backend)
    x = make_input((140, 260), torch.float32)
    x[:, 128:256] = 0
    x[7, 3] = float("nan")
    x[135, 259] = float("-inf")
    got = pyops.quantize_fp8(x, gran, backend=backend)
    want = pyops.quantize_fp8(x.cpu(), gran, backend="reference")
    assert_bits_equal(got.data, want.data)
    assert_bits_equal(got.scale, want.scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_3d_input(backend):
    need_backend("quantize_fp8", backend)
    x = make_input((2, 65, 200), torch.bfloat16)
    for gran in GRANS:
        got = pyops.quantize_fp8(x, gran, backend=backend)
        want = pyops.quantize_fp8(x.cpu(), gran, backend="reference")
        assert_bits_equal(got.data, want.data)
        assert_bits_equal(got.scale, want.scale)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backend_past_int32_elements(backend):
    """> 2^31 elements: rows near the end match the reference (int64 offsets)."""
    need_backend("quantize_fp8", backend)
    K = 4096
    M = 2**31 // K + 3
    x = torch.empty((M, K), dtype=torch.bfloat16, device="cuda").normal_()
    t = pyops.quantize_fp8(x, "row", backend=backend)
    tail = x[-5:].cpu()
    want = pyops.quantize_fp8(tail, "row", backend="reference")
    assert_bits_equal(t.data[-5:], want.data)
    assert_bits_equal(t.scale[-5:], want.scale)


# ---- errors before any launch ------------------------------------------------------------------
def test_bad_inputs():
    with pytest.raises(TypeError, match="torch.Tensor"):
        pyops.quantize_fp8([1.0, 2.0])
    with pytest.raises(TypeError, match="dtype int32"):
        pyops.quantize_fp8(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype float64"):
        pyops.quantize_fp8(torch.ones(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 1 dim"):
        pyops.quantize_fp8(torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty"):
        pyops.quantize_fp8(torch.ones(0, 4))
    with pytest.raises(ValueError, match="granularity"):
        pyops.quantize_fp8(torch.ones(4, 4), "per_channel")
    with pytest.raises(ValueError, match="unknown backend"):
        pyops.quantize_fp8(torch.ones(4, 4), backend="cudnn")
    with pytest.raises(ValueError, match="on meta"):
        pyops.quantize_fp8(torch.ones(4, 4, device="meta"))
    q = pyops.quantize_fp8(torch.ones(4, 256), "block1x128")
    with pytest.raises(ValueError, match="scale has"):
        pyops.dequantize_fp8(q.data, q.scale[:, :1], "block1x128")
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        pyops.dequantize_fp8(q.scale, q.scale, "block1x128")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only error")
def test_explicit_backend_that_cannot_run():
    with pytest.raises(RuntimeError, match="cannot run"):
        pyops.quantize_fp8(torch.ones(4, 4), backend="cuda")


def test_env_override(monkeypatch):
    monkeypatch.setenv("PYOPS_BACKEND_QUANTIZE_FP8", "reference")
    from pyops import _backend
    assert _backend.resolve("quantize_fp8", DEVICE) == "reference"
    monkeypatch.setenv("PYOPS_BACKEND_QUANTIZE_FP8", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        pyops.quantize_fp8(torch.ones(4, 4, device=DEVICE))


def test_input_not_mutated():
    x = make_input((33, 70), torch.float32)
    x[0, 0] = float("nan")
    before = x.clone()
    for gran in GRANS:
        pyops.quantize_fp8(x, gran)
    assert torch.equal(x.isnan(), before.isnan())
    assert torch.equal(x.nan_to_num(), before.nan_to_num())


# ---- op registration ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    need_backend("quantize_fp8", backend)
    for gran in GRANS:
        x = make_input((3, 130), torch.bfloat16)
        torch.library.opcheck(torch.ops.pyops.quantize_fp8.default, (x, gran, backend))
        q, s = torch.ops.pyops.quantize_fp8(x, gran, backend)
        # test_schema is left out for dequantize only: torch's SchemaCheckMode multiplies the
        # fp8 input to detect mutation, which CPU fp8 tensors do not support.
        torch.library.opcheck(torch.ops.pyops.dequantize_fp8.default,
                              (q, s, gran, torch.bfloat16, backend),
                              test_utils=("test_faketensor", "test_autograd_registration",
                                          "test_aot_dispatch_dynamic"))


def test_compile_fullgraph():
    def f(x):
        t = pyops.quantize_fp8(x, "row", backend="reference")
        return t.dequantize(torch.float32, backend="reference"), t.scale

    x = make_input((16, 256), torch.bfloat16, device="cpu")
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for shape in [(16, 256), (3, 256)]:
        x = make_input(shape, torch.bfloat16, device="cpu")
        a, sa = cf(x)
        b, sb = f(x)
        assert_bits_equal(a, b)
        assert_bits_equal(sa, sb)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_and_compile(backend):
    need_backend("quantize_fp8", backend)
    x = make_input((512, 1024), torch.bfloat16)
    for gran in GRANS:
        pyops.quantize_fp8(x, gran, backend=backend)  # warm up (JIT, allocator)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            t = pyops.quantize_fp8(x, gran, backend=backend)
        for _ in range(2):
            x.copy_(make_input((512, 1024), torch.bfloat16, "outlier"))
            g.replay()
            want = pyops.quantize_fp8(x.cpu(), gran, backend="reference")
            assert_bits_equal(t.data, want.data)
            assert_bits_equal(t.scale, want.scale)
        cf = torch.compile(lambda y: pyops.quantize_fp8(y, gran, backend=backend).data,
                           fullgraph=True)
        assert_bits_equal(cf(x), pyops.quantize_fp8(x, gran, backend=backend).data)


def test_dequantize_rejects_a_wrongly_shaped_scale():
    t = pyops.quantize_fp8(torch.randn(300, 256), "block1x128")
    with pytest.raises(ValueError, match="scale has shape"):  # same count, transposed
        pyops.dequantize_fp8(t.data, t.scale.t().contiguous(), "block1x128")
    assert pyops.dequantize_fp8(t.data, t.scale, "block1x128").shape == (300, 256)


def test_triton_min_capability(monkeypatch):
    """A Triton kernel with fp8 operands is not offered below sm_89 (auto falls back)."""
    from pyops import _backend
    dev = torch.device("cuda", 0)
    # the capability is read once per device and cached (pyops._backend.device_capability)
    monkeypatch.setattr(_backend, "_CAPABILITY", {0: (8, 0)})
    ok, why = _backend.available("fp8_linear", "triton", dev)
    assert not ok and "sm_89" in why
    assert _backend.available("quantize_fp8", "triton", dev)[0]  # uint8 views: any arch
    monkeypatch.setattr(_backend, "_CAPABILITY", {0: (9, 0)})
    assert _backend.available("fp8_linear", "triton", dev)[0]

"""pyops.quantize_fp8 / dequantize_fp8: spec, backends bit-exact, errors, opcheck, compile.

Sections: the reference against independent computations; the public function on every backend
the registry holds; each backend's destination-passing entry point (``_backend.impl``) with
poisoned outputs; errors; op registration; Triton-only internals; the CUDA backend at production
shapes (GPU). The Triton conversion helpers themselves are tested in tests/test_cvt.py.

References are computed on the host from a host copy of the input (see tests/_quantize_util.py);
codes compare as bytes, fp32 scales by their bit patterns (a NaN scale must be the very NaN the
reference writes, 0x7FC00000).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyops
from pyops import _backend
from pyops.reference import quantize_fp8 as ref

from _quantize_util import (DEV, assert_bits, assert_same, capture, huge_row_stride_input,
                            make_x, more_than_2pow31_input, new_seed,
                            poisoned, quantizer_backends, randn_cuda, raw_bits)
from _util import (DEVICE, HAS_CUDA, Case, assert_bits_equal, assert_cases_isolated,
                   make_input, need_backend, non_contiguous, schema_check)

# the interpreter's numpy ops warn on x/0 and inf-inf in groups the kernels then overwrite
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Backends to parametrize over (need_backend skips what cannot run here); OPCHECK_BACKENDS: the
# ones both the quantize and the dequantize op hold.
QUANTIZE_BACKENDS, DEQ_BACKENDS, DEQ_NAMES, OPCHECK_BACKENDS = quantizer_backends(
    "quantize_fp8", "dequantize_fp8")

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


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
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
@pytest.mark.parametrize("backend", DEQ_BACKENDS)
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


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
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


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
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


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_backend_3d_input(backend):
    need_backend("quantize_fp8", backend)
    x = make_input((2, 65, 200), torch.bfloat16)
    for gran in GRANS:
        got = pyops.quantize_fp8(x, gran, backend=backend)
        want = pyops.quantize_fp8(x.cpu(), gran, backend="reference")
        assert_bits_equal(got.data, want.data)
        assert_bits_equal(got.scale, want.scale)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
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
@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
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
@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
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


# ---- each backend's entry point (destination-passing), poisoned outputs --------------------------
# The entry points the registry holds (``_backend.impl(op, backend)``, what the op calls with its
# freshly allocated outputs), called on outputs poisoned with 0xAA bytes so an unwritten element
# is caught. "cuda" is the compiled binding (GPU); a dequantize backend registered later is picked
# up without editing the tests.


def run_kernel(x, g, backend="triton"):
    """The backend's entry point on x's device vs the reference on the host; returns the
    (checked) outputs."""
    M, K = x.shape
    want_q, want_s = ref.quantize_fp8(x.cpu(), g)
    q = poisoned((M, K), torch.float8_e4m3fn, x.device)
    s = poisoned(want_s.shape, torch.float32, x.device)
    _backend.impl("quantize_fp8", backend)(x, q, s, g)
    assert_bits(q, want_q, f"{backend} q {g}")
    # the scale's NaN is checked bit for bit (0x7FC00000)
    assert torch.equal(raw_bits(s).cpu(), raw_bits(want_s).cpu()), f"{backend} scale {g}"
    return q, s


def check_deq(q, s, g, out_dtype, backend="triton"):
    M, K = q.shape
    out = poisoned((M, K), out_dtype, q.device)
    _backend.impl("dequantize_fp8", backend)(q, s, g, out)
    assert_bits(out, ref.dequantize_fp8(q.cpu(), s.cpu(), g, out_dtype),
                f"{backend} deq {g} {out_dtype}")


def check_deq_all(q, s, g, out_dtype):
    """Every dequantize backend the registry holds that can run here, on the checked codes."""
    for b in DEQ_NAMES:
        if _backend.available("dequantize_fp8", b, q.device)[0]:
            check_deq(q, s, g, out_dtype, b)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("g", GRANS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_dtypes_outliers_nonfinite(backend, g, dtype):
    need_backend("quantize_fp8", backend)
    x = make_x(130, 300, dtype, seed=1, nonfinite=True)
    q, s = run_kernel(x, g, backend)
    if g != "tensor":
        assert not s.isnan().all()  # only the groups holding inf/NaN are NaN
    check_deq_all(q, s, g, dtype)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("g", GRANS)
def test_kernel_shapes(backend, shape, g, dtype):
    need_backend("quantize_fp8", backend)
    x = make_x(*shape, dtype, seed=2, nonfinite=True)
    q, s = run_kernel(x, g, backend)
    check_deq_all(q, s, g, torch.float32)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("gran", GRANS)
def test_kernel_writes_every_output(backend, gran):
    """Fresh random bf16 input, every output poisoned (was the CUDA binding's own test)."""
    need_backend("quantize_fp8", backend)
    s = new_seed()
    x = make_input((257, 300), torch.bfloat16, seed=s)
    q = torch.full((257, 300), 0xA5, dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
    sc = torch.full(ref.scale_shape_2d(257, 300, gran), -12345.0, device=DEV)
    _backend.impl("quantize_fp8", backend)(x, q, sc, gran)
    rq, rs = ref.quantize_fp8(x.cpu(), gran)
    assert_same(q, rq, f"{backend} codes", s)
    assert_same(sc, rs, f"{backend} scales", s)


@pytest.mark.parametrize("backend", DEQ_BACKENDS)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_kernel_dequant_out_dtypes(backend, out_dtype):
    need_backend("dequantize_fp8", backend)
    x = make_x(257, 33, torch.float32, seed=3, nonfinite=True)
    for g in GRANS:
        q, s = ref.quantize_fp8(x.cpu(), g)
        check_deq(q.to(DEV), s.to(DEV), g, out_dtype, backend)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "column_slice"])
def test_kernel_noncontiguous(backend, view):
    need_backend("quantize_fp8", backend)
    base = make_x(300, 130, torch.bfloat16, seed=4)
    x = base.t() if view == "transposed" else base[:, 7:7 + 97]
    assert not x.is_contiguous()
    for g in GRANS:
        run_kernel(x, g, backend)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_kernel_all_zero_and_all_nonfinite(backend):
    need_backend("quantize_fp8", backend)
    for g in GRANS:
        q, s = run_kernel(torch.zeros(129, 130, dtype=torch.float16, device=DEV), g, backend)
        assert (s == 2.0**-126).all() and (q.view(torch.uint8) == 0).all()
    x = torch.full((3, 129), float("nan"), device=DEV)
    for g in GRANS:
        q, s = run_kernel(x, g, backend)
        assert s.isnan().all() and (q.view(torch.uint8) == 0).all()


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_kernel_rne_ties(backend):
    """Row 0 has amax 448, so scale 1 and x/scale = x: put x on e4m3 midpoints (normal and
    subnormal) and their fp32 neighbours; row 1 the same scaled by 2**-20 (scale 2**-20)."""
    need_backend("quantize_fp8", backend)
    mids = torch.tensor([1.0625, 1.1875, 17.0, 19.0, 0.5 * 2.0**-9, 1.5 * 2.0**-9, 2.5 * 2.0**-9,
                         7.5 * 2.0**-9, 2.0**-6 + 2.0**-10, 2.0**-6 + 3 * 2.0**-10, 440.0])
    up = (mids.view(torch.int32) + 1).view(torch.float32)
    dn = (mids.view(torch.int32) - 1).view(torch.float32)
    row = torch.cat([torch.tensor([448.0]), mids, -mids, up, dn, -up,
                     torch.tensor([0.0, -0.0, 2.0**-149, -(2.0**-149)])])
    x = torch.stack([row, row * 2.0**-20]).to(DEV)
    for g in GRANS:
        q, s = run_kernel(x, g, backend)
    q, s = run_kernel(x, "row", backend)
    assert torch.equal(s.cpu(), torch.tensor([1.0, 2.0**-20]))
    assert torch.equal(q[0, 1:5].float().cpu(), torch.tensor([1.0, 1.25, 16.0, 20.0]))


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_kernel_row_stride_over_2_31(backend):
    """A (2, 32) view with row stride 2**31 elements: offsets must be computed in int64."""
    need_backend("quantize_fp8", backend)
    x = huge_row_stride_input()
    q, s = run_kernel(x, "row", backend)
    check_deq_all(q, s, "row", torch.bfloat16)


# ---- Triton only: the kernels' internal paths ------------------------------------------------
def test_triton_multi_partial_and_two_pass_rows(monkeypatch):
    """Exercise the persistent partial-amax loop (more tiles than partials) and long rows."""
    need_backend("quantize_fp8", "triton")
    from pyops.triton_kernels import _amax as tka
    from pyops.triton_kernels import quantize_fp8 as tk8
    monkeypatch.setattr(tka, "MAX_PARTIALS", 3)
    monkeypatch.setattr(tka, "TILE_ELEMS", 512)
    monkeypatch.setattr(tk8, "TILE_ELEMS", 512)
    monkeypatch.setattr(tk8, "ROW_SINGLE_MAX", 128)
    monkeypatch.setattr(tk8, "ROW_CHUNK", 64)
    for dtype in (torch.bfloat16, torch.float32):
        x = make_x(130, 300, dtype, seed=5, nonfinite=dtype == torch.float32)
        for g in ("tensor", "row"):
            q, s = run_kernel(x, g)
    x = make_x(130, 300, torch.float16, seed=6)
    x[:, 290] = 60000.0  # the amax sits in the last chunk / a late partial
    run_kernel(x, "tensor")
    run_kernel(x, "row")


@pytest.mark.gpu
def test_triton_gpu_hw_and_soft_casts(monkeypatch):
    """The Triton quantizer and dequantizer with the hardware casts (PYOPS_TRITON_SOFT_CVT=0) and
    the soft bit-level casts (=1) on the GPU, bit-exact with the host reference at a large shape
    (the conversions themselves: tests/test_cvt.py::test_gpu_hw_and_soft_paths)."""
    need_backend("quantize_fp8", "triton")
    for soft in ("0", "1"):
        monkeypatch.setenv("PYOPS_TRITON_SOFT_CVT", soft)
        for dtype in DTYPES:
            x = make_x(1000, 4100, dtype, seed=13, nonfinite=True)
            for g in GRANS:
                q, s = run_kernel(x, g)
                check_deq(q, s, g, dtype)


# ---- the CUDA backend at production shapes (GPU) -----------------------------------------------
# The public function with backend="cuda" against the reference on a CPU copy of the input, at the
# shapes, layouts and dtypes the kernel's vector and scalar paths see in a model. CUDA only: at
# these sizes the Triton interpreter would take minutes on a CPU machine (the Triton backend runs
# the same checks at small shapes above, and at a large shape in test_triton_gpu_hw_and_soft_casts).
# (37, 3072), (5, 5120), (3, 12288): the one-, two- and four-warps-per-row kernel (Flux, Wan,
# MLP widths); (2, 16384): a row too long for it (the block-per-row kernel); (33, 136): 1x128
# groups with a partial last group on the warp kernel.
CUDA_SHAPES = ((1, 1), (1, 17), (3, 129), (257, 300), (129, 4096), (37, 3072), (5, 5120),
               (3, 12288), (2, 16384), (33, 136))


@pytest.fixture
def cuda_backend():
    need_backend("quantize_fp8", "cuda", torch.device("cuda"))


def check_cuda(x: torch.Tensor, gran: str, seed=None):
    got = pyops.quantize_fp8(x, gran, backend="cuda")
    want = pyops.quantize_fp8(x.cpu(), gran, backend="reference")
    assert_same(got.data, want.data, f"fp8 {gran} codes", seed)
    assert_same(got.scale, want.scale, f"fp8 {gran} scales", seed)
    return got


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_shapes(dtype, gran, shape):
    s = new_seed()
    check_cuda(randn_cuda(shape, dtype, 3.0), gran, s)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_every_16bit_value(dtype, gran):
    """Every finite bf16 / fp16 value, shuffled into rows of 1024, then again with each row
    scaled by its own factor in [0.5, 1): quotients x / scale land on and next to the e4m3
    rounding midpoints for many different scales, which is where the kernels' division
    shortcut (ScaleDiv in csrc/common.cuh) would differ from IEEE division if it were wrong."""
    s = new_seed()
    g = torch.Generator().manual_seed(s)
    v = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    v = v[torch.isfinite(v.float())]
    v = v[torch.randperm(v.numel(), generator=g)]
    K = 1024
    x = v[: v.numel() // K * K].view(-1, K)
    check_cuda(x.to("cuda"), gran, s)
    f = 0.5 + 0.5 * torch.rand(x.shape[0], 1, generator=g)
    check_cuda((x.float() * f).to(dtype).to("cuda"), gran, s)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
@pytest.mark.parametrize("layout", ["transposed", "col_slice", "col_slice_aligned", "3d"])
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_layouts(dtype, gran, layout):
    s = new_seed()
    if layout == "transposed":
        x = randn_cuda((300, 257), dtype).t()                 # strides (1, 257)
    elif layout == "col_slice":
        x = randn_cuda((131, 333), dtype)[:, 5:5 + 260]       # misaligned rows, padded stride
    elif layout == "col_slice_aligned":
        x = randn_cuda((131, 1024), dtype)[:, :512]           # vector path, row stride != K
    else:
        x = randn_cuda((3, 50, 384), dtype)                   # leading dims flattened
    check_cuda(x, gran, s)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_outliers_and_tiny(dtype, gran):
    s = new_seed()
    x = randn_cuda((256, 640), torch.float32)
    x[:, 7] *= 2000.0                      # outlier channel
    x[:, 300:305] *= 1e-6                  # values that round to (signed) zero codes
    x[5] *= 1e-30                          # tiny row (bf16/fp32: near or below FLT_MIN * 448)
    x[9, :128] = 0.0                       # an all-zero group
    x[11, :64] = -0.0
    if dtype == torch.float32:
        x[13, 10:20] = torch.tensor([1e-40, -1e-40, 3e-39, -7e-45, 0.0, 1.0, -1.0, 2e-38,
                                     -2e-38, 5e-39])  # subnormals in the input
    check_cuda(x.to(dtype), gran, s)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_all_zero(dtype, gran):
    check_cuda(torch.zeros((130, 260), device="cuda", dtype=dtype), gran)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_nonfinite(dtype, gran):
    s = new_seed()
    x = randn_cuda((260, 400), dtype)
    x[3, 17] = float("inf")
    x[140, 390] = float("nan")
    x[200, 5] = float("-inf")
    x[259, 399] = float("nan")
    got = check_cuda(x, gran, s)
    assert torch.isnan(got.scale).any()


# opcheck's test_schema compares every argument before/after with torch.allclose, which has no
# CUDA kernel for float8 (the H200 run: '"mul_cuda" not implemented for Float8_e4m3fn', in torch's
# SchemaCheckMode, not in pyops). The fp8 op's schema is checked byte-wise by _util.schema_check.
OPCHECK_NO_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
def test_cuda_binding_opcheck():
    x = randn_cuda((64, 256), torch.bfloat16)
    q = torch.empty((64, 256), dtype=torch.float8_e4m3fn, device="cuda")
    sc = torch.empty((64,), device="cuda")
    op = torch.ops.pyops._quantize_fp8_cuda.default
    torch.library.opcheck(op, (x, q, sc, 1), test_utils=OPCHECK_NO_SCHEMA)
    x0 = x.clone()
    schema_check(op, (x, q, sc, 1))
    assert_same(x, x0, "x after the op")
    rq, rs = ref.quantize_fp8(x.cpu(), "row")
    assert_same(q, rq, "codes")
    assert_same(sc, rs, "scales")


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
def test_cuda_binding_bad_arguments_raise():
    """The calls that took the H200 test run down (SIGSEGV), each in a child interpreter; the
    full set of cases for every binding is tests/test_binding_checks.py."""
    setup = """
F = op("_quantize_fp8_cuda")
x = torch.randn(4, 32, device=DEV, dtype=torch.bfloat16)
q = torch.empty((4, 32), dtype=torch.float8_e4m3fn, device=DEV)
"""
    assert_cases_isolated(setup, [
        Case("scale of the wrong size", "F(x, q, torch.empty((3,), device=DEV), 1)", "scale"),
        Case("granularity 7", "F(x, q, torch.empty((4,), device=DEV), 7)", "granularity"),
        Case("x float64", "F(x.to(torch.float64), q, torch.empty((4,), device=DEV), 1)",
             "dtype|must be"),
    ], device="cuda")


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
def test_cuda_graph_replay_every_granularity():
    """One graph holding every granularity, replayed on inputs of changing magnitude (and a NaN)."""
    s = new_seed()
    static_x = randn_cuda((300, 1000), torch.bfloat16)
    graph, outs = capture(lambda: {g: pyops.quantize_fp8(static_x, g, backend="cuda")
                                   for g in GRANS})
    for scale in (1.0, 1e3, 1e-3):
        new = randn_cuda((300, 1000), torch.bfloat16, scale)
        new[17, 3] = float("nan") if scale == 1e3 else new[17, 3]
        static_x.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        for g, got in outs.items():
            want = pyops.quantize_fp8(new.cpu(), g, backend="reference")
            assert_same(got.data, want.data, f"graph fp8 {g} codes", s)
            assert_same(got.scale, want.scale, f"graph fp8 {g} scales", s)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
def test_cuda_more_than_2pow31_elements():
    K = 4096
    s = new_seed()
    x = more_than_2pow31_input(K)            # 2^31 + 3*4096 elements, ~4.3 GB in bf16
    M = x.shape[0]
    x[-2, 4000] = float("nan")
    rows = [slice(0, 2), slice(M - 5, M)]
    # Row-local granularities: rows can be checked on their own against the reference.
    for gran in ("row", "block1x128"):
        got = pyops.quantize_fp8(x, gran, backend="cuda")
        for r in rows:
            want = pyops.quantize_fp8(x[r].cpu(), gran, backend="reference")
            assert_same(got.data[r], want.data, f"big fp8 {gran} codes {r}", s)
            assert_same(got.scale.reshape(M, -1)[r], want.scale.reshape(want.data.shape[0], -1),
                        f"big fp8 {gran} scales {r}", s)
        del got
    # Per tensor: the scale comes from the whole tensor (inf/NaN excluded); check it from an
    # exact torch max, then the codes of the last rows with that scale.
    y = x
    y[-2, 4000] = 0.0                         # keep the tensor finite for this part
    got = pyops.quantize_fp8(y, "tensor", backend="cuda")
    amax = torch.maximum(y.max().float().abs(), y.min().float().abs()).cpu().reshape(1)
    want_scale = torch.clamp_min(amax / 448.0, 2.0**-126)
    assert_same(got.scale, want_scale, "big fp8 tensor scale", s)
    tail = y[M - 3:].cpu().float()
    want = (tail / want_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert_same(got.data[M - 3:], want, "big fp8 tensor codes (last rows)", s)

"""pyops.gelu_quant: GELU + per-token FP8 e4m3 quantization, fused.

Accuracy policy (pyops/reference/gelu_quant.py). Backends compute tanh / erf their own way, so
their fp32 y differs from the reference's by a few ulps of the formula's terms, and an element
on an e4m3 rounding boundary can then round the other way. So:

* the reference itself is checked against an independent fp64 GELU (``x / (1 + exp(-2u))``
  and ``x erfc(-x/sqrt 2) / 2``, other formulas than the spec's) within
  ``Y_ULPS * 2^-24 * (|x| + |y|)``;
* a backend's y (returned in fp32) is compared with the reference y (and with the fp64 GELU)
  within the same bound;
* the quantization itself is checked bit-exactly: ``quantize_fp8(y, "row")`` of the backend's
  own fp32 y equals the q and scale it returned (the FP8 spec, no tolerance); the dequantized
  output is within e4m3 resolution of the reference y.

The Triton kernel and csrc/gelu_quant.cu share one operation sequence and one set of constants
(checked below), so the Triton interpreter's y on a CPU is what the CUDA kernel computes; on a
GPU the two backends' y are compared bit for bit.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import pyops
from pyops.ops.gelu_quant import gelu_quant
from pyops.reference import gelu_quant as ref
from pyops.reference.quantize_fp8 import FLT_MIN

from _util import (BACKENDS, DEVICE, HAS_CUDA, ROOT, assert_bits_equal, make_input,
                   need_backend, non_contiguous)

OP = "gelu_quant"
APPROX = ["tanh", "none"]
Y_ULPS = ref.Y_ULPS


# ---- helpers -------------------------------------------------------------------------------------
def _fp64_gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU in fp64 by other formulas than the spec: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u));
    0.5 x (1 + erf(z)) = 0.5 x erfc(-z)."""
    xd = x.double().cpu()
    if approximate == "tanh":
        u = math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd ** 3)
        return xd / (1.0 + torch.exp(-2.0 * u))
    return 0.5 * xd * torch.special.erfc(-xd / math.sqrt(2.0))


def _tol(x: torch.Tensor, y: torch.Tensor, ulps: float = Y_ULPS) -> torch.Tensor:
    """The contract's bound: Y_ULPS * 2^-24 * (|x| + |y|), in fp64."""
    return ulps * 2.0**-24 * (x.double().abs() + y.double().abs())


def _assert_close(y, want, x, what, ulps=Y_ULPS):
    """|y - want| <= _tol(x, want) where want is finite; y non-finite exactly where want is."""
    y, want, x = y.cpu().reshape(-1), want.cpu().reshape(-1), x.cpu().reshape(-1)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(y)), f"{what}: non-finite positions differ"
    err = (y.double() - want.double()).abs()[fin]
    tol = _tol(x, want, ulps)[fin]
    if not (err <= tol).all():
        i = int(torch.argmax(err - tol))
        xi = x[fin][i].item()
        raise AssertionError(f"{what}: {int((err > tol).sum())} elements over tolerance; worst "
                             f"at x={xi!r}: got {y[fin][i].item()!r}, want "
                             f"{want[fin][i].item()!r} (tol {tol[i].item():.3g})")


def _reference(x, approximate):
    K = x.shape[-1]
    return ref.gelu_quant(x.cpu().reshape(-1, K), approximate)


def _check_against_reference(x, backend, approximate="tanh"):
    K = x.shape[-1]
    fp8, y = gelu_quant(x, approximate=approximate, y_dtype=torch.float32, backend=backend)
    assert isinstance(fp8, pyops.FP8Tensor) and fp8.granularity == "row"
    assert fp8.dtype == x.dtype
    assert fp8.data.shape == x.shape and fp8.data.dtype == torch.float8_e4m3fn
    assert fp8.scale.shape == (*x.shape[:-1], 1) and fp8.scale.dtype == torch.float32
    assert y.shape == x.shape and y.dtype == torch.float32
    q, s = fp8.data.reshape(-1, K).cpu(), fp8.scale.reshape(-1).cpu()
    y = y.reshape(-1, K).cpu()
    xc = x.reshape(-1, K).cpu()
    # 1. the quantization is exactly quantize_fp8 of the backend's own fp32 y
    self_q = pyops.quantize_fp8(y, "row", backend="reference")
    assert_bits_equal(q, self_q.data, "q vs quantize_fp8(own y)")
    assert_bits_equal(s, self_q.scale.reshape(-1), "scale vs quantize_fp8(own y)")
    # 2. y against the fp32 reference, within the contract
    rq, rs, ry = _reference(x, approximate)
    _assert_close(y, ry, xc, f"{backend} y vs reference ({approximate})")
    finite = torch.isfinite(ry).all(dim=1)
    tol = _tol(xc, ry)
    rowtol = torch.where(torch.isfinite(tol), tol, torch.zeros_like(tol)).amax(dim=1)
    assert ((s - rs).abs()[finite].double() <= rowtol[finite] / 448 + 2.0**-22 * rs[finite]).all()
    assert s[~finite].isnan().all() and (q[~finite].view(torch.uint8) == 0).all()
    # 3. dequantized output against the reference y, within e4m3 resolution
    d = (q.float() * s[:, None])[finite].double()
    bound = (2.0**-4 * ry.abs() + 2.0**-10 * rs[:, None])[finite].double() + 2 * tol[finite]
    assert ((d - ry[finite].double()).abs() <= bound * (1 + 1e-6)).all()
    return fp8, y


def _special_values() -> torch.Tensor:
    """Every finite bf16 value, dense grids over [-12, 12] and around the kernels' branch points
    (erf's split |x| = 0.875 sqrt 2 and clamp 4 sqrt 2; the tanh form's exponent clamps near
    x = -9.98 and x = 10), tiny, subnormal and huge values, random wide values."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    bf = bits.view(torch.bfloat16).float()
    parts = [bf[torch.isfinite(bf)], torch.linspace(-12, 12, 60001)]
    for c in (0.875 * math.sqrt(2), 4 * math.sqrt(2), 9.98, 10.0):
        for sgn in (1.0, -1.0):
            parts.append(sgn * torch.linspace(c - 0.01, c + 0.01, 2001))
    parts.append(torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, FLT_MIN, -FLT_MIN,
                               1e-20, -1e-20, 3.4e38, -3.4e38, 1e30, -1e30, 7e12, -7e12]))
    g = torch.Generator().manual_seed(7)
    parts.append(torch.randn(40000, generator=g) * torch.exp2(
        torch.randint(-40, 40, (40000,), generator=g).float()))
    x = torch.cat(parts).float()
    n = (x.numel() + 1023) // 1024 * 1024
    return torch.nn.functional.pad(x, (0, n - x.numel())).reshape(-1, 1024)


# ---- the reference against fp64 ------------------------------------------------------------------
@pytest.mark.parametrize("approximate", APPROX)
def test_reference_against_fp64(approximate):
    x = _special_values()
    q, s, y = ref.gelu_quant(x, approximate)
    _assert_close(y, _fp64_gelu(x, approximate).float(), x, f"reference vs fp64 ({approximate})")
    # and against torch's own GELU, loosely: its CPU kernel depends on the CPU (on an AVX512 CPU
    # its vectorized erf is off by up to ~5 units of 2^-24 (|x| + |y|), and its erf form
    # overflows to inf for finite x >= 2^127 (1.7e38): those inputs are left out here; the
    # fp64 comparison above is the spec's check)
    keep = (~(torch.isfinite(x) & (x.abs() >= 2.0**127))).reshape(-1)
    torch_y = torch.nn.functional.gelu(x, approximate=approximate)
    _assert_close(y.reshape(-1)[keep], torch_y.reshape(-1)[keep], x.reshape(-1)[keep], "vs F.gelu",
                  ulps=16)
    self_q = pyops.quantize_fp8(y, "row", backend="reference")
    assert_bits_equal(q, self_q.data)
    assert_bits_equal(s, self_q.scale.reshape(-1))


def test_reference_nonfinite_and_signs():
    x = torch.tensor([[float("inf"), float("-inf"), float("nan"), -3.4e38, 3.4e38, -0.0]])
    for approximate in APPROX:
        y = ref.gelu(x, approximate)[0]
        assert y[0] == float("inf") and y[1].isnan() and y[2].isnan()
        assert y[3] == 0.0 and y[4] == 3.4e38 and y[5] == 0.0


def test_reference_backend_is_the_spec():
    x = make_input((2, 9, 64), torch.bfloat16, "outlier", device="cpu")
    for approximate in APPROX:
        fp8, y = gelu_quant(x, approximate=approximate, y_dtype=torch.float32,
                            backend="reference")
        q, s, ry = _reference(x, approximate)
        assert_bits_equal(fp8.data.reshape(-1, 64), q)
        assert_bits_equal(fp8.scale.reshape(-1), s)
        assert_bits_equal(y.reshape(-1, 64), ry)
        assert_bits_equal(fp8.dequantize(torch.float32), pyops.quantize_fp8(ry, "row").dequantize(
            torch.float32).reshape(2, 9, 64))


# ---- the kernels' GELU arithmetic -------------------------------------------------------------
@pytest.mark.parametrize("approximate", APPROX)
def test_kernel_gelu_accuracy(approximate):
    """The Triton kernel's y (the CUDA kernel's arithmetic: same operations, same constants) on
    every bf16 value, dense grids and the branch points: within the contract of the fp64 GELU and
    of the reference; quantized exactly; non-finite exactly where x is."""
    need_backend(OP, "triton")
    x = _special_values().to(DEVICE)
    fp8, y = gelu_quant(x, approximate=approximate, y_dtype=torch.float32, backend="triton")
    xc, y = x.cpu(), y.cpu()
    _assert_close(y, _fp64_gelu(xc, approximate).float(), xc, f"kernel vs fp64 ({approximate})")
    _assert_close(y, ref.gelu(xc, approximate), xc, f"kernel vs reference ({approximate})")
    self_q = pyops.quantize_fp8(y, "row", backend="reference")
    assert_bits_equal(fp8.data.cpu(), self_q.data)
    assert_bits_equal(fp8.scale.reshape(-1).cpu(), self_q.scale.reshape(-1))
    # huge negative x: exactly zero, as in the reference (t rounds to -1 there)
    assert (y[xc <= -10.5] == 0).all() and (y[xc >= 10.0] == xc[xc >= 10.0]).all()


def test_cuda_and_triton_share_constants():
    """csrc/gelu_quant.cu and triton_kernels/gelu_quant.py hold the same fp32 constants, bit for
    bit, and they are the spec's constants where the spec has them."""
    from pyops.triton_kernels import _cvt
    from pyops.triton_kernels import gelu_quant as tk
    src = (ROOT / "csrc" / "gelu_quant.cu").read_text()
    cu = {m[1]: float.fromhex(m[2]) if "x" in m[2] else float(m[2])
          for m in re.finditer(r"constexpr float (k\w+) = ([-+0-9a-fA-Fxp.]+)f;", src)}
    rne_bits = int(re.search(r"constexpr int kRneIntBits = (0x[0-9A-Fa-f]+);", src)[1], 16)

    def f32(v):
        return torch.tensor(float(v), dtype=torch.float32)

    pairs = {"kTanhA": tk.TANH_A, "kTanhB": tk.TANH_B, "kExpLo": tk.EXP_LO, "kExpHi": tk.EXP_HI,
             "kLog2e": _cvt.LOG2E, "kLn2": _cvt.LN2, "kRneInt": tk.RNE_INT,
             "kSqrt1_2": tk.SQRT1_2, "kErfClamp": tk.ERF_CLAMP, "kErfSplit": tk.ERF_SPLIT,
             "kErfMid": tk.ERF_MID}
    pairs.update({f"kExp{i}": getattr(tk, f"EXP{i}") for i in range(2, 7)})
    pairs.update({f"kErfS{i}": getattr(tk, f"ERF_S{i}") for i in range(6)})
    pairs.update({f"kErfL{i}": getattr(tk, f"ERF_L{i}") for i in range(7)})
    assert set(cu) == set(pairs), sorted(set(cu) ^ set(pairs))
    for name, k in pairs.items():
        assert_bits_equal(f32(cu[name]), f32(k.value), name)
    assert rne_bits == tk.RNE_INT_BITS.value == f32(tk.RNE_INT.value).view(torch.int32).item()
    # the spec's constants
    assert_bits_equal(f32(tk.SQRT1_2.value), f32(ref.SQRT1_2), "1/sqrt(2)")
    assert_bits_equal(f32(tk.TANH_A.value), -2 * f32(ref.SQRT_2_OVER_PI), "-2 sqrt(2/pi)")
    assert_bits_equal(f32(tk.TANH_B.value), f32(-2 * ref.SQRT_2_OVER_PI * ref.GELU_KAPPA),
                      "-2 sqrt(2/pi) 0.044715")


# ---- backends ------------------------------------------------------------------------------------
CASES = [  # (shape, dtype, kind)
    ((2, 7, 64), torch.bfloat16, "outlier"),
    ((5, 1000), torch.float16, "randn"),
    ((3, 1000), torch.bfloat16, "randn"),
    ((1, 3, 3079), torch.bfloat16, "outlier"),
    ((1, 64), torch.float32, "randn"),
    ((5, 1), torch.bfloat16, "randn"),
    ((3, 300), torch.float32, "wide"),
    ((2, 12288), torch.bfloat16, "outlier"),
    ((2, 13824), torch.bfloat16, "randn"),
    ((4096,), torch.float32, "outlier"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{c[2]}")
def test_backend_vs_reference(backend, approximate, case):
    need_backend(OP, backend)
    shape, dtype, kind = case
    x = make_input(shape, dtype, kind) * 3
    _check_against_reference(x, backend, approximate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_y_dtypes_and_no_y(backend):
    """q/scale do not depend on whether y is returned; bf16/fp16 y is the fp32 y rounded."""
    need_backend(OP, backend)
    x = make_input((2, 33, 200), torch.bfloat16, "outlier")
    fp8_32, y32 = gelu_quant(x, y_dtype=torch.float32, backend=backend)
    only = gelu_quant(x, backend=backend)
    assert isinstance(only, pyops.FP8Tensor)
    assert_bits_equal(only.data, fp8_32.data)
    assert_bits_equal(only.scale, fp8_32.scale)
    for dt in (torch.bfloat16, torch.float16):
        fp8, y = gelu_quant(x, y_dtype=dt, backend=backend)
        assert y.dtype == dt
        assert_bits_equal(fp8.data, fp8_32.data)
        assert_bits_equal(y, y32.to(dt), f"y {dt}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["transposed", "col_slice", "row_step"])
def test_backend_non_contiguous(backend, how):
    need_backend(OP, backend)
    x = make_input((48, 136), torch.bfloat16, "outlier")
    xn = non_contiguous(x, how)
    assert not xn.is_contiguous()
    fp8, y = _check_against_reference(xn, backend)
    want, wy = gelu_quant(x, y_dtype=torch.float32, backend=backend)
    assert_bits_equal(fp8.data, want.data)
    assert_bits_equal(y, wy)
    # 3-D view with strides that cannot be flattened to 2-D without a copy
    x3 = make_input((3, 40, 24), torch.float16).transpose(0, 1).contiguous().transpose(0, 1)
    _check_against_reference(x3, backend, "none")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: inf * 0
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("approximate", APPROX)
def test_nonfinite_zero_and_extreme_rows(backend, approximate):
    """inf/NaN poison their own row only; a zero row gets FLT_MIN and codes 0; huge negative x
    gives y = 0 (not a large value that would set the row's scale)."""
    need_backend(OP, backend)
    B, N, K = 2, 6, 130
    x = make_input((B, N, K), torch.float32) * 2
    x[0, 1, 7] = float("nan")
    x[1, 4, 129] = float("inf")
    x[0, 5, 0] = float("-inf")
    x[0, 3] = 0.0
    x[1, 2] = -3.0e38  # every element hugely negative: y = 0, scale FLT_MIN
    x[1, 3, :5] = torch.tensor([-3.0e38, -1e30, -7e12, 3.0e38, -20.0])  # one huge positive
    fp8, y = _check_against_reference(x, backend, approximate)
    s = fp8.scale.reshape(B, N).cpu()
    bad = torch.zeros(B, N, dtype=torch.bool)
    bad[0, 1] = bad[1, 4] = bad[0, 5] = True
    assert s[bad].isnan().all() and not s[~bad].isnan().any()
    assert (fp8.data[bad.to(DEVICE)].view(torch.uint8) == 0).all()
    yc = y.reshape(B, N, K).cpu()
    assert (yc[1, 2] == 0).all() and s[1, 2] == FLT_MIN and s[0, 3] == FLT_MIN
    assert (fp8.data[0, 3].view(torch.uint8) == 0).all()
    assert (yc[1, 3, :3] == 0).all() and yc[1, 3, 3] == 3.0e38
    assert s[1, 3] == torch.tensor(3.0e38 / 448, dtype=torch.float32)
    z = gelu_quant(torch.zeros(3, 40, device=DEVICE), approximate=approximate, backend=backend)
    assert (z.scale == FLT_MIN).all() and (z.data.view(torch.uint8) == 0).all()


@pytest.mark.parametrize("approximate", APPROX)
def test_triton_long_row_path(approximate):
    """The chunked path for rows longer than the register tile, forced at a small K: the same
    bits as the one-pass path (y recomputed with the same operations)."""
    need_backend(OP, "triton")
    from pyops.triton_kernels import gelu_quant as tk
    M, K = 5, 300
    x = make_input((M, K), torch.bfloat16, "outlier")
    x[3, 17] = float("nan")
    outs = []
    for kw in ({}, {"single_max": 64, "chunk": 64}):
        q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=DEVICE)
        s = torch.empty(M, device=DEVICE)
        y = torch.empty(M, K, device=DEVICE)
        tk.gelu_quant(x, tk.GELU_TANH if approximate == "tanh" else tk.GELU_ERF, q, s, y, **kw)
        outs.append((q, s, y))
    for a, b, what in zip(outs[0], outs[1], ("q", "scale", "y")):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), what
    _assert_close(outs[1][2], ref.gelu(x.cpu(), approximate), x, "long-row y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_writes_every_output(backend):
    """Destination-passing entry point with poisoned outputs: every q / scale / y element is
    written (odd K: partial chunks)."""
    need_backend(OP, backend)
    from pyops import _backend
    impl = _backend.impl(OP, backend)
    for M, K in ((7, 1003), (3, 64)):
        x = make_input((M, K), torch.bfloat16, "outlier")
        outs = []
        for fill in (0xAA, 0x55):
            q = torch.full((M, K), fill, dtype=torch.uint8, device=DEVICE).view(
                torch.float8_e4m3fn)
            s = torch.full((M,), fill, dtype=torch.uint8, device=DEVICE).repeat(4).view(
                torch.float32)
            y = torch.full((M, K * 4), fill, dtype=torch.uint8, device=DEVICE).view(torch.float32)
            impl(x, "tanh", q, s, y)
            outs.append((q, s, y))
        for a, b in zip(*outs):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---- feeding the FP8 linear ----------------------------------------------------------------------
def test_feeds_fp8_linear():
    """The returned FP8Tensor is a pre-quantized activation for pyops.linear (the lead's
    pyops.patch feeds ff.net[2] this way): the same GEMM input as quantize_fp8 of the reference
    GELU, output in h's dtype, close to the unquantized bf16 MLP-out."""
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(2, 5, 96, generator=g) * 2).bfloat16()
    w = torch.randn(40, 96, generator=g) / 10
    bias = torch.randn(40, generator=g).bfloat16()
    qw = pyops.quantize_weight(w, "fp8")
    t = gelu_quant(h)
    r = pyops.quantize_fp8(ref.gelu(h).reshape(2, 5, 96), "row")
    assert_bits_equal(t.data, r.data)
    assert_bits_equal(t.scale, r.scale)
    got = pyops.linear(t, qw, bias, backend="reference")
    assert got.dtype == torch.bfloat16 and got.shape == (2, 5, 40)
    want = pyops.linear(pyops.FP8Tensor(r.data, r.scale, "row", torch.bfloat16), qw, bias,
                        backend="reference")
    assert_bits_equal(got, want)
    dense = torch.nn.functional.linear(torch.nn.functional.gelu(h.float(), approximate="tanh"),
                                       w, bias.float())
    cos = torch.nn.functional.cosine_similarity(got.float().reshape(-1), dense.reshape(-1), dim=0)
    assert cos > 0.999, cos


# ---- errors before any launch -------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(2, 4, 8)
    f = gelu_quant
    with pytest.raises(TypeError, match="torch.Tensor"):
        f([1.0])
    with pytest.raises(TypeError, match="dtype int32"):
        f(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype float64"):
        f(x.double())
    with pytest.raises(TypeError, match="dtype float8_e4m3fn"):
        f(x.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="at least 1 dim"):
        f(torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty"):
        f(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match="empty"):
        f(torch.randn(3, 0))
    with pytest.raises(ValueError, match="unknown approximate 'erf'"):
        f(x, approximate="erf")
    with pytest.raises(ValueError, match="unknown approximate"):
        f(x, approximate=None)
    with pytest.raises(TypeError, match="y_dtype"):
        f(x, y_dtype=torch.int8)
    with pytest.raises(TypeError, match="y_dtype"):
        f(x, y_dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown backend"):
        f(x, backend="cudnn")
    with pytest.raises(ValueError, match="on meta"):
        f(x.to("meta"))
    with pytest.raises(TypeError):
        f(x, "tanh")  # approximate is keyword-only


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only error")
def test_explicit_backend_that_cannot_run():
    with pytest.raises(RuntimeError, match="cannot run"):
        gelu_quant(torch.ones(4, 4), backend="cuda")


def test_input_not_mutated():
    x = make_input((2, 3, 70), torch.float32, device="cpu")
    before = x.clone()
    gelu_quant(x, y_dtype=torch.float32)
    assert_bits_equal(x, before)


# ---- op registration ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    need_backend(OP, backend, torch.device("cpu") if not HAS_CUDA else DEVICE)
    x = make_input((2, 3, 40), torch.bfloat16)
    for args in [(x, "tanh", None, backend), (x, "none", torch.float32, backend),
                 (x.reshape(6, 40), "tanh", torch.bfloat16, backend),
                 (x[0, 0], "tanh", None, backend)]:
        torch.library.opcheck(torch.ops.pyops.gelu_quant.default, args)


def test_compile_fullgraph():
    def f(x):
        t, y = gelu_quant(x, y_dtype=torch.float32, backend="reference")
        return t.dequantize(torch.float32, backend="reference"), t.scale, y

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for shape in [(2, 16, 64), (1, 5, 64)]:
        x = make_input(shape, torch.bfloat16, device="cpu")
        for a, b in zip(cf(x), f(x)):
            assert_bits_equal(a, b)


# ---- GPU only ------------------------------------------------------------------------------------
GPU_SHAPES = [(1, 4608, 12288), (37, 13824), (5, 3072), (3, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_production_shapes(backend, dtype, shape):
    """The Flux MLP hidden state, Wan's ffn width, a DiT width, an odd K: y within the contract,
    codes/scales exactly quantize_fp8 of the backend's own y (both GELU forms at the small
    shapes)."""
    need_backend(OP, backend)
    x = make_input(shape, dtype, "outlier") * 2
    x.view(-1, shape[-1])[0, 5] = float("nan")  # a poisoned row stays confined
    for approximate in (APPROX if shape[-1] <= 3072 else ["tanh"]):
        fp8, _ = _check_against_reference(x, backend, approximate)
        s = fp8.scale.reshape(-1)
        assert s[0].isnan() and not s[1:].isnan().any()


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", APPROX)
def test_cuda_matches_triton_bitwise(approximate):
    """One operation sequence, two backends: on the GPU the CUDA kernel's y, codes and scales
    equal the Triton kernel's bit for bit, on the fast path (aligned rows up to K = 14336) and on
    the generic one (strided / unaligned views, odd K, K > 14336), every dtype, and every bf16
    bit pattern."""
    need_backend(OP, "cuda")
    need_backend(OP, "triton")
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    inputs = [bits.view(torch.bfloat16).reshape(64, 1024).cuda()]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for shape in ((64, 13824), (3, 14336), (9, 3072), (4, 20000), (5, 1003), (7, 8)):
            inputs.append(make_input(shape, dtype, "outlier") * 3)
        big = make_input((40, 1032), dtype, "wide")
        inputs += [big[:, 3:1027], big[::2, :1024], big.t()]
    for x in inputs:
        got = gelu_quant(x, approximate=approximate, y_dtype=torch.float32, backend="cuda")
        want = gelu_quant(x, approximate=approximate, y_dtype=torch.float32, backend="triton")
        what = f"{tuple(x.shape)} {x.dtype} strides {x.stride()}"
        y, wy = got[1].cpu(), want[1].cpu()
        assert torch.equal(y.isnan(), wy.isnan()), what
        assert_bits_equal(y[~y.isnan()], wy[~wy.isnan()], f"y {what}")
        assert_bits_equal(got[0].data, want[0].data, f"q {what}")
        assert_bits_equal(got[0].scale, want[0].scale, f"scale {what}")
    _check_against_reference(inputs[0], "cuda", approximate)  # every bf16 value


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_and_compile(backend):
    need_backend(OP, backend)
    B, N, K = 2, 256, 12288
    x = make_input((B, N, K), torch.bfloat16)
    gelu_quant(x, y_dtype=torch.float32, backend=backend)  # warm up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        t, y = gelu_quant(x, y_dtype=torch.float32, backend=backend)
    for _ in range(2):
        x.copy_(make_input((B, N, K), torch.bfloat16, "outlier"))
        g.replay()
        torch.cuda.synchronize()
        self_q = pyops.quantize_fp8(y, "row", backend="reference")
        assert_bits_equal(t.data, self_q.data)
        assert_bits_equal(t.scale, self_q.scale)
        _assert_close(y, ref.gelu(x.cpu()), x, "graph replay y")
    cf = torch.compile(lambda a: gelu_quant(a, backend=backend).data, fullgraph=True)
    assert_bits_equal(cf(x), gelu_quant(x, backend=backend).data)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_past_int32_elements(backend):
    """> 2^31 elements: rows near the end are right (int64 offsets)."""
    need_backend(OP, backend)
    K = 13824
    M = 2**31 // K + 3
    free, _ = torch.cuda.mem_get_info()
    if free < M * K * 3 + (1 << 30):
        pytest.skip("needs ~6.5 GiB free on the GPU")
    x = torch.empty((M, K), dtype=torch.bfloat16, device="cuda").normal_()
    t = gelu_quant(x, backend=backend)
    tail = x[-4:].contiguous()
    del x
    want = gelu_quant(tail, backend=backend)
    assert_bits_equal(t.data[-4:], want.data)
    assert_bits_equal(t.scale[-4:], want.scale)
    _check_against_reference(tail, backend)

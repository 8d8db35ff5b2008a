"""pyops.norm_modulate_quant: LayerNorm/RMSNorm + adaLN modulate + per-token FP8, fused.

Accuracy policy. Backends may take the two row sums (mean, variance) in another order than the
fp32 reference, so their fp32 y differs from the reference's by a few ulps of the row's scale;
an element sitting on an e4m3 rounding boundary can then round the other way. So:

* y (returned in fp32) is compared with the reference y within ``Y_RTOL * rowmax|y|`` (fp32
  reduction noise, orders of magnitude below fp8 resolution);
* the dequantized output is compared with the reference y within e4m3 resolution: half a step,
  ``2^-4 |y|`` for normals and ``2^-10 * scale`` for subnormals, plus the y noise above;
* the quantization itself is checked bit-exactly: ``quantize_fp8(y, "row")`` of the backend's own
  fp32 y equals the q and scale it returned (the FP8 spec, no tolerance).
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops.ops.norm_modulate_quant import norm_modulate_quant
from pyops.reference import norm_modulate_quant as ref
from pyops.reference.quantize_fp8 import FLT_MIN

from _util import (BACKENDS, DEVICE, HAS_CUDA, assert_bits_equal, make_input, need_backend,
                   non_contiguous)

OP = "norm_modulate_quant"
Y_RTOL = 2e-5  # fp32 reduction-order noise, relative to the row's max |y|


def _params(D, B, dtype=torch.float32, mod=True, affine=False, seed=None, pdtype=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    pdtype = pdtype or dtype
    out = {}
    if mod:
        out["shift"] = torch.randn(B, D, generator=g).to(pdtype).to(DEVICE)
        out["scale"] = (0.5 * torch.randn(B, D, generator=g)).to(pdtype).to(DEVICE)
    if affine:
        out["weight"] = (1 + 0.2 * torch.randn(D, generator=g)).to(pdtype).to(DEVICE)
        out["bias"] = (0.1 * torch.randn(D, generator=g)).to(pdtype).to(DEVICE)
    return out


def _reference(x, shift=None, scale=None, weight=None, bias=None, norm="layer", eps=1e-6):
    """The spec on CPU copies, for the public API's argument shapes."""
    D = x.shape[-1]
    c = lambda t: None if t is None else t.cpu().reshape(-1, D)  # noqa: E731
    q, s, y = ref.norm_modulate_quant(x.cpu().reshape(-1, D), c(shift), c(scale),
                                      None if weight is None else weight.cpu(),
                                      None if bias is None else bias.cpu(), norm, eps)
    return q, s, y


def _check_against_reference(x, backend, norm="layer", eps=1e-6, **p):
    D = x.shape[-1]
    fp8, y = norm_modulate_quant(x, norm=norm, eps=eps, y_dtype=torch.float32,
                                 backend=backend, **p)
    assert isinstance(fp8, pyops.FP8Tensor) and fp8.granularity == "row"
    assert fp8.data.shape == x.shape and fp8.data.dtype == torch.float8_e4m3fn
    assert fp8.scale.shape == (*x.shape[:-1], 1) and fp8.scale.dtype == torch.float32
    assert y.shape == x.shape and y.dtype == torch.float32
    q, s = fp8.data.reshape(-1, D).cpu(), fp8.scale.reshape(-1).cpu()
    y = y.reshape(-1, D).cpu()
    # 1. the quantization is exactly quantize_fp8 of the backend's own fp32 y
    self_q = pyops.quantize_fp8(y, "row", backend="reference")
    assert_bits_equal(q, self_q.data, "q vs quantize_fp8(own y)")
    assert_bits_equal(s, self_q.scale.reshape(-1), "scale vs quantize_fp8(own y)")
    # 2. y against the fp32 reference, up to reduction order
    rq, rs, ry = _reference(x, norm=norm, eps=eps, **p)
    rowmax = ry.abs().amax(dim=1, keepdim=True)
    finite = torch.isfinite(ry).all(dim=1)
    assert torch.equal(finite, torch.isfinite(y).all(dim=1))
    err = (y - ry).abs()[finite]
    tol = (Y_RTOL * rowmax.expand_as(ry))[finite]
    assert (err <= tol).all(), f"y max err {(err - tol).max().item():.3g} over tolerance"
    assert torch.allclose(s[finite], rs[finite], rtol=Y_RTOL, atol=0)
    assert s[~finite].isnan().all() and (q[~finite].view(torch.uint8) == 0).all()
    # 3. dequantized output against the reference y, within e4m3 resolution
    d = (q.float() * s[:, None])[finite]
    bound = (2.0**-4 * ry.abs() + 2.0**-10 * rs[:, None] + 2 * Y_RTOL * rowmax)[finite]
    assert ((d - ry[finite]).abs() <= bound * (1 + 1e-6)).all()
    return fp8, y


# ---- the reference against torch's own norms -------------------------------------------------------
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_reference_matches_torch_norms(norm):
    x = make_input((3, 40, 257), torch.float32, "outlier")
    p = _params(257, 3, affine=True)
    p = {k: v.cpu() for k, v in p.items()}
    xd = x.double()
    if norm == "layer":
        n = torch.nn.functional.layer_norm(xd, (257,), p["weight"].double(), p["bias"].double(),
                                           eps=1e-6)
    else:
        n = xd * torch.rsqrt((xd * xd).mean(-1, keepdim=True) + 1e-6)
        n = n * p["weight"].double() + p["bias"].double()
    want = n * (1 + p["scale"].double()[:, None]) + p["shift"].double()[:, None]
    q, s, y = _reference(x, norm=norm, **p)
    assert torch.allclose(y.double(), want.reshape(-1, 257), rtol=1e-5, atol=1e-5)
    qq, ss = pyops.quantize_fp8(y, "row", backend="reference").data, None
    assert_bits_equal(q, qq)


def test_reference_backend_is_the_spec():
    x = make_input((2, 9, 64), torch.bfloat16, device="cpu")
    p = {k: v.cpu() for k, v in _params(64, 2, affine=True).items()}
    fp8, y = norm_modulate_quant(x, norm="rms", y_dtype=torch.float32, backend="reference", **p)
    q, s, ry = _reference(x, norm="rms", **p)
    assert_bits_equal(fp8.data.reshape(-1, 64), q)
    assert_bits_equal(fp8.scale.reshape(-1), s)
    assert_bits_equal(y.reshape(-1, 64), ry)
    # the FP8Tensor dequantizes like any pyops.quantize_fp8 result
    assert_bits_equal(fp8.dequantize(torch.float32), pyops.quantize_fp8(ry, "row").dequantize(
        torch.float32).reshape(2, 9, 64))


# ---- backends --------------------------------------------------------------------------------------
CASES = [  # (shape, dtype, norm, mod, affine, kind)
    ((2, 7, 64), torch.bfloat16, "layer", True, False, "outlier"),
    ((2, 5, 1000), torch.float16, "rms", True, True, "randn"),
    ((1, 3, 3079), torch.bfloat16, "layer", True, True, "outlier"),
    ((1, 64), torch.float32, "layer", False, False, "randn"),
    ((5, 1), torch.bfloat16, "layer", True, False, "randn"),
    ((4, 1), torch.float32, "rms", False, True, "randn"),
    ((3, 300), torch.float32, "rms", True, False, "wide"),
    ((2, 12288), torch.bfloat16, "layer", True, True, "outlier"),
    ((3, 520), torch.float32, "layer", True, False, "offset"),  # mean >> std
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{c[2]}"
                         f"{'-mod' if c[3] else ''}{'-affine' if c[4] else ''}")
def test_backend_vs_reference(backend, case):
    need_backend(OP, backend)
    shape, dtype, norm, mod, affine, kind = case
    x = make_input(shape, dtype, "randn" if kind == "offset" else kind)
    if kind == "offset":
        x = x + 8.0
    B = shape[0]  # 2-D x: one modulation row per token
    p = _params(shape[-1], B, dtype, mod, affine)
    _check_against_reference(x, backend, norm, **p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_y_dtypes_and_no_y(backend):
    """q/scale do not depend on whether y is returned; bf16/fp16 y is the fp32 y rounded."""
    need_backend(OP, backend)
    x = make_input((2, 33, 200), torch.bfloat16, "outlier")
    p = _params(200, 2, torch.bfloat16, affine=True)
    fp8_32, y32 = norm_modulate_quant(x, y_dtype=torch.float32, backend=backend, **p)
    only = norm_modulate_quant(x, backend=backend, **p)
    assert isinstance(only, pyops.FP8Tensor)
    assert_bits_equal(only.data, fp8_32.data)
    assert_bits_equal(only.scale, fp8_32.scale)
    for dt in (torch.bfloat16, torch.float16):
        fp8, y = norm_modulate_quant(x, y_dtype=dt, backend=backend, **p)
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
    p = _params(136, 48, torch.bfloat16, affine=True)  # 2-D x: per-token modulation
    fp8, _ = _check_against_reference(xn, backend, "layer", **p)
    want, _ = norm_modulate_quant(x, y_dtype=torch.float32, backend=backend, **p)
    assert_bits_equal(fp8.data, want.data)
    # 3-D view with strides that cannot be flattened to 2-D without a copy
    x3 = make_input((3, 40, 24), torch.float16).transpose(0, 1).contiguous().transpose(0, 1)
    _check_against_reference(x3, backend, "rms", **_params(24, 3, torch.float16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_modulation_shapes(backend):
    need_backend(OP, backend)
    B, N, D = 3, 5, 96
    x = make_input((B, N, D), torch.bfloat16)
    sh, sc = torch.randn(B, D, device=DEVICE), torch.randn(B, D, device=DEVICE)
    base = norm_modulate_quant(x, sh, sc, backend=backend)
    for sh2, sc2 in [(sh[:, None], sc[:, None]), (sh.t().contiguous().t(), sc[:, None])]:
        got = norm_modulate_quant(x, sh2, sc2, backend=backend)
        assert_bits_equal(got.data, base.data)
    # one vector for every batch element, mixed with per-batch rows, and mixed dtypes
    _check_against_reference(x, backend, shift=sh[0], scale=sc)
    _check_against_reference(x, backend, shift=sh[:1], scale=sc.bfloat16(),
                             weight=torch.ones(D, dtype=torch.float16, device=DEVICE))
    _check_against_reference(x, backend, scale=sc)
    _check_against_reference(x, backend, shift=sh)
    # 2-D x: per-token rows or one vector
    x2 = x.reshape(B * N, D)
    _check_against_reference(x2, backend, shift=torch.randn(B * N, D, device=DEVICE),
                             scale=sc[0])


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_triton_long_row_path(norm):
    """The chunked path for rows longer than the register tile, forced at a small D."""
    need_backend(OP, "triton")
    from pyops.triton_kernels import norm_modulate_quant as tk
    M, D = 5, 300
    x = make_input((M, D), torch.bfloat16, "outlier")
    sh, sc = torch.randn(1, D, device=DEVICE), torch.randn(M, D, device=DEVICE)
    w = torch.randn(D, device=DEVICE)
    q = torch.empty(M, D, dtype=torch.float8_e4m3fn, device=DEVICE)
    s = torch.empty(M, device=DEVICE)
    y = torch.empty(M, D, device=DEVICE)
    tk.norm_modulate_quant(x, w, None, sh, sc, norm == "rms", 1e-6, q, s, y,
                           single_max=64, chunk=64)
    self_q = pyops.quantize_fp8(y.cpu(), "row", backend="reference")
    assert_bits_equal(q, self_q.data.to(DEVICE))
    assert_bits_equal(s, self_q.scale.reshape(-1).to(DEVICE))
    _, _, ry = ref.norm_modulate_quant(x.cpu(), sh.cpu(), sc.cpu(), w.cpu(), None, norm)
    assert ((y.cpu() - ry).abs() <= Y_RTOL * ry.abs().amax(1, keepdim=True)).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: inf - inf
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_nonfinite_and_constant_rows(backend):
    need_backend(OP, backend)
    B, N, D = 2, 6, 130
    x = make_input((B, N, D), torch.float32)
    x[0, 1, 7] = float("nan")
    x[1, 4, 129] = float("inf")
    x[1, 2] = 3.0  # constant row: LayerNorm gives 0, y = shift
    x[0, 3] = 0.0  # zero row, no modulation channel below: all-zero y for RMSNorm -> FLT_MIN
    sh = torch.randn(B, D, device=DEVICE)
    sc = torch.randn(B, D, device=DEVICE)
    fp8, y = _check_against_reference(x, backend, shift=sh, scale=sc)
    s = fp8.scale.reshape(B, N).cpu()
    bad = torch.zeros(B, N, dtype=torch.bool)
    bad[0, 1] = bad[1, 4] = True
    assert s[bad].isnan().all() and not s[~bad].isnan().any()
    assert (fp8.data[bad.to(DEVICE)].view(torch.uint8) == 0).all()
    assert torch.allclose(y.reshape(B, N, D)[1, 2].cpu(), sh[1].cpu())
    z = norm_modulate_quant(torch.zeros(3, 40, device=DEVICE), norm="rms", backend=backend)
    assert (z.scale == FLT_MIN).all() and (z.data.view(torch.uint8) == 0).all()
    # a non-finite modulation channel poisons the rows that use it, only those
    sh[1, 5] = float("nan")
    fp8b = norm_modulate_quant(x, sh, sc, backend=backend)
    sb = fp8b.scale.reshape(B, N).cpu()
    assert sb[1].isnan().all() and torch.equal(sb[0].isnan(), bad[0])


# ---- errors before any launch -------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(2, 4, 8)
    f = norm_modulate_quant
    with pytest.raises(TypeError, match="torch.Tensor"):
        f([1.0])
    with pytest.raises(TypeError, match="dtype int32"):
        f(torch.ones(2, 4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype float64"):
        f(x.double())
    with pytest.raises(ValueError, match=r"\(B, N, D\) or \(M, D\)"):
        f(torch.randn(8))
    with pytest.raises(ValueError, match=r"\(B, N, D\) or \(M, D\)"):
        f(torch.randn(2, 2, 2, 8))
    with pytest.raises(ValueError, match="empty"):
        f(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match=r"shift has shape \(3, 8\)"):
        f(x, torch.randn(3, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"scale has shape \(2, 7\)"):
        f(x, None, torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"shift has shape \(2, 8\).*\(8, 8\)"):
        f(x.reshape(8, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"weight has shape \(4,\), expected \(8,\)"):
        f(x, weight=torch.ones(4))
    with pytest.raises(TypeError, match="bias has dtype int64"):
        f(x, bias=torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown norm"):
        f(x, norm="group")
    with pytest.raises(ValueError, match="eps"):
        f(x, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        f(x, eps=float("nan"))
    with pytest.raises(TypeError, match="y_dtype"):
        f(x, y_dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown backend"):
        f(x, backend="cudnn")
    with pytest.raises(ValueError, match="on meta"):
        f(x.to("meta"))
    with pytest.raises(ValueError, match="shift is on meta"):
        f(x, torch.randn(2, 8, device="meta"))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only error")
def test_explicit_backend_that_cannot_run():
    with pytest.raises(RuntimeError, match="cannot run"):
        norm_modulate_quant(torch.ones(4, 4), backend="cuda")


def test_input_not_mutated():
    x = make_input((2, 3, 70), torch.float32, device="cpu")
    sh, sc = torch.randn(2, 70), torch.randn(2, 70)
    before = [t.clone() for t in (x, sh, sc)]
    norm_modulate_quant(x, sh, sc, y_dtype=torch.float32)
    for a, b in zip((x, sh, sc), before):
        assert_bits_equal(a, b)


# ---- op registration ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    need_backend(OP, backend, torch.device("cpu") if not HAS_CUDA else DEVICE)
    x = make_input((2, 3, 40), torch.bfloat16)
    sh = torch.randn(2, 40, device=DEVICE, dtype=torch.bfloat16)
    sc = torch.randn(2, 40, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(40, device=DEVICE, dtype=torch.bfloat16)
    for args in [(x, sh, sc, None, None, "layer", 1e-6, None, backend),
                 (x, None, sc, w, w, "rms", 1e-5, torch.float32, backend),
                 (x.reshape(6, 40), None, None, None, None, "layer", 1e-6, torch.bfloat16,
                  backend)]:
        torch.library.opcheck(torch.ops.pyops.norm_modulate_quant.default, args)


def test_compile_fullgraph():
    def f(x, sh, sc):
        t, y = norm_modulate_quant(x, sh, sc, y_dtype=torch.float32, backend="reference")
        return t.dequantize(torch.float32, backend="reference"), t.scale, y

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for B, N in [(2, 16), (1, 5)]:
        x = make_input((B, N, 64), torch.bfloat16, device="cpu")
        sh, sc = torch.randn(B, 64), torch.randn(B, 64)
        for a, b in zip(cf(x, sh, sc), f(x, sh, sc)):
            assert_bits_equal(a, b)


# ---- GPU only ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_and_compile(backend):
    need_backend(OP, backend)
    B, N, D = 2, 256, 3072
    x = make_input((B, N, D), torch.bfloat16)
    sh = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    sc = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    norm_modulate_quant(x, sh, sc, y_dtype=torch.float32, backend=backend)  # warm up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        t, y = norm_modulate_quant(x, sh, sc, y_dtype=torch.float32, backend=backend)
    for _ in range(2):
        x.copy_(make_input((B, N, D), torch.bfloat16, "outlier"))
        sh.copy_(torch.randn(B, D, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        self_q = pyops.quantize_fp8(y, "row", backend="reference")
        assert_bits_equal(t.data, self_q.data)
        assert_bits_equal(t.scale, self_q.scale)
        _, _, ry = _reference(x, sh, sc)
        assert ((y.reshape(-1, D).cpu() - ry).abs()
                <= Y_RTOL * ry.abs().amax(1, keepdim=True)).all()
    cf = torch.compile(lambda a, b, c: norm_modulate_quant(a, b, c, backend=backend).data,
                       fullgraph=True)
    assert_bits_equal(cf(x, sh, sc), norm_modulate_quant(x, sh, sc, backend=backend).data)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_past_int32_elements(backend):
    """> 2^31 elements: rows near the end are right (int64 offsets)."""
    need_backend(OP, backend)
    D = 4096
    B, N = 2, (2**31 // D) // 2 + 3
    x = torch.empty((B, N, D), dtype=torch.bfloat16, device="cuda").normal_()
    sh = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    sc = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    t = norm_modulate_quant(x, sh, sc, backend=backend)
    tail = x[1, -4:].contiguous()
    del x
    want, _ = norm_modulate_quant(tail[None], sh[1:], sc[1:], y_dtype=torch.float32,
                                  backend="reference")
    d = t.dequantize(torch.float32)[1, -4:]
    ry = want.dequantize(torch.float32)[0]
    assert (t.scale[1, -4:].reshape(-1) - want.scale.reshape(-1)).abs().max() <= \
        Y_RTOL * want.scale.abs().max()
    assert ((d - ry).abs() <= 2.0**-3 * ry.abs() + 2.0**-9 * want.scale[0]).all()

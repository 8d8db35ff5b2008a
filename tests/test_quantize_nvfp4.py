"""pyops.quantize_nvfp4 / dequantize_nvfp4: spec, packing, swizzle, backends bit-exact, errors.

Sections: the reference against independent computations; the public function on every backend
the registry holds; each backend's destination-passing entry point (``_backend.impl``) with
poisoned outputs; errors; op registration; Triton-only internals; the CUDA backend at production
shapes (GPU). The Triton E2M1/E4M3 codecs themselves are tested in tests/test_cvt.py.

References are computed on the host from a host copy of the input (see tests/_quantize_util.py);
data and scales compare as bytes, the fp32 global scale by its bit pattern.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyops
from pyops import _backend
from pyops.reference import quantize_nvfp4 as ref

from _quantize_util import (DEV, assert_bits, assert_same, capture, huge_row_stride_input,
                            make_x, more_than_2pow31_input, new_seed,
                            poisoned, quantizer_backends, randn_cuda, raw_bits)
from _util import (DEVICE, assert_bits_equal, make_input, need_backend,
                   non_contiguous)

# the interpreter's numpy ops warn on x/0 and inf-inf in groups the kernels then overwrite
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Backends to parametrize over (need_backend skips what cannot run here); OPCHECK_BACKENDS: the
# ones both the quantize and the dequantize op hold.
QUANTIZE_BACKENDS, DEQ_BACKENDS, DEQ_NAMES, OPCHECK_BACKENDS = quantizer_backends(
    "quantize_nvfp4", "dequantize_nvfp4")

E2M1 = torch.tensor(ref.E2M1_VALUES)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def q(x, **kw):
    return pyops.quantize_nvfp4(x, **kw)


# ---- the reference against independent computations ---------------------------------------
def test_e2m1_round_to_nearest_even_brute_force():
    """Every code is the nearest grid value; exact ties go to the even code."""
    v = torch.cat([torch.linspace(-6, 6, 4801), torch.tensor(
        [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0])])
    codes = ref.e2m1_codes(v)
    d = (v.abs().view(-1, 1) - E2M1.view(1, -1)).abs()
    best = d.min(dim=1, keepdim=True).values
    ties = (d == best).sum(dim=1) > 1
    mag = (codes & 7).long()
    assert torch.equal(d.gather(1, mag.view(-1, 1)), best)
    assert ((mag[ties] % 2) == 0).all() and ties.sum() >= 14
    assert torch.equal((codes >> 3).bool(), v < 0)


def test_exact_ties_and_packing():
    """g = 1 and a block amax of 6 give s = 1, so x/(s*g) = x exactly: codes by the table."""
    row = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0,
                        0.5, 1.0, 1.5, 2.0, 3.0, 4.0, -0.5, -6.0])
    t = q(row.view(1, 16), global_scale=1.0, backend="reference")
    assert t.scales.view(torch.uint8).item() == 0x38  # e4m3 1.0
    codes = [0, 2, 2, 4, 4, 6, 6, 7, 1, 2, 3, 4, 5, 6, 9, 15]
    want = [codes[2 * i] | (codes[2 * i + 1] << 4) for i in range(8)]
    assert t.data.view(-1).tolist() == want
    assert t.as_float4().dtype == torch.float4_e2m1fn_x2


def test_block_scale_rounds_to_nearest_even():
    # block amax / 6 / g lands halfway between e4m3 neighbours: 1.0625 -> 1.0, 1.1875 -> 1.25
    x = torch.zeros(2, 16)
    x[0, 0] = 6 * 1.0625
    x[1, 0] = 6 * 1.1875
    t = q(x, global_scale=1.0, backend="reference")
    assert t.scales.float().view(-1).tolist() == [1.0, 1.25]
    # saturation: a static global scale too small for the block clamps the scale at 448
    t = q(torch.full((1, 16), 1e6), global_scale=1.0, backend="reference")
    assert t.scales.float().item() == 448.0
    assert (t.data == 0x77).all()  # all codes saturate at 6


def test_global_scale_is_amax_over_2688():
    x = make_input((70, 90), torch.float32, "outlier")
    t = q(x, backend="reference")
    want = np.float32(np.abs(x.cpu().numpy()).max()) / np.float32(2688.0)
    assert t.global_scale.item() == want


def test_dequantized_values_are_nearest_representable():
    """Each dequantized element is the nearest of +-e2m1 * s * g to x (brute force, fp64)."""
    x = make_input((64, 80), torch.float32, "wide", device="cpu")
    t = q(x, backend="reference")
    nb = 5
    s = t.scales.float().view(64, nb, 1).double() * t.global_scale.double()
    grid = torch.cat([E2M1, -E2M1]).double().view(1, 1, 1, -1) * s.unsqueeze(-1)
    xv = x.double().view(64, nb, 16, 1)
    d = (xv - grid).abs()
    best = d.min(dim=-1).values
    got = t.dequantize(torch.float32).double().view(64, nb, 16)
    err = (got - x.double().view(64, nb, 16)).abs()
    # the kernel works with fl(s*g) and rounds x/(s*g) once in fp32: allow a few fp32 ulps of x
    assert (err <= best + 2**-21 * x.double().view(64, nb, 16).abs()).all()
    assert (err > 0).any()  # not a trivial input


def test_swizzle_layout_hand_computed():
    M, nb = 130, 5
    s = torch.arange(M * nb, dtype=torch.int64).view(M, nb)
    sw = ref.swizzle_scales((s % 251).to(torch.uint8))
    assert sw.shape == (256, 8)
    flat = sw.view(-1)
    # (r, c) -> tile * 512 + (r % 32) * 16 + (r // 32 % 4) * 4 + c % 4, tiles K-block fastest
    assert flat[21] == s[33, 1] % 251          # tile 0: 1*16 + 1*4 + 1
    assert flat[512 + 16 * 5 + 4 * 3] == s[96 + 5, 4] % 251   # tile 1 (kblock 4-7)
    assert flat[3 * 512 + 16] == s[129, 4] % 251   # tile (1, 1): r=1 -> 16
    assert flat[16 * 2 + 3] == s[2, 3] % 251                    # tile 0: r=2, c=3
    assert flat[2 * 512 + 16 * 1 + 3] == s[129, 3] % 251        # tile (1, 0): r=129 -> 1
    assert flat[2 * 512 + 16 * 2 + 3] == 0                      # row 130: padding
    assert flat[4] == s[32, 0] % 251 and flat[512 + 1] == 0       # kblock 5: padding
    assert int((flat != 0).sum()) <= M * nb
    assert torch.equal(ref.unswizzle_scales(sw, M, nb), (s % 251).to(torch.uint8))


def test_zero_tiny_huge_inputs():
    z = q(torch.zeros(3, 40), backend="reference")
    assert (z.data == 0).all() and (z.scales.view(torch.uint8) == 0).all()
    assert (z.dequantize(torch.float32) == 0).all()
    for mag in (1e-30, 1e-40, 1e38):
        x = make_input((4, 48), torch.float32).clamp(-3, 3) * mag  # up to 3e38 < FLT_MAX
        t = q(x, backend="reference")
        d = t.dequantize(torch.float32)
        assert torch.isfinite(d).all() and torch.isfinite(t.global_scale).all()
        if mag > 1e-39:  # subnormal inputs lose precision by design (scale floor FLT_MIN)
            assert ((d - x).double().norm() / x.double().norm()) < 0.2


def test_nonfinite_poisons_only_its_block():
    x = make_input((20, 64), torch.float32)
    x[4, 17] = 0.0
    clean = q(x, backend="reference")
    y = x.clone()
    y[4, 17] = float("nan")
    t = q(y, backend="reference")
    assert torch.equal(t.global_scale, clean.global_scale)
    sb, cb = t.scales.view(torch.uint8), clean.scales.view(torch.uint8)
    assert sb[4, 1] == 0x7F and (t.data[4, 8:16] == 0).all()
    mask = torch.ones_like(sb, dtype=torch.bool)
    mask[4, 1] = False
    assert torch.equal(sb[mask], cb[mask])
    d = t.dequantize(torch.float32)
    assert d[4, 16:32].isnan().all() and not d[:4].isnan().any()
    with pytest.raises(ValueError, match="inf or NaN"):
        q(y, check_finite=True)


def test_shapes_3d_and_odd_k():
    x = torch.randn(2, 3, 37)
    t = q(x)
    assert t.data.shape == (2, 3, 24) and t.scales.shape == (6, 3)
    assert t.dequantize().shape == x.shape and t.dequantize().dtype == x.dtype
    ts = q(x, swizzle=True)
    assert ts.scales.shape == (128, 4)
    assert torch.equal(ts.dequantize(), t.dequantize())


# ---- backends: bit-exact with the reference -------------------------------------------------
SHAPES = [(1, 1), (1, 17), (3, 129), (130, 300), (257, 33)]
# Each bit-exact test runs every (input dtype, make_input kind) pair.
DTYPE_KINDS = [(torch.bfloat16, "randn"), (torch.float16, "outlier"), (torch.float32, "wide")]


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("swizzle", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_backend_bit_exact(backend, shape, swizzle, static):
    need_backend("quantize_nvfp4", backend)
    for dtype, kind in DTYPE_KINDS:
        x = make_input(shape, dtype, kind)
        gs = (x.float().abs().amax() / 1000.0 + 1e-30) if static else None
        got = q(x, global_scale=gs, swizzle=swizzle, backend=backend)
        want = q(x.cpu(), global_scale=None if gs is None else gs.cpu(), swizzle=swizzle,
                 backend="reference")
        assert_bits_equal(got.data, want.data, f"data {dtype} {kind}")
        assert_bits_equal(got.scales, want.scales, f"scales {dtype} {kind}")
        assert_bits_equal(got.global_scale, want.global_scale, "global")


# Only the backends dequantize_nvfp4 registers (a "cuda" one is picked up once it exists).
@pytest.mark.parametrize("backend", DEQ_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("swizzle", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_dequantize_backend_bit_exact(backend, shape, swizzle, static):
    need_backend("dequantize_nvfp4", backend)
    for dtype, kind in DTYPE_KINDS:
        x = make_input(shape, dtype, kind, device="cpu")
        gs = (x.float().abs().amax() / 1000.0 + 1e-30) if static else None
        t = q(x, global_scale=gs, swizzle=swizzle, backend="reference")
        dev = [a.to(DEVICE) for a in (t.data, t.scales, t.global_scale)]
        for out in DTYPES:
            assert_bits_equal(pyops.dequantize_nvfp4(*dev, shape[1], swizzled=swizzle, dtype=out,
                                                     backend=backend),
                              t.dequantize(out, backend="reference"), f"deq {dtype} {out}")


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("how", ["transposed", "col_slice", "row_step"])
def test_backend_non_contiguous(backend, how):
    need_backend("quantize_nvfp4", backend)
    x = make_input((131, 80), torch.bfloat16, "outlier")
    xn = non_contiguous(x, how)
    got = q(xn, backend=backend)
    want = q(x.cpu(), backend="reference")
    assert_bits_equal(got.data, want.data)
    assert_bits_equal(got.scales, want.scales)
    assert_bits_equal(got.global_scale, want.global_scale)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_backend_zero_and_nonfinite(backend):
    need_backend("quantize_nvfp4", backend)
    x = make_input((40, 70), torch.float32)
    x[:, 16:48] = 0
    x[7, 3] = float("nan")
    x[39, 69] = float("inf")
    for swizzle in (False, True):
        got = q(x, swizzle=swizzle, backend=backend)
        want = q(x.cpu(), swizzle=swizzle, backend="reference")
        assert_bits_equal(got.data, want.data)
        assert_bits_equal(got.scales, want.scales)
        assert_bits_equal(got.global_scale, want.global_scale)
    z = q(torch.zeros(5, 33, device=DEVICE), backend=backend)
    assert (z.data == 0).all() and (z.scales.view(torch.uint8) == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_backend_past_int32_elements(backend):
    need_backend("quantize_nvfp4", backend)
    K = 4096
    M = 2**31 // K + 3
    x = torch.empty((M, K), dtype=torch.bfloat16, device="cuda").normal_()
    t = q(x, global_scale=0.01, swizzle=True, backend=backend)
    want = q(x[-130:].cpu(), global_scale=0.01, backend="reference")
    assert_bits_equal(t.data[-130:], want.data)
    got_scales = ref.unswizzle_scales(t.scales.cpu(), M, K // 16)[-130:]
    assert_bits_equal(got_scales, want.scales)


# ---- errors before any launch ------------------------------------------------------------------
def test_bad_inputs():
    with pytest.raises(TypeError, match="dtype int8"):
        q(torch.ones(4, 16, dtype=torch.int8))
    with pytest.raises(ValueError, match="empty"):
        q(torch.ones(3, 0))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite and > 0"):
            q(torch.ones(4, 16), global_scale=bad)
    with pytest.raises(ValueError, match="one value"):
        q(torch.ones(4, 16), global_scale=torch.ones(2))
    t = q(torch.ones(4, 40))
    with pytest.raises(ValueError, match="K=64 needs"):
        pyops.dequantize_nvfp4(t.data, t.scales, t.global_scale, 64)
    with pytest.raises(ValueError, match="scales have shape"):
        pyops.dequantize_nvfp4(t.data, t.scales[:2], t.global_scale, 40)
    with pytest.raises(ValueError, match="scales have shape"):
        pyops.dequantize_nvfp4(t.data, t.scales, t.global_scale, 40, swizzled=True)
    with pytest.raises(TypeError, match="uint8"):
        pyops.dequantize_nvfp4(t.data.float(), t.scales, t.global_scale, 40)


# ---- op registration ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_opcheck(backend):
    need_backend("quantize_nvfp4", backend)
    x = make_input((3, 40), torch.bfloat16)
    for gs in (None, torch.tensor([0.01], device=DEVICE)):
        for swizzle in (False, True):
            torch.library.opcheck(torch.ops.pyops.quantize_nvfp4.default, (x, gs, swizzle, backend))
    d, s, g = torch.ops.pyops.quantize_nvfp4(x, None, False, backend)
    # test_schema is left out: SchemaCheckMode multiplies the fp8 scales, unsupported on CPU.
    torch.library.opcheck(torch.ops.pyops.dequantize_nvfp4.default,
                          (d, s, g, 40, False, torch.float32, backend),
                          test_utils=("test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))


def test_compile_fullgraph():
    def f(x):
        t = pyops.quantize_nvfp4(x, swizzle=True, backend="reference")
        return t.dequantize(torch.float32, backend="reference"), t.data

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for shape in [(8, 64), (5, 64)]:
        x = make_input(shape, torch.bfloat16, device="cpu")
        a, da = cf(x)
        b, db = f(x)
        assert_bits_equal(a, b)
        assert_bits_equal(da, db)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_cuda_graph(backend):
    need_backend("quantize_nvfp4", backend)
    x = make_input((512, 1024), torch.bfloat16)
    for swizzle in (False, True):
        q(x, swizzle=swizzle, backend=backend)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            t = q(x, swizzle=swizzle, backend=backend)
        for _ in range(2):
            x.copy_(make_input((512, 1024), torch.bfloat16, "outlier"))
            g.replay()
            want = q(x.cpu(), swizzle=swizzle, backend="reference")
            assert_bits_equal(t.data, want.data)
            assert_bits_equal(t.scales, want.scales)
            assert_bits_equal(t.global_scale, want.global_scale)


def test_tensor_global_scale_checked_with_check_finite():
    x = torch.randn(4, 32)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and > 0"):
            q(x, global_scale=torch.tensor([bad]), check_finite=True)
    t = q(x, global_scale=torch.tensor(0.01))
    assert pyops.dequantize_nvfp4(t.data, t.scales, torch.tensor(0.01), 32).shape == (4, 32)


# ---- each backend's entry point (destination-passing), poisoned outputs --------------------------
# The entry points the registry holds (``_backend.impl(op, backend)``, what the op calls with its
# freshly allocated outputs), called on outputs poisoned with 0xAA bytes so an unwritten element
# is caught. "cuda" is the compiled binding (GPU); a dequantize backend registered later is picked
# up without editing the tests.
# Backends whose caller zero-fills the swizzled layout's padding (the CUDA binding's contract,
# csrc/bindings/quantize_nvfp4.cpp; the op allocates the swizzled scales with torch.zeros): their
# padding starts at 0, every other byte is still poisoned. The Triton kernel zeroes it itself.
CALLER_ZEROES_PADDING = ("cuda",)


def run_kernel(x, gs=None, swizzle=False, backend="triton"):
    """gs None: computed global scale; else a static fp32 (1,) tensor. Returns the reference's
    outputs on x's device (equal to the backend's: checked)."""
    M, K = x.shape
    want_d, want_s, want_g = ref.quantize_nvfp4(x.cpu(), None if gs is None else gs.cpu(),
                                                swizzle)
    d = poisoned(want_d.shape, torch.uint8, x.device)
    s = poisoned(want_s.shape, torch.uint8, x.device)  # swizzle padding included
    if swizzle and backend in CALLER_ZEROES_PADDING:
        real = ref.swizzle_scales(torch.ones((M, want_d.shape[1] // 8), dtype=torch.uint8))
        s[(real == 0).to(x.device)] = 0
    g = poisoned((1,), torch.float32, x.device) if gs is None else gs.clone()
    _backend.impl("quantize_nvfp4", backend)(x, d, s, g, gs is None, swizzle)
    assert_bits(d, want_d, f"{backend} data")
    assert_bits(s, want_s.view(torch.uint8), f"{backend} scales")
    assert torch.equal(raw_bits(g).cpu(), raw_bits(want_g.reshape(1)).cpu()), \
        f"{backend} global scale"
    return want_d.to(x.device), want_s.to(x.device), want_g.to(x.device)


def check_deq(d, s, g, K, swizzled, out_dtype, backend="triton"):
    M = d.shape[0]
    out = poisoned((M, K), out_dtype, d.device)
    _backend.impl("dequantize_nvfp4", backend)(d, s.view(torch.uint8), g, K, swizzled, out)
    assert_bits(out, ref.dequantize_nvfp4(d.cpu(), s.cpu(), g.cpu(), K, swizzled, out_dtype),
                f"{backend} nvfp4 deq")


def check_deq_all(d, s, g, K, swizzled, out_dtype):
    """Every dequantize backend the registry holds that can run here."""
    for b in DEQ_NAMES:
        if _backend.available("dequantize_nvfp4", b, d.device)[0]:
            check_deq(d, s, g, K, swizzled, out_dtype, b)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("swizzle", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_dtypes_outliers_nonfinite(backend, dtype, static, swizzle):
    need_backend("quantize_nvfp4", backend)
    x = make_x(130, 300, dtype, seed=7, nonfinite=True)
    gs = torch.tensor([0.37], device=DEV) if static else None
    d, s, g = run_kernel(x, gs, swizzle, backend)
    check_deq_all(d, s, g, 300, swizzle, dtype)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("swizzle", [False, True])
def test_kernel_shapes(backend, shape, swizzle, dtype):
    need_backend("quantize_nvfp4", backend)
    x = make_x(*shape, dtype, seed=8, nonfinite=True)
    d, s, g = run_kernel(x, None, swizzle, backend)
    check_deq_all(d, s, g, shape[1], swizzle, torch.float32)
    run_kernel(x, torch.tensor([1e-3], device=DEV), swizzle, backend)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("swizzle", [False, True])
def test_kernel_writes_every_output(backend, swizzle):
    """Fresh random fp16 input, K = 100 (a partial last block), computed global scale (was the
    CUDA binding's own test; the scales are poisoned too, the swizzle padding as in run_kernel)."""
    need_backend("quantize_nvfp4", backend)
    s = new_seed()
    x = make_input((130, 100), torch.float16, seed=s)
    nb = 7
    data = torch.full((130, nb * 8), 0xA5, dtype=torch.uint8, device=DEV)
    shape = ref.swizzled_shape(130, nb) if swizzle else (130, nb)
    scales = torch.full(shape, 0xA5, dtype=torch.uint8, device=DEV)
    if swizzle and backend in CALLER_ZEROES_PADDING:
        real = ref.swizzle_scales(torch.ones((130, nb), dtype=torch.uint8))
        scales[(real == 0).to(DEV)] = 0
    g = torch.full((1,), -1.0, device=DEV)
    _backend.impl("quantize_nvfp4", backend)(x, data, scales, g, True, swizzle)
    rd, rsc, rg = ref.quantize_nvfp4(x.cpu(), None, swizzle)
    assert_same(data, rd, f"{backend} data", s)
    assert_same(scales, rsc.view(torch.uint8), f"{backend} scales", s)
    assert_same(g, rg, f"{backend} global", s)


@pytest.mark.parametrize("backend", DEQ_BACKENDS)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_kernel_dequant_out_dtypes(backend, out_dtype):
    need_backend("dequantize_nvfp4", backend)
    x = make_x(257, 33, torch.float32, seed=9, nonfinite=True, device="cpu")
    for swizzle in (False, True):
        d, s, g = ref.quantize_nvfp4(x, None, swizzle)
        check_deq(d.to(DEV), s.to(DEV), g.to(DEV), 33, swizzle, out_dtype, backend)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "column_slice"])
def test_kernel_noncontiguous(backend, view):
    need_backend("quantize_nvfp4", backend)
    base = make_x(300, 130, torch.float16, seed=10)
    x = base.t() if view == "transposed" else base[:, 5:5 + 75]
    assert not x.is_contiguous()
    for swizzle in (False, True):
        run_kernel(x, None, swizzle, backend)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_kernel_all_zero_and_nonfinite(backend):
    need_backend("quantize_nvfp4", backend)
    for swizzle in (False, True):
        d, s, g = run_kernel(torch.zeros(3, 40, dtype=torch.bfloat16, device=DEV), None, swizzle,
                             backend)
        assert (d == 0).all() and g.item() == 2.0**-126
    x = torch.randn(4, 64, device=DEV)
    x[1, 20] = float("nan")
    x[3, 63] = float("inf")
    d, s, g = run_kernel(x, None, False, backend)
    sb = s.view(torch.uint8).cpu()
    assert sb[1, 1] == 0x7F and sb[3, 3] == 0x7F and (d[1, 8:16] == 0).all()
    run_kernel(torch.full((2, 16), float("inf"), device=DEV), None, True, backend)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_kernel_e2m1_ties(backend):
    """Static g = 1 and a block amax of 6 give s_blk = 1, so v = x exactly: put v on every E2M1
    rounding boundary (ties to even) and on either side of it; also g = 0.5 with x halved."""
    need_backend("quantize_nvfp4", backend)
    t = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    up = (t.view(torch.int32) + 1).view(torch.float32)
    dn = (t.view(torch.int32) - 1).view(torch.float32)
    blk = [torch.cat([torch.tensor([6.0]), t, -t, torch.tensor([-0.0])]),
           torch.cat([torch.tensor([-6.0]), up, -dn, torch.tensor([-0.1])]),
           torch.cat([torch.tensor([6.0]), dn, -up, torch.tensor([0.1])])]
    x = torch.cat(blk).reshape(1, 48).to(DEV)
    d, s, g = run_kernel(x, torch.tensor([1.0], device=DEV), False, backend)
    codes = ref.unpack_codes(d.cpu())[0, :16].tolist()
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 0]
    run_kernel(x * 0.5, torch.tensor([0.5], device=DEV), True, backend)
    run_kernel(x, None, False, backend)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_kernel_e4m3_scale_ties(backend):
    """Static g = 1: block amax / 6 lands exactly on e4m3 midpoints (normal and subnormal) for
    the block scale, and on the 448 saturation edge."""
    need_backend("quantize_nvfp4", backend)
    targets = [1.0625, 1.1875, 17.0, 19.0, 1.5 * 2.0**-9, 2.5 * 2.0**-9, 0.5 * 2.0**-9, 464.0,
               2.0**-6 + 2.0**-10, 300.0]
    rows = []
    for i, t in enumerate(targets):
        r = torch.linspace(-1.0, 1.0, 16) * (6.0 * t)
        r[i % 16] = 6.0 * t * (-1) ** i
        rows.append(r)
    x = torch.stack(rows).to(DEV)
    d, s, g = run_kernel(x, torch.tensor([1.0], device=DEV), False, backend)
    want = torch.tensor(targets).clamp(max=448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(s.view(torch.uint8)[:, 0].cpu(), want)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_kernel_row_stride_over_2_31(backend):
    """A (2, 32) view with row stride 2**31 elements: offsets must be computed in int64."""
    need_backend("quantize_nvfp4", backend)
    x = huge_row_stride_input()
    run_kernel(x, torch.tensor([0.05], device=DEV), False, backend)
    run_kernel(x, None, True, backend)


# ---- Triton only: the kernels' internal paths ------------------------------------------------
def test_triton_multi_partial_and_tiles(monkeypatch):
    need_backend("quantize_nvfp4", "triton")
    from pyops.triton_kernels import _amax as tka
    from pyops.triton_kernels import quantize_nvfp4 as tk4
    monkeypatch.setattr(tka, "MAX_PARTIALS", 3)
    monkeypatch.setattr(tka, "TILE_ELEMS", 256)
    monkeypatch.setattr(tk4, "TILE_ELEMS", 256)
    monkeypatch.setattr(tk4, "MAX_NBB", 4)
    x = make_x(130, 300, torch.bfloat16, seed=11, nonfinite=True)
    x[129, 299] = 3000.0
    for swizzle in (False, True):
        d, s, g = run_kernel(x, None, swizzle)
        check_deq(d, s, g, 300, swizzle, torch.bfloat16)


@pytest.mark.gpu
def test_triton_gpu_hw_and_soft_casts(monkeypatch):
    """The Triton quantizer and dequantizer with the hardware casts (PYOPS_TRITON_SOFT_CVT=0) and
    the soft bit-level casts (=1) on the GPU, bit-exact with the host reference at a large shape
    (the conversions themselves: tests/test_cvt.py::test_gpu_hw_and_soft_paths)."""
    need_backend("quantize_nvfp4", "triton")
    for soft in ("0", "1"):
        monkeypatch.setenv("PYOPS_TRITON_SOFT_CVT", soft)
        for dtype in DTYPES:
            x = make_x(1000, 4100, dtype, seed=13, nonfinite=True)
            for swizzle in (False, True):
                d, s, g = run_kernel(x, None, swizzle)
                check_deq(d, s, g, 4100, swizzle, dtype)


# ---- the CUDA backend at production shapes (GPU) -----------------------------------------------
# The public function with backend="cuda" against the reference on a CPU copy of the input, at the
# shapes, layouts and dtypes the kernel's vector and scalar paths see in a model. CUDA only: at
# these sizes the Triton interpreter would take minutes on a CPU machine (the Triton backend runs
# the same checks at small shapes above, and at a large shape in test_triton_gpu_hw_and_soft_casts).
# (129, 4096), (37, 3072), (3, 5120): the one-thread-per-block kernel (K % 16 == 0, aligned rows);
# the others: the lane-per-chunk kernel (partial last block, odd K).
CUDA_SHAPES = ((1, 1), (1, 17), (3, 129), (257, 300), (129, 4096), (37, 3072), (3, 5120))


@pytest.fixture
def cuda_backend():
    need_backend("quantize_nvfp4", "cuda", torch.device("cuda"))


def check_cuda(x: torch.Tensor, gs, swizzle: bool, seed=None):
    got = q(x, global_scale=gs, swizzle=swizzle, backend="cuda")
    gs_cpu = gs.cpu() if isinstance(gs, torch.Tensor) else gs
    want = q(x.cpu(), global_scale=gs_cpu, swizzle=swizzle, backend="reference")
    assert_same(got.global_scale, want.global_scale, "nvfp4 global scale", seed)
    assert_same(got.scales, want.scales, "nvfp4 scales", seed)
    assert_same(got.data, want.data, "nvfp4 data", seed)
    return got


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
@pytest.mark.parametrize("global_mode", ["computed", "static", "static_small", "static_large"])
@pytest.mark.parametrize("swizzle", [False, True], ids=["linear", "swizzled"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_shapes(dtype, shape, swizzle, global_mode):
    s = new_seed()
    x = randn_cuda(shape, dtype, 2.0)
    gs = {"computed": None,
          "static": torch.tensor([0.0123], device="cuda"),
          "static_small": 1e-5,       # block scales saturate at 448, codes clip at 6
          "static_large": 50.0}[global_mode]   # many block scales underflow to 0
    check_cuda(x, gs, swizzle, s)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
@pytest.mark.parametrize("gs", [None, 0.0123, 3e-36, -0.5, float("nan")],
                         ids=["computed", "static", "static_tiny", "static_negative", "static_nan"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_every_16bit_value(dtype, gs):
    """Every finite bf16 / fp16 value, shuffled into rows of 1024, with the global scale computed
    and static (including a tiny one, whose block divisors leave the ScaleDiv fast range, a
    negative one and NaN: the reference's codes are what they are, the kernel must match): the
    divisions, the underflow-to-(-0) sign rule and the bit-rounding E2M1 code of the kernels
    against the reference's threshold sum."""
    s = new_seed()
    g = torch.Generator().manual_seed(s)
    v = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    v = v[torch.isfinite(v.float())]
    v = v[torch.randperm(v.numel(), generator=g)]
    x = v[: v.numel() // 1024 * 1024].view(-1, 1024).to("cuda")
    if gs is not None:  # a device tensor: the value is not checked on the host (no sync)
        gs = torch.tensor([gs], device="cuda")
    for swizzle in (False, True):
        check_cuda(x, gs, swizzle, s)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
@pytest.mark.parametrize("layout", ["transposed", "col_slice", "col_slice_aligned", "3d"])
@pytest.mark.parametrize("swizzle", [False, True], ids=["linear", "swizzled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_layouts(dtype, swizzle, layout):
    s = new_seed()
    if layout == "transposed":
        x = randn_cuda((300, 257), dtype).t()
    elif layout == "col_slice":
        x = randn_cuda((131, 333), dtype)[:, 3:3 + 250]
    elif layout == "col_slice_aligned":
        x = randn_cuda((131, 1024), dtype)[:, :512]
    else:
        x = randn_cuda((3, 50, 384), dtype)
    check_cuda(x, None, swizzle, s)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_outliers_zero_nonfinite(dtype):
    s = new_seed()
    x = randn_cuda((200, 320), torch.float32)
    x[:, 33] *= 3000.0
    x[:, 100:116] *= 1e-7
    x[7] = 0.0
    x[8, :16] = -0.0
    x[20, 5] = float("inf")
    x[21, 40] = float("nan")
    x[22, 319] = float("-inf")
    x = x.to(dtype)
    for swizzle in (False, True):
        got = check_cuda(x, None, swizzle, s)
        check_cuda(x, torch.tensor([0.05], device="cuda"), swizzle, s)
    assert (got.scales.view(torch.uint8) == 0x7F).any()
    check_cuda(torch.zeros((33, 48), device="cuda", dtype=dtype), None, True, s)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
def test_cuda_binding_opcheck():
    x = randn_cuda((64, 256), torch.bfloat16)
    data = torch.empty((64, 128), dtype=torch.uint8, device="cuda")
    scales = torch.zeros((128, 16), dtype=torch.uint8, device="cuda")
    g = torch.empty((1,), device="cuda")
    torch.library.opcheck(torch.ops.pyops._quantize_nvfp4_cuda.default,
                          (x, data, scales, g, True, True))


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
def test_cuda_graph_replay():
    """A captured computed-global-scale swizzled quantization, replayed on inputs of changing
    magnitude (and a NaN)."""
    s = new_seed()
    static_x = randn_cuda((300, 1000), torch.bfloat16)
    graph, n = capture(lambda: q(static_x, swizzle=True, backend="cuda"))
    for scale in (1.0, 1e3, 1e-3):
        new = randn_cuda((300, 1000), torch.bfloat16, scale)
        new[17, 3] = float("nan") if scale == 1e3 else new[17, 3]
        static_x.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want = q(new.cpu(), swizzle=True, backend="reference")
        assert_same(n.global_scale, want.global_scale, "graph nvfp4 global", s)
        assert_same(n.scales, want.scales, "graph nvfp4 scales", s)
        assert_same(n.data, want.data, "graph nvfp4 data", s)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_backend")
def test_cuda_more_than_2pow31_elements():
    """NVFP4 with a static global scale is row-local: the first and last rows of a 2^31 + 3*4096
    element input against the reference, in both scale layouts."""
    K = 4096
    s = new_seed()
    y = more_than_2pow31_input(K)            # 2^31 + 3*4096 elements, ~4.3 GB in bf16
    M = y.shape[0]
    y[-2, 4000] = 0.0
    rows = [slice(0, 2), slice(M - 5, M)]
    gs = torch.tensor([0.002], device="cuda")
    for swizzle in (False, True):
        got = q(y, global_scale=gs, swizzle=swizzle, backend="cuda")
        nb = K // 16
        for r in rows:
            want = q(y[r].cpu(), global_scale=gs.cpu(), swizzle=False, backend="reference")
            assert_same(got.data[r], want.data, f"big nvfp4 data {r}", s)
            sc = got.scales.view(torch.uint8)
            if swizzle:  # the 128x4-tile layout, restated for just these rows
                m = torch.arange(M, device="cuda")[r].view(-1, 1)
                c = torch.arange(nb, device="cuda").view(1, -1)
                tile = (m // 128) * (((nb + 3) // 4 * 4) // 4) + c // 4
                rr = m % 128
                sc = sc.reshape(-1)[tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + c % 4]
            else:
                sc = sc[r]
            assert_same(sc, want.scales.view(torch.uint8), f"big nvfp4 scales {r}", s)
        del got

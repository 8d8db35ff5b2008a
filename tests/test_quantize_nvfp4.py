"""pyops.quantize_nvfp4 / dequantize_nvfp4: spec, packing, swizzle, backends bit-exact, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyops
from pyops.reference import quantize_nvfp4 as ref

from _util import (BACKENDS, DEVICE, assert_bits_equal, make_input, need_backend,
                   non_contiguous, registered_backends)

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


@pytest.mark.parametrize("backend", BACKENDS)
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
@pytest.mark.parametrize("backend", registered_backends("dequantize_nvfp4"))
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


@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("backend", BACKENDS)
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
@pytest.mark.parametrize("backend", ["triton", "cuda"])
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
@pytest.mark.parametrize("backend", ["reference", "triton"])
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
@pytest.mark.parametrize("backend", ["triton", "cuda"])
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

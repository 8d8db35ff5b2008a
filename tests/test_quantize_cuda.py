"""The CUDA backend (pyops._C) of the FP8 / NVFP4 quantizers, bit-exact against the reference.

The reference runs on a CPU copy of the input: the spec divides with IEEE division, which is what
torch does on the CPU; on CUDA, torch computes ``tensor / python_scalar`` as
``tensor * (1/scalar)`` (aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu), which is not
bit-identical for amax / 448, amax / 2688 or block_amax / 6.

Codes are compared as bytes, fp32 scales by their bit patterns (so a NaN scale must be the very
NaN the reference writes, 0x7FC00000).
"""
from __future__ import annotations

import random

import pytest
import torch

import pyops
from pyops import _backend
from pyops.reference import quantize_fp8 as ref_fp8
from pyops.reference import quantize_nvfp4 as ref_nvfp4

from _util import Case, assert_cases_isolated, schema_check

pytestmark = pytest.mark.gpu

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GRANS = ("tensor", "row", "block1x128", "block128x128")
SHAPES = ((1, 1), (1, 17), (3, 129), (257, 300), (129, 4096))


@pytest.fixture(autouse=True)
def _need_cuda_backend():
    dev = torch.device("cuda")
    for op in ("quantize_fp8", "quantize_nvfp4"):
        ok, why = _backend.available(op, "cuda", dev)
        if not ok:
            pytest.skip(f"CUDA backend unavailable: {why}")


def _seed() -> int:
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str, seed=None):
    got = got.detach().cpu().contiguous()
    want = want.detach().cpu().contiguous()
    if got.dtype == torch.float32:
        got, want = got.view(torch.int32), want.view(torch.int32)
    elif got.dtype != torch.uint8:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {bad.shape[0]} of {got.numel()} differ (seed {seed}); "
                             f"first at {i}: got {int(got[i]):#x}, want {int(want[i]):#x}")


def check_fp8(x: torch.Tensor, gran: str, seed=None):
    got = pyops.quantize_fp8(x, gran, backend="cuda")
    ref = pyops.quantize_fp8(x.cpu(), gran, backend="reference")
    _assert_same(got.data, ref.data, f"fp8 {gran} codes", seed)
    _assert_same(got.scale, ref.scale, f"fp8 {gran} scales", seed)
    return got


def check_nvfp4(x: torch.Tensor, gs, swizzle: bool, seed=None):
    got = pyops.quantize_nvfp4(x, gs, swizzle=swizzle, backend="cuda")
    gs_cpu = gs.cpu() if isinstance(gs, torch.Tensor) else gs
    ref = pyops.quantize_nvfp4(x.cpu(), gs_cpu, swizzle=swizzle, backend="reference")
    _assert_same(got.global_scale, ref.global_scale, "nvfp4 global scale", seed)
    _assert_same(got.scales, ref.scales, "nvfp4 scales", seed)
    _assert_same(got.data, ref.data, "nvfp4 data", seed)
    return got


def _randn(shape, dtype, scale=1.0):
    return (torch.randn(shape, device="cuda", dtype=torch.float32) * scale).to(dtype)


# ---- FP8 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_shapes(dtype, gran, shape):
    s = _seed()
    check_fp8(_randn(shape, dtype, 3.0), gran, s)


@pytest.mark.parametrize("layout", ["transposed", "col_slice", "col_slice_aligned", "3d"])
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_layouts(dtype, gran, layout):
    s = _seed()
    if layout == "transposed":
        x = _randn((300, 257), dtype).t()                 # strides (1, 257)
    elif layout == "col_slice":
        x = _randn((131, 333), dtype)[:, 5:5 + 260]       # misaligned rows, padded stride
    elif layout == "col_slice_aligned":
        x = _randn((131, 1024), dtype)[:, :512]           # vector path, row stride != K
    else:
        x = _randn((3, 50, 384), dtype)                   # leading dims flattened
    check_fp8(x, gran, s)


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_outliers_and_tiny(dtype, gran):
    s = _seed()
    x = _randn((256, 640), torch.float32)
    x[:, 7] *= 2000.0                      # outlier channel
    x[:, 300:305] *= 1e-6                  # values that round to (signed) zero codes
    x[5] *= 1e-30                          # tiny row (bf16/fp32: near or below FLT_MIN * 448)
    x[9, :128] = 0.0                       # an all-zero group
    x[11, :64] = -0.0
    if dtype == torch.float32:
        x[13, 10:20] = torch.tensor([1e-40, -1e-40, 3e-39, -7e-45, 0.0, 1.0, -1.0, 2e-38,
                                     -2e-38, 5e-39])  # subnormals in the input
    check_fp8(x.to(dtype), gran, s)


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_all_zero(dtype, gran):
    check_fp8(torch.zeros((130, 260), device="cuda", dtype=dtype), gran)


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_nonfinite(dtype, gran):
    s = _seed()
    x = _randn((260, 400), dtype)
    x[3, 17] = float("inf")
    x[140, 390] = float("nan")
    x[200, 5] = float("-inf")
    x[259, 399] = float("nan")
    got = check_fp8(x, gran, s)
    assert torch.isnan(got.scale).any()


# ---- NVFP4 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("global_mode", ["computed", "static", "static_small", "static_large"])
@pytest.mark.parametrize("swizzle", [False, True], ids=["linear", "swizzled"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_shapes(dtype, shape, swizzle, global_mode):
    s = _seed()
    x = _randn(shape, dtype, 2.0)
    gs = {"computed": None,
          "static": torch.tensor([0.0123], device="cuda"),
          "static_small": 1e-5,       # block scales saturate at 448, codes clip at 6
          "static_large": 50.0}[global_mode]   # many block scales underflow to 0
    check_nvfp4(x, gs, swizzle, s)


@pytest.mark.parametrize("layout", ["transposed", "col_slice", "col_slice_aligned", "3d"])
@pytest.mark.parametrize("swizzle", [False, True], ids=["linear", "swizzled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_layouts(dtype, swizzle, layout):
    s = _seed()
    if layout == "transposed":
        x = _randn((300, 257), dtype).t()
    elif layout == "col_slice":
        x = _randn((131, 333), dtype)[:, 3:3 + 250]
    elif layout == "col_slice_aligned":
        x = _randn((131, 1024), dtype)[:, :512]
    else:
        x = _randn((3, 50, 384), dtype)
    check_nvfp4(x, None, swizzle, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_outliers_zero_nonfinite(dtype):
    s = _seed()
    x = _randn((200, 320), torch.float32)
    x[:, 33] *= 3000.0
    x[:, 100:116] *= 1e-7
    x[7] = 0.0
    x[8, :16] = -0.0
    x[20, 5] = float("inf")
    x[21, 40] = float("nan")
    x[22, 319] = float("-inf")
    x = x.to(dtype)
    for swizzle in (False, True):
        got = check_nvfp4(x, None, swizzle, s)
        check_nvfp4(x, torch.tensor([0.05], device="cuda"), swizzle, s)
    assert (got.scales.view(torch.uint8) == 0x7F).any()
    check_nvfp4(torch.zeros((33, 48), device="cuda", dtype=dtype), None, True, s)


# ---- direct op calls: poisoned outputs, opcheck ------------------------------------------------
@pytest.mark.parametrize("gran", range(4))
def test_fp8_op_writes_every_output(gran):
    s = _seed()
    x = _randn((257, 300), torch.bfloat16)
    name = GRANS[gran]
    shape = ref_fp8.scale_shape_2d(257, 300, name)
    q = torch.full((257, 300), 0xA5, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    sc = torch.full(shape, -12345.0, device="cuda")
    torch.ops.pyops._quantize_fp8_cuda(x, q, sc, gran)
    rq, rs = ref_fp8.quantize_fp8(x.cpu(), name)
    _assert_same(q, rq, "codes", s)
    _assert_same(sc, rs, "scales", s)


@pytest.mark.parametrize("swizzle", [False, True])
def test_nvfp4_op_writes_every_output(swizzle):
    s = _seed()
    x = _randn((130, 100), torch.float16)
    nb = 7
    ref = ref_nvfp4
    data = torch.full((130, nb * 8), 0xA5, dtype=torch.uint8, device="cuda")
    shape = ref.swizzled_shape(130, nb) if swizzle else (130, nb)
    scales = torch.zeros(shape, dtype=torch.uint8, device="cuda")
    g = torch.full((1,), -1.0, device="cuda")
    torch.ops.pyops._quantize_nvfp4_cuda(x, data, scales, g, True, swizzle)
    rd, rsc, rg = ref.quantize_nvfp4(x.cpu(), None, swizzle)
    _assert_same(data, rd, "data", s)
    _assert_same(scales, rsc.view(torch.uint8), "scales", s)
    _assert_same(g, rg, "global", s)


# opcheck's test_schema compares every argument before/after with torch.allclose, which has no
# CUDA kernel for float8 (the H200 run: '"mul_cuda" not implemented for Float8_e4m3fn', in torch's
# SchemaCheckMode, not in pyops). The fp8 op's schema is checked byte-wise by _util.schema_check.
OPCHECK_NO_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck():
    x = _randn((64, 256), torch.bfloat16)
    q = torch.empty((64, 256), dtype=torch.float8_e4m3fn, device="cuda")
    sc = torch.empty((64,), device="cuda")
    op = torch.ops.pyops._quantize_fp8_cuda.default
    torch.library.opcheck(op, (x, q, sc, 1), test_utils=OPCHECK_NO_SCHEMA)
    x0 = x.clone()
    schema_check(op, (x, q, sc, 1))
    _assert_same(x, x0, "x after the op")
    rq, rs = ref_fp8.quantize_fp8(x.cpu(), "row")
    _assert_same(q, rq, "codes")
    _assert_same(sc, rs, "scales")
    data = torch.empty((64, 128), dtype=torch.uint8, device="cuda")
    scales = torch.zeros((128, 16), dtype=torch.uint8, device="cuda")
    g = torch.empty((1,), device="cuda")
    torch.library.opcheck(torch.ops.pyops._quantize_nvfp4_cuda.default,
                          (x, data, scales, g, True, True))


def test_bad_arguments_raise():
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


# ---- CUDA graphs --------------------------------------------------------------------------------
def test_cuda_graph_replay():
    s = _seed()
    static_x = _randn((300, 1000), torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        for _ in range(2):
            pyops.quantize_fp8(static_x, "tensor", backend="cuda")
            pyops.quantize_nvfp4(static_x, None, swizzle=True, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = {g: pyops.quantize_fp8(static_x, g, backend="cuda") for g in GRANS}
        n = pyops.quantize_nvfp4(static_x, None, swizzle=True, backend="cuda")
    for scale in (1.0, 1e3, 1e-3):
        new = _randn((300, 1000), torch.bfloat16, scale)
        new[17, 3] = float("nan") if scale == 1e3 else new[17, 3]
        static_x.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        for g, got in outs.items():
            ref = pyops.quantize_fp8(new.cpu(), g, backend="reference")
            _assert_same(got.data, ref.data, f"graph fp8 {g} codes", s)
            _assert_same(got.scale, ref.scale, f"graph fp8 {g} scales", s)
        ref = pyops.quantize_nvfp4(new.cpu(), None, swizzle=True, backend="reference")
        _assert_same(n.global_scale, ref.global_scale, "graph nvfp4 global", s)
        _assert_same(n.scales, ref.scales, "graph nvfp4 scales", s)
        _assert_same(n.data, ref.data, "graph nvfp4 data", s)


# ---- more than 2^31 elements -------------------------------------------------------------------
def test_more_than_2pow31_elements():
    K = 4096
    M = 2**31 // K + 3                       # 2^31 + 3*4096 elements, ~4.3 GB in bf16
    need = M * K * (2 + 1) + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.1f} GiB free on the GPU, {free / 2**30:.1f} available")
    s = _seed()
    x = torch.randn((M, K), device="cuda", dtype=torch.bfloat16)
    x[-1, -5:] *= 100.0
    x[-2, 4000] = float("nan")
    rows = [slice(0, 2), slice(M - 5, M)]
    # Row-local granularities: rows can be checked on their own against the reference.
    for gran in ("row", "block1x128"):
        got = pyops.quantize_fp8(x, gran, backend="cuda")
        for r in rows:
            ref = pyops.quantize_fp8(x[r].cpu(), gran, backend="reference")
            _assert_same(got.data[r], ref.data, f"big fp8 {gran} codes {r}", s)
            _assert_same(got.scale.reshape(M, -1)[r], ref.scale.reshape(ref.data.shape[0], -1),
                         f"big fp8 {gran} scales {r}", s)
        del got
    # Per tensor: the scale comes from the whole tensor (inf/NaN excluded); check it from an
    # exact torch max, then the codes of the last rows with that scale.
    y = x
    y[-2, 4000] = 0.0                         # keep the tensor finite for this part
    got = pyops.quantize_fp8(y, "tensor", backend="cuda")
    amax = torch.maximum(y.max().float().abs(), y.min().float().abs()).cpu().reshape(1)
    want_scale = torch.clamp_min(amax / 448.0, 2.0**-126)
    _assert_same(got.scale, want_scale, "big fp8 tensor scale", s)
    tail = y[M - 3:].cpu().float()
    want = (tail / want_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    _assert_same(got.data[M - 3:], want, "big fp8 tensor codes (last rows)", s)
    del got
    # NVFP4 with a static global scale is row-local too.
    gs = torch.tensor([0.002], device="cuda")
    for swizzle in (False, True):
        got = pyops.quantize_nvfp4(y, gs, swizzle=swizzle, backend="cuda")
        nb = K // 16
        for r in rows:
            ref = pyops.quantize_nvfp4(y[r].cpu(), gs.cpu(), swizzle=False, backend="reference")
            _assert_same(got.data[r], ref.data, f"big nvfp4 data {r}", s)
            sc = got.scales.view(torch.uint8)
            if swizzle:  # the 128x4-tile layout, restated for just these rows
                m = torch.arange(M, device="cuda")[r].view(-1, 1)
                c = torch.arange(nb, device="cuda").view(1, -1)
                tile = (m // 128) * (((nb + 3) // 4 * 4) // 4) + c // 4
                rr = m % 128
                sc = sc.reshape(-1)[tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + c % 4]
            else:
                sc = sc[r]
            _assert_same(sc, ref.scales.view(torch.uint8), f"big nvfp4 scales {r}", s)
        del got

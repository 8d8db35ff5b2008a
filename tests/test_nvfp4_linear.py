"""pyops.linear with NVFP4 weights: backends triton (fused W4A16 kernel), torch (variant dequant:
Triton dequantize + cuBLAS; variant w4a4: cuBLASLt NVFP4 via torch._scaled_mm), reference.

The packing is checked on a hand-built weight with known codes and scales (independent of the
quantizer); the kernels against the fp32 reference with an error bound scaled by
sum_k |x_k w_k|.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops import _backend
from pyops.ops import nvfp4_linear as op
from pyops.ops.linear import linear
from pyops.weights import NVFP4Weight, quantize_weight
from pyops.triton_kernels import nvfp4_linear as tk

from _util import HAS_CUDA, assert_bits_equal, capture_graph, make_input, non_contiguous

SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-20}
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.fixture
def small_tiles(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setattr(tk, "FORCE_CONFIG", SMALL)


# (backend, variant) pairs that run W4A16 on the CPU (Triton interpreter; torch.mm for dequant)
W4A16_PATHS = [("triton", "fused"), ("torch", "dequant")]


@pytest.fixture(params=W4A16_PATHS, ids=["triton-fused", "torch-dequant"])
def path(request, monkeypatch):
    """(backend, variant); the variant forced through PYOPS_NVFP4_LINEAR_VARIANT."""
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", request.param[1])
    return request.param


def operands(M, N, K, dtype=torch.bfloat16, bias=True, kind="randn"):
    x = make_input((M, K), dtype, kind)
    w = make_input((N, K), torch.float32, "outlier")
    qw = quantize_weight(w, "nvfp4")
    b = make_input((N,), dtype) if bias else None
    return x, qw, b


def assert_close(y, x, qw, bias, rel=2.0**-14, w_rel=0.0):
    """|y - ref| <= eps_out |ref| + (rel + w_rel) * (sum_k |x_k w_k| + |bias|), ref in fp64.
    w_rel: the "dequant" variant rounds each weight once to x's dtype."""
    w = qw.dequantize(torch.float32).double()
    xd = x.double().reshape(-1, x.shape[-1])
    want = xd @ w.t()
    scale = xd.abs() @ w.abs().t()
    if bias is not None:
        want, scale = want + bias.double(), scale + bias.double().abs()
    err = (y.double().reshape(want.shape) - want).abs()
    bound = EPS[y.dtype] * want.abs() + (rel + w_rel) * scale + 1e-30
    worst = float((err / bound).max())
    assert worst <= 1.0, f"error {worst:.2f}x the bound (max err {float(err.max()):.3g})"


def w_rel(variant, dtype):
    return EPS[dtype] if variant == "dequant" else 0.0


# ---- packing consumed correctly: a hand-built weight ---------------------------------------------
def hand_weight(K=40, N=3):
    """Codes c[n, k] = (n + k) % 16, scales by block, global 0.25: W known from the tables."""
    nb = (K + 15) // 16
    codes = torch.tensor([[(n + k) % 16 for k in range(nb * 16)] for n in range(N)],
                         dtype=torch.uint8)
    codes[:, K:] = 0  # padding of the last block
    data = codes[:, 0::2] | (codes[:, 1::2] << 4)
    vals = [0.5, 2.0, 448.0, 0.015625]
    sc = torch.tensor([[vals[(n + j) % 4] for j in range(nb)] for n in range(N)]
                      ).to(torch.float8_e4m3fn)
    g = torch.tensor([0.25])
    W = torch.zeros(N, K)
    for n in range(N):
        for k in range(K):
            c = int(codes[n, k])
            v = E2M1[c & 7] * (-1 if c & 8 else 1)
            W[n, k] = v * float(sc[n, k // 16]) * 0.25
    return NVFP4Weight(data, sc, g, K, torch.bfloat16), W


@pytest.mark.parametrize("backend,variant", [("reference", "fused"), ("reference", "dequant"),
                                             *W4A16_PATHS])
def test_hand_built_weight(small_tiles, monkeypatch, backend, variant):
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", variant)
    qw, W = hand_weight()
    assert torch.equal(qw.dequantize(torch.float32), W)
    # x = identity rows: y[k, n] = W[n, k]; every value is exact in bf16 (products <= 6 bits)
    x = torch.eye(40, dtype=torch.bfloat16)
    y = linear(x, qw, backend=backend)
    assert torch.equal(y.float(), W.t().to(torch.bfloat16).float())
    b = torch.arange(3, dtype=torch.float32)
    y = linear(x, qw, b, backend=backend)  # W + b is not exact in bf16: one rounding
    torch.testing.assert_close(y.float(), W.t() + b, rtol=2.0**-7, atol=0)


def test_linear_close_to_unquantized_fp32():
    x, qw, b = operands(64, 96, 256, torch.float32)
    w = make_input((96, 256), torch.float32)
    qw = quantize_weight(w, "nvfp4")
    y = linear(x, qw, b, backend="reference")
    want = x @ w.t() + b
    cos = torch.nn.functional.cosine_similarity(y.flatten(), want.flatten(), dim=0)
    assert 0.98 < cos < 0.9999  # NVFP4 weight error is visible, but small


# ---- Triton (interpreter on CPU) ----------------------------------------------------------------
@pytest.mark.parametrize("M,N,K", [(1, 16, 64), (17, 33, 100), (33, 17, 200)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backends_match_reference(small_tiles, path, M, N, K, bias, dtype):
    backend, variant = path
    x, qw, b = operands(M, N, K, dtype, bias)
    assert op.choose(x.device, backend, M, N, K, dtype) == path
    y = linear(x, qw, b, backend=backend)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close(y, x, qw, b, w_rel=w_rel(variant, dtype))


def test_split_k(monkeypatch):
    monkeypatch.setattr(tk, "FORCE_CONFIG", dict(SMALL, SPLIT_K=3))
    x, qw, b = operands(5, 40, 200, torch.bfloat16)
    assert_close(linear(x, qw, b, backend="triton"), x, qw, b)


def test_default_config_small_m_long_k():
    """Real config table (split-K) at decode M; K = 8192 drift check."""
    x, qw, _ = operands(3, 16, 8192, torch.bfloat16, bias=False)
    assert tk.pick_config(3, 16, 8192)["SPLIT_K"] > 1
    assert_close(linear(x, qw, None, backend="triton"), x, qw, None, rel=2.0**-16)


def test_3d_non_contiguous_and_fp8_input(small_tiles):
    x, qw, b = operands(18, 40, 72, torch.bfloat16)
    y = linear(x, qw, b, backend="triton")
    y3 = linear(x.view(2, 9, 72), qw, b, backend="triton")
    assert y3.shape == (2, 9, 40) and torch.equal(y3.reshape(18, 40), y)
    for how in ("transposed", "col_slice", "row_step"):
        assert torch.equal(linear(non_contiguous(x, how), qw, b, backend="triton"), y), how
    # an FP8Tensor input is dequantized (W4A16 takes high-precision activations)
    xt = pyops.quantize_fp8(x, "row")
    assert torch.equal(linear(xt, qw, b, backend="triton"),
                       linear(xt.dequantize(), qw, b, backend="triton"))


def test_opcheck():
    x, qw, b = operands(5, 16, 48, torch.bfloat16)
    for backend, variant in [("reference", "fused"), *W4A16_PATHS]:
        for bias in (b, None):
            torch.library.opcheck(
                torch.ops.pyops.nvfp4_linear.default,
                (x, qw.data, qw.scales.view(torch.uint8), qw.global_scale, 48, bias, backend,
                 variant),
                test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                            "test_aot_dispatch_dynamic"))


def test_compile_fullgraph():
    x, qw, b = operands(6, 32, 64, torch.bfloat16)
    f = torch.compile(lambda x: linear(x, qw, b, backend="reference"), fullgraph=True)
    assert torch.equal(f(x), linear(x, qw, b, backend="reference"))


def test_errors_and_weight_object():
    x, qw, b = operands(4, 16, 40, torch.bfloat16)
    with pytest.raises(ValueError, match="in_features is 40"):
        linear(x[:, :32], qw)
    with pytest.raises(TypeError, match="dtype"):
        linear(x.to(torch.int64), qw)
    with pytest.raises(ValueError, match="meta"):
        linear(x, qw.to("meta"))
    for backend in ("triton", "torch"):
        with pytest.raises(RuntimeError, match="bf16/fp16"):
            linear(x.float(), qw, backend=backend)
    assert linear(x.float(), qw).dtype == torch.float32  # auto: the reference
    with pytest.raises(ValueError, match="has no variant"):  # the op checks its pair
        op.nvfp4_linear_op(x, qw.data, qw.scales.view(torch.uint8), qw.global_scale, 40, None,
                           "triton", "dequant")
    nb = 3
    assert qw.nbytes == 16 * nb * 8 + 16 * nb + 4
    assert "NVFP4Weight(out_features=16, in_features=40" in repr(qw)
    again = NVFP4Weight.from_state_dict(qw.state_dict(), qw.metadata())
    assert again.K == 40 and torch.equal(again.dequantize(), qw.dequantize())


# ---- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 333, 4608])
@pytest.mark.parametrize("backend,var", W4A16_PATHS)
def test_gpu_vs_reference(monkeypatch, M, backend, var):
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", var)
    x, qw, b = operands(M, 3072, 3072 + 16, torch.bfloat16)
    y = linear(x, qw, b)  # the forced variant names the backend
    assert torch.equal(y, linear(x, qw, b, backend=backend))
    assert_close(y, x, qw, b, rel=2.0**-12, w_rel=w_rel(var, torch.bfloat16))


@pytest.mark.gpu
def test_gpu_large_m():
    x, qw, b = operands(32760, 5120, 5120, torch.bfloat16)
    assert_close(linear(x, qw, b), x, qw, b, rel=2.0**-12, w_rel=EPS[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("M", [8, 2048])
def test_gpu_compile_and_cuda_graph(M):
    x, qw, b = operands(M, 1024, 1024, torch.bfloat16)
    f = torch.compile(lambda x: linear(x, qw, b), fullgraph=True)
    assert torch.equal(f(x), linear(x, qw, b))
    static_x = x.clone()
    g, static_y = capture_graph(lambda xx: linear(xx, qw, b), static_x)
    for _ in range(2):
        new = make_input(x.shape, torch.bfloat16)
        static_x.copy_(new)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, linear(new, qw, b))


# ---- W4A4 (Blackwell native NVFP4; the GEMM itself is unverified on hardware) -------------------
# CPU: the reference's accuracy, the exact _scaled_mm argument preparation, and the whole variant
# with torch._scaled_mm replaced by an emulation of its documented math (CPU _scaled_mm rejects
# float4). GPU (sm_100/103/120/121 only): the real call against the reference.
from pyops.reference import nvfp4_linear as ref_lin  # noqa: E402
from pyops.reference.quantize_nvfp4 import swizzle_scales  # noqa: E402

NATIVE = HAS_CUDA and _backend.native_fp4(torch.device("cuda"))


def sqnr_db(y, want):
    return float(20 * torch.log10(want.norm() / (y - want).norm()))


def w4a4_operands(M, N, K, kind="randn", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if kind == "outlier":
        x[:, : max(1, K // 64)] *= 30.0
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    return x, w, quantize_weight(w, "nvfp4"), b


def _spec_unswizzle(sw: torch.Tensor, rows: int, nb: int) -> torch.Tensor:
    """Independent of the quantizer: scale (r, c) sits in 128x4 tile (r // 128, c // 4), tiles
    row-block-major with the K-block fastest, at (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4."""
    flat = sw.contiguous().view(torch.uint8).reshape(-1)
    tiles_k = sw.shape[1] // 4
    out = torch.empty(rows, nb, dtype=torch.uint8)
    for r in range(rows):
        for c in range(nb):
            t = (r // 128) * tiles_k + c // 4
            out[r, c] = flat[t * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4]
    return out.view(torch.float8_e4m3fn)


def _spec_decode_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (R, C) -> fp32 (R, 2C): element 2i in the low nibble; bit 3 the sign."""
    lut = torch.tensor(E2M1 + [-v for v in E2M1])
    lo, hi = (packed & 0xF).long(), (packed >> 4).long()
    return torch.stack((lut[lo], lut[hi]), dim=-1).reshape(packed.shape[0], -1)


def emulated_scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None,
                       use_fast_accum=False):
    """torch._scaled_mm's NVFP4 math, with its argument checks (pytorch ScaledBlas.cpp)."""
    f4 = torch.float4_e2m1fn_x2
    assert a.dtype == f4 and b.dtype == f4
    assert scale_a.dtype == torch.float8_e4m3fn and scale_b.dtype == torch.float8_e4m3fn
    assert scale_a.is_contiguous() and scale_b.is_contiguous()
    assert bias is None and scale_result is None and not use_fast_accum
    M, kb = a.shape
    kb2, N = b.shape
    assert kb == kb2 and kb % 16 == 0 and N % 16 == 0 and a.stride(1) == 1 and b.stride(0) == 1
    nb = kb * 2 // 16
    rup = lambda v, m: (v + m - 1) // m * m  # noqa: E731
    assert scale_a.numel() == rup(M, 128) * rup(nb, 4)
    assert scale_b.numel() == rup(N, 128) * rup(nb, 4)
    sa = _spec_unswizzle(scale_a, M, nb).float().repeat_interleave(16, dim=1)
    sb = _spec_unswizzle(scale_b, N, nb).float().repeat_interleave(16, dim=1)
    av = _spec_decode_fp4(a.view(torch.uint8)) * sa
    bv = _spec_decode_fp4(b.t().contiguous().view(torch.uint8)) * sb
    return (av.double() @ bv.double().t()).to(out_dtype or torch.bfloat16)


def test_w4a4_reference_accuracy_vs_fp32():
    """NVFP4 activations cost ~3 dB against W4A16: ~17.5 dB SQNR, cos ~0.991 on normal data.
    A global scale applied twice or dropped, or scales read through the wrong layout, fail."""
    for kind, (M, N, K) in [("randn", (64, 96, 256)), ("outlier", (130, 48, 200))]:
        x, w, qw, b = w4a4_operands(M, N, K, kind)
        want = x @ w.t() + b
        y = ref_lin.nvfp4_linear_w4a4(x, qw.data, qw.scales, qw.global_scale, K, b, torch.float32)
        y16 = ref_lin.nvfp4_linear(x, qw.data, qw.scales, qw.global_scale, K, b, torch.float32)
        cos = float(torch.nn.functional.cosine_similarity(y.flatten(), want.flatten(), dim=0))
        s, s16 = sqnr_db(y, want), sqnr_db(y16, want)
        assert 16.0 < s < s16 - 1.0, (kind, s, s16)  # activations visibly quantized, not worse
        assert 0.985 < cos < 0.998, (kind, cos)
        # the thresholds catch the classic mistakes
        g2 = qw.global_scale * qw.global_scale
        bad_g = ref_lin.nvfp4_linear_w4a4(x, qw.data, qw.scales, g2, K, b, torch.float32)
        assert sqnr_db(bad_g, want) < 5.0
        sw = qw.swizzled_scales()
        wrong = ref_lin.nvfp4_linear_w4a4(x, qw.data, sw[:N, : qw.scales.shape[1]].contiguous(),
                                          qw.global_scale, K, b, torch.float32)
        assert sqnr_db(wrong, want) < 16.0  # fails the bound above
        # the swizzled-scale entry is the same function
        again = ref_lin.nvfp4_linear_w4a4(x, qw.data, sw, qw.global_scale, K, b, torch.float32,
                                          scales_swizzled=True)
        assert torch.equal(again, y)


@pytest.mark.parametrize("M,N,K", [(5, 48, 64), (130, 40, 200), (1, 16, 32), (129, 130, 520)])
def test_w4a4_prepare_args_exact(M, N, K):
    x, _, qw, _ = w4a4_operands(M, N, K)
    nb = (K + 15) // 16
    xt = pyops.quantize_nvfp4(x, swizzle=True, backend="reference")
    args = op.prepare_w4a4_args(xt.data, xt.scales, xt.global_scale, qw.data,
                                qw.swizzled_scales(), qw.global_scale, K)
    # the activation, as the reference quantizer gives it unswizzled
    from pyops.reference import quantize_nvfp4 as rq
    d, s, g = rq.quantize_nvfp4(x)
    kb = (nb + 1) // 2 * 16
    n16 = (N + 15) // 16 * 16
    f4 = torch.float4_e2m1fn_x2
    a, b = args["a"], args["b"]
    assert a.dtype == f4 and b.dtype == f4 and args["N"] == N
    assert a.shape == (M, kb) and a.is_contiguous()
    assert b.shape == (kb, n16) and b.stride() == (1, kb)  # column-major view of weight rows
    au, bu = a.view(torch.uint8), b.t().contiguous().view(torch.uint8)
    assert torch.equal(au[:, : nb * 8], d) and not au[:, nb * 8:].any()
    assert torch.equal(bu[:N, : nb * 8], qw.data) and not bu[:N, nb * 8:].any()
    assert not bu[N:].any()
    assert_bits_equal(args["scale_a"], swizzle_scales(s), "scale_a")
    assert_bits_equal(args["scale_b"], swizzle_scales(qw.scales), "scale_b")
    assert_bits_equal(args["scale_a"], swizzle_scales(_spec_unswizzle(args["scale_a"], M, nb)))
    assert args["scale_a"].is_contiguous() and args["scale_b"].is_contiguous()
    assert args["alpha"].dtype == torch.float32 and args["alpha"].dim() == 0
    assert_bits_equal(args["alpha"].reshape(1), (g * qw.global_scale).reshape(1), "alpha")
    # torch._scaled_mm's element-count rule (ScaledBlas.cpp) with K = 2 * a.shape[1]
    rup = lambda v, m: (v + m - 1) // m * m  # noqa: E731
    assert args["scale_a"].numel() == rup(M, 128) * rup(a.shape[1] * 2 // 16, 4)
    assert args["scale_b"].numel() == rup(b.shape[1], 128) * rup(b.shape[0] * 2 // 16, 4)
    with pytest.raises(ValueError, match="swizzled"):
        op.prepare_w4a4_args(xt.data, xt.scales, xt.global_scale, qw.data, qw.scales,
                             qw.global_scale, K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_w4a4_variant_emulated_end_to_end(monkeypatch, dtype, bias):
    """Backend "torch", variant "w4a4", on CPU: per-call activation quantization, argument
    preparation, torch._scaled_mm replaced by its emulation, the Triton epilogue (interpreter)."""
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "w4a4")
    monkeypatch.setattr(_backend, "native_fp4_status", lambda device: (True, "pretend sm_100"))
    monkeypatch.setattr(torch, "_scaled_mm", emulated_scaled_mm)
    M, N, K = 37, 40, 200
    x, _, qw, b = w4a4_operands(M, N, K, "outlier", seed=3)
    x, b = x.to(dtype), (b.to(dtype) if bias else None)
    assert op.choose(x.device, None, M, N, K, dtype) == ("torch", "w4a4")
    y = linear(x, qw, b, backend="torch")
    assert y.shape == (M, N) and y.dtype == dtype
    want = ref_lin.nvfp4_linear_w4a4(x, qw.data, qw.scales, qw.global_scale, K, b, torch.float64)
    # acc rounded to the GEMM's output dtype (bf16 for bf16, fp32 for fp16), then y once more;
    # fp32 summation order (the reference's) relative to sum |xq_k wq_k|
    xq = pyops.quantize_nvfp4(x, backend="reference").dequantize(torch.float32).double()
    sabs = xq.abs() @ qw.dequantize(torch.float32).double().abs().t()
    babs = b.double().abs() if bias else 0.0
    eps = EPS[dtype] / 2
    tol = eps * want.abs() + (eps if dtype == torch.bfloat16 else 0.0) * (want.abs() + babs) \
        + 2.0**-16 * sabs
    assert ((y.double() - want).abs() <= tol).all()
    y_ref = linear(x, qw, b, backend="reference")  # same variant, reference backend
    assert ((y_ref.double() - want).abs() <= eps * want.abs() + 2.0**-16 * sabs).all()


def test_w4a4_epilogue_exact():
    g = torch.Generator().manual_seed(1)
    acc = torch.randn(9, 48, generator=g).to(torch.bfloat16)
    alpha = torch.tensor(3.0e-5 * (1 + 2.0**-20))  # not representable in bf16
    bias = torch.randn(40, generator=g).to(torch.bfloat16)
    for bb in (bias, None):
        out = torch.empty(9, 40, dtype=torch.bfloat16)
        op.w4a4_epilogue(acc, alpha, bb, out)
        want = acc[:, :40].float() * alpha
        if bb is not None:
            want = want + bb.float()
        assert_bits_equal(out, want.to(torch.bfloat16), "epilogue")


def fake_capability(monkeypatch, cap):
    """Every capability query of the policy code answers ``cap`` (no CUDA needed); the native
    NVFP4 check sees a real device (not the Triton interpreter), knobs unset."""
    def query(device):
        assert torch.device(device).type == "cuda", device
        return cap
    monkeypatch.setattr(_backend, "device_capability", query)
    monkeypatch.setattr(_backend, "triton_interpret", lambda: False)
    for var in ("PYOPS_NVFP4_LINEAR_VARIANT", "PYOPS_NVFP4_NATIVE", "PYOPS_BACKEND",
                "PYOPS_BACKEND_NVFP4_LINEAR"):
        monkeypatch.delenv(var, raising=False)


CUDA0 = torch.device("cuda", 0)
BF16 = torch.bfloat16


def test_w4a4_variant_selection(monkeypatch):
    monkeypatch.delenv("PYOPS_NVFP4_LINEAR_VARIANT", raising=False)
    assert op.choose(torch.device("cpu"), None, 4608, 3072, 3072, BF16) == ("reference", "fused")
    for cap, want in [((9, 0), False), ((8, 9), False), ((10, 0), True), ((10, 3), True),
                      ((12, 0), True), ((12, 1), True), ((11, 0), False)]:
        fake_capability(monkeypatch, cap)
        assert _backend.native_fp4(CUDA0) is want, cap
        for M in (1, 4608):
            assert (op.choose(CUDA0, None, M, 3072, 3072, BF16) == ("torch", "w4a4")) is want, \
                (cap, M)
            if want:
                assert op.auto_backend(cap, M, 3072, 3072, native=True) == "torch"
    fake_capability(monkeypatch, (10, 0))  # PYOPS_NVFP4_NATIVE=0 turns W4A4 off, as elsewhere
    monkeypatch.setenv("PYOPS_NVFP4_NATIVE", "0")
    ok, why = _backend.native_fp4_status(CUDA0)
    assert not ok and "PYOPS_NVFP4_NATIVE" in why
    assert op.choose(CUDA0, None, 4608, 3072, 3072, BF16) == ("torch", "dequant")
    assert op.choose(CUDA0, None, 8, 3072, 3072, BF16) == ("triton", "fused")  # unmeasured rule
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "w4a4")
    with pytest.raises(RuntimeError, match="PYOPS_NVFP4_NATIVE"):  # w4a4 forced, cannot run
        op.choose(CUDA0, None, 4608, 3072, 3072, BF16)
    monkeypatch.delenv("PYOPS_NVFP4_NATIVE")
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "fused")  # the override wins
    assert op.choose(CUDA0, None, 4608, 3072, 3072, BF16) == ("triton", "fused")
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "dequant")
    assert op.choose(CUDA0, None, 4608, 3072, 3072, BF16) == ("torch", "dequant")


def test_variant_knob_and_backend_names(monkeypatch):
    """PYOPS_NVFP4_LINEAR_VARIANT names the backend (fused -> triton, dequant/w4a4 -> torch); an
    explicit backend that contradicts it, an unknown value and the retired "cuda" name raise."""
    fake_capability(monkeypatch, (9, 0))
    for var, backend in [("fused", "triton"), ("dequant", "torch"), ("auto", None)]:
        monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", var)
        got = op.choose(CUDA0, None, 4608, 3072, 3072, BF16)
        assert got == ((backend, var) if backend else ("torch", "dequant")), var
        assert op.choose(CUDA0, "reference", 4608, 3072, 3072, BF16)[0] == "reference"
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "fused")
    with pytest.raises(ValueError, match="runs on backend 'triton'"):
        op.choose(CUDA0, "torch", 4608, 3072, 3072, BF16)
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "w4a4")
    with pytest.raises(ValueError, match="runs on backend 'torch'"):
        op.choose(CUDA0, "triton", 4608, 3072, 3072, BF16)
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "dequnt")
    with pytest.raises(ValueError, match="dequnt"):
        op.choose(CUDA0, None, 4608, 3072, 3072, BF16)
    monkeypatch.delenv("PYOPS_NVFP4_LINEAR_VARIANT")
    with pytest.raises(RuntimeError, match="'torch'"):
        op.choose(CUDA0, "cuda", 4608, 3072, 3072, BF16)
    # fp32 activations: auto falls back to the reference; the kernels say why they cannot run
    assert op.choose(CUDA0, None, 4608, 3072, 3072, torch.float32) == ("reference", "fused")
    assert "bf16/fp16" in _backend.available(op.OP, "torch", CUDA0, dtype=torch.float32)[1]
    # without shape keywords (pyops.info()) the policy answers, and the registry prints it
    assert _backend.resolve(op.OP, CUDA0) == "torch" and "H200" in _backend.policy(op.OP)


@pytest.mark.parametrize("var", ["fused", "dequant", "w4a4"])
def test_variant_knob_never_breaks_what_cannot_take_it(monkeypatch, var):
    """The knob is a GPU tuning preference: CPU tensors (no interpreter) and fp32 activations
    keep running the reference with it set, as they did before the backend names changed."""
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", var)
    monkeypatch.delenv("PYOPS_BACKEND", raising=False)
    monkeypatch.delenv("PYOPS_BACKEND_NVFP4_LINEAR", raising=False)
    monkeypatch.setattr(_backend, "triton_interpret", lambda: False)
    cpu = torch.device("cpu")
    assert op.choose(cpu, None, 64, 48, 32, BF16)[0] == "reference"
    fake_capability(monkeypatch, (9, 0))
    assert op.choose(CUDA0, None, 64, 48, 32, torch.float32)[0] == "reference"
    x = torch.randn(64, 32, dtype=BF16)
    qw = pyops.quantize_weight(torch.randn(48, 32), "nvfp4", swizzle_scales=var == "w4a4")
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", var)
    y = pyops.linear(x, qw)
    monkeypatch.delenv("PYOPS_NVFP4_LINEAR_VARIANT")
    assert torch.equal(y, pyops.linear(x, qw))  # not applied: the same W4A16 spec as without it


# The H200 measurement (bench/RESULTS.md, section 1, "Linear" table, x bf16):
# (M, K, N): (fused, dequant). Copied here so the test checks the policy against the data, not
# against itself. fused = backend "triton", dequant = backend "torch" (variant dequant).
H200_VARIANTS = {
    (4608, 3072, 3072): (0.17, 0.88), (4608, 3072, 12288): (0.17, 0.86),
    (4608, 12288, 3072): (0.17, 1.00), (4608, 3072, 15360): (0.17, 0.95),
    (4608, 15360, 3072): (0.16, 0.95), (9216, 3072, 3072): (0.18, 0.95),
    (9216, 3072, 12288): (0.20, 0.99), (9216, 12288, 3072): (0.16, 0.97),
    (1, 3072, 3072): (0.25, 0.12), (1, 3072, 12288): (0.48, 0.44),
    (1, 12288, 3072): (0.22, 0.33), (16, 3072, 3072): (0.20, 0.33),
}


def measured_winner(M, K, N):
    fused, dequant = H200_VARIANTS[(M, K, N)]
    return ("triton", "fused") if fused > dequant else ("torch", "dequant")


@pytest.mark.parametrize("M,K,N", sorted(H200_VARIANTS))
def test_sm90_policy_picks_the_measured_winner(monkeypatch, M, K, N):
    """On sm_90 auto picks the (backend, variant) that measured faster on the H200 at that shape
    (before the measurement, M < 1024 always took "fused": wrong at (1, 12288, 3072) and (16,
    3072, 3072))."""
    winner = measured_winner(M, K, N)
    assert op.auto_backend((9, 0), M, N, K) == winner[0]
    fake_capability(monkeypatch, (9, 0))
    assert op.choose(CUDA0, None, M, N, K, BF16) == winner  # pyops.linear's path


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", sorted(H200_VARIANTS))
def test_gpu_sm90_auto_runs_the_measured_winner(monkeypatch, M, K, N):
    """On a real sm_90 device, pyops.linear's auto mode runs the measured winner (bit-equal to
    that (backend, variant) called directly)."""
    if tuple(torch.cuda.get_device_capability()) != (9, 0):
        pytest.skip("the measured policy is sm_90's")
    for var in ("PYOPS_NVFP4_LINEAR_VARIANT", "PYOPS_BACKEND", "PYOPS_BACKEND_NVFP4_LINEAR"):
        monkeypatch.delenv(var, raising=False)
    backend, variant = measured_winner(M, K, N)
    x, qw, b = operands(M, N, K, torch.bfloat16)
    want = op.nvfp4_linear_op(x, qw.data, qw.scales.view(torch.uint8), qw.global_scale, K, b,
                              backend, variant)
    assert torch.equal(linear(x, qw, b), want)


def test_policy_other_capabilities_unchanged(monkeypatch):
    """Unmeasured capabilities keep the previous rule (fused below M = 1024, dequant above); the
    CPU takes the reference; native-FP4 devices take torch w4a4."""
    shapes = [(1, 3072, 12288), (16, 3072, 3072), (1023, 3072, 3072), (1024, 3072, 3072),
              (4608, 12288, 3072)]
    for M, K, N in shapes:
        want = ("triton", "fused") if M < 1024 else ("torch", "dequant")
        for cap in [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0)]:
            assert op.auto_backend(cap, M, N, K) == want[0], (cap, M, K, N)
        monkeypatch.delenv("PYOPS_NVFP4_LINEAR_VARIANT", raising=False)
        assert op.choose(torch.device("cpu"), None, M, N, K, BF16) == ("reference", "fused")
        for cap in [(8, 0), (8, 9)]:
            fake_capability(monkeypatch, cap)
            assert op.choose(CUDA0, None, M, N, K, BF16) == want, cap
        if hasattr(torch, "float4_e2m1fn_x2"):
            fake_capability(monkeypatch, (12, 0))
            assert op.choose(CUDA0, None, M, N, K, BF16) == ("torch", "w4a4")


def test_policy_explicit_request_wins(monkeypatch):
    """A forced variant and an explicit backend beat the sm_90 policy."""
    fake_capability(monkeypatch, (9, 0))
    for M, K, N in [(1, 12288, 3072), (16, 3072, 3072), (4608, 3072, 3072), (1, 3072, 3072)]:
        for backend, var in W4A16_PATHS:
            monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", var)
            assert op.choose(CUDA0, None, M, N, K, BF16) == (backend, var)
        monkeypatch.delenv("PYOPS_NVFP4_LINEAR_VARIANT")
        for backend, var in W4A16_PATHS:
            assert op.choose(CUDA0, backend, M, N, K, BF16) == (backend, var)
    assert op.choose(CUDA0, "reference", 1, 3072, 3072, BF16)[0] == "reference"
    monkeypatch.setenv("PYOPS_BACKEND_NVFP4_LINEAR", "reference")
    assert op.choose(CUDA0, None, 1, 3072, 3072, BF16)[0] == "reference"


def test_w4a4_forced_without_native_fp4(monkeypatch):
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "w4a4")
    x, _, qw, b = w4a4_operands(4, 32, 64)
    for backend in ("torch", None):
        with pytest.raises(RuntimeError, match="sm_100"):
            linear(x.to(torch.bfloat16), qw, b.to(torch.bfloat16), backend=backend)
    y = linear(x, qw, b, backend="reference")  # the reference of the forced variant
    want = ref_lin.nvfp4_linear_w4a4(x, qw.data, qw.scales, qw.global_scale, 64, b,
                                     torch.float32)
    assert torch.equal(y, want)


def test_w4a4_swizzled_scales_cached():
    _, _, qw, _ = w4a4_operands(3, 40, 72)
    sw = qw.swizzled_scales()
    assert sw is qw.swizzled_scales() and sw.dtype == torch.float8_e4m3fn
    assert_bits_equal(sw, swizzle_scales(qw.scales))
    other = NVFP4Weight(qw.data, qw.scales, qw.global_scale, qw.K)  # as QuantLinear.qweight
    assert other.swizzled_scales() is sw
    qw.scales.view(torch.uint8)[0, 0] ^= 1  # in-place update: version bump -> rebuilt
    fresh = NVFP4Weight(qw.data, qw.scales, qw.global_scale, qw.K).swizzled_scales()
    assert fresh is not sw and torch.equal(fresh.view(torch.uint8),
                                           swizzle_scales(qw.scales).view(torch.uint8))
    assert quantize_weight(torch.randn(16, 32), "nvfp4", swizzle_scales=True)._scales_swizzled \
        is not None
    assert quantize_weight(torch.randn(16, 32), "nvfp4")._scales_swizzled is None  # CPU


def test_w4a4_opcheck():
    x, _, qw, b = w4a4_operands(5, 16, 48)
    x, b = x.to(torch.bfloat16), b.to(torch.bfloat16)
    for bias in (b, None):
        torch.library.opcheck(
            torch.ops.pyops.nvfp4_linear.default,
            (x, qw.data, qw.swizzled_scales().view(torch.uint8), qw.global_scale, 48, bias,
             "reference", "w4a4"),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                        "test_aot_dispatch_dynamic"))


@pytest.mark.gpu
@pytest.mark.skipif(not NATIVE, reason="needs native NVFP4 (sm_100/103/120/121)")
@pytest.mark.parametrize("M,N,K", [(1, 3072, 3072), (333, 3072, 3088), (4608, 3072, 3072),
                                   (64, 40, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_w4a4_vs_reference(monkeypatch, M, N, K, dtype):
    monkeypatch.delenv("PYOPS_NVFP4_LINEAR_VARIANT", raising=False)
    assert op.choose(torch.device("cuda"), None, M, N, K, dtype) == ("torch", "w4a4")
    x, _, qw, b = w4a4_operands(M, N, K, "outlier")
    x, b = x.to(dtype).cuda(), b.to(dtype).cuda()
    qw = quantize_weight(qw.dequantize(torch.float32).cuda(), "nvfp4")
    assert qw._scales_swizzled is not None  # built at quantize time on a native device
    y = linear(x, qw, b)
    want = ref_lin.nvfp4_linear_w4a4(x.cpu(), qw.data.cpu(), qw.scales.cpu(),
                                     qw.global_scale.cpu(), K, b.cpu(), torch.float64)
    xq = pyops.quantize_nvfp4(x.cpu(), backend="reference").dequantize(torch.float32).double()
    scale = xq.abs() @ qw.dequantize(torch.float32).cpu().double().abs().t() \
        + b.cpu().double().abs()
    err = (y.cpu().double() - want).abs()
    assert (err <= 2.0**-7 * want.abs() + 2.0**-12 * scale).all(), float(err.max())


@pytest.mark.gpu
@pytest.mark.skipif(not NATIVE, reason="needs native NVFP4 (sm_100/103/120/121)")
def test_gpu_w4a4_compile_and_cuda_graph():
    x, _, qw, b = w4a4_operands(256, 1024, 1024)
    x, b = x.to(torch.bfloat16).cuda(), b.to(torch.bfloat16).cuda()
    qw = quantize_weight(qw.dequantize(torch.float32).cuda(), "nvfp4")
    f = torch.compile(lambda x: linear(x, qw, b), fullgraph=True)
    assert torch.equal(f(x), linear(x, qw, b))
    static_x = x.clone()
    g, static_y = capture_graph(lambda xx: linear(xx, qw, b), static_x)
    new = torch.randn_like(x)
    static_x.copy_(new)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, linear(new, qw, b))

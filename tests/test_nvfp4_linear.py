"""pyops.linear with NVFP4 weights (W4A16): fused Triton kernel, dequantize + GEMM, reference.

The packing is checked on a hand-built weight with known codes and scales (independent of the
quantizer); the kernels against the fp32 reference with an error bound scaled by
sum_k |x_k w_k|.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops.qlinear import NVFP4Weight, linear, quantize_weight
from pyops.ops import nvfp4_linear as op
from pyops.triton_kernels import nvfp4_linear as tk

from _util import HAS_CUDA, make_input, non_contiguous

SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-20}
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.fixture
def small_tiles(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setattr(tk, "FORCE_CONFIG", SMALL)


@pytest.fixture(params=["fused", "dequant"])
def variant(request, monkeypatch):
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", request.param)
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


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hand_built_weight(small_tiles, variant, backend):
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
def test_triton_matches_reference(small_tiles, variant, M, N, K, bias, dtype):
    x, qw, b = operands(M, N, K, dtype, bias)
    y = linear(x, qw, b, backend="triton")
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
    for backend in ("reference", "triton"):
        for bias in (b, None):
            torch.library.opcheck(
                torch.ops.pyops.nvfp4_linear.default,
                (x, qw.data, qw.scales.view(torch.uint8), qw.global_scale, 48, bias, backend,
                 "fused"),
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
    with pytest.raises(RuntimeError, match="bf16/fp16"):
        linear(x.float(), qw, backend="triton")
    nb = 3
    assert qw.nbytes == 16 * nb * 8 + 16 * nb + 4
    assert "NVFP4Weight(out_features=16, in_features=40" in repr(qw)
    again = NVFP4Weight.from_state_dict(qw.state_dict(), qw.metadata())
    assert again.K == 40 and torch.equal(again.dequantize(), qw.dequantize())


# ---- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 333, 4608])
@pytest.mark.parametrize("var", ["fused", "dequant"])
def test_gpu_vs_reference(monkeypatch, M, var):
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", var)
    x, qw, b = operands(M, 3072, 3072 + 16, torch.bfloat16)
    assert_close(linear(x, qw, b), x, qw, b, rel=2.0**-12, w_rel=w_rel(var, torch.bfloat16))


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
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        linear(static_x, qw, b)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = linear(static_x, qw, b)
    for _ in range(2):
        new = make_input(x.shape, torch.bfloat16)
        static_x.copy_(new)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, linear(new, qw, b))

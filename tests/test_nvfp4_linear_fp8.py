"""nvfp4_linear's variant "fp8": an NVFP4 weight re-encoded as FP8 per call, then the row-wise
FP8 GEMM (x quantized per token). Spec: the chain of references (nvfp4_to_fp8, quantize_fp8
row, fp8_linear). Opt-in (PYOPS_NVFP4_LINEAR_VARIANT=fp8 or the op's variant argument): auto
mode never picks it until a GPU has measured it.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops import _backend
from pyops.ops import nvfp4_linear as op
from pyops.reference import fp8_linear as ref8
from pyops.reference import nvfp4_to_fp8 as ref_conv
from pyops.reference import quantize_fp8 as ref_q8

from _util import HAS_CUDA, capture_graph, make_input

CUDA0 = torch.device("cuda", 0)
BF16 = torch.bfloat16


def operands(M, N, K, dtype=BF16, bias=True, kind="randn"):
    x = make_input((M, K), dtype, kind)
    qw = pyops.quantize_weight(make_input((N, K), torch.float32), "nvfp4")
    b = make_input((N,), torch.float32) if bias else None
    return x, qw, b


def call(x, qw, b, backend, variant="fp8"):
    return op.nvfp4_linear_op(x, qw.data, qw.scales.view(torch.uint8), qw.global_scale,
                              qw.shape[1], b, backend, variant)


def chain(x, qw, b):
    """fp64 of the spec's chain: the FP8 weight and FP8 activations, dequantized and multiplied."""
    wq, ws = ref_conv.nvfp4_to_fp8(qw.data.cpu(), qw.scales.view(torch.uint8).cpu(),
                                   qw.global_scale.cpu(), qw.shape[1])
    xq, xs = ref_q8.quantize_fp8(x.cpu(), "row")
    xd = xq.double() * xs.double().reshape(-1, 1)
    wd = wq.double() * ws.double().reshape(-1, 1)
    y = xd @ wd.t()
    return (y + b.cpu().double()) if b is not None else y, xd.abs() @ wd.abs().t()


@pytest.mark.parametrize("M,N,K", [(5, 48, 160), (17, 32, 100), (1, 16, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_is_the_chain(M, N, K, bias):
    x, qw, b = operands(M, N, K, bias=bias, kind="outlier")
    y = call(x.cpu(), qw.to("cpu"), None if b is None else b.cpu(), "reference")
    want, scale = chain(x, qw, b)
    err = (y.double() - want).abs()
    assert float((err / (2.0**-8 * want.abs() + 2.0**-20 * scale + 1e-30)).max()) <= 1.0
    xq, xs = ref_q8.quantize_fp8(x.cpu(), "row")
    wq, ws = ref_conv.nvfp4_to_fp8(qw.data.cpu(), qw.scales.view(torch.uint8).cpu(),
                                   qw.global_scale.cpu(), K)
    direct = ref8.fp8_linear(xq, xs.reshape(-1), wq, ws, None if b is None else b.cpu(), BF16)
    assert torch.equal(y, direct)


def test_close_to_w4a16():
    """The FP8 chain stays close to the W4A16 spec (FP8 activations + the weight's re-encoding)."""
    x, qw, b = operands(32, 64, 512)
    y = call(x.cpu(), qw.to("cpu"), b.cpu(), "reference").double()
    w4a16 = call(x.cpu(), qw.to("cpu"), b.cpu(), "reference", "fused").double()
    rel = float((y - w4a16).norm() / w4a16.norm())
    assert rel < 0.05, rel


def test_torch_path_on_cpu_scaled_mm(monkeypatch):
    """The torch backend's chain (conversion and quantizer by auto mode: the references on CPU
    tensors; then torch._scaled_mm where this torch has it on CPU) against the reference chain."""
    x, qw, b = operands(5, 48, 160)
    out = torch.empty(5, 48, dtype=BF16)
    try:
        op._fp8(x.cpu(), qw.data.cpu(), qw.scales.view(torch.uint8).cpu(),
                qw.global_scale.cpu(), 160, b.cpu(), out)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no CPU torch._scaled_mm here: {e}")
    want, scale = chain(x, qw, b)
    err = (out.double() - want).abs()
    # _scaled_mm takes the bias in bf16 (one extra rounding of the bias, as in fp8_linear)
    bound = 2.0**-8 * want.abs() + 2.0**-16 * scale + 2.0**-8 * b.double().abs() + 1e-30
    assert float((err / bound).max()) <= 1.0


def fake_capability(monkeypatch, cap):
    monkeypatch.setattr(_backend, "device_capability", lambda device: cap)
    monkeypatch.setattr(_backend, "triton_interpret", lambda: False)
    monkeypatch.setattr(_backend, "triton_runs", lambda device: (True, "fake"))
    for var in ("PYOPS_NVFP4_LINEAR_VARIANT", "PYOPS_NVFP4_NATIVE", "PYOPS_BACKEND",
                "PYOPS_BACKEND_NVFP4_LINEAR"):
        monkeypatch.delenv(var, raising=False)


def test_opt_in_only_and_availability(monkeypatch):
    fake_capability(monkeypatch, (9, 0))
    for M in (1, 16, 4608, 32760):  # auto never picks it (unmeasured)
        assert op.choose(CUDA0, None, M, 3072, 3072, BF16)[1] != "fp8"
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "fp8")
    assert op.choose(CUDA0, None, 4608, 3072, 3072, BF16) == ("torch", "fp8")
    with pytest.raises(RuntimeError, match="bf16"):  # _scaled_mm row-wise writes bf16 only
        op.choose(CUDA0, None, 4608, 3072, 3072, torch.float16)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        op.choose(CUDA0, None, 4608, 3000, 3072, BF16)
    with pytest.raises(ValueError, match="runs on backend 'torch'"):
        op.choose(CUDA0, "triton", 4608, 3072, 3072, BF16)
    fake_capability(monkeypatch, (8, 9))
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "fp8")
    with pytest.raises(RuntimeError, match="sm_90"):
        op.choose(CUDA0, None, 4608, 3072, 3072, BF16)


def test_bad_variant_name_for_backend():
    x, qw, b = operands(2, 16, 32)
    with pytest.raises(ValueError, match="fp8"):
        call(x, qw, b, "triton", "fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(4608, 3072, 3072), (64, 3072, 12288), (333, 160, 4112)])
def test_gpu_fp8_variant_vs_reference(M, N, K):
    x, qw, b = operands(M, N, K, kind="outlier")
    y = call(x, qw, b, "torch")
    want, scale = chain(x, qw, b)
    err = (y.cpu().double() - want).abs()
    bound = 2.0**-8 * want.abs() + 2.0**-14 * scale + 2.0**-8 * b.cpu().double().abs() + 1e-30
    assert float((err / bound).max()) <= 1.0


@pytest.mark.gpu
def test_gpu_fp8_variant_compile_and_graph(monkeypatch):
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "fp8")
    x, qw, b = operands(512, 1024, 1024)
    f = torch.compile(lambda x: pyops.linear(x, qw, b), fullgraph=True)
    assert torch.equal(f(x), pyops.linear(x, qw, b))
    static_x = x.clone()
    g, static_y = capture_graph(lambda xx: pyops.linear(xx, qw, b), static_x)
    new = make_input(x.shape, BF16)
    static_x.copy_(new)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, pyops.linear(new, qw, b))


def test_prequantized_fp8_input_skips_the_requantization(monkeypatch):
    """pyops.linear(FP8Tensor, NVFP4Weight) with the fp8 variant feeds x's codes to the FP8 GEMM
    as they are; other variants dequantize x (W4A16), as before."""
    x, qw, b = operands(6, 32, 64)
    t = pyops.quantize_fp8(x, "row", backend="reference")
    xq, xs = t.data.reshape(6, 64), t.scale.reshape(6)
    wq, ws = ref_conv.nvfp4_to_fp8(qw.data, qw.scales.view(torch.uint8), qw.global_scale, 64)
    monkeypatch.setenv("PYOPS_NVFP4_LINEAR_VARIANT", "fp8")
    y = pyops.linear(t, qw, b, backend="reference")
    assert torch.equal(y, ref8.fp8_linear(xq, xs, wq, ws, b, BF16))
    t3 = pyops.quantize_fp8(x.reshape(2, 3, 64), "row", backend="reference")
    assert torch.equal(pyops.linear(t3, qw, b, backend="reference").reshape(6, 32), y)
    monkeypatch.delenv("PYOPS_NVFP4_LINEAR_VARIANT")
    w4a16 = pyops.linear(t, qw, b, backend="reference")
    assert torch.equal(w4a16, pyops.linear(t.dequantize(), qw, b, backend="reference"))
    assert not torch.equal(w4a16, y)

"""pyops.linear: ``x @ W.T + bias`` with a quantized weight (dispatch by the weight's format)."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .._checks import check_same_device, check_tensor, eager_fast_path
from . import fp8_linear as _fp8
from . import nvfp4_linear as _nv4
from .quantize_fp8 import FP8Tensor, quantize_fp8
from ..weights import FP8Weight, NVFP4Weight, QuantizedWeight

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---- linear -------------------------------------------------------------------------------------
def _check_bias(bias, N: int, ref: torch.Tensor) -> None:
    if bias is None:
        return
    check_tensor("linear", "bias", bias)
    if bias.shape != (N,):
        raise ValueError(f"pyops.linear: bias has shape {tuple(bias.shape)}, expected ({N},)")
    check_same_device("linear", ref, bias=bias)


def linear(x: Union[torch.Tensor, FP8Tensor], qweight: QuantizedWeight,
           bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None
           ) -> torch.Tensor:
    """``x @ W.T + bias`` with a quantized weight; output (..., N) in x's dtype.

    x: (..., K) bf16/fp16 (fp32 too; the reference computes it) or, for FP8 weights, an
    ``FP8Tensor`` with row (per-token) granularity whose ``dtype`` sets the output dtype.
    backend: ``"cuda"`` (FP8 only: torch._scaled_mm), ``"triton"``, ``"reference"`` or None
    (auto: per-shape policy on CUDA, the reference on CPU; env ``PYOPS_BACKEND_FP8_LINEAR`` /
    ``PYOPS_BACKEND_NVFP4_LINEAR`` / ``PYOPS_BACKEND``).
    """
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"pyops.linear: qweight must come from pyops.quantize_weight, got "
                        f"{type(qweight).__name__}")
    N, K = qweight.shape
    if qweight.format == "fp8":
        return _linear_fp8(x, qweight, bias, backend, N, K)
    if isinstance(x, FP8Tensor):  # W4A16 takes the activation in high precision
        x = x.dequantize()
    return _linear_nvfp4(x, qweight, bias, backend, N, K)


def _lead_shape(x_shape, K: int, what: str):
    if len(x_shape) < 1 or x_shape[-1] != K:
        raise ValueError(f"pyops.linear: {what} has shape {tuple(x_shape)}; the weight's "
                         f"in_features is {K}")
    return tuple(x_shape[:-1])


def _linear_fp8(x, qw: FP8Weight, bias, backend, N: int, K: int) -> torch.Tensor:
    if isinstance(x, FP8Tensor):
        if x.granularity != "row":
            raise ValueError(f"pyops.linear: a pre-quantized FP8Tensor input must have row "
                             f"(per-token) granularity, got {x.granularity!r}")
        check_tensor("linear", "x.data", x.data, dtypes=(torch.float8_e4m3fn,))
        check_tensor("linear", "x.scale", x.scale, dtypes=(torch.float32,))
        lead = _lead_shape(x.data.shape, K, "x.data")
        M = math.prod(lead)
        if x.scale.numel() != M:
            raise ValueError(f"pyops.linear: x.scale has {x.scale.numel()} elements, expected "
                             f"one per row ({M})")
        out_dtype = x.dtype if x.dtype in _ACT_DTYPES else torch.bfloat16
        xq, xs, dev = x.data.reshape(M, K), x.scale.reshape(M), x.data.device
        check_same_device("linear", x.data, scale=x.scale)
    else:
        check_tensor("linear", "x", x, dtypes=_ACT_DTYPES)
        lead = _lead_shape(x.shape, K, "x")
        M = math.prod(lead)
        out_dtype, dev = x.dtype, x.device
        xq = xs = None
    if dev != qw.data.device:
        raise ValueError(f"pyops.linear: x is on {dev} but the weight is on {qw.data.device}")
    check_same_device("linear", qw.data, scale=qw.scale)
    _check_bias(bias, N, qw.data)
    b = _fp8.resolve(dev, backend, M, N, K, out_dtype)
    if xq is None:
        # The GEMM backend names ("cuda" = torch._scaled_mm) are not the quantizer's, so the
        # quantizer picks its own (all give identical bits); the reference GEMM gets the reference.
        t = quantize_fp8(x, "row", backend="reference" if b == "reference" else None)
        xq, xs = t.data.reshape(M, K), t.scale.reshape(M)
    ws = qw.scale.reshape(N)
    if eager_fast_path(xq, xs, qw.data, ws, bias):
        y = _fp8.fp8_linear_impl(xq, xs, qw.data, ws, bias, out_dtype, b)
    else:
        y = torch.ops.pyops.fp8_linear(xq, xs, qw.data, ws, bias, out_dtype, b)
    return y.view(*lead, N)


def _linear_nvfp4(x, qw: NVFP4Weight, bias, backend, N: int, K: int) -> torch.Tensor:
    check_tensor("linear", "x", x, dtypes=_ACT_DTYPES)
    lead = _lead_shape(x.shape, K, "x")
    M = math.prod(lead)
    check_same_device("linear", qw.data, x=x, scales=qw.scales, global_scale=qw.global_scale)
    _check_bias(bias, N, x)
    b = _nv4.resolve(x.device, backend, x.dtype)
    x2 = x.reshape(M, K)
    # native W4A4 only where the Triton backend runs on an NVFP4 device (never for the reference)
    variant = _nv4.pick_variant(M, N, K, x.device if b == "triton" else None)
    # the "w4a4" variant takes the swizzled scales (its contract; see pyops/ops/nvfp4_linear.py)
    scales = (qw.swizzled_scales() if variant == "w4a4" else qw.scales).view(torch.uint8)
    if eager_fast_path(x2, qw.data, scales, qw.global_scale, bias):
        y = _nv4.nvfp4_linear_impl(x2, qw.data, scales, qw.global_scale, K, bias, b, variant)
    else:
        y = torch.ops.pyops.nvfp4_linear(x2, qw.data, scales, qw.global_scale, K, bias, b,
                                         variant)
    return y.view(*lead, N)

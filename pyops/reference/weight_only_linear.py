"""Weight-only quantized linear (W8A16 / W4A16): the reference, and the spec of every backend.

The activations are used as they are (bf16/fp16; fp32 here too); only the weight is quantized.
This is the op of the small-M regime (M = batch for adaLN modulation, timestep and guidance
embedders, small-batch serving), where a linear is bound by the bytes of its weight: an FP8
weight streams 2x fewer bytes than bf16 and an NVFP4 weight 3.56x fewer (4.5 bits per weight),
and skipping the per-call activation quantization of the W8A8 path removes a launch and a pass.

Operands, viewed as 2-D: ``x`` (M, K); the weight in one of two formats (``fmt``):

* ``"fp8"``: ``data`` float8_e4m3fn (N, K) and ``scales`` fp32 (N,): per-output-channel scales,
  as ``pyops.quantize_weight(w, "fp8")`` makes them (``global_scale`` None):

      W[n, k] = float(data[n, k]) * scales[n]

* ``"nvfp4"``: ``data`` uint8 (N, ceil(K/16)*8) (two E2M1 codes a byte, element 2i in the low
  nibble), ``scales`` e4m3 bytes (N, ceil(K/16)), ``global_scale`` fp32 (1,), as
  ``pyops.quantize_weight(w, "nvfp4")`` makes them (``pyops/reference/nvfp4_linear.py``):

      W[n, k] = e2m1(data[n, k]) * float(scales[n, k // 16]) * global_scale

    y = x @ W.T (+ bias), in fp32 on the exactly decoded operands, rounded once to ``out_dtype``.

Backends feed the tensor cores an operand that is exact in x's 16-bit dtype (the e4m3 value; or
e2m1 * e4m3 block scale, at most 6 significant bits, magnitude in [2**-10, 2688]), accumulate in
fp32, and multiply by the per-channel scale (fp8) or the global scale (nvfp4) in the epilogue,
where the bias (widened to fp32) is added and the result rounded once. They differ from this
reference by fp32 summation order (split-K order included) and where the scale is applied, so
tests bound the error relative to ``sum_k |x_k W_nk|`` (``abs_product_sum``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .nvfp4_linear import nvfp4_linear
from .quantize_nvfp4 import dequantize_nvfp4

FORMATS = ("fp8", "nvfp4")


def dequantize(data: torch.Tensor, scales: torch.Tensor, global_scale: Optional[torch.Tensor],
               fmt: str, K: int) -> torch.Tensor:
    """The weight (N, K) in fp32, decoded exactly (see the module docstring)."""
    if fmt == "fp8":
        return data.view(torch.float8_e4m3fn).float() * scales.float().reshape(-1, 1)
    if fmt == "nvfp4":
        return dequantize_nvfp4(data, scales.view(torch.float8_e4m3fn), global_scale, K,
                                out_dtype=torch.float32)
    raise ValueError(f"weight_only_linear: unknown weight format {fmt!r}; expected {FORMATS}")


def weight_only_linear(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                       global_scale: Optional[torch.Tensor], fmt: str, K: int,
                       bias: Optional[torch.Tensor] = None,
                       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(M, K) x quantized (N, K) -> (M, N) in ``out_dtype`` (default: x's dtype)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if fmt == "nvfp4":  # one spec: the W4A16 reference of pyops.linear's NVFP4 path
        return nvfp4_linear(x, data, scales, global_scale, K, bias, out_dtype)
    y = x.float() @ dequantize(data, scales, global_scale, fmt, K).t()
    if bias is not None:
        y = y + bias.float().reshape(1, -1)
    return y.to(out_dtype)


def abs_product_sum(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                    global_scale: Optional[torch.Tensor], fmt: str, K: int) -> torch.Tensor:
    """(M, N) fp32: sum_k |x_k W_nk| on the decoded operands (the error scale for tests)."""
    return x.float().abs() @ dequantize(data, scales, global_scale, fmt, K).abs().t()

"""NVFP4-weight linear (W4A16): the reference, and the spec every backend is measured against.

Operands: ``x`` (M, K) bf16/fp16/fp32 (used as is: activations are not quantized); the weight
as produced by ``quantize_nvfp4(w)`` on the (N, K) weight: ``data`` uint8 (N, ceil(K/16)*8) two
E2M1 codes a byte (element 2i in the low nibble), ``scales`` e4m3 (N, ceil(K/16)) (not
swizzled), ``global_scale`` fp32 (1,); ``bias`` (N,) or None.

    W[n, k] = e2m1(code[n, k]) * float(scales[n, k // 16]) * global_scale
    y       = x @ W.T (+ bias), in fp32, rounded once to ``out_dtype``

Backends: E2M1 * E4M3 needs at most 6 significant bits, so ``e2m1 * s_blk`` is exact in bf16
(and fp16); the Triton kernel dequantizes that product in its main loop, runs a bf16/fp16 MMA with
an fp32 accumulator and multiplies by ``global_scale`` (and adds the bias) in the epilogue. It
differs from this reference by fp32 summation order, where ``global_scale`` is applied and the
final rounding. The "dequant" path (dequantize W to x's dtype, then a dense GEMM) rounds each
weight once to x's dtype (relative 2**-9 for bf16) before the GEMM.
"""
from __future__ import annotations

from typing import Optional

import torch

from .quantize_nvfp4 import dequantize_nvfp4


def nvfp4_linear(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                 global_scale: torch.Tensor, K: int, bias: Optional[torch.Tensor] = None,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(M, K) x NVFP4 (N, K) -> (M, N) in ``out_dtype``."""
    w = dequantize_nvfp4(data, scales.view(torch.float8_e4m3fn), global_scale, K,
                         out_dtype=torch.float32)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float().reshape(1, -1)
    return y.to(out_dtype)

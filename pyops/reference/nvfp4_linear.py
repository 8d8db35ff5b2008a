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

W4A4 (``nvfp4_linear_w4a4``, the spec of the ``"w4a4"`` variant, Blackwell-native): the activations
are quantized per call with the NVFP4 reference (``quantize_nvfp4(x)``: E2M1 + E4M3 per 16 along
K + an fp32 global scale ``amax(x) / 2688`` computed from x), then both operands are dequantized
and multiplied in fp32. Nothing else is applied: both global scales are inside the dequantization.

    y = dequant(quantize_nvfp4(x)) @ W.T (+ bias), in fp32, rounded once to ``out_dtype``
"""
from __future__ import annotations

from typing import Optional

import torch

from .quantize_nvfp4 import BLOCK, dequantize_nvfp4, quantize_nvfp4, unswizzle_scales


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


def nvfp4_linear_w4a4(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                      global_scale: torch.Tensor, K: int, bias: Optional[torch.Tensor] = None,
                      out_dtype: torch.dtype = torch.bfloat16,
                      scales_swizzled: bool = False) -> torch.Tensor:
    """W4A4: NVFP4(x) (M, K) x NVFP4 (N, K) -> (M, N) in ``out_dtype``.

    scales: the weight's (N, ceil(K/16)) e4m3 scales, or (``scales_swizzled``) the 128x4-swizzled
    padded layout the ``"w4a4"`` variant passes.
    """
    N = data.shape[0]
    nb = (K + BLOCK - 1) // BLOCK
    s = scales.view(torch.float8_e4m3fn)
    if scales_swizzled:
        s = unswizzle_scales(s, N, nb)
    xd, xs, xg = quantize_nvfp4(x, None, False)
    xa = dequantize_nvfp4(xd, xs, xg, K, out_dtype=torch.float32)
    w = dequantize_nvfp4(data, s, global_scale, K, out_dtype=torch.float32)
    y = xa @ w.t()
    if bias is not None:
        y = y + bias.float().reshape(1, -1)
    return y.to(out_dtype)

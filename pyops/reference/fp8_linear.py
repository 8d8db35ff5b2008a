"""FP8 W8A8 linear: the reference, and the spec every backend is measured against.

Operands, viewed as 2-D:

* ``xq`` float8_e4m3fn (M, K) and ``x_scale`` fp32 (M,): per-token (row) dequantization scales,
  as produced by ``quantize_fp8(x, "row")``;
* ``wq`` float8_e4m3fn (N, K) and ``w_scale`` fp32 (N,): per-output-channel scales, as produced
  by ``quantize_fp8(w, "row")`` on the (N, K) weight;
* ``bias`` (N,) any float dtype or None.

    y[m, n] = sum_k (float(xq[m,k]) * x_scale[m]) * (float(wq[n,k]) * w_scale[n])  (+ bias[n])

computed here in fp32 on the dequantized operands and rounded once to ``out_dtype``. Backends
compute the same sum as ``x_scale[m] * w_scale[n] * sum_k float(xq)*float(wq)`` with an fp32
accumulator (the scales are per row/column, so they factor out of the K sum) and add the bias in
the epilogue; they differ from this reference only by fp32 summation order and the final
rounding, so tests bound the error relative to ``sum_k |x_k w_k|``.
"""
from __future__ import annotations

from typing import Optional

import torch


def fp8_linear(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(M, K) x (N, K) -> (M, N) in ``out_dtype``."""
    x = xq.float() * x_scale.float().reshape(-1, 1)
    w = wq.float() * w_scale.float().reshape(-1, 1)
    y = x @ w.t()
    if bias is not None:
        y = y + bias.float().reshape(1, -1)
    return y.to(out_dtype)


def abs_product_sum(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
                    w_scale: torch.Tensor) -> torch.Tensor:
    """(M, N) fp32: sum_k |x_k w_k| on the dequantized operands (the error scale for tests)."""
    x = (xq.float() * x_scale.float().reshape(-1, 1)).abs()
    w = (wq.float() * w_scale.float().reshape(-1, 1)).abs()
    return x @ w.t()

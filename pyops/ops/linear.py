"""pyops.linear: ``x @ W.T + bias`` with a quantized weight, dispatched by the weight's format.

    qw = pyops.quantize_weight(w, "fp8")      # or "nvfp4"; w is (out_features, in_features)
    y  = pyops.linear(x, qw, bias)            # x (..., K) bf16/fp16 (or an FP8Tensor) -> (..., N)

* ``FP8Weight`` -> ``fp8_linear`` (``pyops/ops/fp8_linear.py``): W8A8, activations quantized
  per token on the fly unless x is already a row-granularity ``FP8Tensor``; GEMM
  ``torch._scaled_mm`` (backend ``torch``) or our Triton kernel (``triton``).
* ``NVFP4Weight`` -> ``nvfp4_linear`` (``pyops/ops/nvfp4_linear.py``): W4A16 with our fused
  Triton kernel (``triton``) or a Triton dequant pass + cuBLAS (``torch``, variant dequant);
  on native-NVFP4 GPUs (sm_100/103/120/121) W4A4 through cuBLASLt (``torch``, variant w4a4;
  UNVERIFIED ON HARDWARE).

The weight containers and ``quantize_weight`` are in ``pyops/weights.py``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..weights import FP8Weight, NVFP4Weight, QuantizedWeight
from .fp8_linear import fp8_linear
from .nvfp4_linear import nvfp4_linear
from .quantize_fp8 import FP8Tensor


def linear(x: Union[torch.Tensor, FP8Tensor], qweight: QuantizedWeight,
           bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None
           ) -> torch.Tensor:
    """``x @ W.T + bias`` with a quantized weight (N, K); output (..., N) in x's dtype.

    x: (..., K) bf16/fp16 (fp32: the reference computes it, and the Triton FP8 kernel) or, for
    FP8 weights, an ``FP8Tensor`` with row (per-token) granularity whose ``dtype`` sets the
    output dtype (NVFP4 weights dequantize it first). qweight: from ``pyops.quantize_weight``.
    bias: (N,) float or None. backend: ``"torch"`` (a vendor GEMM through torch:
    ``torch._scaled_mm`` for FP8; cuBLAS after a Triton dequant pass, or cuBLASLt W4A4 on
    native NVFP4, for NVFP4), ``"triton"`` (our kernels), ``"reference"`` or None (auto: the
    measured per-shape policy on CUDA, the reference on CPU; env ``PYOPS_BACKEND_FP8_LINEAR`` /
    ``PYOPS_BACKEND_NVFP4_LINEAR`` / ``PYOPS_BACKEND``, and ``PYOPS_NVFP4_LINEAR_VARIANT`` for
    NVFP4). pyops has no CUDA GEMM kernel of its own: ``"cuda"`` is refused for NVFP4 and, for
    FP8, a deprecated name of ``"torch"`` (one-time FutureWarning).
    Errors (before any launch): TypeError for a qweight that is not a ``QuantizedWeight`` or a
    wrong dtype; ValueError for shape/device mismatches; RuntimeError for a requested backend
    that cannot run. Details: ``fp8_linear`` and ``nvfp4_linear``.
    """
    if isinstance(qweight, FP8Weight):
        return fp8_linear(x, qweight, bias, backend=backend)
    if isinstance(qweight, NVFP4Weight):
        return nvfp4_linear(x, qweight, bias, backend=backend)
    raise TypeError(f"pyops.linear: qweight must come from pyops.quantize_weight, got "
                    f"{type(qweight).__name__}")

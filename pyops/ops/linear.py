"""pyops.linear: ``x @ W.T + bias`` with a quantized weight, dispatched by the weight's format.

    qw = pyops.quantize_weight(w, "fp8")      # or "nvfp4"; w is (out_features, in_features)
    y  = pyops.linear(x, qw, bias)            # x (..., K) bf16/fp16 (or an FP8Tensor) -> (..., N)

* ``FP8Weight`` -> ``fp8_linear`` (``pyops/ops/fp8_linear.py``): W8A8, activations quantized
  per token on the fly unless x is already a row-granularity ``FP8Tensor``; GEMM
  ``torch._scaled_mm`` (backend ``torch``) or our Triton kernel (``triton``).
* ``NVFP4Weight`` with a per-token ``FP8Tensor`` input where ``nvfp4_linear`` runs its variant
  ``"fp8"``: x's codes go to the FP8 GEMM as they are (``_nvfp4_fp8_prequantized``).
* ``NVFP4Weight`` -> ``nvfp4_linear`` (``pyops/ops/nvfp4_linear.py``): W4A16 with our fused
  Triton kernel (``triton``) or a Triton dequant pass + cuBLAS (``torch``, variant dequant);
  on native-NVFP4 GPUs (sm_100/103/120/121) W4A4 through cuBLASLt (``torch``, variant w4a4;
  UNVERIFIED ON HARDWARE).

* small M (tokens <= ``weight_only_max_m``): ``weight_only_linear``
  (``pyops/ops/weight_only_linear.py``): W8A16 / W4A16, the weight streamed once, activations not
  quantized. The routing is a measured policy per (compute capability, format); nothing is
  measured yet, so by default no shape is routed there (``WEIGHT_ONLY_MAX_M`` is empty).
  ``PYOPS_LINEAR_WEIGHT_ONLY_MAX_M=<int>`` sets the bound by hand (0: never).

The weight containers and ``quantize_weight`` are in ``pyops/weights.py``.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch

from .. import _backend
from ..weights import FP8Weight, NVFP4Weight, QuantizedWeight
from .._checks import check_same_device
from ..weights import check_linear_bias
from . import nvfp4_to_fp8 as _conv
from .fp8_linear import _prequantized, fp8_linear, fp8_linear_op
from .nvfp4_linear import choose as _nvfp4_choose
from .nvfp4_linear import nvfp4_linear
from .quantize_fp8 import FP8Tensor
from .weight_only_linear import weight_only_linear

# ---- routing policy: which M goes to weight_only_linear, per device and format -------------------
# (compute capability, format) -> the largest M routed to weight_only_linear. Entries only from
# a measurement (bench/bench_linear.py, bench/RESULTS.md); none exists yet, so nothing is routed.
WEIGHT_ONLY_MAX_M: dict = {}
WEIGHT_ONLY_ENV = "PYOPS_LINEAR_WEIGHT_ONLY_MAX_M"
ROUTE_SOURCE = ("unmeasured: no GPU has measured weight_only_linear against the W8A8 / W4A16 "
                "GEMMs, so pyops.linear routes no shape to it by default")


def weight_only_max_m(device: torch.device, fmt: str) -> int:
    """The largest token count M that ``pyops.linear`` sends to ``weight_only_linear`` on
    ``device`` for weights of format ``fmt`` ("fp8" / "nvfp4"): ``PYOPS_LINEAR_WEIGHT_ONLY_MAX_M``
    if set (an int >= 0; ValueError otherwise), else the measured table ``WEIGHT_ONLY_MAX_M``
    (empty today: 0), and 0 off CUDA (the references of both paths are then equally exact)."""
    env = os.environ.get(WEIGHT_ONLY_ENV, "")
    if env not in ("", "auto"):
        try:
            v = int(env)
        except ValueError:
            v = -1
        if v < 0:
            raise ValueError(f"pyops: {WEIGHT_ONLY_ENV}={env!r}; expected an integer >= 0")
        return v
    if device.type != "cuda":
        return 0
    return WEIGHT_ONLY_MAX_M.get((_backend.device_capability(device), fmt), 0)


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
    that cannot run. Details: ``fp8_linear`` and ``nvfp4_linear``. With ``backend`` None, calls
    of at most ``weight_only_max_m`` tokens run ``weight_only_linear`` instead (W8A16 / W4A16;
    no shape by default until measured).
    """
    if (backend is None and isinstance(qweight, (FP8Weight, NVFP4Weight))
            and isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16)
            and x.dim() >= 1 and x.shape[-1] == qweight.shape[1]
            and 1 <= math.prod(x.shape[:-1]) <= weight_only_max_m(x.device, qweight.format)):
        return weight_only_linear(x, qweight, bias)
    if isinstance(qweight, FP8Weight):
        return fp8_linear(x, qweight, bias, backend=backend)
    if isinstance(qweight, NVFP4Weight):
        if isinstance(x, FP8Tensor) and x.granularity == "row":
            y = _nvfp4_fp8_prequantized(x, qweight, bias, backend)
            if y is not None:
                return y
        return nvfp4_linear(x, qweight, bias, backend=backend)
    raise TypeError(f"pyops.linear: qweight must come from pyops.quantize_weight, got "
                    f"{type(qweight).__name__}")


def _nvfp4_fp8_prequantized(x: FP8Tensor, qweight: NVFP4Weight, bias: Optional[torch.Tensor],
                            backend: Optional[str]) -> Optional[torch.Tensor]:
    """An NVFP4 weight with a per-token FP8 input (e.g. from ``pyops.norm_modulate_quant``) where
    ``nvfp4_linear`` runs its variant ``"fp8"``: the FP8 GEMM takes x's codes and scales as they
    are (no dequantize + requantize pass); the weight is re-encoded by ``nvfp4_to_fp8``. Returns
    None where another variant runs (the caller then takes ``nvfp4_linear``'s W4A16 path)."""
    N, K = qweight.shape
    xq, xs, lead, out_dtype, dev = _prequantized(x, K)
    b, variant = _nvfp4_choose(dev, backend, math.prod(lead), N, K, out_dtype)
    if variant != "fp8":
        return None
    check_same_device("linear", xq, data=qweight.data, scales=qweight.scales,
                      global_scale=qweight.global_scale)
    check_linear_bias(bias, N, xq)
    cb = "reference" if b == "reference" else _backend.resolve(_conv.OP, dev)
    wq, ws = _conv.nvfp4_to_fp8_op(qweight.data, qweight.scales.view(torch.uint8),
                                   qweight.global_scale, K, cb)
    y = fp8_linear_op(xq, xs, wq, ws, bias, out_dtype, "reference" if b == "reference" else "torch")
    return y.view(*lead, N)

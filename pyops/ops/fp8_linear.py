"""fp8_linear: FP8 W8A8 GEMM with row-wise scales (public function, op, backends, policy).

Op ``pyops::fp8_linear(xq, x_scale, wq, w_scale, bias?, out_dtype, backend) -> out`` on 2-D
operands: ``xq`` e4m3 (M, K), ``x_scale`` fp32 (M,), ``wq`` e4m3 (N, K), ``w_scale`` fp32 (N,),
``bias`` (N,) or None; ``out`` (M, N) in ``out_dtype``. Spec: ``pyops/reference/fp8_linear.py``.
Backends (destination-passing: ``impl(xq, x_scale, wq, w_scale, bias, out)``):

* ``torch``: ``torch._scaled_mm`` row-wise (scale_a (M,1), scale_b (1,N) fp32, bias, bf16 out):
  cuBLASLt/CUTLASS inside torch (pyops has no FP8 GEMM kernel of its own, so there is no
  ``cuda`` backend). Runs where ``scaled_mm_available`` says so: CUDA, sm_90+, K and N multiples
  of 16, bf16 output. It takes the bias in the output dtype, so an fp32 bias is rounded to bf16
  first (the spec and the Triton kernel add it in fp32): at most one bf16 rounding apart.
* ``triton``: ``triton_kernels/fp8_linear.py`` (sm_89+: fp8 operands; any shape, bf16/fp16/fp32
  output).
* ``reference``: ``pyops/reference/fp8_linear.py``.

The public function is ``fp8_linear(x, qweight, bias, backend=)`` (``pyops.linear`` calls it for
an ``FP8Weight``).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch

from .. import _backend
from .._checks import check_same_device, check_tensor
from .._op import define
from ..reference import fp8_linear as ref
from ..weights import ACT_DTYPES, FP8Weight, check_linear_bias, linear_lead_shape
from .quantize_fp8 import OP as QUANT_OP
from .quantize_fp8 import FP8Tensor, quantize_fp8_op

OP = "fp8_linear"

# torch._scaled_mm's use_fast_accum: False keeps cuBLAS/CUTLASS promoting the FP8 MMA's partial
# sums into fp32 (accurate on long K). True is a few percent faster; to be decided on the GPU.
SCALED_MM_FAST_ACCUM = os.environ.get("PYOPS_SCALED_MM_FAST_ACCUM", "0") not in ("", "0")


# ---- backends: destination-passing --------------------------------------------------------------
def _reference(xq, xs, wq, ws, bias, out) -> None:
    out.copy_(ref.fp8_linear(xq, xs, wq, ws, bias, out.dtype))


def _triton(xq, xs, wq, ws, bias, out) -> None:
    from ..triton_kernels import fp8_linear as tk
    tk.fp8_linear(xq, xs.reshape(-1).contiguous(), wq, ws.reshape(-1).contiguous(), bias, out)


def _torch(xq, xs, wq, ws, bias, out) -> None:
    M, N = out.shape
    if bias is not None and bias.dtype != out.dtype:
        bias = bias.to(out.dtype)  # _scaled_mm wants the bias in the output dtype
    torch._scaled_mm(xq.contiguous(), wq.contiguous().t(),
                     scale_a=xs.reshape(M, 1).contiguous(), scale_b=ws.reshape(1, N).contiguous(),
                     bias=bias, out_dtype=out.dtype, use_fast_accum=SCALED_MM_FAST_ACCUM,
                     out=out)


def scaled_mm_available(device: torch.device, N: int = 16, K: int = 16,
                        out_dtype: torch.dtype = torch.bfloat16, **_) -> tuple[bool, str]:
    """(ok, why): whether row-wise ``torch._scaled_mm`` runs x (M, K) @ W (N, K).T on ``device``
    with an ``out_dtype`` output: CUDA, sm_90+, K and N multiples of 16, bf16 output. Without
    shape keywords (``pyops.info()``) it answers for a bf16 output with aligned K and N."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, "torch._scaled_mm (backend 'torch') needs CUDA tensors"
    if not hasattr(torch, "_scaled_mm"):
        return False, "this torch has no torch._scaled_mm"
    major, minor = _backend.device_capability(device)
    if (major, minor) < (9, 0):
        return False, f"row-wise torch._scaled_mm needs sm_90+, device is sm_{major}{minor}"
    if K % 16 or N % 16:
        return False, f"torch._scaled_mm needs K and N multiples of 16 (K={K}, N={N})"
    if out_dtype != torch.bfloat16:
        return False, f"row-wise torch._scaled_mm writes bf16 only (asked {out_dtype})"
    return True, "torch._scaled_mm row-wise"


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton, min_capability=(8, 9))  # fp8 operands: sm_89+
_backend.register(OP, "torch", _torch, available=scaled_mm_available)
_backend.register_alias(OP, "cuda", "torch", "pyops has no FP8 GEMM kernel of its own; "
                        "torch._scaled_mm (cuBLASLt) is a vendor kernel, so its backend is 'torch'")


# ---- auto policy: which GEMM to prefer, per device and shape ------------------------------------
# Measured: NVIDIA H200 (sm_90), 2026-11-30, torch 2.11, Triton 3.6, pyops 8d8b3ea,
# bench/RESULTS.md section 1, table "Linear" (bench/bench_linear.py; x bf16 =
# cuBLAS bf16 ms / ms, the per-token activation quantization included). "torch"
# (torch._scaled_mm; the table's "cuda" column, its name then) vs "triton", x bf16:
#   M K N             torch triton        M K N              torch triton
#   4608 3072 3072    1.24  0.51          9216 3072 3072     1.25  0.62
#   4608 3072 12288   1.38  0.59          9216 3072 12288    1.56  0.64
#   4608 12288 3072   1.28  0.49          9216 12288 3072    1.24  0.52
#   4608 3072 15360   1.52  0.65          32760 5120 5120    1.42  0.63
#   4608 15360 3072   1.28  0.49          1 3072 3072        0.07  0.06
#   16 3072 3072      0.21  0.15          1 12288 3072       0.39  0.29
#   1 3072 12288      0.22  0.23
# _scaled_mm wins every shape but (1, 3072, 12288), where Triton's 0.23 vs 0.22 is inside the
# run-to-run spread of the same table (its "auto" column, which resolves to _scaled_mm at that
# shape, read 0.20): a tie, not a measured Triton win. So on sm_90: _scaled_mm at every shape.
# Other capabilities are unmeasured and keep the previous rule: _scaled_mm wherever it can run
# (rowwise _scaled_mm needs sm_90+, so sm_89 gets Triton through the fallback in resolve()).
# One answer for every device today; a per-capability, per-shape rule goes in auto_backend when
# a measurement shows Triton winning somewhere.
POLICY_SOURCE = ("sm_90: NVIDIA H200 2026-11-30, bench/RESULTS.md section 1 'Linear' "
                 "(torch._scaled_mm won or tied every shape); other capabilities unmeasured")


def auto_backend(capability: tuple[int, int], M: Optional[int] = None, N: Optional[int] = None,
                 K: Optional[int] = None, **_) -> str:
    """The GEMM backend auto mode prefers for x (M, K) @ W (N, K).T on a device of compute
    ``capability`` (major, minor): ``"torch"`` (torch._scaled_mm) at every shape today.

    A preference only: ``_backend.resolve`` checks that it can run (``scaled_mm_available``)
    and otherwise takes the first of cuda, triton, torch, reference that can. Source of the
    sm_90 rule: the H200 measurement cited above (``POLICY_SOURCE``); other capabilities are
    unmeasured (same answer)."""
    return "torch"


_backend.register_policy(OP, auto_backend, POLICY_SOURCE)


# ---- the op -------------------------------------------------------------------------------------
def _fake(xq, x_scale, wq, w_scale, bias, out_dtype, backend):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)


@define(OP, fake=_fake)
def fp8_linear_op(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
                  w_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                  backend: str) -> torch.Tensor:
    out = torch.empty((xq.shape[0], wq.shape[0]), dtype=out_dtype, device=xq.device)
    _backend.impl(OP, backend)(xq, x_scale, wq, w_scale, bias, out)
    return out


# ---- public function ----------------------------------------------------------------------------
def _prequantized(x: FP8Tensor, K: int):
    """(xq (M, K), xs (M,), lead, out_dtype, device) of a row-granularity FP8Tensor."""
    if x.granularity != "row":
        raise ValueError(f"pyops.linear: a pre-quantized FP8Tensor input must have row "
                         f"(per-token) granularity, got {x.granularity!r}")
    check_tensor("linear", "x.data", x.data, dtypes=(torch.float8_e4m3fn,))
    check_tensor("linear", "x.scale", x.scale, dtypes=(torch.float32,))
    check_same_device("linear", x.data, scale=x.scale)
    lead = linear_lead_shape(x.data.shape, K, "x.data")
    M = math.prod(lead)
    if x.scale.numel() != M:
        raise ValueError(f"pyops.linear: x.scale has {x.scale.numel()} elements, expected one "
                         f"per row ({M})")
    out_dtype = x.dtype if x.dtype in ACT_DTYPES else torch.bfloat16
    return x.data.reshape(M, K), x.scale.reshape(M), lead, out_dtype, x.data.device


def fp8_linear(x: Union[torch.Tensor, FP8Tensor], qweight: FP8Weight,
               bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None
               ) -> torch.Tensor:
    """``x @ W.T + bias`` with an FP8 (W8A8) weight: (..., K) -> (..., N).

    x: (..., K) bf16/fp16/fp32, quantized per token here (e4m3, scale = row amax / 448 on the
    device, ``pyops/reference/quantize_fp8.py``), output in x's dtype; or an ``FP8Tensor`` with
    row granularity (e.g. from ``pyops.norm_modulate_quant``), output in its ``dtype`` (bf16 if
    that is not a float dtype). qweight: ``FP8Weight`` (e4m3 (N, K), fp32 scale (N, 1)). bias:
    (N,) float or None, added in fp32 (``torch``: rounded to the output dtype first).
    backend: ``"torch"`` (torch._scaled_mm), ``"triton"``, ``"reference"`` or None (auto: the
    reference off CUDA; on CUDA ``auto_backend``'s measured preference where it can run, else the
    first that can); env ``PYOPS_BACKEND_FP8_LINEAR`` / ``PYOPS_BACKEND``. The activation
    quantizer runs the reference for the reference GEMM and its own auto choice otherwise (all
    quantizer backends give identical bits).
    Errors (before any launch): TypeError for a wrong dtype or weight type; ValueError for a
    shape, granularity or device mismatch; RuntimeError for a requested backend that cannot run.
    ``"cuda"`` (this path's old name) runs ``"torch"`` with a one-time FutureWarning.
    """
    if not isinstance(qweight, FP8Weight):
        raise TypeError(f"pyops.linear: fp8_linear takes an FP8Weight, got "
                        f"{type(qweight).__name__}")
    N, K = qweight.shape
    if isinstance(x, FP8Tensor):
        xq, xs, lead, out_dtype, dev = _prequantized(x, K)
    else:
        check_tensor("linear", "x", x, dtypes=ACT_DTYPES)
        lead = linear_lead_shape(x.shape, K, "x")
        xq = xs = None
        out_dtype, dev = x.dtype, x.device
    if dev != qweight.data.device:
        raise ValueError(f"pyops.linear: x is on {dev} but the weight is on "
                         f"{qweight.data.device}")
    check_same_device("linear", qweight.data, scale=qweight.scale)
    check_linear_bias(bias, N, qweight.data)
    if bias is not None:
        bias = bias.contiguous()  # the kernels read bias[n] at bias + n
    M = math.prod(lead)
    b = _backend.resolve(OP, dev, backend, M=M, N=N, K=K, out_dtype=out_dtype)
    if xq is None:
        qb = "reference" if b == "reference" else _backend.resolve(QUANT_OP, dev)
        q, s = quantize_fp8_op(x, "row", qb)
        xq, xs = q.reshape(M, K), s.reshape(M)
    y = fp8_linear_op(xq, xs, qweight.data, qweight.scale.reshape(N), bias, out_dtype, b)
    return y.view(*lead, N)

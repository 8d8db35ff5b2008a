"""pyops::fp8_linear: FP8 W8A8 GEMM with row-wise scales (schema, fake, backends, policy).

Backends (destination-passing: ``impl(xq, x_scale, wq, w_scale, bias, out)``):

* ``cuda``: ``torch._scaled_mm`` row-wise (scale_a (M,1), scale_b (1,N) fp32, bias, bf16 out):
  cuBLASLt/CUTLASS inside torch, not pyops' own extension, so its availability is decided here
  (CUDA device with sm_90+, K and N multiples of 16, bf16 output) and not by ``pyops._C``.
  It takes the bias in the output dtype, so an fp32 bias is rounded to bf16 first (the spec and
  the Triton kernel add it in fp32): a documented difference of at most one bf16 rounding.
* ``triton``: ``triton_kernels/fp8_linear.py`` (any shape, bf16/fp16/fp32 output).
* ``reference``: ``pyops/reference/fp8_linear.py``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _backend
from ..reference import fp8_linear as ref

OP = "fp8_linear"

# torch._scaled_mm's use_fast_accum: False keeps cuBLAS/CUTLASS promoting the FP8 MMA's partial
# sums into fp32 (accurate on long K). True is a few percent faster; to be decided on the GPU.
SCALED_MM_FAST_ACCUM = os.environ.get("PYOPS_SCALED_MM_FAST_ACCUM", "0") not in ("", "0")


def _reference(xq, xs, wq, ws, bias, out) -> None:
    out.copy_(ref.fp8_linear(xq, xs, wq, ws, bias, out.dtype))


def _triton(xq, xs, wq, ws, bias, out) -> None:
    from ..triton_kernels import fp8_linear as tk
    tk.fp8_linear(xq, xs.reshape(-1).contiguous(), wq, ws.reshape(-1).contiguous(), bias, out)


def _cuda(xq, xs, wq, ws, bias, out) -> None:
    M, N = out.shape
    if bias is not None and bias.dtype != out.dtype:
        bias = bias.to(out.dtype)  # _scaled_mm wants the bias in the output dtype
    torch._scaled_mm(xq.contiguous(), wq.contiguous().t(),
                     scale_a=xs.reshape(M, 1).contiguous(), scale_b=ws.reshape(1, N).contiguous(),
                     bias=bias, out_dtype=out.dtype, use_fast_accum=SCALED_MM_FAST_ACCUM,
                     out=out)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton, min_capability=(8, 9))  # fp8 operands: sm_89+
_backend.register(OP, "cuda", _cuda)


# ---- backend choice -----------------------------------------------------------------------------
def scaled_mm_available(device: torch.device, N: int, K: int, out_dtype: torch.dtype
                        ) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "torch._scaled_mm provider needs CUDA tensors"
    if not hasattr(torch, "_scaled_mm"):
        return False, "this torch has no torch._scaled_mm"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return False, f"row-wise torch._scaled_mm needs sm_90+, device is sm_{major}{minor}"
    if K % 16 or N % 16:
        return False, f"torch._scaled_mm needs K and N multiples of 16 (K={K}, N={N})"
    if out_dtype != torch.bfloat16:
        return False, f"row-wise torch._scaled_mm writes bf16 only (asked {out_dtype})"
    return True, "torch._scaled_mm row-wise"


_backend.register_availability(  # shape-independent part, for pyops.info() and explicit requests
    OP, "cuda", lambda device: scaled_mm_available(torch.device(device), 16, 16, torch.bfloat16))


def prefer_scaled_mm(M: int, N: int, K: int) -> bool:
    """Per-shape policy between torch._scaled_mm ("cuda") and the Triton kernel.

    TO BE SET BY MEASUREMENT ON THE GPU (bench/bench_linear.py); nothing was measured with this
    code yet. Default: torch._scaled_mm everywhere it can run, because it measured 1110-1232
    TFLOPS row-wise on an H100 at Flux shapes (../shared/reference.md) while the classic Triton
    kernel here is untuned. Edit this table (e.g. Triton for M <= 64 if it wins there).
    """
    return True


def resolve(device: torch.device, backend: Optional[str], M: int, N: int, K: int,
            out_dtype: torch.dtype) -> str:
    want = _backend.requested(OP, backend)
    if want == "cuda":
        ok, why = scaled_mm_available(device, N, K, out_dtype)
        if not ok:
            raise RuntimeError(f"pyops: backend 'cuda' requested for {OP} cannot run: {why}")
        return want
    if want is not None:
        ok, why = _backend.available(OP, want, device)
        if not ok:
            raise RuntimeError(f"pyops: backend {want!r} requested for {OP} cannot run: {why}")
        return want
    if device.type != "cuda":
        return "reference"
    if scaled_mm_available(device, N, K, out_dtype)[0] and prefer_scaled_mm(M, N, K):
        return "cuda"
    if _backend.available(OP, "triton", device)[0]:
        return "triton"
    return "reference"


# ---- the op -------------------------------------------------------------------------------------
def fp8_linear_impl(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
                    w_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                    backend: str) -> torch.Tensor:
    out = torch.empty((xq.shape[0], wq.shape[0]), dtype=out_dtype, device=xq.device)
    _backend.impl(OP, backend)(xq, x_scale, wq, w_scale, bias, out)
    return out


@torch.library.custom_op("pyops::fp8_linear", mutates_args=())
def fp8_linear_op(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
                  w_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                  backend: str) -> torch.Tensor:
    return fp8_linear_impl(xq, x_scale, wq, w_scale, bias, out_dtype, backend)


@fp8_linear_op.register_fake
def _(xq, x_scale, wq, w_scale, bias, out_dtype, backend):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)

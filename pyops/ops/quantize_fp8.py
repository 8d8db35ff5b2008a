"""pyops::quantize_fp8 / pyops::dequantize_fp8: schema, fake, backends."""
from __future__ import annotations

import torch

from .. import _backend
from .._checks import as_2d
from ..reference import quantize_fp8 as ref

OP = "quantize_fp8"
DEQ_OP = "dequantize_fp8"
GRANULARITIES = ref.GRANULARITIES
GRANULARITY_CODE = {g: i for i, g in enumerate(GRANULARITIES)}


def _scale_shape(M, K, granularity):
    return ref.scale_shape_2d(M, K, granularity)


# ---- backends: destination-passing, (M, K) input view with any strides -------------------------
def _reference(x2, q, scale, granularity: str) -> None:
    rq, rs = ref.quantize_fp8(x2, granularity)
    q.copy_(rq)
    scale.copy_(rs)


def _triton(x2, q, scale, granularity: str) -> None:
    from ..triton_kernels import quantize_fp8 as tk
    tk.quantize_fp8(x2, q, scale, GRANULARITY_CODE[granularity])


def _cuda(x2, q, scale, granularity: str) -> None:
    torch.ops.pyops._quantize_fp8_cuda(x2, q, scale, GRANULARITY_CODE[granularity])


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)
_backend.register(OP, "cuda", _cuda)


def _deq_reference(q2, scale, granularity: str, out) -> None:
    out.copy_(ref.dequantize_fp8(q2, scale, granularity, out.dtype))


def _deq_triton(q2, scale, granularity: str, out) -> None:
    from ..triton_kernels import quantize_fp8 as tk
    tk.dequantize_fp8(q2, scale, GRANULARITY_CODE[granularity], out)


_backend.register(DEQ_OP, "reference", _deq_reference)
_backend.register(DEQ_OP, "triton", _deq_triton)


# ---- the ops ------------------------------------------------------------------------------------
def quantize_fp8_impl(x: torch.Tensor, granularity: str, backend: str):
    K = x.shape[-1]
    x2 = as_2d(x)
    M = x2.shape[0]
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(_scale_shape(M, K, granularity), dtype=torch.float32, device=x.device)
    if M > 0 and K > 0:
        _backend.impl(OP, backend)(x2, q, scale, granularity)
    return q.view(x.shape), scale


@torch.library.custom_op("pyops::quantize_fp8", mutates_args=())
def quantize_fp8_op(x: torch.Tensor, granularity: str, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8_impl(x, granularity, backend)


@quantize_fp8_op.register_fake
def _(x, granularity, backend):
    K = x.shape[-1]
    M = x.numel() // K if x.dim() != 2 else x.shape[0]
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty(_scale_shape(M, K, granularity), dtype=torch.float32))


def dequantize_fp8_impl(q: torch.Tensor, scale: torch.Tensor, granularity: str,
                        out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    q2 = as_2d(q)
    out = torch.empty(q2.shape, dtype=out_dtype, device=q.device)
    if q2.numel() > 0:
        _backend.impl(DEQ_OP, backend)(q2, scale, granularity, out)
    return out.view(q.shape)


@torch.library.custom_op("pyops::dequantize_fp8", mutates_args=())
def dequantize_fp8_op(q: torch.Tensor, scale: torch.Tensor, granularity: str,
                      out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    return dequantize_fp8_impl(q, scale, granularity, out_dtype, backend)


@dequantize_fp8_op.register_fake
def _(q, scale, granularity, out_dtype, backend):
    return q.new_empty(q.shape, dtype=out_dtype)


# The CUDA extension's destination-passing entry point, if it was built: give it a fake too so
# it can be traced and opchecked on its own.
def _register_cuda_fakes() -> None:
    if hasattr(torch.ops.pyops, "_quantize_fp8_cuda"):
        torch.library.register_fake("pyops::_quantize_fp8_cuda")(lambda x, q, s, g: None)

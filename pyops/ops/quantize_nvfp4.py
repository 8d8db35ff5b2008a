"""pyops::quantize_nvfp4 / pyops::dequantize_nvfp4: schema, fake, backends."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._checks import as_2d
from ..reference import quantize_nvfp4 as ref

OP = "quantize_nvfp4"
DEQ_OP = "dequantize_nvfp4"
BLOCK = ref.BLOCK


def _nb(K):
    return (K + BLOCK - 1) // BLOCK


def _scale_shape(M, K, swizzle: bool):
    nb = _nb(K)
    return ref.swizzled_shape(M, nb) if swizzle else (M, nb)


# ---- backends: destination-passing ---------------------------------------------------------------
# data: uint8 (M, nb*8); scales: uint8 (M, nb) or swizzled (Mp, Np), zero-filled by the caller;
# global_scale: fp32 (1,), read when compute_global is False, written when True.
def _reference(x2, data, scales, global_scale, compute_global: bool, swizzle: bool) -> None:
    d, s, g = ref.quantize_nvfp4(x2, None if compute_global else global_scale, swizzle)
    data.copy_(d)
    scales.copy_(s.view(torch.uint8))
    if compute_global:
        global_scale.copy_(g)


def _triton(x2, data, scales, global_scale, compute_global: bool, swizzle: bool) -> None:
    from ..triton_kernels import quantize_nvfp4 as tk
    tk.quantize_nvfp4(x2, data, scales, global_scale, compute_global, swizzle)


def _cuda(x2, data, scales, global_scale, compute_global: bool, swizzle: bool) -> None:
    torch.ops.pyops._quantize_nvfp4_cuda(x2, data, scales, global_scale, compute_global, swizzle)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)
_backend.register(OP, "cuda", _cuda)


def _deq_reference(data, scales, global_scale, K: int, swizzled: bool, out) -> None:
    out.copy_(ref.dequantize_nvfp4(data, scales.view(torch.float8_e4m3fn), global_scale, K,
                                   swizzled, out.dtype))


def _deq_triton(data, scales, global_scale, K: int, swizzled: bool, out) -> None:
    from ..triton_kernels import quantize_nvfp4 as tk
    tk.dequantize_nvfp4(data, scales, global_scale, K, swizzled, out)


_backend.register(DEQ_OP, "reference", _deq_reference)
_backend.register(DEQ_OP, "triton", _deq_triton)


# ---- the ops ------------------------------------------------------------------------------------
def quantize_nvfp4_impl(x: torch.Tensor, global_scale: Optional[torch.Tensor], swizzle: bool,
                        backend: str):
    K = x.shape[-1]
    x2 = as_2d(x)
    M = x2.shape[0]
    nb = _nb(K)
    data = torch.empty((M, nb * 8), dtype=torch.uint8, device=x.device)
    # Every backend writes all (M, nb) scales; only the swizzled layout's padding needs the
    # zero fill (the CUDA kernel relies on it), so skip the memset otherwise.
    alloc = torch.zeros if swizzle else torch.empty
    scales = alloc(_scale_shape(M, K, swizzle), dtype=torch.uint8, device=x.device)
    if global_scale is None:
        g = torch.empty(1, dtype=torch.float32, device=x.device)
    else:
        g = global_scale.detach().to(torch.float32).reshape(1).clone()
    _backend.impl(OP, backend)(x2, data, scales, g, global_scale is None, swizzle)
    return data.view(*x.shape[:-1], nb * 8), scales.view(torch.float8_e4m3fn), g


@torch.library.custom_op("pyops::quantize_nvfp4", mutates_args=())
def quantize_nvfp4_op(x: torch.Tensor, global_scale: Optional[torch.Tensor], swizzle: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quantize_nvfp4_impl(x, global_scale, swizzle, backend)


@quantize_nvfp4_op.register_fake
def _(x, global_scale, swizzle, backend):
    K = x.shape[-1]
    M = x.numel() // K if x.dim() != 2 else x.shape[0]
    return (x.new_empty((*x.shape[:-1], _nb(K) * 8), dtype=torch.uint8),
            x.new_empty(_scale_shape(M, K, swizzle), dtype=torch.float8_e4m3fn),
            x.new_empty((1,), dtype=torch.float32))


def dequantize_nvfp4_impl(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                          K: int, swizzled: bool, out_dtype: torch.dtype, backend: str):
    d2 = as_2d(data)
    out = torch.empty((d2.shape[0], K), dtype=out_dtype, device=data.device)
    _backend.impl(DEQ_OP, backend)(d2, scales.view(torch.uint8), global_scale, K, swizzled, out)
    return out.view(*data.shape[:-1], K)


@torch.library.custom_op("pyops::dequantize_nvfp4", mutates_args=())
def dequantize_nvfp4_op(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                        K: int, swizzled: bool, out_dtype: torch.dtype, backend: str
                        ) -> torch.Tensor:
    return dequantize_nvfp4_impl(data, scales, global_scale, K, swizzled, out_dtype, backend)


@dequantize_nvfp4_op.register_fake
def _(data, scales, global_scale, K, swizzled, out_dtype, backend):
    return data.new_empty((*data.shape[:-1], K), dtype=out_dtype)


def _register_cuda_fakes() -> None:
    if hasattr(torch.ops.pyops, "_quantize_nvfp4_cuda"):
        torch.library.register_fake("pyops::_quantize_nvfp4_cuda")(
            lambda x, d, s, g, compute_global, swizzle: None)

"""quantize_nvfp4 / dequantize_nvfp4: NVFP4 quantization (public functions, ops, backends).

Ops ``pyops::quantize_nvfp4(x, global_scale?, swizzle, backend) -> (data, scales, global)`` and
``pyops::dequantize_nvfp4(data, scales, global, K, swizzled, out_dtype, backend) -> out``.
Backends (destination-passing): ``cuda`` (``csrc/quantize_nvfp4.cu``), ``triton``
(``triton_kernels/quantize_nvfp4.py``), ``reference`` (``pyops/reference/quantize_nvfp4.py``, the
spec; every backend is bit-exact to it). Dequantize has ``triton`` and ``reference``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, as_2d, check_same_device, check_tensor
from .._checks import check_finite as _check_finite
from .._op import binding_fake, define
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
def _quantize_fake(x, global_scale, swizzle, backend):
    K = x.shape[-1]
    M = x.numel() // K if x.dim() != 2 else x.shape[0]
    return (x.new_empty((*x.shape[:-1], _nb(K) * 8), dtype=torch.uint8),
            x.new_empty(_scale_shape(M, K, swizzle), dtype=torch.float8_e4m3fn),
            x.new_empty((1,), dtype=torch.float32))


@define(OP, fake=_quantize_fake)
def quantize_nvfp4_op(x: torch.Tensor, global_scale: Optional[torch.Tensor], swizzle: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _dequantize_fake(data, scales, global_scale, K, swizzled, out_dtype, backend):
    return data.new_empty((*data.shape[:-1], K), dtype=out_dtype)


@define(DEQ_OP, fake=_dequantize_fake)
def dequantize_nvfp4_op(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                        K: int, swizzled: bool, out_dtype: torch.dtype, backend: str
                        ) -> torch.Tensor:
    d2 = as_2d(data)
    out = torch.empty((d2.shape[0], K), dtype=out_dtype, device=data.device)
    _backend.impl(DEQ_OP, backend)(d2, scales.view(torch.uint8), global_scale, K, swizzled, out)
    return out.view(*data.shape[:-1], K)


binding_fake("_quantize_nvfp4_cuda")  # the CUDA entry point (when built): traceable, opcheck-able


# ---- public API ---------------------------------------------------------------------------------
@dataclass
class NVFP4Tensor:
    """NVFP4: E2M1 codes packed two a byte (low nibble first) along the last dim, one E4M3 scale
    per 16 elements, one fp32 global scale: ``x ~= e2m1 * float(scales) * global_scale``.

    ``data``: uint8 (*lead, ceil(K/16)*8) (the last block zero-padded); ``scales``:
    float8_e4m3fn (M, ceil(K/16)), or the 128x4-swizzled padded layout when ``swizzled``.
    """
    data: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    swizzled: bool = False

    def dequantize(self, dtype: Optional[torch.dtype] = None, *, backend: Optional[str] = None
                   ) -> torch.Tensor:
        return dequantize_nvfp4(self.data, self.scales, self.global_scale, self.shape[-1],
                                swizzled=self.swizzled, dtype=dtype or self.dtype,
                                backend=backend)

    def as_float4(self) -> torch.Tensor:
        """The packed codes as ``torch.float4_e2m1fn_x2`` (same bytes)."""
        return self.data.view(torch.float4_e2m1fn_x2)


def _global_scale_tensor(gs, x: torch.Tensor) -> Optional[torch.Tensor]:
    if gs is None:
        return None
    if isinstance(gs, (int, float)):
        if not (math.isfinite(gs) and gs > 0):
            raise ValueError(f"pyops.quantize_nvfp4: global_scale must be finite and > 0, "
                             f"got {gs}")
        return torch.tensor([float(gs)], dtype=torch.float32, device=x.device)
    check_tensor("quantize_nvfp4", "global_scale", gs, dtypes=FLOAT_DTYPES, min_ndim=0)
    check_same_device("quantize_nvfp4", x, global_scale=gs)
    if gs.numel() != 1:
        raise ValueError(f"pyops.quantize_nvfp4: global_scale must hold one value, got shape "
                         f"{tuple(gs.shape)}")
    return gs


def quantize_nvfp4(x: torch.Tensor, global_scale: Union[None, float, torch.Tensor] = None, *,
                   swizzle: bool = False, backend: Optional[str] = None,
                   check_finite: bool = False) -> NVFP4Tensor:
    """NVFP4 quantization (E2M1 + E4M3 per 16 + fp32 global) along the last dim.

    x: (..., K) bf16/fp16/fp32. global_scale: None computes ``amax / (448 * 6)`` on the device
    (no host sync; 448 and 6 are the E4M3 and E2M1 maxima, NVIDIA's NVFP4 two-level scaling);
    a float or a 1-element tensor is used as is (static calibration; a tensor must hold a
    finite value > 0, checked only with check_finite=True, which syncs).
    swizzle: emit the scales in the 128x4-tiled layout Blackwell block-scaled GEMMs take.
    backend: ``"cuda" | "triton" | "reference"`` or None (auto). Spec:
    ``pyops/reference/quantize_nvfp4.py``. Errors: TypeError/ValueError before any launch.
    """
    check_tensor("quantize_nvfp4", "x", x)
    gs = _global_scale_tensor(global_scale, x)
    if check_finite:
        _check_finite("quantize_nvfp4", x)
        if isinstance(gs, torch.Tensor) and not bool((torch.isfinite(gs) & (gs > 0)).all()):
            raise ValueError("pyops.quantize_nvfp4: global_scale must be finite and > 0")
    b = _backend.resolve(OP, x.device, backend)
    d, s, g = quantize_nvfp4_op(x, gs, bool(swizzle), b)
    return NVFP4Tensor(d, s, g, x.shape, x.dtype, bool(swizzle))


def dequantize_nvfp4(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                     K: int, *, swizzled: bool = False, dtype: torch.dtype = torch.bfloat16,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Inverse of ``quantize_nvfp4`` for a last dim of K elements: (..., K) in ``dtype``."""
    op = "dequantize_nvfp4"
    check_tensor(op, "data", data, dtypes=(torch.uint8,))
    check_tensor(op, "scales", scales, dtypes=(torch.float8_e4m3fn, torch.uint8))
    check_tensor(op, "global_scale", global_scale, dtypes=(torch.float32,), min_ndim=0)
    check_same_device(op, data, scales=scales, global_scale=global_scale)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"pyops.{op}: dtype must be one of {FLOAT_DTYPES}")
    nb = _nb(K)
    if K <= 0 or data.shape[-1] != nb * 8:
        raise ValueError(f"pyops.{op}: data's last dim is {data.shape[-1]}, K={K} needs {nb * 8}")
    M = data.numel() // data.shape[-1]
    want = _scale_shape(M, K, swizzled)
    if tuple(scales.shape) != tuple(want):
        raise ValueError(f"pyops.{op}: scales have shape {tuple(scales.shape)}, expected {want}")
    if global_scale.numel() != 1:
        raise ValueError(f"pyops.{op}: global_scale must hold one value")
    scales = scales.contiguous().view(torch.float8_e4m3fn)
    data = data.contiguous()
    b = _backend.resolve(DEQ_OP, data.device, backend)
    return dequantize_nvfp4_op(data, scales, global_scale, K, swizzled, dtype, b)

"""Public quantization API: ``quantize_fp8`` / ``quantize_nvfp4`` and their containers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import _backend
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, eager_fast_path
from ._checks import check_finite as _check_finite
from .ops import quantize_fp8 as _fp8
from .ops import quantize_nvfp4 as _nvfp4

_GRAN_ALIASES = {
    "tensor": "tensor", "per_tensor": "tensor", "tensorwise": "tensor",
    "row": "row", "token": "row", "per_token": "row", "rowwise": "row",
    "block1x128": "block1x128", "1x128": "block1x128",
    "block128x128": "block128x128", "128x128": "block128x128",
}


def _granularity(g: str) -> str:
    try:
        return _GRAN_ALIASES[g]
    except (KeyError, TypeError):
        raise ValueError(f"pyops.quantize_fp8: unknown granularity {g!r}; expected one of "
                         f"{sorted(_GRAN_ALIASES)}") from None


@dataclass
class FP8Tensor:
    """FP8 e4m3 codes and fp32 dequantization scales: ``x ~= float(data) * scale`` per group.

    ``data`` has the input's shape (float8_e4m3fn). ``scale`` shape by granularity, for an input
    viewed as (M, K) with M = product of leading dims: tensor (1,), row (*lead, 1),
    block1x128 (*lead, ceil(K/128)), block128x128 (ceil(M/128), ceil(K/128)).
    """
    data: torch.Tensor
    scale: torch.Tensor
    granularity: str
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: Optional[torch.dtype] = None, *, backend: Optional[str] = None
                   ) -> torch.Tensor:
        return dequantize_fp8(self.data, self.scale, self.granularity, dtype or self.dtype,
                              backend=backend)


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


def _fp8_scale_user_shape(x: torch.Tensor, scale: torch.Tensor, granularity: str):
    lead = tuple(x.shape[:-1])
    if granularity == "row":
        return scale.view(*lead, 1)
    if granularity == "block1x128":
        return scale.view(*lead, scale.shape[-1])
    return scale


def quantize_fp8(x: torch.Tensor, granularity: str = "row", *, backend: Optional[str] = None,
                 check_finite: bool = False) -> FP8Tensor:
    """Dynamic FP8 e4m3 quantization; scales computed on the device from amax, no host sync.

    granularity: ``"tensor"``, ``"row"`` (per token), ``"block1x128"``, ``"block128x128"``.
    backend: ``"cuda" | "triton" | "reference"`` or None (auto; env ``PYOPS_BACKEND``).
    check_finite: raise ValueError on inf/NaN (a host sync). Without it, a group holding
    inf/NaN gets scale NaN and codes 0 (it dequantizes to NaN); other groups are unaffected.
    """
    check_tensor("quantize_fp8", "x", x)
    g = _granularity(granularity)
    if check_finite:
        _check_finite("quantize_fp8", x)
    b = _backend.resolve(_fp8.OP, x.device, backend)
    if eager_fast_path(x):
        q, s = _fp8.quantize_fp8_impl(x, g, b)
    else:
        q, s = torch.ops.pyops.quantize_fp8(x, g, b)
    return FP8Tensor(q, _fp8_scale_user_shape(x, s, g), g, x.dtype)


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor, granularity: str = "row",
                   dtype: torch.dtype = torch.bfloat16, *, backend: Optional[str] = None
                   ) -> torch.Tensor:
    """``float(data) * scale`` per group, computed in fp32 and rounded once to ``dtype``."""
    check_tensor("dequantize_fp8", "data", data, dtypes=(torch.float8_e4m3fn,))
    check_tensor("dequantize_fp8", "scale", scale, dtypes=(torch.float32,))
    check_same_device("dequantize_fp8", data, scale=scale)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"pyops.dequantize_fp8: dtype must be one of {FLOAT_DTYPES}")
    g = _granularity(granularity)
    K = data.shape[-1]
    M = data.numel() // K
    want = _fp8._scale_shape(M, K, g)
    lead = tuple(data.shape[:-1])
    public = {"tensor": (1,), "row": (*lead, 1), "block1x128": (*lead, want[-1]),
              "block128x128": want}[g]
    if tuple(scale.shape) not in (tuple(want), public):
        raise ValueError(f"pyops.dequantize_fp8: scale has shape {tuple(scale.shape)}; "
                         f"granularity {g!r} on {tuple(data.shape)} needs {public}")
    scale = scale.reshape(want).contiguous()
    b = _backend.resolve(_fp8.DEQ_OP, data.device, backend)
    if eager_fast_path(data, scale):
        return _fp8.dequantize_fp8_impl(data, scale, g, dtype, b)
    return torch.ops.pyops.dequantize_fp8(data, scale, g, dtype, b)


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

    global_scale: None computes ``amax / 2688`` on the device (no host sync); a float or a
    1-element tensor is used as is (static calibration; a tensor must hold a finite value > 0,
    checked only with check_finite=True, which syncs).
    swizzle: emit the scales in the 128x4-tiled layout Blackwell block-scaled GEMMs take.
    """
    check_tensor("quantize_nvfp4", "x", x)
    gs = _global_scale_tensor(global_scale, x)
    if check_finite:
        _check_finite("quantize_nvfp4", x)
        if isinstance(gs, torch.Tensor) and not bool((torch.isfinite(gs) & (gs > 0)).all()):
            raise ValueError("pyops.quantize_nvfp4: global_scale must be finite and > 0")
    b = _backend.resolve(_nvfp4.OP, x.device, backend)
    if eager_fast_path(x, gs):
        d, s, g = _nvfp4.quantize_nvfp4_impl(x, gs, bool(swizzle), b)
    else:
        d, s, g = torch.ops.pyops.quantize_nvfp4(x, gs, bool(swizzle), b)
    return NVFP4Tensor(d, s, g, x.shape, x.dtype, bool(swizzle))


def dequantize_nvfp4(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                     K: int, *, swizzled: bool = False, dtype: torch.dtype = torch.bfloat16,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Inverse of ``quantize_nvfp4`` for a last dim of K elements."""
    op = "dequantize_nvfp4"
    check_tensor(op, "data", data, dtypes=(torch.uint8,))
    check_tensor(op, "scales", scales, dtypes=(torch.float8_e4m3fn, torch.uint8))
    check_tensor(op, "global_scale", global_scale, dtypes=(torch.float32,), min_ndim=0)
    check_same_device(op, data, scales=scales, global_scale=global_scale)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"pyops.{op}: dtype must be one of {FLOAT_DTYPES}")
    nb = _nvfp4._nb(K)
    if K <= 0 or data.shape[-1] != nb * 8:
        raise ValueError(f"pyops.{op}: data's last dim is {data.shape[-1]}, K={K} needs {nb * 8}")
    M = data.numel() // data.shape[-1]
    want = _nvfp4._scale_shape(M, K, swizzled)
    if tuple(scales.shape) != tuple(want):
        raise ValueError(f"pyops.{op}: scales have shape {tuple(scales.shape)}, expected {want}")
    if global_scale.numel() != 1:
        raise ValueError(f"pyops.{op}: global_scale must hold one value")
    scales = scales.contiguous().view(torch.float8_e4m3fn)
    data = data.contiguous()
    b = _backend.resolve(_nvfp4.DEQ_OP, data.device, backend)
    if eager_fast_path(data, scales, global_scale):
        return _nvfp4.dequantize_nvfp4_impl(data, scales, global_scale, K, swizzled, dtype, b)
    return torch.ops.pyops.dequantize_nvfp4(data, scales, global_scale, K, swizzled, dtype, b)

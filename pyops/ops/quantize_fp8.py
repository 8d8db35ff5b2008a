"""quantize_fp8 / dequantize_fp8: dynamic FP8 E4M3 quantization (public functions, ops, backends).

Ops ``pyops::quantize_fp8(x, granularity, backend) -> (q, scale)`` and
``pyops::dequantize_fp8(q, scale, granularity, out_dtype, backend) -> out``. Backends
(destination-passing on an (M, K) view with any strides): ``cuda`` (``csrc/quantize_fp8.cu``),
``triton`` (``triton_kernels/quantize_fp8.py``), ``reference`` (``pyops/reference/quantize_fp8.py``,
the spec; every backend is bit-exact to it). Dequantize has ``triton`` and ``reference``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, as_2d, check_same_device, check_tensor
from .._checks import check_finite as _check_finite
from .._op import binding_fake, define
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
def _quantize_fake(x, granularity, backend):
    K = x.shape[-1]
    M = x.numel() // K if x.dim() != 2 else x.shape[0]
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty(_scale_shape(M, K, granularity), dtype=torch.float32))


@define(OP, fake=_quantize_fake)
def quantize_fp8_op(x: torch.Tensor, granularity: str, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    K = x.shape[-1]
    x2 = as_2d(x)
    M = x2.shape[0]
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(_scale_shape(M, K, granularity), dtype=torch.float32, device=x.device)
    if M > 0 and K > 0:
        _backend.impl(OP, backend)(x2, q, scale, granularity)
    return q.view(x.shape), scale


def _dequantize_fake(q, scale, granularity, out_dtype, backend):
    return q.new_empty(q.shape, dtype=out_dtype)


@define(DEQ_OP, fake=_dequantize_fake)
def dequantize_fp8_op(q: torch.Tensor, scale: torch.Tensor, granularity: str,
                      out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    q2 = as_2d(q)
    out = torch.empty(q2.shape, dtype=out_dtype, device=q.device)
    if q2.numel() > 0:
        _backend.impl(DEQ_OP, backend)(q2, scale, granularity, out)
    return out.view(q.shape)


binding_fake("_quantize_fp8_cuda")  # the CUDA entry point (when built): traceable, opcheck-able


# ---- public API ---------------------------------------------------------------------------------
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


def _scale_user_shape(x: torch.Tensor, scale: torch.Tensor, granularity: str):
    lead = tuple(x.shape[:-1])
    if granularity == "row":
        return scale.view(*lead, 1)
    if granularity == "block1x128":
        return scale.view(*lead, scale.shape[-1])
    return scale


def quantize_fp8(x: torch.Tensor, granularity: str = "row", *, backend: Optional[str] = None,
                 check_finite: bool = False) -> FP8Tensor:
    """Dynamic FP8 e4m3 quantization; scales computed on the device from amax, no host sync.

    x: (..., K) bf16/fp16/fp32, CUDA (or CPU: the reference). granularity: ``"tensor"``,
    ``"row"`` (per token), ``"block1x128"``, ``"block128x128"`` (aliases: ``per_token``, ...).
    Per group, ``scale = amax / 448`` (448 = E4M3's largest finite value, OCP FP8 spec) and
    ``data = round_to_nearest_even(x / scale)``; see ``pyops/reference/quantize_fp8.py``.
    backend: ``"cuda" | "triton" | "reference"`` or None (auto; env ``PYOPS_BACKEND``).
    check_finite: raise ValueError on inf/NaN (a host sync). Without it, a group holding
    inf/NaN gets scale NaN and codes 0 (it dequantizes to NaN); other groups are unaffected.
    Errors: TypeError for a non-float dtype, ValueError for an empty input or a bad granularity.
    """
    check_tensor("quantize_fp8", "x", x)
    g = _granularity(granularity)
    if check_finite:
        _check_finite("quantize_fp8", x)
    b = _backend.resolve(OP, x.device, backend)
    q, s = quantize_fp8_op(x, g, b)
    return FP8Tensor(q, _scale_user_shape(x, s, g), g, x.dtype)


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor, granularity: str = "row",
                   dtype: torch.dtype = torch.bfloat16, *, backend: Optional[str] = None
                   ) -> torch.Tensor:
    """``float(data) * scale`` per group, computed in fp32 and rounded once to ``dtype``.

    data: float8_e4m3fn (..., K); scale: fp32 in the shape ``quantize_fp8`` returns (or its
    flat (M, groups) form). Errors: TypeError/ValueError on a wrong dtype, device or shape."""
    check_tensor("dequantize_fp8", "data", data, dtypes=(torch.float8_e4m3fn,))
    check_tensor("dequantize_fp8", "scale", scale, dtypes=(torch.float32,))
    check_same_device("dequantize_fp8", data, scale=scale)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"pyops.dequantize_fp8: dtype must be one of {FLOAT_DTYPES}")
    g = _granularity(granularity)
    K = data.shape[-1]
    M = data.numel() // K
    want = _scale_shape(M, K, g)
    lead = tuple(data.shape[:-1])
    public = {"tensor": (1,), "row": (*lead, 1), "block1x128": (*lead, want[-1]),
              "block128x128": want}[g]
    if tuple(scale.shape) not in (tuple(want), public):
        raise ValueError(f"pyops.dequantize_fp8: scale has shape {tuple(scale.shape)}; "
                         f"granularity {g!r} on {tuple(data.shape)} needs {public}")
    scale = scale.reshape(want).contiguous()
    b = _backend.resolve(DEQ_OP, data.device, backend)
    return dequantize_fp8_op(data, scale, g, dtype, b)

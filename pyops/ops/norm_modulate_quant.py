"""pyops::norm_modulate_quant: schema, fake, backends (spec: pyops/reference/norm_modulate_quant.py).

Op arguments are already normalized by the public function (``pyops.norm_modulate_quant``):
x (..., D) any strides; shift/scale None or (Bm, D) with unit stride along D, Bm dividing the
number of rows M (row m uses modulation row m // (M // Bm)); weight/bias None or (D,)
contiguous; weight/bias/shift/scale of one dtype. Returns ``[q, scale]`` or, when ``y_dtype``
is given, ``[q, scale, y]``: q float8_e4m3fn with x's shape, scale fp32 (M,), y (x's shape,
``y_dtype``). A list because a schema cannot return an optional tensor.

Backends are destination-passing on the (M, D) view: ``fn(x2, weight, bias, shift, scale, rms,
eps, q, q_scale, y)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._checks import as_2d
from ..reference import norm_modulate_quant as ref

OP = "norm_modulate_quant"
NORM_CODE = {"layer": 0, "rms": 1}


# ---- backends ------------------------------------------------------------------------------------
def _reference(x2, weight, bias, shift, scale, rms, eps, q, q_scale, y) -> None:
    rq, rs, ry = ref.norm_modulate_quant(x2, shift, scale, weight, bias,
                                         "rms" if rms else "layer", eps)
    q.copy_(rq)
    q_scale.copy_(rs)
    if y is not None:
        y.copy_(ry)


def _triton(x2, weight, bias, shift, scale, rms, eps, q, q_scale, y) -> None:
    from ..triton_kernels import norm_modulate_quant as tk
    tk.norm_modulate_quant(x2, weight, bias, shift, scale, rms, eps, q, q_scale, y)


def _cuda(x2, weight, bias, shift, scale, rms, eps, q, q_scale, y) -> None:
    torch.ops.pyops._norm_modulate_quant_cuda(x2, weight, bias, shift, scale, int(rms),
                                              float(eps), q, q_scale, y)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)
_backend.register(OP, "cuda", _cuda)


# ---- the op --------------------------------------------------------------------------------------
def norm_modulate_quant_impl(x: torch.Tensor, shift: Optional[torch.Tensor],
                             scale: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], norm: str, eps: float,
                             y_dtype: Optional[torch.dtype], backend: str) -> list[torch.Tensor]:
    D = x.shape[-1]
    x2 = as_2d(x)
    M = x2.shape[0]
    q = torch.empty((M, D), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    y = torch.empty((M, D), dtype=y_dtype, device=x.device) if y_dtype is not None else None
    if M > 0 and D > 0:
        _backend.impl(OP, backend)(x2, weight, bias, shift, scale, norm == "rms", float(eps),
                                   q, s, y)
    out = [q.view(x.shape), s]
    if y is not None:
        out.append(y.view(x.shape))
    return out


@torch.library.custom_op("pyops::norm_modulate_quant", mutates_args=())
def norm_modulate_quant_op(x: torch.Tensor, shift: Optional[torch.Tensor],
                           scale: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], norm: str, eps: float,
                           y_dtype: Optional[torch.dtype], backend: str) -> list[torch.Tensor]:
    return norm_modulate_quant_impl(x, shift, scale, weight, bias, norm, eps, y_dtype, backend)


@norm_modulate_quant_op.register_fake
def _(x, shift, scale, weight, bias, norm, eps, y_dtype, backend):
    D = x.shape[-1]
    M = x.numel() // D if x.dim() != 2 else x.shape[0]
    out = [x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
           x.new_empty((M,), dtype=torch.float32)]
    if y_dtype is not None:
        out.append(x.new_empty(x.shape, dtype=y_dtype))
    return out


def _register_cuda_fakes() -> None:
    if hasattr(torch.ops.pyops, "_norm_modulate_quant_cuda"):
        torch.library.register_fake("pyops::_norm_modulate_quant_cuda")(lambda *a: None)


if _backend.extension_status()[0]:
    _register_cuda_fakes()

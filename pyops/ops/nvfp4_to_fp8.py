"""nvfp4_to_fp8: an NVFP4 weight re-encoded as FP8 e4m3 with one fp32 scale per output channel
(public function, op, backends), so a large-M NVFP4 linear can run the row-wise FP8 GEMM.

Op ``pyops::nvfp4_to_fp8(data, scales, global_scale, K, backend) -> (q, scale)``: ``data``
uint8 (N, ceil(K/16)*8), ``scales`` (N, ceil(K/16)) E4M3 (float8_e4m3fn or its uint8 bytes,
not swizzled), ``global_scale`` fp32 (1,); ``q`` float8_e4m3fn (N, K), ``scale`` fp32 (N,).
Spec: ``pyops/reference/nvfp4_to_fp8.py``. Backends (destination-passing,
``impl(data, scales, global_scale, K, q, scale)``): ``triton``
(``triton_kernels/nvfp4_to_fp8.py``, bit-exact to the spec) and ``reference``. No policy: auto
mode takes the first that runs (triton on CUDA, the reference elsewhere).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._checks import check_same_device, check_tensor
from .._op import define
from ..reference import nvfp4_to_fp8 as ref
from ..reference.formats import NVFP4_BLOCK
from ..weights import FP8Weight, NVFP4Weight

OP = "nvfp4_to_fp8"


def _nb(K: int) -> int:
    return (K + NVFP4_BLOCK - 1) // NVFP4_BLOCK


# ---- backends: destination-passing ---------------------------------------------------------------
def _reference(data, scales, global_scale, K: int, q, scale) -> None:
    rq, rs = ref.nvfp4_to_fp8(data, scales, global_scale, K)
    q.copy_(rq)
    scale.copy_(rs)


def _triton(data, scales, global_scale, K: int, q, scale) -> None:
    from ..triton_kernels import nvfp4_to_fp8 as tk
    tk.nvfp4_to_fp8(data, scales, global_scale, K, q, scale)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)


# ---- checks -------------------------------------------------------------------------------------
def check_inputs(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                 K: int) -> None:
    """TypeError / ValueError for arguments the op cannot take (shapes and dtypes only; no
    data is read, so it is safe under tracing and before any launch)."""
    check_tensor(OP, "data", data, dtypes=(torch.uint8,), min_ndim=2)
    check_tensor(OP, "scales", scales, dtypes=(torch.float8_e4m3fn, torch.uint8), min_ndim=2)
    check_tensor(OP, "global_scale", global_scale, dtypes=(torch.float32,), min_ndim=0)
    check_same_device(OP, data, scales=scales, global_scale=global_scale)
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"pyops.{OP}: K must be an int, got {type(K).__name__}")
    if data.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"pyops.{OP}: data and scales must be 2-D (N, ...), got shapes "
                         f"{tuple(data.shape)} and {tuple(scales.shape)}")
    if K < 1:
        raise ValueError(f"pyops.{OP}: K must be >= 1, got {K}")
    N, nb = data.shape[0], _nb(K)
    if data.shape[1] != nb * 8:
        raise ValueError(f"pyops.{OP}: data has shape {tuple(data.shape)}; K={K} needs "
                         f"({N}, {nb * 8}) (ceil(K/16)*8 packed bytes a row)")
    if tuple(scales.shape) != (N, nb):
        raise ValueError(f"pyops.{OP}: scales have shape {tuple(scales.shape)}; data "
                         f"{tuple(data.shape)} with K={K} needs ({N}, {nb}) (one E4M3 scale "
                         f"per 16 elements, not swizzled)")
    if global_scale.numel() != 1:
        raise ValueError(f"pyops.{OP}: global_scale must hold one value, got shape "
                         f"{tuple(global_scale.shape)}")
    if data.stride(-1) != 1 or scales.stride(-1) != 1:
        raise ValueError(f"pyops.{OP}: data and scales must be contiguous along their last dim")


# ---- the op -------------------------------------------------------------------------------------
def _fake(data, scales, global_scale, K, backend):
    N = data.shape[0]
    return (data.new_empty((N, K), dtype=torch.float8_e4m3fn),
            data.new_empty((N,), dtype=torch.float32))


@define(OP, fake=_fake)
def nvfp4_to_fp8_op(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                    K: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_inputs(data, scales, global_scale, K)
    N = data.shape[0]
    q = torch.empty((N, K), dtype=torch.float8_e4m3fn, device=data.device)
    scale = torch.empty((N,), dtype=torch.float32, device=data.device)
    g = global_scale.reshape(1)
    _backend.impl(OP, backend)(data, scales.view(torch.uint8), g, K, q, scale)
    return q, scale


# ---- public function ----------------------------------------------------------------------------
def nvfp4_to_fp8(qweight: NVFP4Weight, *, backend: Optional[str] = None) -> FP8Weight:
    """Re-encode an NVFP4 weight as FP8 e4m3 with one fp32 scale per output channel, in one pass
    on the device (no host sync), for the row-wise FP8 GEMM (``torch._scaled_mm``).

    qweight: ``NVFP4Weight`` (``pyops.quantize_weight(w, "nvfp4")``): data uint8
    (N, ceil(K/16)*8), scales E4M3 (N, ceil(K/16)), global_scale fp32 (1,).
    Returns ``FP8Weight`` with data float8_e4m3fn (N, K) and scale fp32 (N, 1), dtype
    ``qweight.dtype``: ``W_fp8[n, k] = float(data[n, k]) * scale[n]``. Per row, with
    u = e2m1 * s_blk: ``scale = g * 2^e``, e the smallest integer with max|u| <= 448 * 2^e
    (448: E4M3's largest finite value, OCP FP8 spec), ``data = e4m3_rne(u * 2^-e)``. Exact
    where u * 2^-e fits E4M3 (at most 4 significant bits, or an E4M3 subnormal), else one
    rounding with relative error <= 2^-4; measured numbers and the full spec (NaN block scales
    -> NaN row scale, zero codes) in ``pyops/reference/nvfp4_to_fp8.py``.
    backend: ``"triton" | "reference"`` or None (auto; env ``PYOPS_BACKEND_NVFP4_TO_FP8``,
    ``PYOPS_BACKEND``); both give the same bits. Errors: TypeError for a qweight that is not an
    ``NVFP4Weight`` or tensors of the wrong dtype; ValueError for shapes that do not match K,
    before any launch; RuntimeError for a requested backend that cannot run.
    """
    if not isinstance(qweight, NVFP4Weight):
        raise TypeError(f"pyops.{OP}: qweight must be an NVFP4Weight "
                        f"(pyops.quantize_weight(w, 'nvfp4')), got {type(qweight).__name__}")
    data, scales, g, K = qweight.data, qweight.scales, qweight.global_scale, qweight.K
    check_inputs(data, scales, g, K)
    b = _backend.resolve(OP, data.device, backend)
    q, scale = nvfp4_to_fp8_op(data, scales, g, K, b)
    return FP8Weight(q, scale.view(-1, 1), qweight.dtype)

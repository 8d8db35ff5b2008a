"""FP8 e4m3 dynamic quantization: the reference, and the spec for every backend.

Input: a 2-D view ``x`` of shape (M, K) (any strides), bf16/fp16/fp32.
Groups, by granularity (code in brackets):

* ``tensor`` [0]       one group; scale shape (1,)
* ``row`` [1]          one group per row; scale shape (M,)
* ``block1x128`` [2]   1x128 along K; scale shape (M, ceil(K/128)); the last block may be partial
* ``block128x128`` [3] 128x128 tiles; scale shape (ceil(M/128), ceil(K/128)); edge tiles partial

For every group, in fp32:

    amax  = max |x| over the group's finite elements (0 if none)
    scale = max(amax / 448, FLT_MIN)                 # IEEE division, round to nearest even
    q     = e4m3(clamp(x / scale, -448, 448))        # IEEE division, RNE cast (torch's cast)

A group holding any inf or NaN gets ``scale = NaN`` and all its codes 0, so it dequantizes to
NaN: non-finite input is never silently turned into plausible numbers. ``scale`` is the
*dequantization* scale: ``x ~= float(q) * scale``.
"""
from __future__ import annotations

import torch

from .formats import E4M3_MAX, FLT_MAX, FLT_MIN, FP8_BLOCK  # noqa: F401 (re-exported)

FP8_MAX = E4M3_MAX
GRANULARITIES = ("tensor", "row", "block1x128", "block128x128")
BLOCK = FP8_BLOCK


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def scale_shape_2d(M: int, K: int, granularity: str) -> tuple[int, ...]:
    """Shape of the scale tensor for a (M, K) input."""
    if granularity == "tensor":
        return (1,)
    if granularity == "row":
        return (M,)
    if granularity == "block1x128":
        return (M, _cdiv(K, BLOCK))
    if granularity == "block128x128":
        return (_cdiv(M, BLOCK), _cdiv(K, BLOCK))
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


def div_rn(a: torch.Tensor, c: float) -> torch.Tensor:
    """IEEE ``a / c`` on every device. (On CUDA, torch computes ``tensor / python_scalar`` as
    ``tensor * (1 / scalar)``, which differs in the last bit about half the time.)"""
    return a / torch.full_like(a, c)


def _pad_to(t: torch.Tensor, M: int, K: int, value: float) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, K - t.shape[1], 0, M - t.shape[0]), value=value)


def _group_reduce(a0: torch.Tensor, bad: torch.Tensor, granularity: str):
    """Per-group amax over finite values and per-group 'has non-finite' flag."""
    M, K = a0.shape
    if granularity == "tensor":
        return a0.amax().reshape(1), bad.any().reshape(1)
    if granularity == "row":
        return a0.amax(dim=1), bad.any(dim=1)
    nk = _cdiv(K, BLOCK)
    if granularity == "block1x128":
        a = _pad_to(a0, M, nk * BLOCK, 0.0).view(M, nk, BLOCK)
        b = _pad_to(bad, M, nk * BLOCK, False).view(M, nk, BLOCK)
        return a.amax(dim=2), b.any(dim=2)
    nm = _cdiv(M, BLOCK)
    a = _pad_to(a0, nm * BLOCK, nk * BLOCK, 0.0).view(nm, BLOCK, nk, BLOCK)
    b = _pad_to(bad, nm * BLOCK, nk * BLOCK, False).view(nm, BLOCK, nk, BLOCK)
    return a.amax(dim=(1, 3)), b.any(dim=3).any(dim=1)


def expand_scale(scale: torch.Tensor, M: int, K: int, granularity: str) -> torch.Tensor:
    """Broadcast a per-group tensor (scale shape for ``granularity``) to (M, K)."""
    if granularity == "tensor":
        return scale.reshape(1, 1).expand(M, K)
    if granularity == "row":
        return scale.reshape(M, 1).expand(M, K)
    if granularity == "block1x128":
        return scale.repeat_interleave(BLOCK, dim=1)[:, :K]
    return scale.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)[:M, :K]


def quantize_fp8(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float tensor -> (q float8_e4m3fn (M, K), scale fp32 of ``scale_shape_2d``)."""
    M, K = x.shape
    xf = x.float()
    a = xf.abs()
    bad = ~(a <= FLT_MAX)  # inf or NaN
    a0 = torch.where(bad, torch.zeros((), dtype=a.dtype, device=a.device), a)
    amax, gbad = _group_reduce(a0, bad, granularity)
    scale = torch.clamp_min(div_rn(amax, FP8_MAX), FLT_MIN)
    scale = torch.where(gbad, torch.full_like(scale, float("nan")), scale)
    s_full = expand_scale(scale, M, K, granularity)
    q = (xf / s_full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    q = torch.where(expand_scale(gbad, M, K, granularity), torch.zeros_like(q), q)
    return q.view(torch.float8_e4m3fn), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, granularity: str,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, K) e4m3 codes and per-group scales -> float(q) * scale, rounded once to ``out_dtype``."""
    M, K = q.shape
    return (q.float() * expand_scale(scale.float(), M, K, granularity)).to(out_dtype)

"""Triton FP8 e4m3 quantizer / dequantizer. Spec: ``pyops/reference/quantize_fp8.py`` (bit-exact).

Destination-passing host functions (launch on the current stream, no host sync):

* ``quantize_fp8(x, q, scale, granularity)`` -- x (M, K) bf16/fp16/fp32, any strides;
  q (M, K) float8_e4m3fn contiguous; scale fp32 contiguous, shape by granularity code
  0 tensor (1,), 1 row (M,), 2 block1x128 (M, ceil(K/128)), 3 block128x128
  (ceil(M/128), ceil(K/128)).
* ``dequantize_fp8(q, scale, granularity, out)`` -- out = float(q) * scale in fp32, rounded once.

Design (memory bound; one read of x, one write of q, except as noted):

* row / block1x128 / block128x128: one launch. A program owns whole groups (BM rows x a K
  range), reduces amax in registers and quantizes the same registers. Rows longer than
  ``ROW_SINGLE_MAX`` are done in two passes over the row (the second read mostly hits L2).
* tensor: two launches. ``_amax.partial_amax`` (at most ``_amax.MAX_PARTIALS`` persistent
  programs) writes one partial per program: amax over finite values, or +inf if the program saw
  a non-finite value. ``_fp8_quant_kernel`` reduces all partials itself (tiny, L2-resident) and
  quantizes its tile; program 0 writes the scale.

Division is ``tl.math.div_rn`` (IEEE RNE; plain ``/`` is approximate on GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._amax import partial_amax, pow2 as _pow2, warps as _warps
from ._cvt import (F32_NAN_BITS, FLT_MAX, FP8_BLOCK, as_kernel_input, as_kernel_output,
                   e4m3_to_f32, f32_to_out, fp8_codes, fp8_scale, load_f32, out_kind,
                   use_soft_cvt)

BLOCK = FP8_BLOCK.value  # the block granularities' 128 (host side)
ROW_SINGLE_MAX = 8192  # rows up to this length are kept in registers (one pass)
ROW_CHUNK = 4096  # chunk along K for longer rows (two passes)
TILE_ELEMS = 8192  # target elements per program


@triton.jit
def _fp8_group_scale(amax):
    """amax over the group with non-finite values mapped to +inf -> (scale, bad)."""
    bad = amax > FLT_MAX
    nan = tl.full(amax.shape, F32_NAN_BITS, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(bad, nan, fp8_scale(amax)), bad


@triton.jit
def _abs_mark(x):
    """|x| with inf/NaN mapped to +inf, so one max gives both amax and the 'bad' flag."""
    a = tl.abs(x)
    return tl.where(a <= FLT_MAX, a, float("inf"))


@triton.jit
def _fp8_codes(x, scale, bad, SOFT: tl.constexpr):
    """``_cvt.fp8_codes`` with the codes of a non-finite group (``bad``) set to 0."""
    return tl.where(bad, 0, fp8_codes(x, scale, SOFT)).to(tl.uint8)


@triton.jit
def _fp8_quant_kernel(x_ptr, q_ptr, s_ptr, part_ptr, n_part, M, K, sxm, sxk, sqm,
                      n_tiles_k, ssm,
                      MODE: tl.constexpr, SINGLE: tl.constexpr, IS_BF16: tl.constexpr,
                      SOFT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                      P_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_k
    pid_k = pid % n_tiles_k
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < M
    xrow = rows[:, None] * sxm
    qrow = rows[:, None] * sqm
    if MODE == 0:  # tensor: reduce the partials of the amax pass
        pofs = tl.arange(0, P_BLOCK)
        part = tl.load(part_ptr + pofs, mask=pofs < n_part, other=0.0)
        scale, bad = _fp8_group_scale(tl.max(part, axis=0))
        if pid == 0:
            tl.store(s_ptr, scale)
        cols = pid_k.to(tl.int64) * BK + tl.arange(0, BK)
        mask = rmask[:, None] & (cols < K)[None, :]
        x = load_f32(x_ptr, xrow + cols[None, :] * sxk, mask, IS_BF16)
        tl.store(q_ptr + qrow + cols[None, :], _fp8_codes(x, scale, bad, SOFT), mask=mask)
    elif MODE == 3:  # block128x128: the whole tile is one group
        cols = pid_k.to(tl.int64) * BK + tl.arange(0, BK)
        mask = rmask[:, None] & (cols < K)[None, :]
        x = load_f32(x_ptr, xrow + cols[None, :] * sxk, mask, IS_BF16)
        scale, bad = _fp8_group_scale(tl.max(tl.max(_abs_mark(x), axis=1), axis=0))
        tl.store(s_ptr + pid_m.to(tl.int64) * ssm + pid_k, scale)
        tl.store(q_ptr + qrow + cols[None, :], _fp8_codes(x, scale, bad, SOFT), mask=mask)
    elif SINGLE:  # row (BK >= K) or block1x128 (BK == 128): one group per row of the tile
        cols = pid_k.to(tl.int64) * BK + tl.arange(0, BK)
        mask = rmask[:, None] & (cols < K)[None, :]
        x = load_f32(x_ptr, xrow + cols[None, :] * sxk, mask, IS_BF16)
        scale, bad = _fp8_group_scale(tl.max(_abs_mark(x), axis=1))
        tl.store(s_ptr + rows * ssm + pid_k, scale, mask=rmask)
        tl.store(q_ptr + qrow + cols[None, :], _fp8_codes(x, scale[:, None], bad[:, None], SOFT),
                 mask=mask)
    else:  # row, long rows: amax pass, then quantize pass
        amax = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK).to(tl.int64)
            mask = rmask[:, None] & (cols < K)[None, :]
            x = load_f32(x_ptr, xrow + cols[None, :] * sxk, mask, IS_BF16)
            amax = tl.maximum(amax, tl.max(_abs_mark(x), axis=1))
        scale, bad = _fp8_group_scale(amax)
        tl.store(s_ptr + rows, scale, mask=rmask)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK).to(tl.int64)
            mask = rmask[:, None] & (cols < K)[None, :]
            x = load_f32(x_ptr, xrow + cols[None, :] * sxk, mask, IS_BF16)
            tl.store(q_ptr + qrow + cols[None, :],
                     _fp8_codes(x, scale[:, None], bad[:, None], SOFT), mask=mask)


@triton.jit
def _fp8_dequant_kernel(q_ptr, s_ptr, o_ptr, M, K, sqm, som, n_tiles_k, ssm,
                        MODE: tl.constexpr, OUT_KIND: tl.constexpr, SOFT: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_k
    pid_k = pid % n_tiles_k
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_k.to(tl.int64) * BK + tl.arange(0, BK)
    rmask = rows < M
    mask = rmask[:, None] & (cols < K)[None, :]
    if MODE == 0:
        s = tl.load(s_ptr + rows * 0, mask=rmask, other=0.0)
    elif MODE == 1:
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
    elif MODE == 2:  # BK == FP8_BLOCK: the tile's columns are one K block
        s = tl.load(s_ptr + rows * ssm + pid_k, mask=rmask, other=0.0)
    else:
        s = tl.load(s_ptr + (rows // FP8_BLOCK) * ssm + pid_k, mask=rmask, other=0.0)
    b = tl.load(q_ptr + rows[:, None] * sqm + cols[None, :], mask=mask, other=0)
    v = e4m3_to_f32(b, SOFT) * s[:, None]
    tl.store(o_ptr + rows[:, None] * som + cols[None, :], f32_to_out(v, OUT_KIND, SOFT), mask=mask)




def _check_2d(name, t, M, K):
    if t.dim() != 2 or tuple(t.shape) != (M, K):
        raise ValueError(f"{name} must have shape ({M}, {K}), got {tuple(t.shape)}")
    if t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along K")


def _scale_shape(M: int, K: int, g: int):
    nk = triton.cdiv(K, BLOCK)
    return [(1,), (M,), (M, nk), (triton.cdiv(M, BLOCK), nk)][g]


def quantize_fp8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, granularity: int) -> None:
    """Quantize x (M, K) into q and scale (preallocated); granularity code 0..3."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bf16/fp16/fp32, got {x.dtype}")
    g = int(granularity)
    if g not in (0, 1, 2, 3):
        raise ValueError(f"granularity code must be 0..3, got {granularity}")
    M, K = x.shape
    _check_2d("q", q, M, K)
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"q must be float8_e4m3fn, got {q.dtype}")
    if (scale.dtype != torch.float32 or not scale.is_contiguous()
            or tuple(scale.shape) != _scale_shape(M, K, g)):
        raise ValueError(f"scale must be contiguous fp32 of shape {_scale_shape(M, K, g)}")
    if M == 0 or K == 0:
        return
    soft = use_soft_cvt(x)
    xk = as_kernel_input(x)
    qk = q.view(torch.uint8)
    is_bf16 = x.dtype == torch.bfloat16
    sxm, sxk = x.stride()
    n_sk = triton.cdiv(K, BLOCK)
    single, p_block, part, n_part = True, 1, scale, 1
    if g == 0:
        part, n_part, p_block = partial_amax(xk, x, mark_nonfinite=True)
        BK = min(_pow2(K), 1024)
        BM = min(max(TILE_ELEMS // BK, 1), _pow2(M))
        n_tiles_k = triton.cdiv(K, BK)
    elif g == 1:
        single = K <= ROW_SINGLE_MAX
        BK = _pow2(K) if single else ROW_CHUNK
        BM = min(max(TILE_ELEMS // BK, 1), _pow2(M))
        n_tiles_k = 1
    elif g == 2:
        BK = BLOCK
        BM = min(TILE_ELEMS // BK, _pow2(M))
        n_tiles_k = n_sk
    else:
        BK, BM = BLOCK, BLOCK
        n_tiles_k = n_sk
    grid = (triton.cdiv(M, BM) * n_tiles_k,)
    _fp8_quant_kernel[grid](xk, qk, scale, part, n_part, M, K, sxm, sxk, qk.stride(0),
                            n_tiles_k, 1 if g == 1 else n_sk,
                            MODE=g, SINGLE=single, IS_BF16=is_bf16, SOFT=soft, BM=BM, BK=BK,
                            P_BLOCK=p_block, num_warps=_warps(BM * BK))


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, granularity: int,
                   out: torch.Tensor) -> None:
    """out (M, K) bf16/fp16/fp32 = float(q) * scale (fp32), rounded once."""
    if q.dim() != 2 or q.dtype != torch.float8_e4m3fn:
        raise ValueError("q must be a 2-D float8_e4m3fn tensor")
    M, K = q.shape
    g = int(granularity)
    if g not in (0, 1, 2, 3):
        raise ValueError(f"granularity code must be 0..3, got {granularity}")
    _check_2d("q", q, M, K)
    _check_2d("out", out, M, K)
    if (scale.dtype != torch.float32 or not scale.is_contiguous()
            or tuple(scale.shape) != _scale_shape(M, K, g)):
        raise ValueError(f"scale must be contiguous fp32 of shape {_scale_shape(M, K, g)}")
    if M == 0 or K == 0:
        return
    soft = use_soft_cvt(q)
    ok = as_kernel_output(out, soft)
    qk = q.view(torch.uint8)
    n_sk = triton.cdiv(K, BLOCK)
    if g in (0, 1):
        BK = min(_pow2(K), 1024)
        BM = min(max(TILE_ELEMS // BK, 1), _pow2(M))
    else:
        BK = BLOCK
        BM = min(64, _pow2(M))
    n_tiles_k = triton.cdiv(K, BK)
    grid = (triton.cdiv(M, BM) * n_tiles_k,)
    _fp8_dequant_kernel[grid](qk, scale, ok, M, K, qk.stride(0), ok.stride(0), n_tiles_k,
                              1 if g == 1 else n_sk,
                              MODE=g, OUT_KIND=out_kind(out.dtype), SOFT=soft, BM=BM, BK=BK,
                              num_warps=_warps(BM * BK))

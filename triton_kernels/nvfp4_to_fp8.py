"""Triton NVFP4 weight -> FP8 e4m3 with one fp32 scale per row. Spec (bit-exact: q bytes and
scale bits): ``pyops/reference/nvfp4_to_fp8.py``.

Destination-passing host function (current stream, no host sync)::

    nvfp4_to_fp8(data, scales, global_scale, K, q, scale)
        data uint8 (N, nb*8), nb = ceil(K/16), packed E2M1 (low nibble first), rows contiguous;
        scales uint8 (or float8_e4m3fn) (N, nb) E4M3 block scales, not swizzled;
        global_scale fp32 (1,); q float8_e4m3fn (N, K) contiguous; scale fp32 (N,) contiguous.

A program owns BN whole rows. It decodes u = e2m1 * s_blk (exact fp32; E2M1 and the E4M3 scale
bytes decoded with integer arithmetic, identical on the GPU and in the interpreter), reduces the
row amax, takes the row exponent e from amax's fp32 bits, multiplies by 2^-e (exact; the power
of two built from bits, no exp2) and rounds once to e4m3 (``_cvt.e4m3_bits``). Rows up to
``ROW_SINGLE_MAX`` elements are decoded once and kept in registers; longer rows are read twice
(an amax pass, then the conversion pass, whose re-read of the half-byte-per-element input mostly
hits L2). Unmeasured on a GPU.

The row exponent, from amax = 1.f * 2^(b - 127) (fp32 biased exponent b, mantissa bits f) and
448 = 1.75 * 2^(135 - 127): e = b - b448 + (f > f448), the smallest e with amax <= 448 * 2^e
(the reference's frexp rule, in bits; b448 and f448 are computed on the host from E4M3_MAX).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._amax import pow2 as _pow2, warps as _warps
from ._cvt import (E4M3_MAX, F32_NAN_BITS, FLT_MAX, NVFP4_BLOCK, e2m1_to_f32, e2m1_unpack,
                   e4m3_bits, e4m3_to_f32, use_soft_cvt)

BLOCK = NVFP4_BLOCK.value
ROW_SINGLE_MAX = 8192  # rows up to this many elements are converted from registers (one read)
ROW_CHUNK = 4096  # chunk along K for longer rows (two reads)
TILE_ELEMS = 8192  # target fp32 elements per program and chunk
_MAX_BITS = struct.unpack("<i", struct.pack("<f", E4M3_MAX.value))[0]
MAX_BIASED_EXP = _MAX_BITS >> 23  # 135
MAX_MANT_BITS = _MAX_BITS & 0x7FFFFF  # 0x600000 (1.75)


@triton.jit
def _weight_tile(d_ptr, s_ptr, rows, rmask, k0, K, sdn, ssn,
                 BN: tl.constexpr, BK: tl.constexpr):
    """u = e2m1 * float(s_blk) (fp32, exact) for rows x [k0, k0 + BK); 0 outside k < K."""
    kh = k0 // 2 + tl.arange(0, BK // 2)
    kb = k0 // NVFP4_BLOCK + tl.arange(0, BK // NVFP4_BLOCK)
    pk = tl.load(d_ptr + rows[:, None] * sdn + kh[None, :],
                 mask=rmask[:, None] & (2 * kh < K)[None, :], other=0).to(tl.int32)
    sb = tl.load(s_ptr + rows[:, None] * ssn + kb[None, :],
                 mask=rmask[:, None] & (kb * NVFP4_BLOCK < K)[None, :], other=0).to(tl.int32)
    v = e2m1_to_f32(tl.reshape(e2m1_unpack(pk), [BN, BK]))
    s = e4m3_to_f32(sb, True)  # integer decode everywhere (exact)
    u = tl.reshape(tl.reshape(v, [BN, BK // NVFP4_BLOCK, NVFP4_BLOCK]) * s[:, :, None], [BN, BK])
    kk = k0 + tl.arange(0, BK)
    return tl.where(rmask[:, None] & (kk < K)[None, :], u, 0.0)


@triton.jit
def _marked_row_max(u):
    """max |u| per row with NaN counted as +inf (so one max also flags a NaN block scale)."""
    a = tl.abs(u)
    return tl.max(tl.where(a <= FLT_MAX, a, float("inf")), axis=1)


@triton.jit
def _nvfp4_to_fp8_kernel(d_ptr, s_ptr, g_ptr, q_ptr, o_ptr, N, K, sdn, ssn, sqn,
                         MAX_EXP: tl.constexpr, MAX_MANT: tl.constexpr, SINGLE: tl.constexpr,
                         SOFT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    rmask = rows < N
    if SINGLE:  # BK >= K: the whole row in registers
        u = _weight_tile(d_ptr, s_ptr, rows, rmask, 0, K, sdn, ssn, BN, BK)
        amax = _marked_row_max(u)
    else:
        amax = tl.zeros([BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            amax = tl.maximum(amax, _marked_row_max(
                _weight_tile(d_ptr, s_ptr, rows, rmask, k0, K, sdn, ssn, BN, BK)))
    bad = amax > FLT_MAX
    bits = amax.to(tl.int32, bitcast=True)
    e = (bits >> 23) - MAX_EXP + ((bits & 0x7FFFFF) > MAX_MANT).to(tl.int32)
    e = tl.where((amax == 0) | bad, 0, e)  # e in [-18, 3] otherwise: both powers are normal
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e
    nan = tl.full([BN], F32_NAN_BITS, tl.int32).to(tl.float32, bitcast=True)
    scale = tl.where(bad, nan, tl.load(g_ptr) * ((127 + e) << 23).to(tl.float32, bitcast=True))
    tl.store(o_ptr + rows, scale, mask=rmask)
    if SINGLE:
        kk = tl.arange(0, BK)
        codes = tl.where(bad[:, None], 0, e4m3_bits(u * inv[:, None], SOFT))
        tl.store(q_ptr + rows[:, None] * sqn + kk[None, :], codes.to(tl.uint8),
                 mask=rmask[:, None] & (kk < K)[None, :])
    else:
        for k0 in range(0, K, BK):
            u = _weight_tile(d_ptr, s_ptr, rows, rmask, k0, K, sdn, ssn, BN, BK)
            kk = k0 + tl.arange(0, BK)
            codes = tl.where(bad[:, None], 0, e4m3_bits(u * inv[:, None], SOFT))
            tl.store(q_ptr + rows[:, None] * sqn + kk[None, :], codes.to(tl.uint8),
                     mask=rmask[:, None] & (kk < K)[None, :])


def _check(name, t, shape, dtype, rows_only=False):
    ok = t.dim() == len(shape) and tuple(t.shape) == tuple(shape) and t.dtype == dtype
    ok = ok and (t.stride(-1) == 1 if rows_only else t.is_contiguous())
    if not ok:
        raise ValueError(f"{name} must be {dtype} of shape {tuple(shape)} "
                         f"({'rows contiguous' if rows_only else 'contiguous'}), got {t.dtype} "
                         f"{tuple(t.shape)} strides {tuple(t.stride())}")


def tiles(N: int, K: int) -> tuple[int, int, bool]:
    """(BN, BK, single) for a (N, K) conversion."""
    single = K <= ROW_SINGLE_MAX
    BK = max(_pow2(K), BLOCK) if single else ROW_CHUNK
    BN = min(max(TILE_ELEMS // BK, 1), _pow2(N))
    return BN, BK, single


def nvfp4_to_fp8(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, K: int,
                 q: torch.Tensor, scale: torch.Tensor) -> None:
    K = int(K)
    if data.dim() != 2 or K < 1:
        raise ValueError(f"data must be 2-D and K >= 1, got shape {tuple(data.shape)}, K={K}")
    N = data.shape[0]
    nb = triton.cdiv(K, BLOCK)
    if scales.dtype == torch.float8_e4m3fn:
        scales = scales.view(torch.uint8)
    _check("data", data, (N, nb * BLOCK // 2), torch.uint8, rows_only=True)
    _check("scales", scales, (N, nb), torch.uint8, rows_only=True)
    _check("global_scale", global_scale.reshape(-1), (1,), torch.float32)
    _check("q", q, (N, K), torch.float8_e4m3fn)
    _check("scale", scale, (N,), torch.float32)
    if N == 0:
        return
    BN, BK, single = tiles(N, K)
    _nvfp4_to_fp8_kernel[(triton.cdiv(N, BN),)](
        data, scales, global_scale, q.view(torch.uint8), scale, N, K, data.stride(0),
        scales.stride(0), q.stride(0), MAX_EXP=MAX_BIASED_EXP, MAX_MANT=MAX_MANT_BITS,
        SINGLE=single, SOFT=use_soft_cvt(data), BN=BN, BK=BK, num_warps=_warps(BN * BK))

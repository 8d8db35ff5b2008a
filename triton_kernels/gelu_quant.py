"""Triton kernel of pyops::gelu_quant (spec: pyops/reference/gelu_quant.py).

One pass over x: y = GELU(x) in fp32, then per-token FP8 e4m3 quantization of that fp32 y exactly
as ``quantize_fp8(y, "row")`` (``_cvt.fp8_scale`` / ``fp8_codes``: IEEE division, clamp +-448,
RNE cast; a non-finite row -> NaN scale and zero codes), and optionally y itself (fp32/fp16/bf16,
RNE).

* Rows up to ``single_max`` (default 16384) elements: a program holds BM whole rows in registers
  (BM > 1 only for short rows); x is read once and GELU computed once per element.
* Longer rows: chunks of ``CHUNK`` along K, two passes (amax, then codes); the second recomputes
  y with the same operations, so it gets the same bits (re-reads mostly hit L2).

GELU arithmetic (the same operation sequence as ``csrc/gelu_quant.cu``, so on a GPU the two
backends' y agree bit for bit; only exactly rounded operations: fma, IEEE division, products,
sums, integer bit moves; no hardware approximation, no FMA contraction):

* ``approximate="tanh"``: ``0.5 x (1 + tanh(u)) = x / (1 + exp(-2u))`` with
  ``-2u = x (A + B x^2)``, ``A = -2 sqrt(2/pi)``, ``B = A * 0.044715`` (fp32), the exponent
  clamped to [-87, 88.8] (below: 1 + e^-87 rounds to 1; above: the factor becomes inf and y +-0,
  as in the reference, where t rounds to -1 there; a NaN exponent comes only from a NaN x, whose
  y is NaN through the numerator).
* ``approximate="none"``: ``(0.5 x)(1 + erf(x / sqrt 2))`` with erf of ``a = min(|z|, 4)``:
  ``a P(a^2)`` for a < 0.875, else ``1 - exp(R(a - 2.4375) - a^2)`` (R approximates
  ``log erfc(a) + a^2``), sign of z restored; erf(4) rounds to 1 in fp32.
* ``exp(v)`` (``_exp_split``): ``k = rint(v log2 e)`` (magic-number rounding), ``r = v - k ln2``
  (one fma), ``exp(r)`` a degree-6 polynomial on [-ln2/2, ln2/2], times ``2^k`` built from k's
  bits.

The polynomial coefficients are our own minimax fits (linear programming over 3000 Chebyshev
points, coefficients rounded to fp32): exp's relative error is below 2^-28 on its interval,
erf's absolute error below 2^-28 (small branch) and ``erfc * |R error|`` below 2^-29 (large
branch). tests/test_gelu_quant.py measures the kernel's y against an fp64 GELU on every bf16
value and dense fp32 grids (within 4 * 2^-24 (|x| + |y|)) and checks that csrc/gelu_quant.cu
holds the same constants bit for bit.

Offsets are int64; x may have any strides; q / y / scale are contiguous.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._cvt import (LN2, LOG2E, as_kernel_input, as_kernel_output, f32_to_out, load_f32,
                   out_kind, use_soft_cvt)
from .norm_modulate_quant import CHUNK, SINGLE_MAX, row_tiling
from .quantize_fp8 import _abs_mark, _fp8_codes, _fp8_group_scale

GELU_TANH = 0  # approximate="tanh" (the C ABI's PYOPS_GELU_TANH)
GELU_ERF = 1  # approximate="none" (PYOPS_GELU_ERF)

_h = float.fromhex
# tanh form: -2u = x * (TANH_A + TANH_B * x^2)
TANH_A = tl.constexpr(_h("-0x1.988454p+0"))  # fp32(-2 * sqrt(2/pi))
TANH_B = tl.constexpr(_h("-0x1.2444f2p-4"))  # fp32(-2 * sqrt(2/pi) * 0.044715)
EXP_LO = tl.constexpr(-87.0)  # exponent clamp of the tanh form (see the module docstring)
EXP_HI = tl.constexpr(88.8)
RNE_INT = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + RNE_INT) - RNE_INT = rint(v), |v| < 2^22
RNE_INT_BITS = tl.constexpr(0x4B400000)  # its fp32 bits: bits(v + RNE_INT) - this = rint(v)
# exp(r) = 1 + r (1 + r (EXP2 + r (EXP3 + r (EXP4 + r (EXP5 + r EXP6))))) on [-ln2/2, ln2/2]
EXP_C = (_h("0x1.fffffcp-2"), _h("0x1.55541ap-3"), _h("0x1.555822p-5"), _h("0x1.126792p-7"),
         _h("0x1.6ae72p-10"))
EXP2 = tl.constexpr(EXP_C[0])
EXP3 = tl.constexpr(EXP_C[1])
EXP4 = tl.constexpr(EXP_C[2])
EXP5 = tl.constexpr(EXP_C[3])
EXP6 = tl.constexpr(EXP_C[4])
# erf form
SQRT1_2 = tl.constexpr(_h("0x1.6a09e6p-1"))  # fp32(1/sqrt(2)), the reference's constant
ERF_CLAMP = tl.constexpr(4.0)
ERF_SPLIT = tl.constexpr(0.875)
ERF_MID = tl.constexpr(2.4375)
# erf(a) = a * (S0 + a^2 (S1 + a^2 (S2 + ...))), a < 0.875
ERF_S = (_h("0x1.20dd74p+0"), _h("-0x1.8126bep-2"), _h("0x1.ce187ep-4"), _h("-0x1.b68df6p-6"),
         _h("0x1.47bd04p-8"), _h("-0x1.3d812ap-11"))
# log(erfc(a)) + a^2 = L0 + t (L1 + t (L2 + ...)), t = a - 2.4375, 0.875 <= a <= 4
ERF_L = (_h("-0x1.88d888p+0"), _h("-0x1.707994p-2"), _h("0x1.dcd512p-5"), _h("-0x1.709abep-7"),
         _h("0x1.5953a8p-9"), _h("-0x1.4c4488p-13"), _h("0x1.a33954p-13"))
ERF_S0, ERF_S1, ERF_S2, ERF_S3, ERF_S4, ERF_S5 = (tl.constexpr(c) for c in ERF_S)
ERF_L0, ERF_L1, ERF_L2, ERF_L3, ERF_L4, ERF_L5, ERF_L6 = (tl.constexpr(c) for c in ERF_L)


@triton.jit
def _exp_split(v):
    """exp(v) as (p, s) with exp(v) ~= p * s, p = exp(r) in [0.7, 1.42], s = 2^k (fp32 bits;
    k = 128 gives inf). v within [-87.3, 88.8] (callers clamp)."""
    j = tl.math.fma(v, LOG2E, RNE_INT)
    kf = j - RNE_INT
    r = tl.math.fma(kf, -LN2, v)
    p = tl.math.fma(r, EXP6, EXP5)
    p = tl.math.fma(p, r, EXP4)
    p = tl.math.fma(p, r, EXP3)
    p = tl.math.fma(p, r, EXP2)
    p = tl.math.fma(p, r, 1.0)
    p = tl.math.fma(p, r, 1.0)
    kb = j.to(tl.int32, bitcast=True) - RNE_INT_BITS
    s = ((kb + 127) << 23).to(tl.float32, bitcast=True)
    return p, s


@triton.jit
def _gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) computed as x / (1 + exp(-2u))."""
    x2 = x * x
    v = x * tl.math.fma(x2, TANH_B, TANH_A)
    v = tl.minimum(tl.maximum(v, EXP_LO), EXP_HI)  # NaN -> EXP_LO (then y = NaN / .. = NaN)
    p, s = _exp_split(v)
    return tl.math.div_rn(x, tl.math.fma(p, s, 1.0))


@triton.jit
def _gelu_erf(x):
    """(0.5 x) (1 + erf(x / sqrt 2))."""
    z = x * SQRT1_2
    zb = z.to(tl.int32, bitcast=True)
    a = (zb & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    a = tl.minimum(a, ERF_CLAMP)  # NaN -> 4 (then y = 0.5 NaN .. = NaN)
    a2 = a * a
    ps = tl.math.fma(a2, ERF_S5, ERF_S4)
    ps = tl.math.fma(ps, a2, ERF_S3)
    ps = tl.math.fma(ps, a2, ERF_S2)
    ps = tl.math.fma(ps, a2, ERF_S1)
    ps = tl.math.fma(ps, a2, ERF_S0)
    small = a * ps
    t = a - ERF_MID
    pl = tl.math.fma(t, ERF_L6, ERF_L5)
    pl = tl.math.fma(pl, t, ERF_L4)
    pl = tl.math.fma(pl, t, ERF_L3)
    pl = tl.math.fma(pl, t, ERF_L2)
    pl = tl.math.fma(pl, t, ERF_L1)
    pl = tl.math.fma(pl, t, ERF_L0)
    p, s = _exp_split(tl.math.fma(-a, a, pl))
    large = 1.0 - p * s
    e = tl.where(a < ERF_SPLIT, small, large)
    e = (e.to(tl.int32, bitcast=True) | (zb & -2147483648)).to(tl.float32, bitcast=True)
    return (0.5 * x) * (1.0 + e)


@triton.jit
def _gelu(x, APPROX: tl.constexpr):
    if APPROX == GELU_TANH:
        y = _gelu_tanh(x)
    else:
        y = _gelu_erf(x)
    return y


@triton.jit
def _chunk_y(k0, K, rmask, x_ptr, xrow, sxk, IS_BF16: tl.constexpr, APPROX: tl.constexpr,
             BK: tl.constexpr):
    cols = k0 + tl.arange(0, BK).to(tl.int64)
    mask = rmask[:, None] & (cols < K)[None, :]
    x = load_f32(x_ptr, xrow + cols[None, :] * sxk, mask, IS_BF16)
    return cols, mask, _gelu(x, APPROX)


@triton.jit
def _gelu_quant_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, K, sxm, sxk,
                       APPROX: tl.constexpr, WRITE_Y: tl.constexpr, Y_KIND: tl.constexpr,
                       IS_BF16: tl.constexpr, SOFT: tl.constexpr, SINGLE: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < M
    xrow = rows[:, None] * sxm
    orow = rows[:, None] * K
    if SINGLE:  # BK >= K: whole rows in registers
        cols, mask, y = _chunk_y(0, K, rmask, x_ptr, xrow, sxk, IS_BF16, APPROX, BK)
        amax = tl.max(tl.where(mask, _abs_mark(y), 0.0), axis=1)
        scale, bad = _fp8_group_scale(amax)
        tl.store(s_ptr + rows, scale, mask=rmask)
        tl.store(q_ptr + orow + cols[None, :], _fp8_codes(y, scale[:, None], bad[:, None], SOFT),
                 mask=mask)
        if WRITE_Y:
            tl.store(y_ptr + orow + cols[None, :], f32_to_out(y, Y_KIND, SOFT), mask=mask)
    else:  # long rows: amax pass, then codes pass (y recomputed: same operations, same bits)
        amax = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols, mask, y = _chunk_y(k0, K, rmask, x_ptr, xrow, sxk, IS_BF16, APPROX, BK)
            amax = tl.maximum(amax, tl.max(tl.where(mask, _abs_mark(y), 0.0), axis=1))
            if WRITE_Y:
                tl.store(y_ptr + orow + cols[None, :], f32_to_out(y, Y_KIND, SOFT), mask=mask)
        scale, bad = _fp8_group_scale(amax)
        tl.store(s_ptr + rows, scale, mask=rmask)
        for k0 in range(0, K, BK):
            cols, mask, y = _chunk_y(k0, K, rmask, x_ptr, xrow, sxk, IS_BF16, APPROX, BK)
            tl.store(q_ptr + orow + cols[None, :],
                     _fp8_codes(y, scale[:, None], bad[:, None], SOFT), mask=mask)


def gelu_quant(x: torch.Tensor, approx: int, q: torch.Tensor, q_scale: torch.Tensor,
               y: Optional[torch.Tensor], single_max: int = SINGLE_MAX,
               chunk: int = CHUNK) -> None:
    """Destination-passing launch on the current stream.

    x (M, K) bf16/fp16/fp32, any strides; approx GELU_TANH (0) or GELU_ERF (1); q (M, K)
    float8_e4m3fn, q_scale (M,) fp32, y (M, K) fp32/fp16/bf16 or None: contiguous.
    ``single_max`` / ``chunk`` pick the long-row path (tests force it on small K).
    """
    M, K = x.shape
    if M == 0 or K == 0:
        return
    if approx not in (GELU_TANH, GELU_ERF):
        raise ValueError(f"approx must be {GELU_TANH} (tanh) or {GELU_ERF} (erf), got {approx!r}")
    soft = use_soft_cvt(x)
    single, BM, BK, warps = row_tiling(M, K, single_max, chunk)
    yk = as_kernel_output(y, soft) if y is not None else q_scale
    grid = (triton.cdiv(M, BM),)
    _gelu_quant_kernel[grid](as_kernel_input(x), q.view(torch.uint8), q_scale, yk,
                             M, K, x.stride(0), x.stride(1),
                             APPROX=int(approx), WRITE_Y=y is not None,
                             Y_KIND=out_kind(y.dtype) if y is not None else 0,
                             IS_BF16=x.dtype == torch.bfloat16, SOFT=soft, SINGLE=single,
                             BM=BM, BK=BK, num_warps=warps, enable_fp_fusion=False)

"""Triton kernel of pyops::norm_modulate_quant (spec: pyops/reference/norm_modulate_quant.py).

One pass over x: LayerNorm / RMSNorm (fp32, two-pass mean/variance on the row held in
registers), optional weight/bias, adaLN modulate ``y = n * (1 + scale) + shift``, then per-token
FP8 e4m3 quantization of the fp32 y exactly as ``quantize_fp8(y, "row")`` (IEEE division by
``tl.math.div_rn``, clamp +-448, RNE cast, a non-finite row -> NaN scale and zero codes), and
optionally y itself (fp32/fp16/bf16, RNE).

* Rows up to ``single_max`` (default 16384) elements: a program holds BM whole rows in registers
  (BM > 1 only for short rows); x is read once.
* Longer rows: chunks of ``CHUNK`` along D, several passes over the row (re-reads mostly hit L2).

Offsets are int64; x may have any strides; q / y / scale are contiguous.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._amax import pow2 as _pow2
from ._cvt import as_kernel_input, as_kernel_output, f32_to_out, load_f32, out_kind, use_soft_cvt
from .quantize_fp8 import _abs_mark, _fp8_codes, _fp8_group_scale

SINGLE_MAX = 16384
CHUNK = 4096
TILE_ELEMS = 8192


def row_tiling(M: int, K: int, single_max: int = SINGLE_MAX, chunk: int = CHUNK):
    """(single, BM, BK, num_warps) of a row-wise quantizing kernel (this one, gelu_quant): rows
    of up to ``single_max`` elements in one tile of BM rows x BK (about TILE_ELEMS elements),
    longer rows one per program in ``chunk``-sized pieces."""
    single = K <= single_max
    if single:
        BK = _pow2(K)
        BM = min(max(TILE_ELEMS // BK, 1), _pow2(M))
    else:
        BK = min(_pow2(chunk), _pow2(K))
        BM = 1
    elems = BM * BK
    return single, BM, BK, 16 if elems >= 16384 else (8 if elems >= 4096 else 4)

@triton.jit
def _rsqrt_rn(v):
    """1 / sqrt(v), each step IEEE round-to-nearest (tl.math.rsqrt is approximate)."""
    return tl.math.div_rn(tl.zeros_like(v) + 1.0, tl.math.sqrt_rn(v))


@triton.jit
def _affine_modulate(n, cols, cmask, mrow, mask, w_ptr, b_ptr, sh_ptr, sc_ptr, ssh, ssc,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SH: tl.constexpr,
                     HAS_SC: tl.constexpr, P_BF16: tl.constexpr):
    """n (BM, BD) -> y = (n * w + b) * (1 + scale) + shift, each step rounded in fp32."""
    if HAS_W:
        n = n * load_f32(w_ptr, cols, cmask, P_BF16)[None, :]
    if HAS_B:
        n = n + load_f32(b_ptr, cols, cmask, P_BF16)[None, :]
    if HAS_SC:
        sc = load_f32(sc_ptr, mrow[:, None] * ssc + cols[None, :], mask, P_BF16)
        n = n * (1.0 + sc)
    if HAS_SH:
        n = n + load_f32(sh_ptr, mrow[:, None] * ssh + cols[None, :], mask, P_BF16)
    return n


@triton.jit
def _chunk_y(k0, D, rmask, x_ptr, xrow, sxd, mean, rstd, mrow, w_ptr, b_ptr, sh_ptr, sc_ptr, ssh,
             ssc, RMS: tl.constexpr, IS_BF16: tl.constexpr, HAS_W: tl.constexpr,
             HAS_B: tl.constexpr, HAS_SH: tl.constexpr, HAS_SC: tl.constexpr,
             P_BF16: tl.constexpr, BD: tl.constexpr):
    """y of columns [k0, k0 + BD) of a long row (the chunked path reads the row twice)."""
    cols = k0 + tl.arange(0, BD).to(tl.int64)
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = load_f32(x_ptr, xrow + cols[None, :] * sxd, mask, IS_BF16)
    if RMS:
        n = x * rstd[:, None]
    else:
        n = (x - mean[:, None]) * rstd[:, None]
    y = _affine_modulate(n, cols, cmask, mrow, mask, w_ptr, b_ptr, sh_ptr, sc_ptr, ssh, ssc,
                         HAS_W, HAS_B, HAS_SH, HAS_SC, P_BF16)
    return cols, mask, y


@triton.jit
def _nmq_kernel(x_ptr, w_ptr, b_ptr, sh_ptr, sc_ptr, q_ptr, s_ptr, y_ptr,
                M, D, d_f, sxm, sxd, ssh, ssc, rows_per_mod, eps,
                RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                HAS_SH: tl.constexpr, HAS_SC: tl.constexpr, WRITE_Y: tl.constexpr,
                Y_KIND: tl.constexpr, IS_BF16: tl.constexpr, P_BF16: tl.constexpr,
                SOFT: tl.constexpr, SINGLE: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < M
    mrow = rows // rows_per_mod
    xrow = rows[:, None] * sxm
    orow = rows[:, None] * D
    if SINGLE:  # BD >= D: whole rows in registers
        cols = tl.arange(0, BD).to(tl.int64)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        x = load_f32(x_ptr, xrow + cols[None, :] * sxd, mask, IS_BF16)
        if RMS:
            ms = tl.math.div_rn(tl.sum(x * x, axis=1), d_f)
            rstd = _rsqrt_rn(ms + eps)
            n = x * rstd[:, None]
        else:
            mean = tl.math.div_rn(tl.sum(x, axis=1), d_f)
            d = tl.where(mask, x - mean[:, None], 0.0)
            var = tl.math.div_rn(tl.sum(d * d, axis=1), d_f)
            rstd = _rsqrt_rn(var + eps)
            n = d * rstd[:, None]
        y = _affine_modulate(n, cols, cmask, mrow, mask, w_ptr, b_ptr, sh_ptr, sc_ptr, ssh, ssc,
                             HAS_W, HAS_B, HAS_SH, HAS_SC, P_BF16)
        amax = tl.max(tl.where(mask, _abs_mark(y), 0.0), axis=1)
        scale, bad = _fp8_group_scale(amax)
        tl.store(s_ptr + rows, scale, mask=rmask)
        tl.store(q_ptr + orow + cols[None, :], _fp8_codes(y, scale[:, None], bad[:, None], SOFT),
                 mask=mask)
        if WRITE_Y:
            tl.store(y_ptr + orow + cols[None, :], f32_to_out(y, Y_KIND, SOFT), mask=mask)
    else:  # long rows: chunked passes over the row
        acc = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, D, BD):
            cols = k0 + tl.arange(0, BD).to(tl.int64)
            mask = rmask[:, None] & (cols < D)[None, :]
            x = load_f32(x_ptr, xrow + cols[None, :] * sxd, mask, IS_BF16)
            if RMS:
                acc += tl.sum(x * x, axis=1)
            else:
                acc += tl.sum(x, axis=1)
        if RMS:
            mean = tl.zeros([BM], dtype=tl.float32)
            rstd = _rsqrt_rn(tl.math.div_rn(acc, d_f) + eps)
        else:
            mean = tl.math.div_rn(acc, d_f)
            acc2 = tl.zeros([BM], dtype=tl.float32)
            for k0 in range(0, D, BD):
                cols = k0 + tl.arange(0, BD).to(tl.int64)
                mask = rmask[:, None] & (cols < D)[None, :]
                x = load_f32(x_ptr, xrow + cols[None, :] * sxd, mask, IS_BF16)
                d = tl.where(mask, x - mean[:, None], 0.0)
                acc2 += tl.sum(d * d, axis=1)
            rstd = _rsqrt_rn(tl.math.div_rn(acc2, d_f) + eps)
        amax = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, D, BD):
            cols, mask, y = _chunk_y(k0, D, rmask, x_ptr, xrow, sxd, mean, rstd, mrow, w_ptr,
                                     b_ptr, sh_ptr, sc_ptr, ssh, ssc, RMS, IS_BF16, HAS_W, HAS_B,
                                     HAS_SH, HAS_SC, P_BF16, BD)
            amax = tl.maximum(amax, tl.max(tl.where(mask, _abs_mark(y), 0.0), axis=1))
            if WRITE_Y:
                tl.store(y_ptr + orow + cols[None, :], f32_to_out(y, Y_KIND, SOFT), mask=mask)
        scale, bad = _fp8_group_scale(amax)
        tl.store(s_ptr + rows, scale, mask=rmask)
        for k0 in range(0, D, BD):  # recompute y (same operations, same values) and quantize
            cols, mask, y = _chunk_y(k0, D, rmask, x_ptr, xrow, sxd, mean, rstd, mrow, w_ptr,
                                     b_ptr, sh_ptr, sc_ptr, ssh, ssc, RMS, IS_BF16, HAS_W, HAS_B,
                                     HAS_SH, HAS_SC, P_BF16, BD)
            tl.store(q_ptr + orow + cols[None, :],
                     _fp8_codes(y, scale[:, None], bad[:, None], SOFT), mask=mask)



def norm_modulate_quant(x: torch.Tensor, weight: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                        scale: Optional[torch.Tensor], rms: bool, eps: float,
                        q: torch.Tensor, q_scale: torch.Tensor, y: Optional[torch.Tensor],
                        single_max: int = SINGLE_MAX, chunk: int = CHUNK) -> None:
    """Destination-passing launch on the current stream.

    x (M, D) any strides; weight/bias (D,) contiguous; shift/scale (Bm, D) with unit stride
    along D (any row stride, 0 to broadcast), Bm dividing M; all of weight/bias/shift/scale of
    one dtype. q (M, D) float8_e4m3fn, q_scale (M,) fp32, y (M, D) fp32/fp16/bf16 or None:
    contiguous. ``single_max`` / ``chunk`` pick the long-row path (tests force it on small D).
    """
    M, D = x.shape
    if M == 0 or D == 0:
        return
    params = [t for t in (weight, bias, shift, scale) if t is not None]
    pdt = params[0].dtype if params else torch.float32
    if any(t.dtype != pdt for t in params):
        raise TypeError("weight/bias/shift/scale must share one dtype")
    for name, t in (("shift", shift), ("scale", scale)):
        if t is not None and (t.dim() != 2 or t.shape[1] != D or t.stride(1) != 1
                              or M % t.shape[0] != 0):
            raise ValueError(f"{name} must be (Bm, {D}) with unit stride along D, Bm | {M}")
    bms = {t.shape[0] for t in (shift, scale) if t is not None and t.shape[0] > 1}
    if len(bms) > 1:
        raise ValueError("shift and scale must have the same number of rows (or one row)")
    rows_per_mod = M // bms.pop() if bms else M  # a single row is read with row stride 0
    soft = use_soft_cvt(x)
    xk = as_kernel_input(x)
    pk = [as_kernel_input(t) if t is not None else None for t in (weight, bias, shift, scale)]
    dummy = q_scale
    wk, bk, shk, sck = (t if t is not None else dummy for t in pk)
    ssh = shift.stride(0) if (shift is not None and shift.shape[0] > 1) else 0
    ssc = scale.stride(0) if (scale is not None and scale.shape[0] > 1) else 0
    single, BM, BD, warps = row_tiling(M, D, single_max, chunk)
    yk = as_kernel_output(y, soft) if y is not None else dummy
    grid = (triton.cdiv(M, BM),)
    _nmq_kernel[grid](xk, wk, bk, shk, sck, q.view(torch.uint8), q_scale, yk,
                      M, D, float(D), x.stride(0), x.stride(1), ssh, ssc, rows_per_mod,
                      float(eps),
                      RMS=bool(rms), HAS_W=weight is not None, HAS_B=bias is not None,
                      HAS_SH=shift is not None, HAS_SC=scale is not None,
                      WRITE_Y=y is not None, Y_KIND=out_kind(y.dtype) if y is not None else 0,
                      IS_BF16=x.dtype == torch.bfloat16, P_BF16=pdt == torch.bfloat16,
                      SOFT=soft, SINGLE=single, BM=BM, BD=BD, num_warps=warps,
                      enable_fp_fusion=False)

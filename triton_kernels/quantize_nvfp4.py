"""Triton NVFP4 quantizer / dequantizer. Spec: ``pyops/reference/quantize_nvfp4.py`` (bit-exact).

Destination-passing host functions (launch on the current stream, no host sync):

* ``quantize_nvfp4(x, data, scales, global_scale, compute_global, swizzle)`` -- x (M, K)
  bf16/fp16/fp32, any strides; data uint8 (M, nb*8), nb = ceil(K/16); scales uint8 (M, nb), or
  with ``swizzle`` the padded (roundup(M,128), roundup(nb,4)) 128x4-tiled layout; global_scale
  fp32 (1,), read when ``compute_global`` is False, computed and written when True.
* ``dequantize_nvfp4(data, scales, global_scale, K, swizzled, out)``.

Design (memory bound):

* quantize: a program owns a tile of BM rows x NBB 16-element blocks, held as a
  [BM, NBB, 16] register tensor: block amax, e4m3 block scale, e2m1 codes and the nibble packing
  (``tl.reshape`` + ``tl.split``) all happen in registers; one read of x, one write of the
  packed data and the scale bytes. With ``swizzle`` the grid also covers the padding rows/columns
  and writes their zeros, so the caller's pre-zeroing is not relied upon.
* ``compute_global``: one extra launch before it (the FP8 per-tensor partial-amax kernel, finite
  values only); the quantize kernel reduces the partials itself and program 0 writes
  global_scale. 2 launches, no host sync.
* dequantize: one launch, the same tiling in reverse (``tl.join`` of low/high nibbles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._amax import partial_amax, pow2 as _pow2, warps as _warps
from ._cvt import (E2M1_MAX, E4M3_NAN, FLT_MAX, NVFP4_BLOCK, as_kernel_input, as_kernel_output,
                   e2m1_codes, e2m1_pack, e2m1_to_f32, e2m1_unpack, e4m3_bits, e4m3_to_f32,
                   f32_to_out, load_f32, nvfp4_block_scale, nvfp4_global_scale, out_kind,
                   use_soft_cvt)

BLOCK = NVFP4_BLOCK.value  # elements per block scale (host side)
TILE_ELEMS = 8192  # target input elements per program
MAX_NBB = 64  # at most 64 blocks (1024 elements) along K per tile


@triton.jit
def _swizzle_offset(rows, blks, n_cols_padded):
    """(row, kblock) -> flat offset in the 128x4-tiled scale layout (int64)."""
    tile = (rows // 128)[:, None] * (n_cols_padded // 4) + (blks // 4)[None, :]
    rr = rows % 128
    inner = ((rr % 32) * 16 + (rr // 32) * 4)[:, None] + (blks % 4)[None, :]
    return tile * 512 + inner


@triton.jit
def _nvfp4_quant_kernel(x_ptr, d_ptr, s_ptr, g_ptr, part_ptr, n_part, M, K, nb, sxm, sxk,
                        sdm, n_tiles_b, s_rows, s_cols,
                        COMPUTE_G: tl.constexpr, SWIZZLE: tl.constexpr, IS_BF16: tl.constexpr,
                        SOFT: tl.constexpr, BM: tl.constexpr, NBB: tl.constexpr,
                        P_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_b
    pid_b = pid % n_tiles_b
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    blks = pid_b.to(tl.int64) * NBB + tl.arange(0, NBB)
    cols = blks[:, None] * NVFP4_BLOCK + tl.arange(0, NVFP4_BLOCK)[None, :]  # [NBB, 16]
    rmask = rows < M
    bmask = blks < nb
    mask = rmask[:, None, None] & (cols < K)[None, :, :]
    x = load_f32(x_ptr, rows[:, None, None] * sxm + cols[None, :, :] * sxk, mask, IS_BF16)

    if COMPUTE_G:
        pofs = tl.arange(0, P_BLOCK)
        amax = tl.max(tl.load(part_ptr + pofs, mask=pofs < n_part, other=0.0), axis=0)
        g = nvfp4_global_scale(amax)
        if pid == 0:
            tl.store(g_ptr, g)
    else:
        g = tl.load(g_ptr)

    a = tl.abs(x)
    bamax = tl.max(tl.where(a <= FLT_MAX, a, float("inf")), axis=2)  # [BM, NBB]; inf = bad
    bad = bamax > FLT_MAX
    # NaN must survive the clamps as in torch.clamp (GPU min/max drop NaN by default)
    s = nvfp4_block_scale(bamax, g, NAN_SAFE=True)
    sbits = e4m3_bits(s, SOFT)
    sf = e4m3_to_f32(sbits, SOFT)
    denom = sf * g
    v = tl.math.div_rn(x, denom[:, :, None])
    v = tl.minimum(tl.maximum(v, -E2M1_MAX, propagate_nan=tl.PropagateNan.ALL), E2M1_MAX,
                   propagate_nan=tl.PropagateNan.ALL)
    codes = e2m1_codes(v)
    codes = tl.where((bad | (sf == 0))[:, :, None], 0, codes)
    lo, hi = tl.split(tl.reshape(codes, [BM, NBB, NVFP4_BLOCK // 2, 2]))
    packed = e2m1_pack(lo, hi)
    doffs = (rows[:, None, None] * sdm + blks[None, :, None] * (NVFP4_BLOCK // 2)
             + tl.arange(0, NVFP4_BLOCK // 2)[None, None, :])
    tl.store(d_ptr + doffs, packed, mask=(rmask[:, None] & bmask[None, :])[:, :, None])

    sbyte = tl.where(bad, E4M3_NAN, sbits.to(tl.int32))
    inside = rmask[:, None] & bmask[None, :]
    if SWIZZLE:  # also write the padding's zeros
        sbyte = tl.where(inside, sbyte, 0)
        smask = (rows < s_rows)[:, None] & (blks < s_cols)[None, :]
        soffs = _swizzle_offset(rows, blks, s_cols)
    else:
        smask = inside
        soffs = rows[:, None] * nb + blks[None, :]
    tl.store(s_ptr + soffs, sbyte.to(tl.uint8), mask=smask)


@triton.jit
def _nvfp4_dequant_kernel(d_ptr, s_ptr, g_ptr, o_ptr, M, K, nb, sdm, som, n_tiles_b, s_cols,
                          SWIZZLED: tl.constexpr, OUT_KIND: tl.constexpr, SOFT: tl.constexpr,
                          BM: tl.constexpr, NBB: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid // n_tiles_b
    pid_b = pid % n_tiles_b
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    blks = pid_b.to(tl.int64) * NBB + tl.arange(0, NBB)
    rmask = rows < M
    inside = rmask[:, None] & (blks < nb)[None, :]
    doffs = (rows[:, None, None] * sdm + blks[None, :, None] * (NVFP4_BLOCK // 2)
             + tl.arange(0, NVFP4_BLOCK // 2)[None, None, :])
    byte = tl.load(d_ptr + doffs, mask=inside[:, :, None], other=0).to(tl.int32)
    codes = tl.reshape(e2m1_unpack(byte), [BM, NBB, NVFP4_BLOCK])
    if SWIZZLED:
        soffs = _swizzle_offset(rows, blks, s_cols)
    else:
        soffs = rows[:, None] * nb + blks[None, :]
    sf = e4m3_to_f32(tl.load(s_ptr + soffs, mask=inside, other=0), SOFT)
    denom = sf * tl.load(g_ptr)
    v = e2m1_to_f32(codes) * denom[:, :, None]
    cols = blks[:, None] * NVFP4_BLOCK + tl.arange(0, NVFP4_BLOCK)[None, :]
    omask = rmask[:, None, None] & (cols < K)[None, :, :]
    tl.store(o_ptr + rows[:, None, None] * som + cols[None, :, :],
             f32_to_out(v, OUT_KIND, SOFT), mask=omask)




def _tiles(M: int, nb: int):
    NBB = min(_pow2(nb), MAX_NBB)
    BM = min(max(TILE_ELEMS // (NBB * BLOCK), 1), _pow2(M))
    return BM, NBB


def _swizzled_shape(M: int, nb: int):
    return (triton.cdiv(M, 128) * 128, triton.cdiv(nb, 4) * 4)


def _check(name, t, shape, dtype):
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous {dtype} of shape {tuple(shape)}, got "
                         f"{t.dtype} {tuple(t.shape)} (contiguous={t.is_contiguous()})")


def quantize_nvfp4(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                   global_scale: torch.Tensor, compute_global: bool, swizzle: bool) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bf16/fp16/fp32, got {x.dtype}")
    M, K = x.shape
    nb = triton.cdiv(K, BLOCK)
    _check("data", data, (M, nb * BLOCK // 2), torch.uint8)
    s_shape = _swizzled_shape(M, nb) if swizzle else (M, nb)
    _check("scales", scales, s_shape, torch.uint8)
    _check("global_scale", global_scale.view(-1), (1,), torch.float32)
    if M == 0 or K == 0:
        return
    soft = use_soft_cvt(x)
    xk = as_kernel_input(x)
    is_bf16 = x.dtype == torch.bfloat16
    sxm, sxk = x.stride()
    part, n_part, p_block = global_scale, 1, 1
    if compute_global:
        part, n_part, p_block = partial_amax(xk, x, mark_nonfinite=False)
    s_rows, s_cols = s_shape
    BM, NBB = _tiles(s_rows, s_cols)  # with swizzle the grid covers the padding too
    n_tiles_b = triton.cdiv(s_cols, NBB)
    grid = (triton.cdiv(s_rows, BM) * n_tiles_b,)
    _nvfp4_quant_kernel[grid](xk, data, scales, global_scale, part, n_part, M, K, nb, sxm, sxk,
                              data.stride(0), n_tiles_b, s_rows, s_cols,
                              COMPUTE_G=bool(compute_global), SWIZZLE=bool(swizzle),
                              IS_BF16=is_bf16, SOFT=soft, BM=BM, NBB=NBB, P_BLOCK=p_block,
                              num_warps=_warps(BM * NBB * BLOCK))


def dequantize_nvfp4(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                     K: int, swizzled: bool, out: torch.Tensor) -> None:
    if data.dim() != 2:
        raise ValueError(f"data must be 2-D, got shape {tuple(data.shape)}")
    M = data.shape[0]
    K = int(K)
    nb = triton.cdiv(K, BLOCK)
    _check("data", data, (M, nb * BLOCK // 2), torch.uint8)
    s_shape = _swizzled_shape(M, nb) if swizzled else (M, nb)
    if scales.dtype == torch.float8_e4m3fn:
        scales = scales.view(torch.uint8)
    _check("scales", scales, s_shape, torch.uint8)
    _check("global_scale", global_scale.view(-1), (1,), torch.float32)
    if out.shape != (M, K) or out.stride(-1) != 1 or out.dtype not in (
            torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out must be ({M}, {K}) bf16/fp16/fp32, contiguous along K")
    if M == 0 or K == 0:
        return
    soft = use_soft_cvt(data)
    ok = as_kernel_output(out, soft)
    BM, NBB = _tiles(M, nb)
    n_tiles_b = triton.cdiv(nb, NBB)
    grid = (triton.cdiv(M, BM) * n_tiles_b,)
    _nvfp4_dequant_kernel[grid](data, scales, global_scale, ok, M, K, nb, data.stride(0),
                                ok.stride(0), n_tiles_b, s_shape[1],
                                SWIZZLED=bool(swizzled), OUT_KIND=out_kind(out.dtype), SOFT=soft,
                                BM=BM, NBB=NBB, num_warps=_warps(BM * NBB * BLOCK))

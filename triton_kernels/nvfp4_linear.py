"""Triton W4A16 GEMM for NVFP4 weights: exact dequantization in the main loop.

Spec: ``pyops/reference/nvfp4_linear.py``. Host entry (destination-passing, current stream, no
host sync; the split-K workspace is sized from shapes only)::

    nvfp4_linear(x, data, scales, global_scale, K, bias, out)
        x (M, K) bf16/fp16, any strides; data uint8 (N, nb*8) packed E2M1 (low nibble first);
        scales uint8 (N, nb) E4M3 bits (not swizzled); global_scale fp32 (1,);
        bias (N,) or None; out (M, N) in x's dtype.

Main loop, per K block of one weight tile: load the packed bytes [BN, BK/2], split the nibbles
(``tl.join`` + ``tl.reshape``: element 2i is the low nibble), decode E2M1 and the E4M3 block
scale with integer bit arithmetic (identical on the GPU and in the interpreter), multiply in fp32
(exact: at most 6 significant bits), cast to x's dtype (exact for bf16 and fp16) and run the MMA
with an fp32 accumulator. ``global_scale`` and the bias are applied once in the epilogue.

The MMA is issued "swapped": ``acc[BN, BM] = W_tile[BN, BK] @ x_tile^T[BK, BM]``. The weight,
computed in registers, is the A operand (Hopper wgmma takes A from registers, B must come from
shared memory), and the token count sits on the MMA's N side, which may be as small as 16, so
decode-sized M (1-64) wastes little. For small M the weight stream dominates: split-K spreads
one weight tile's K range over several programs (fp32 partials, reduced by a second kernel that
applies the epilogue), so enough programs read the weight concurrently to approach bandwidth.

Config table: starting points, to be tuned on the H100 (unmeasured here).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._cvt import NVFP4_BLOCK, e2m1_to_f32, e2m1_unpack, e4m3_to_f32, f32_to_out, out_kind

FORCE_CONFIG: Optional[dict] = None  # test hook (small blocks for the interpreter)
NUM_SMS_DEFAULT = 132


@triton.jit
def _nvfp4_linear_kernel(x_ptr, d_ptr, s_ptr, g_ptr, b_ptr, o_ptr, ws_ptr, M, N, K,
                         sxm, sxk, sdn, ssn, som, son, k_per_split,
                         HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         INTERPRET: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_c = tl.minimum(rn, N - 1)
    rm_c = tl.minimum(rm, M - 1)
    rkh = tl.arange(0, BLOCK_K // 2)
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_K // NVFP4_BLOCK)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # weight tile: packed bytes [BN, BK/2] and block scales [BN, BK/16]; the data row
        # holds nb*8 bytes (a zero-padded last block), so whole 16-blocks never run past it
        kh = k0 // 2 + rkh
        kb = k0 // NVFP4_BLOCK + rb
        pk = tl.load(d_ptr + rn_c[:, None] * sdn + kh[None, :],
                     mask=(2 * kh < K)[None, :], other=0).to(tl.int32)
        sb = tl.load(s_ptr + rn_c[:, None] * ssn + kb[None, :],
                     mask=(kb * NVFP4_BLOCK < K)[None, :], other=0).to(tl.int32)
        codes = tl.reshape(e2m1_unpack(pk), [BLOCK_N, BLOCK_K])
        v = e2m1_to_f32(codes)
        s = e4m3_to_f32(sb, True)  # integer decode on the GPU too
        w = tl.reshape(tl.reshape(v, [BLOCK_N, BLOCK_K // NVFP4_BLOCK, NVFP4_BLOCK])
                       * s[:, :, None], [BLOCK_N, BLOCK_K])
        kk = k0 + rk
        xt = tl.load(x_ptr + rm_c[None, :] * sxm + kk[:, None] * sxk,
                     mask=(kk < k_hi)[:, None], other=0.0)  # [BK, BM]
        w = tl.where((kk < k_hi)[None, :], w, 0.0)
        if INTERPRET:  # the interpreter's bf16 tl.dot is wrong; fp32 is exact here
            acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    if SPLIT_K == 1:
        y = acc * tl.load(g_ptr)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + rn_c).to(tl.float32)[:, None]
        tl.store(o_ptr + rm[None, :] * som + rn[:, None] * son,
                 y.to(o_ptr.dtype.element_ty), mask=mask)
    else:  # fp32 partials, workspace (SPLIT_K, M, N) contiguous
        tl.store(ws_ptr + (pid_k * M + rm[None, :]) * N + rn[:, None], acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, s_ptr, b_ptr, o_ptr, M, N, som, son,
                          HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, PER_ROW: tl.constexpr,
                          OUT_KIND: tl.constexpr, SOFT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):  # fixed order: deterministic
        acc += tl.load(ws_ptr + (s * M + rm[:, None]) * N + rn[None, :], mask=mask, other=0.0)
    if PER_ROW:  # one scale per weight row (output column)
        y = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    else:
        y = acc * tl.load(s_ptr)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + rm[:, None] * som + rn[None, :] * son, f32_to_out(y, OUT_KIND, SOFT),
             mask=mask)


def splitk_reduce(ws: torch.Tensor, scale: torch.Tensor, per_row: bool,
                  bias: Optional[torch.Tensor], out: torch.Tensor, o: torch.Tensor,
                  soft: bool) -> None:
    """out (M, N) = sum over s of ws[s] (fp32 (SPLIT_K, M, N) partials, in order) times ``scale``
    (fp32: (N,) with ``per_row``, else (1,)) + bias, rounded once to out's dtype; ``o`` is out as
    the kernel writes it (int16 bits for bf16 on the soft path, ``_cvt.as_kernel_output``)."""
    split, M, N = ws.shape
    rb_m, rb_n = 16, 128
    _splitk_reduce_kernel[(triton.cdiv(N, rb_n), triton.cdiv(M, rb_m))](
        ws, scale, bias if bias is not None else scale, o, M, N, out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, SPLIT_K=split, PER_ROW=per_row,
        OUT_KIND=out_kind(out.dtype), SOFT=soft, BLOCK_M=rb_m, BLOCK_N=rb_n, num_warps=4)


@triton.jit
def _nvfp4_dequant_kernel(d_ptr, s_ptr, g_ptr, o_ptr, N, K, sdn, ssn, son,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[n, k] = e2m1 * s_blk * g in fp32, rounded once to o's dtype (the "dequant" path)."""
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    kb = k0 // NVFP4_BLOCK + tl.arange(0, BLOCK_K // NVFP4_BLOCK)
    nmask = (rn < N)[:, None]
    pk = tl.load(d_ptr + rn[:, None] * sdn + kh[None, :], mask=nmask & (2 * kh < K)[None, :],
                 other=0).to(tl.int32)
    sb = tl.load(s_ptr + rn[:, None] * ssn + kb[None, :],
                 mask=nmask & (kb * NVFP4_BLOCK < K)[None, :], other=0).to(tl.int32)
    codes = tl.reshape(e2m1_unpack(pk), [BLOCK_N, BLOCK_K])
    sg = e4m3_to_f32(sb, True) * tl.load(g_ptr)
    w = tl.reshape(tl.reshape(e2m1_to_f32(codes), [BLOCK_N, BLOCK_K // NVFP4_BLOCK, NVFP4_BLOCK])
                   * sg[:, :, None], [BLOCK_N, BLOCK_K])
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(o_ptr + rn[:, None] * son + kk[None, :], w.to(o_ptr.dtype.element_ty),
             mask=nmask & (kk < K)[None, :])


def dequantize_weight(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                      K: int, out: torch.Tensor) -> None:
    """(N, nb*8) packed NVFP4 -> out (N, K) in out's dtype (contiguous rows)."""
    N = data.shape[0]
    bn, bk = 32, 128
    _nvfp4_dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        data, scales, global_scale, out, N, K, data.stride(0), scales.stride(0), out.stride(0),
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS_DEFAULT


def pick_config(M: int, N: int, K: int, num_sms: int = NUM_SMS_DEFAULT) -> dict:
    """Per-shape config (starting points; to be set by measurement on the GPU)."""
    if FORCE_CONFIG is not None:
        c = dict(FORCE_CONFIG)
        c.setdefault("SPLIT_K", 1)
        return c
    if M <= 16:
        c = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4)
    elif M <= 64:
        c = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif M <= 512:
        c = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    else:
        c = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
    tiles = triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])
    k_blocks = triton.cdiv(K, c["BLOCK_K"])
    split = 1
    # small M: weight-bandwidth bound; aim for >= 2 waves of programs reading the weight
    while tiles * split * 2 < 2 * num_sms and split * 2 <= k_blocks // 4 and split < 16:
        split *= 2
    c["SPLIT_K"] = split
    return c


def nvfp4_linear(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                 global_scale: torch.Tensor, K: int, bias: Optional[torch.Tensor],
                 out: torch.Tensor) -> None:
    M = x.shape[0]
    N = data.shape[0]
    c = pick_config(M, N, K, _num_sms(x.device))
    bk, split = c["BLOCK_K"], c["SPLIT_K"]
    assert bk % 32 == 0
    k_blocks = triton.cdiv(K, bk)
    k_per_split = triton.cdiv(k_blocks, split) * bk
    split = triton.cdiv(K, k_per_split)
    ws = (torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1
          else out)
    grid = (triton.cdiv(N, c["BLOCK_N"]), triton.cdiv(M, c["BLOCK_M"]), split)
    b = bias if bias is not None else global_scale
    _nvfp4_linear_kernel[grid](
        x, data, scales, global_scale, b, out, ws, M, N, K,
        x.stride(0), x.stride(1), data.stride(0), scales.stride(0), out.stride(0),
        out.stride(1), k_per_split, HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=bk,
        INTERPRET=x.device.type != "cuda",
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    if split > 1:
        splitk_reduce(ws, global_scale, False, bias, out, out, False)

"""Triton weight-only linear (W8A16 FP8 weights; W4A16 NVFP4 through ``nvfp4_linear``).

Spec: ``pyops/reference/weight_only_linear.py``. Host entry (destination-passing, current
stream, no host sync; the split-K workspace is sized from shapes only)::

    weight_only_linear(x, data, scales, global_scale, fmt, K, bias, out)
        x (M, K) bf16/fp16, any strides; fmt "fp8": data e4m3 (N, K) (uint8 or float8 view),
        scales fp32 (N,), global_scale None; fmt "nvfp4": the NVFP4 weight (N, nb*8) / (N, nb) /
        (1,) of ``nvfp4_linear``; bias (N,) or None; out (M, N) in x's dtype.

The fallback of the CUDA kernel (``csrc/weight_only_linear.cu``) on GPUs it is not built for.
NVFP4 runs ``nvfp4_linear.py``'s fused W4A16 kernel (the same spec). The FP8 kernel below has
the same structure: the weight tile is decoded in registers (e4m3 -> fp32 -> x's dtype, exact)
and is the MMA's A operand, ``acc[BN, BM] = W_tile[BN, BK] @ x_tile^T[BK, BM]``, so a token
count as small as 16 sits on the MMA's N side; split-K spreads one weight tile's K range over
several programs (fp32 partials in a (SPLIT_K, M, N) workspace, summed in a fixed order by a
second kernel that applies the per-channel scale and the bias). Config: starting points,
unmeasured (no GPU measurement of this kernel exists yet).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import nvfp4_linear as _nvfp4
from ._cvt import as_kernel_input, as_kernel_output, e4m3_to_f32, f32_to_out, load_f32, \
    out_kind, use_soft_cvt

FORCE_CONFIG: Optional[dict] = None  # test hook (small blocks for the interpreter)


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, b_ptr, o_ptr, ws_ptr, M, N, K,
                  sxm, sxk, swn, som, son, k_per_split,
                  HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, IS_BF16: tl.constexpr,
                  OUT_KIND: tl.constexpr, SOFT: tl.constexpr, INTERPRET: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_c = tl.minimum(rn, N - 1)  # clamped rows/columns are computed but never stored
    rm_c = tl.minimum(rm, M - 1)
    rk = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        kmask = kk < k_hi
        wb = tl.load(w_ptr + rn_c[:, None] * swn + kk[None, :], mask=kmask[None, :], other=0)
        w = e4m3_to_f32(wb, SOFT)  # exact (soft: integer decode, before sm_90); masked: +0
        if INTERPRET:  # the interpreter: bf16 as bits, an fp32 MMA (exact products here)
            xt = load_f32(x_ptr, rm_c[None, :] * sxm + kk[:, None] * sxk, kmask[:, None],
                          IS_BF16)
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            xt = tl.load(x_ptr + rm_c[None, :] * sxm + kk[:, None] * sxk, mask=kmask[:, None],
                         other=0.0)
            acc = tl.dot(w.to(xt.dtype), xt, acc)
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    if SPLIT_K == 1:
        y = acc * tl.load(s_ptr + rn_c)[:, None]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + rn_c).to(tl.float32)[:, None]
        tl.store(o_ptr + rm[None, :] * som + rn[:, None] * son, f32_to_out(y, OUT_KIND, SOFT),
                 mask=mask)
    else:  # fp32 partials, workspace (SPLIT_K, M, N) contiguous
        tl.store(ws_ptr + (pid_k * M + rm[None, :]) * N + rn[:, None], acc, mask=mask)


def pick_config(M: int, N: int, K: int, num_sms: int = _nvfp4.NUM_SMS_DEFAULT) -> dict:
    """Per-shape config of the FP8 kernel (starting points; unmeasured)."""
    if FORCE_CONFIG is not None:
        c = dict(FORCE_CONFIG)
        c.setdefault("SPLIT_K", 1)
        return c
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    c = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=256 if M <= 32 else 128, num_warps=4,
             num_stages=4)
    tiles = triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])
    k_blocks = triton.cdiv(K, c["BLOCK_K"])
    split = 1
    # weight-bandwidth bound: aim for >= 2 programs per SM reading the weight
    while tiles * split < 2 * num_sms and split * 2 <= k_blocks // 2 and split < 16:
        split *= 2
    c["SPLIT_K"] = split
    return c


def weight_only_linear(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                       global_scale: Optional[torch.Tensor], fmt: str, K: int,
                       bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    if fmt == "nvfp4":
        _nvfp4.nvfp4_linear(x, data, scales, global_scale, K, bias, out)
        return
    M, N = x.shape[0], data.shape[0]
    c = pick_config(M, N, K, _nvfp4._num_sms(x.device))
    bk, split = c["BLOCK_K"], c["SPLIT_K"]
    k_per_split = triton.cdiv(triton.cdiv(K, bk), split) * bk
    split = triton.cdiv(K, k_per_split)  # no empty split
    soft = use_soft_cvt(x)
    ws = (torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1
          else scales)
    o = as_kernel_output(out, soft)
    interpret = x.device.type != "cuda"
    xk = as_kernel_input(x) if interpret else x
    b = bias if bias is not None else scales
    grid = (triton.cdiv(N, c["BLOCK_N"]), triton.cdiv(M, c["BLOCK_M"]), split)
    _w8a16_kernel[grid](
        xk, data.view(torch.uint8), scales, b, o, ws, M, N, K,
        x.stride(0), x.stride(1), data.stride(0), out.stride(0), out.stride(1), k_per_split,
        HAS_BIAS=bias is not None, SPLIT_K=split, IS_BF16=x.dtype == torch.bfloat16,
        OUT_KIND=out_kind(out.dtype), SOFT=soft, INTERPRET=interpret, BLOCK_M=c["BLOCK_M"],
        BLOCK_N=c["BLOCK_N"], BLOCK_K=bk, num_warps=c["num_warps"], num_stages=c["num_stages"])
    if split > 1:  # fixed-order sum of the partials, per-channel scale, bias, one rounding
        _nvfp4.splitk_reduce(ws, scales, True, bias, out, o, soft)

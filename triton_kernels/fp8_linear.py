"""Triton FP8 W8A8 GEMM with row-wise scales and bias in the epilogue.

Spec: ``pyops/reference/fp8_linear.py``. Host entry (destination-passing, current stream, no
host sync)::

    fp8_linear(xq, x_scale, wq, w_scale, bias, out)
        xq (M, K) e4m3, any strides; x_scale fp32 (M,); wq (N, K) e4m3, any strides;
        w_scale fp32 (N,); bias (N,) any float dtype or None; out (M, N) bf16/fp16/fp32.

Design: a classic tiled GEMM (one output tile per program, grouped tile order for L2 reuse),
``tl.dot`` on e4m3 operands into an fp32 accumulator. ``max_num_imprecise_acc=BLOCK_K`` makes
Triton promote the Hopper FP8 MMA's reduced-precision accumulation into the fp32 accumulator
once per K block (Triton's sm_90 default is to never promote, which drifts on long K). Epilogue:
``acc * x_scale[m] * w_scale[n] + bias[n]``, one rounding to the output dtype.

Not used (yet): persistent scheduling, TMA descriptors, warp specialization. Their Triton APIs
changed between 3.6 and 3.9 (``tl.make_tensor_descriptor`` allocator, ``warp_specialize`` loop
flags); a classic kernel with a small per-shape config table is what both versions compile the
same way. The config table below is a starting point to be tuned on the H100 (unmeasured).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Test hook: a dict overriding the chosen config (e.g. small blocks for the interpreter).
FORCE_CONFIG: Optional[dict] = None


@triton.jit
def _fp8_linear_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, o_ptr, M, N, K,
                       sxm, sxk, swn, swk, som, son,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       PROMOTE_K: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-tiles share the same weight column-tiles while in L2
    group = GROUP_M * num_n
    gid = pid // group
    first_m = gid * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # clamp the row/column indices instead of masking them (those lanes are never stored)
    rm_c = tl.minimum(rm, M - 1)
    rn_c = tl.minimum(rn, N - 1)
    x_ptrs = x_ptr + rm_c[:, None] * sxm + rk[None, :] * sxk
    w_ptrs = w_ptr + rn_c[None, :] * swn + rk[:, None] * swk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            kmask = (k0 + rk) < K
            a = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=PROMOTE_K)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk

    xs = tl.load(xs_ptr + rm_c)
    ws = tl.load(ws_ptr + rn_c)
    y = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + rn_c).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(o_ptr + rm[:, None] * som + rn[None, :] * son,
             y.to(o_ptr.dtype.element_ty), mask=mask)


def pick_config(M: int, N: int, K: int) -> dict:
    """Per-shape tile config (H100 starting points; to be set by measurement on the GPU)."""
    if FORCE_CONFIG is not None:
        return dict(FORCE_CONFIG)
    if M <= 16:
        c = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    elif M <= 64:
        c = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    elif M <= 1024 or N <= 1024:
        c = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    else:
        c = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    return c


def fp8_linear(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
               w_scale: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    M, K = xq.shape
    N = wq.shape[0]
    c = pick_config(M, N, K)
    bk = c["BLOCK_K"]
    grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)
    _fp8_linear_kernel[grid](
        xq, x_scale, wq, w_scale, bias if bias is not None else x_scale, out, M, N, K,
        xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=bk,
        GROUP_M=c["GROUP_M"], PROMOTE_K=c.get("PROMOTE_K", bk), EVEN_K=(K % bk == 0),
        num_warps=c["num_warps"], num_stages=c["num_stages"])

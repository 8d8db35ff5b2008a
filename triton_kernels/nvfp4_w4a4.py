"""Triton pieces of the NVFP4 W4A4 path (Blackwell; UNVERIFIED ON HARDWARE).

* ``w4a4_epilogue(acc, alpha, bias, out)``: ``out = acc[:, :N] * alpha (+ bias)`` in fp32, rounded
  once to out's dtype. ``acc`` is the un-scaled ``torch._scaled_mm`` output (bf16 or fp32),
  ``alpha`` a 1-element fp32 device tensor (g_x * g_w, read by the kernel: no host sync, and not
  rounded to 16 bits as a 0-dim tensor in a 16-bit PyTorch elementwise op would be). The
  bf16 loads/stores go through ``_cvt`` (exact widening; RNE store, also in the interpreter).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._cvt import as_kernel_input, as_kernel_output, f32_to_out, load_f32, out_kind, use_soft_cvt


@triton.jit
def _epilogue_kernel(acc_ptr, alpha_ptr, bias_ptr, out_ptr, M, N, s_am, s_an, s_om, s_on,
                     HAS_BIAS: tl.constexpr, ACC_BF16: tl.constexpr, BIAS_BF16: tl.constexpr,
                     OUT_KIND: tl.constexpr, SOFT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    a = load_f32(acc_ptr, rm[:, None].to(tl.int64) * s_am + rn[None, :] * s_an, mask, ACC_BF16)
    alpha = tl.load(alpha_ptr)
    y = a * alpha
    if HAS_BIAS:
        b = load_f32(bias_ptr, rn, rn < N, BIAS_BF16)
        y = y + b[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * s_om + rn[None, :] * s_on,
             f32_to_out(y, OUT_KIND, SOFT), mask=mask)


def w4a4_epilogue(acc: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor],
                  out: torch.Tensor, BLOCK_M: int = 32, BLOCK_N: int = 128) -> None:
    M, N = out.shape
    alpha = alpha.reshape(1).float()
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    soft = use_soft_cvt(out)
    b = bias if bias is not None else acc
    _epilogue_kernel[grid](as_kernel_input(acc), alpha, as_kernel_input(b),
                           as_kernel_output(out, soft), M, N,
                           acc.stride(0), acc.stride(1), out.stride(0), out.stride(1),
                           HAS_BIAS=bias is not None, ACC_BF16=acc.dtype == torch.bfloat16,
                           BIAS_BF16=b.dtype == torch.bfloat16, OUT_KIND=out_kind(out.dtype),
                           SOFT=soft, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
                           enable_fp_fusion=False)  # a*alpha then +bias: two roundings

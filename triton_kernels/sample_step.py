"""Triton kernel of pyops::sample_step (spec: pyops/reference/sample_step.py).

Elementwise over flat contiguous buffers, fp32 math, every operation rounded on its own: the
launch passes ``enable_fp_fusion=False`` so no mul+add is contracted into an FMA, which makes the
result bit-identical to the PyTorch reference (same operations, same order, IEEE fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cvt import BF16_NAN_BITS_CANONICAL, f32_to_bf16_bits

BLOCK = 1024


@triton.jit
def _round_store(ptr, offs, y, mask):
    """Store fp32 ``y`` in ``ptr``'s dtype, rounding to nearest even (as torch's casts do).

    fp32 -> bf16 is done on the bits (``_cvt.f32_to_bf16_bits``, on the GPU too): the Triton
    interpreter's own cast truncates, and the explicit form is what cvt.rn.bf16.f32 computes on
    the GPU anyway (NaN stays NaN, written as 0x7FC0).
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        hi = f32_to_bf16_bits(y, BF16_NAN_BITS_CANONICAL)
        tl.store(ptr + offs, hi.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, y.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sample_step_kernel(state_ptr, x_out_ptr, cond_ptr, uncond_ptr, noise_ptr, n_elements,
                        alpha, beta, zeta, guidance,
                        HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr,
                        WRITE_X_OUT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(state_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(cond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = u + guidance * (p - u)
    y = alpha * x + beta * p
    if HAS_NOISE:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = y + zeta * z
    _round_store(state_ptr, offs, y, mask)
    if WRITE_X_OUT:
        _round_store(x_out_ptr, offs, y, mask)


def sample_step(state: torch.Tensor, x_out, cond: torch.Tensor, uncond, noise,
                alpha: float, beta: float, zeta: float, guidance: float) -> None:
    """All tensors contiguous with the same numel; ``state`` updated in place."""
    n = state.numel()
    grid = (triton.cdiv(n, BLOCK),)
    _sample_step_kernel[grid](
        state, x_out if x_out is not None else state, cond,
        uncond if uncond is not None else cond, noise if noise is not None else cond, n,
        float(alpha), float(beta), float(zeta), float(guidance),
        HAS_UNCOND=uncond is not None, HAS_NOISE=noise is not None,
        WRITE_X_OUT=x_out is not None, BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)

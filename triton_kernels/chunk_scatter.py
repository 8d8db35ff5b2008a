"""Triton kernels of pyops::chunk_scatter (spec: pyops/reference/chunk_scatter.py).

Two launches, no host sync, fixed shapes (capturable):

1. ``_positions``: grid (cdiv(T, BLOCK),); ``pos[tokens[t]] = t`` for the entries in [0, N)
   (``pos`` is an (N,) int32 buffer filled with -1 by the caller).
2. ``_scatter``: grid (B·N, ≤ 65535); one program per token row (b, n) reads ``pos[n]`` once,
   then walks the row's D elements: a recomputed token copies its row's bits to ``out``,
   writes ``res = rows − x`` and copies x's bits to ``ref``; any other token writes
   ``out = x + res``. x, res and rows are read once per element (a recomputed token's rows and
   x elements twice from the same lines: bits for the copy, fp32 for the difference), out is
   written once, res and ref only at the recomputed tokens: one pass over the data.

Arithmetic in fp32, one round-to-nearest-even per result (``_cvt.f32_to_out``); bf16 is loaded as
int16 bits and widened exactly (``_cvt.load_f32``); copies move raw bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cvt import as_kernel_input, as_kernel_output, f32_to_out, load_f32, out_kind, use_soft_cvt

POS_BLOCK = 1024
GRID_Y_MAX = 65535  # CUDA's limit on grid y


@triton.jit
def _positions(tok_ptr, pos_ptr, T, N, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = t < T
    n = tl.load(tok_ptr + t, mask=inside, other=-1)
    ok = inside & (n >= 0) & (n < N)
    tl.store(pos_ptr + n, t.to(tl.int32), mask=ok)


@triton.jit
def _scatter(out_ptr, out_raw, x_ptr, x_raw, res_in, res_out, rows_ptr, rows_raw, ref_raw,
             pos_ptr, N, T, D, n_blk, IS_BF16: tl.constexpr, OUT_KIND: tl.constexpr,
             SOFT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * N + n
    b = row // N
    n = row % N
    p = tl.load(pos_ptr + n).to(tl.int64)
    src = (b * T + tl.maximum(p, 0)) * D  # the recomputed row of this token (when p >= 0)
    for k in range(tl.program_id(1).to(tl.int64), n_blk, tl.num_programs(1)):  # grid y cap
        d = k * BLOCK + tl.arange(0, BLOCK)
        inside = d < D
        pick = inside & ((d * 0 + p) >= 0)
        keep = inside & ((d * 0 + p) < 0)
        off = row * D + d
        xv = load_f32(x_ptr, off, inside, IS_BF16)
        # recomputed token: out = rows (bits), res = rows - x, ref = x (bits)
        tl.store(out_raw + off, tl.load(rows_raw + src + d, mask=pick), mask=pick)
        rv = load_f32(rows_ptr, src + d, pick, IS_BF16)
        tl.store(res_out + off, f32_to_out(rv - xv, OUT_KIND, SOFT), mask=pick)
        tl.store(ref_raw + off, tl.load(x_raw + off, mask=pick), mask=pick)
        # reused token: out = x + res
        cached = load_f32(res_in, off, keep, IS_BF16)
        tl.store(out_ptr + off, f32_to_out(xv + cached, OUT_KIND, SOFT), mask=keep)


def _raw(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


def chunk_scatter(out, x, res, rows, tokens, ref) -> None:
    """out, x, res, ref contiguous (B, N, D); rows contiguous (B, T, D); tokens (T,) int64; one
    float dtype; no overlaps (checked by the op module)."""
    B, N, D = x.shape
    T = tokens.numel()
    pos = torch.full((N,), -1, dtype=torch.int32, device=x.device)
    _positions[(triton.cdiv(T, POS_BLOCK),)](tokens, pos, T, N, BLOCK=POS_BLOCK, num_warps=4)
    soft = use_soft_cvt(out)
    block = min(1024, max(16, triton.next_power_of_2(D)))
    n_blk = triton.cdiv(D, block)
    _scatter[(B * N, min(n_blk, GRID_Y_MAX))](
        as_kernel_output(out, soft), _raw(out), as_kernel_input(x), _raw(x),
        as_kernel_input(res), as_kernel_output(res, soft), as_kernel_input(rows), _raw(rows),
        _raw(ref), pos, N, T, D, n_blk,
        IS_BF16=x.dtype == torch.bfloat16, OUT_KIND=out_kind(out.dtype), SOFT=soft,
        BLOCK=block, num_warps=4)

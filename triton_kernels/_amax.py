"""Device-side amax over a whole 2-D tensor, first stage: one partial per program.

Shared by the per-tensor FP8 scale and the NVFP4 global scale. At most ``MAX_PARTIALS``
persistent programs each write one fp32 partial; the consumer kernel reduces the partials itself
(tiny, L2-resident), so the whole amax costs one extra launch and no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cvt import FLT_MAX, load_f32

MAX_PARTIALS = 1024
TILE_ELEMS = 8192  # input elements per program and loop iteration


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def warps(elems: int) -> int:
    return 8 if elems >= 4096 else 4


@triton.jit
def _partial_amax_kernel(x_ptr, part_ptr, M, K, sxm, sxk, n_tiles_k, n_tiles,
                         IS_BF16: tl.constexpr, MARK_NONFINITE: tl.constexpr,
                         BM: tl.constexpr, BK: tl.constexpr):
    """Partial = max |x| over the program's tiles. Non-finite values count as +inf when
    MARK_NONFINITE (so one max also flags them), else they are skipped (amax of finite values)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for t in range(pid, n_tiles, nprog):
        tm = t // n_tiles_k
        tk = t % n_tiles_k
        rows = tm.to(tl.int64) * BM + tl.arange(0, BM)
        cols = tk.to(tl.int64) * BK + tl.arange(0, BK)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        a = tl.abs(load_f32(x_ptr, rows[:, None] * sxm + cols[None, :] * sxk, mask, IS_BF16))
        other = float("inf") if MARK_NONFINITE else 0.0
        acc = tl.maximum(acc, tl.where(a <= FLT_MAX, a, other))
    tl.store(part_ptr + pid, tl.max(tl.max(acc, axis=1), axis=0))


def partial_amax(xk: torch.Tensor, x: torch.Tensor, mark_nonfinite: bool):
    """Launch stage one on the kernel view ``xk`` of x (M, K). Returns (partials, n, P_BLOCK)."""
    M, K = x.shape
    sxm, sxk = x.stride()
    BK = min(pow2(K), 1024)
    BM = min(max(TILE_ELEMS // BK, 1), pow2(M))
    n_tiles_k = triton.cdiv(K, BK)
    n_tiles = triton.cdiv(M, BM) * n_tiles_k
    n_part = min(n_tiles, MAX_PARTIALS)
    part = torch.empty(n_part, dtype=torch.float32, device=x.device)
    _partial_amax_kernel[(n_part,)](xk, part, M, K, sxm, sxk, n_tiles_k, n_tiles,
                                    IS_BF16=x.dtype == torch.bfloat16,
                                    MARK_NONFINITE=bool(mark_nonfinite), BM=BM, BK=BK,
                                    num_warps=warps(BM * BK))
    return part, n_part, pow2(n_part)

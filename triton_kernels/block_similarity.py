"""Triton kernels of pyops::block_similarity and pyops::cache_apply
(spec: pyops/reference/block_similarity.py).

Three launches, no host sync, fixed shapes (capturable):

1. ``_partials``: grid (rows·chunks, splits); each program sums |a−b| and |b| over a fixed slice
   of SPLIT elements of one row chunk (fp32, fixed order) and writes one partial pair. With
   ``write_ref == 2`` (always) it also writes a into ref in the same pass.
2. ``_finalize``: grid (chunks,); sums the partials of each cell in a fixed order (two-stage,
   deterministic), then metric, decision and the state update for every group of that chunk.
3. ``_write_ref`` (only when ``write_ref == 1``): copies a into ref in the cells that recompute;
   programs of reused cells load nothing (masked), so a reuse costs one launch, no traffic.

bf16 is loaded as int16 bits and widened exactly (the interpreter's bf16 decode is broken for
subnormals, see _cvt.py); the ref copy moves raw bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cvt import as_kernel_input, as_kernel_output, f32_to_out, load_f32, out_kind, use_soft_cvt

BLOCK = 1024
SPLIT = 16 * BLOCK  # elements per stage-1 program
FIN_BLOCK = 128

GRID_Y_MAX = 65535  # CUDA's limit on grid y

@triton.jit
def _partials(a_ptr, b_ptr, part_ptr, L, Lc, chunks, splits,
              IS_BF16: tl.constexpr, WRITE_ALWAYS: tl.constexpr, BLOCK: tl.constexpr,
              SPLIT: tl.constexpr):
    rc = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    row = rc // chunks
    c = rc % chunks
    base = row * L + c * Lc
    start = sp * SPLIT
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.range(0, SPLIT, BLOCK):
        idx = start + k + tl.arange(0, BLOCK)
        mask = idx < Lc
        a = load_f32(a_ptr, base + idx, mask, IS_BF16)
        b = load_f32(b_ptr, base + idx, mask, IS_BF16)
        acc_d += tl.abs(a - b)
        acc_n += tl.abs(b)
        if WRITE_ALWAYS:
            raw = tl.load(a_ptr + base + idx, mask=mask)
            tl.store(b_ptr + base + idx, raw, mask=mask)
    out = part_ptr + (rc * splits + sp) * 2
    tl.store(out, tl.sum(acc_d, axis=0))
    tl.store(out + 1, tl.sum(acc_n, axis=0))


@triton.jit
def _finalize(part_ptr, state_ptr, metric_ptr, reuse_ptr, groups, rows_per_group, chunks, splits,
              threshold, eps, warmup, max_reuse, num_steps, last_steps,
              RULE: tl.constexpr, ALL_GROUPS: tl.constexpr, FIN_BLOCK: tl.constexpr):
    c = tl.program_id(0)
    n_part = rows_per_group * splits
    # pass 1: metric and the per-cell candidate decision
    for g in range(groups):
        cell = g * chunks + c
        acc_d = tl.zeros([FIN_BLOCK], dtype=tl.float32)
        acc_n = tl.zeros([FIN_BLOCK], dtype=tl.float32)
        for k in range(0, n_part, FIN_BLOCK):
            j = k + tl.arange(0, FIN_BLOCK)
            mask = j < n_part
            i = j // splits
            s = j % splits
            row = g * rows_per_group + i
            p = part_ptr + ((row * chunks + c) * splits + s) * 2
            acc_d += tl.load(p, mask=mask, other=0.0)
            acc_n += tl.load(p + 1, mask=mask, other=0.0)
        d = tl.sum(acc_d, axis=0)
        n = tl.sum(acc_n, axis=0)
        m = tl.math.div_rn(d, tl.maximum(n, eps))
        step = tl.load(state_ptr + cell * 4)
        consec = tl.load(state_ptr + cell * 4 + 1)
        acc = tl.load(state_ptr + cell * 4 + 2)
        # tensor operands first: an int argument equal to 1 arrives as a constexpr
        forced = (step == 0.0) | (step < warmup)
        forced = forced | ((step >= num_steps - last_steps) & (num_steps > 0))
        forced = forced | ((consec >= max_reuse) & (max_reuse >= 0))
        if RULE == 0:
            cand = m < threshold
        else:
            cand = (acc + m) < threshold
        r = (cand & (forced == 0)).to(tl.int32)
        tl.store(metric_ptr + cell, m)
        tl.store(reuse_ptr + cell, r)
    tl.debug_barrier()
    all_r = tl.full([], 1, tl.int32)
    if ALL_GROUPS:
        for g in range(groups):
            all_r = all_r & tl.load(reuse_ptr + g * chunks + c)
    tl.debug_barrier()
    # pass 2: the state update with the final decision
    for g in range(groups):
        cell = g * chunks + c
        m = tl.load(metric_ptr + cell)
        r = tl.load(reuse_ptr + cell)
        if ALL_GROUPS:
            r = r & all_r
        step = tl.load(state_ptr + cell * 4)
        consec = tl.load(state_ptr + cell * 4 + 1)
        acc = tl.load(state_ptr + cell * 4 + 2)
        reused = r != 0
        new_consec = tl.where(reused, consec + 1.0, 0.0)
        if RULE == 1:
            new_acc = tl.where(reused, acc + m, 0.0)
        else:
            new_acc = acc * 0.0
        new_step = step + 1.0
        wrap = (new_step >= num_steps) & (num_steps > 0)
        new_step = tl.where(wrap, 0.0, new_step)
        new_consec = tl.where(wrap, 0.0, new_consec)
        new_acc = tl.where(wrap, 0.0, new_acc)
        tl.store(state_ptr + cell * 4, new_step)
        tl.store(state_ptr + cell * 4 + 1, new_consec)
        tl.store(state_ptr + cell * 4 + 2, new_acc)
        tl.store(state_ptr + cell * 4 + 3, m)
        tl.store(reuse_ptr + cell, r)


@triton.jit
def _write_ref(a_ptr, b_ptr, reuse_ptr, L, Lc, chunks, rows_per_group, n_blk,
               BLOCK: tl.constexpr):
    rc = tl.program_id(0).to(tl.int64)
    row = rc // chunks
    c = rc % chunks
    cell = (row // rows_per_group) * chunks + c
    flag = tl.load(reuse_ptr + cell)
    # grid y is capped at 65535: loop over the remaining blocks of very long rows
    for b in range(tl.program_id(1).to(tl.int64), n_blk, tl.num_programs(1)):
        idx = b * BLOCK + tl.arange(0, BLOCK)
        mask = (idx < Lc) & ((idx * 0 + flag) == 0)
        off = row * L + c * Lc + idx
        raw = tl.load(a_ptr + off, mask=mask)
        tl.store(b_ptr + off, raw, mask=mask)


def _raw(x: torch.Tensor) -> torch.Tensor:
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[x.element_size()])


def block_similarity(a, ref, state, metric, reuse, *, threshold, eps, rule, warmup, max_reuse,
                     num_steps, last_steps, chunks, groups, all_groups, write_ref) -> None:
    """a, ref contiguous, same shape/dtype, (B, ...) with B % groups == 0 and row % chunks == 0."""
    B = a.shape[0]
    L = a.numel() // B
    Lc = L // chunks
    splits = triton.cdiv(Lc, SPLIT)
    part = torch.empty((B * chunks * splits * 2,), dtype=torch.float32, device=a.device)
    is_bf16 = a.dtype == torch.bfloat16
    ak, bk = as_kernel_input(a), as_kernel_input(ref)
    _partials[(B * chunks, splits)](ak, bk, part, L, Lc, chunks, splits, IS_BF16=is_bf16,
                                    WRITE_ALWAYS=write_ref == 2, BLOCK=BLOCK, SPLIT=SPLIT,
                                    num_warps=8)
    _finalize[(chunks,)](part, state, metric, reuse, groups, B // groups, chunks, splits,
                         float(threshold), float(eps), int(warmup), int(max_reuse),
                         int(num_steps), int(last_steps), RULE=int(rule),
                         ALL_GROUPS=bool(all_groups) and groups > 1, FIN_BLOCK=FIN_BLOCK,
                         num_warps=4)
    if write_ref == 1:
        n_blk = triton.cdiv(Lc, BLOCK)
        _write_ref[(B * chunks, min(n_blk, GRID_Y_MAX))](_raw(a), _raw(ref), reuse, L, Lc, chunks,
                                                         B // groups, n_blk, BLOCK=BLOCK,
                                                         num_warps=4)


@triton.jit
def _cache_apply(out_ptr, x_ptr, res_ptr, reuse_ptr, L, rows_per_group,
                 X_BF16: tl.constexpr, R_BF16: tl.constexpr, OUT_KIND: tl.constexpr,
                 SOFT: tl.constexpr, BLOCK: tl.constexpr, n_blk):
    row = tl.program_id(0).to(tl.int64)
    flag = tl.load(reuse_ptr + row // rows_per_group)
    for b in range(tl.program_id(1).to(tl.int64), n_blk, tl.num_programs(1)):  # grid y <= 65535
        idx = b * BLOCK + tl.arange(0, BLOCK)
        mask = (idx < L) & ((idx * 0 + flag) != 0)
        off = row * L + idx
        x = load_f32(x_ptr, off, mask, X_BF16)
        r = load_f32(res_ptr, off, mask, R_BF16)
        tl.store(out_ptr + off, f32_to_out(x + r, OUT_KIND, SOFT), mask=mask)


def cache_apply(out, x, residual, reuse, groups: int) -> None:
    B = out.shape[0]
    L = out.numel() // B
    soft = use_soft_cvt(out)
    n_blk = triton.cdiv(L, BLOCK)
    _cache_apply[(B, min(n_blk, GRID_Y_MAX))](
        as_kernel_output(out, soft), as_kernel_input(x), as_kernel_input(residual), reuse, L,
        B // groups, X_BF16=x.dtype == torch.bfloat16, R_BF16=residual.dtype == torch.bfloat16,
        OUT_KIND=out_kind(out.dtype), SOFT=soft, BLOCK=BLOCK, n_blk=n_blk, num_warps=4)

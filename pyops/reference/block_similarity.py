"""Block-similarity cache check: the reference, and the spec for every backend.

One pass over the current feature ``a`` and the cached reference ``ref`` (same shape and dtype,
batch first). The batch rows are split into ``groups`` contiguous groups (e.g. 2 when the CFG
halves share one forward) and each row into ``chunks`` contiguous token chunks. A *cell* is one
(group, chunk) pair; cells are numbered ``g * chunks + c``. Per cell:

    d = Σ |a − ref|     n = Σ |ref|          (fp32 sums over the cell's elements)
    m = d / max(n, eps)          (relative L1 = mean|a−b| / mean|b|; 0/0 gives 0, inf/NaN inputs
                                  give a NaN m, which never reuses)

State per cell (fp32, 4 values; integers are exact in fp32 up to 2^24):

    state[cell] = [step, consecutive reuses, accumulated distance, last metric]

Decision at step ``s = state[cell, 0]``:

    forced  = s == 0 or s < warmup
              or (num_steps > 0 and s >= num_steps − last_steps)
              or (max_reuse >= 0 and consecutive >= max_reuse)
    rule 0 "last_computed" (First-Block Cache, DBCache):  candidate = m < threshold
    rule 1 "accumulate"    (TeaCache, EasyCache):  acc' = acc + m; candidate = acc' < threshold
    reuse   = not forced and candidate        (strict '<': threshold 0 never reuses)
    all_groups: reuse of every cell with chunk c becomes AND over the groups (one forward runs
                the whole batch, so the groups must agree; each group keeps its own metric)

State update: reuse → consecutive += 1, acc = acc' (rule 1) ; compute → consecutive = 0, acc = 0;
``step += 1``, wrapping to 0 (consecutive and acc reset too) once it reaches ``num_steps`` (when
``num_steps > 0``) so a captured graph replays generation after generation without a host reset.
``last metric = m``.

Reference write (``write_ref``): 0 never, 1 when the cell is recomputed (rule 0: the reference is
the last *computed* feature), 2 always (rule 1: compare adjacent steps). ``ref`` is overwritten
with ``a`` only in the cells whose flag says so.

Outputs: ``metric`` (cells,) fp32 and ``reuse`` (cells,) int32 (1 = reuse the cache, 0 = compute).
"""
from __future__ import annotations

import torch

RULES = {"last_computed": 0, "accumulate": 1}
WRITE_REF = {"never": 0, "on_compute": 1, "always": 2}
STATE_SIZE = 4


def cell_view(x: torch.Tensor, groups: int, chunks: int) -> torch.Tensor:
    """(B, ...) -> (groups, rows per group, chunks, chunk length), a view of contiguous x."""
    B = x.shape[0]
    return x.reshape(groups, B // groups, chunks, -1)


def partial_sums(a: torch.Tensor, ref: torch.Tensor, groups: int, chunks: int):
    """Per-cell (Σ|a−b|, Σ|b|) in fp32."""
    av = cell_view(a, groups, chunks).float()
    bv = cell_view(ref, groups, chunks).float()
    d = (av - bv).abs().sum(dim=(1, 3))
    n = bv.abs().sum(dim=(1, 3))
    return d.reshape(-1), n.reshape(-1)


def decide(d: torch.Tensor, n: torch.Tensor, state: torch.Tensor, *, threshold: float,
           eps: float, rule: int, warmup: int, max_reuse: int, num_steps: int, last_steps: int,
           groups: int, chunks: int, all_groups: bool):
    """Metric, decision and new state from the per-cell sums (device tensors, no host sync)."""
    f32 = torch.float32
    m = d / n.clamp_min(eps)
    step, consec, acc = state[:, 0], state[:, 1], state[:, 2]
    forced = (step == 0) | (step < warmup)
    if num_steps > 0:
        forced = forced | (step >= num_steps - last_steps)
    if max_reuse >= 0:
        forced = forced | (consec >= max_reuse)
    acc_new = acc + m
    cand = (m < threshold) if rule == 0 else (acc_new < threshold)
    reuse = ~forced & cand
    if all_groups and groups > 1:
        reuse = reuse.view(groups, chunks).all(dim=0, keepdim=True).expand(groups, chunks)
        reuse = reuse.reshape(-1)
    zero = torch.zeros_like(acc)
    new_consec = torch.where(reuse, consec + 1, zero)
    new_acc = torch.where(reuse, acc_new, zero) if rule == 1 else zero
    new_step = step + 1
    if num_steps > 0:
        wrap = new_step >= num_steps
        new_step = torch.where(wrap, zero, new_step)
        new_consec = torch.where(wrap, zero, new_consec)
        new_acc = torch.where(wrap, zero, new_acc)
    new_state = torch.stack([new_step, new_consec, new_acc, m], dim=1).to(f32)
    return m, reuse.to(torch.int32), new_state


def block_similarity(a, ref, state, metric, reuse, *, threshold: float, eps: float = 1e-12,
                     rule: int = 0, warmup: int = 1, max_reuse: int = -1, num_steps: int = 0,
                     last_steps: int = 0, chunks: int = 1, groups: int = 1,
                     all_groups: bool = False, write_ref: int = 1) -> None:
    """Destination-passing reference: updates ref, state, metric, reuse in place."""
    d, n = partial_sums(a, ref, groups, chunks)
    m, r, new_state = decide(d, n, state, threshold=threshold, eps=eps, rule=rule, warmup=warmup,
                             max_reuse=max_reuse, num_steps=num_steps, last_steps=last_steps,
                             groups=groups, chunks=chunks, all_groups=all_groups)
    if write_ref:
        write = torch.ones_like(r, dtype=torch.bool) if write_ref == 2 else (r == 0)
        mask = write.view(groups, 1, chunks, 1)
        rv = cell_view(ref, groups, chunks)
        rv.copy_(torch.where(mask, cell_view(a, groups, chunks), rv))
    state.copy_(new_state)
    metric.copy_(m)
    reuse.copy_(r)


def cache_apply(out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                reuse: torch.Tensor, groups: int = 1) -> None:
    """Where a group reuses: ``out = x + residual`` (in out's dtype, one rounding from the fp32
    sum); elsewhere ``out`` keeps its values. ``reuse`` is (groups,) int32 (chunks = 1)."""
    B = out.shape[0]
    flag = (reuse.view(groups, 1) != 0).repeat_interleave(B // groups, dim=0)
    flag = flag.view(B, *([1] * (out.dim() - 1)))
    y = (x.float() + residual.float()).to(out.dtype)
    out.copy_(torch.where(flag, y, out))


def host_rule(ms, *, threshold: float, rule: int = 0, warmup: int = 1, max_reuse: int = -1,
              num_steps: int = 0, last_steps: int = 0):
    """Plain-Python replay of the decision rule over a sequence of metrics (one cell, one group),
    for tests: returns the list of reuse decisions (bool)."""
    out, step, consec, acc = [], 0, 0, 0.0
    for m in ms:
        forced = step == 0 or step < warmup
        if num_steps > 0 and step >= num_steps - last_steps:
            forced = True
        if max_reuse >= 0 and consec >= max_reuse:
            forced = True
        acc_new = acc + m
        cand = (m < threshold) if rule == 0 else (acc_new < threshold)
        r = (not forced) and cand
        out.append(r)
        consec, acc = (consec + 1, acc_new if rule == 1 else 0.0) if r else (0, 0.0)
        step += 1
        if num_steps > 0 and step >= num_steps:
            step, consec, acc = 0, 0, 0.0
    return out

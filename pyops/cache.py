"""Training-free caching for DiTs: the fused similarity check and the caching policies.

The check, :func:`block_similarity`, compares the current feature with a cached reference in one
pass and decides on the device whether the cached result may be reused (rules in
:mod:`pyops.reference.block_similarity`). Nothing is read back to the host: the decision lives in
an int32 device tensor that a CUDA-graph IF node (:mod:`pyops.graphs`) or the eager path reads.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _backend
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from .ops import block_similarity as _op
from .reference import block_similarity as _ref

RULES = _ref.RULES
WRITE_REF = _ref.WRITE_REF
STATE_SIZE = _ref.STATE_SIZE


def new_state(cells: int = 1, device=None) -> torch.Tensor:
    """A fresh (cells, 4) fp32 state: step 0, no reuses, nothing accumulated."""
    return torch.zeros((cells, STATE_SIZE), dtype=torch.float32, device=device)


def _code(table: dict, name: str, value) -> int:
    if isinstance(value, int) and value in table.values():
        return value
    if value not in table:
        raise ValueError(f"pyops.block_similarity: {name}={value!r}; expected one of "
                         f"{sorted(table)}")
    return table[value]


def block_similarity(a: torch.Tensor, ref: torch.Tensor, state: torch.Tensor, *,
                     threshold: float, rule: str = "last_computed", warmup: int = 1,
                     max_reuse: int = -1, num_steps: int = 0, last_steps: int = 0,
                     chunks: int = 1, groups: int = 1, all_groups: bool = False,
                     write_ref: Optional[str] = None, eps: float = 1e-12,
                     metric: Optional[torch.Tensor] = None, reuse: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused cache check: per cell ``m = Σ|a−ref| / max(Σ|ref|, eps)``, decision, state update.

    ``a``/``ref``: same shape and dtype, contiguous, batch first; ``ref`` is updated in place
    (``write_ref``: "on_compute" (default for rule "last_computed"), "always" (default for
    "accumulate"), "never"). ``state``: (groups·chunks, 4) fp32 from :func:`new_state`, updated
    in place. Returns ``(reuse, metric)``: (groups·chunks,) int32 (1 = reuse) and fp32; pass
    ``metric``/``reuse`` buffers to reuse static storage (CUDA graphs). No host sync.
    """
    op = "block_similarity"
    check_tensor(op, "a", a, FLOAT_DTYPES)
    check_tensor(op, "ref", ref, FLOAT_DTYPES)
    check_tensor(op, "state", state, (torch.float32,), min_ndim=2)
    check_same_device(op, a, reference=ref, state=state, metric=metric, reuse=reuse)
    if ref.shape != a.shape or ref.dtype != a.dtype:
        raise ValueError(f"pyops.block_similarity: ref {tuple(ref.shape)} {ref.dtype} must match "
                         f"a {tuple(a.shape)} {a.dtype}")
    if not ref.is_contiguous():
        raise ValueError("pyops.block_similarity: ref must be contiguous (it is written in place)")
    if not torch.compiler.is_compiling() and ref.data_ptr() == a.data_ptr():
        raise ValueError("pyops.block_similarity: ref must not alias a")
    groups, chunks = int(groups), int(chunks)
    B = a.shape[0]
    if groups < 1 or B % groups:
        raise ValueError(f"pyops.block_similarity: batch {B} is not divisible by groups={groups}")
    tok = a.shape[1] if a.dim() >= 3 else a.numel() // B
    if chunks < 1 or tok % chunks:
        raise ValueError(f"pyops.block_similarity: {tok} tokens are not divisible by "
                         f"chunks={chunks}")
    cells = groups * chunks
    if tuple(state.shape) != (cells, STATE_SIZE) or not state.is_contiguous():
        raise ValueError(f"pyops.block_similarity: state must be contiguous ({cells}, "
                         f"{STATE_SIZE}) fp32, got {tuple(state.shape)}")
    rule_c = _code(RULES, "rule", rule)
    if write_ref is None:
        write_ref = "on_compute" if rule_c == 0 else "always"
    wr = _code(WRITE_REF, "write_ref", write_ref)
    if not (threshold >= 0.0) or not (eps > 0.0):
        raise ValueError(f"pyops.block_similarity: threshold must be >= 0 and eps > 0, got "
                         f"{threshold}, {eps}")
    if metric is None:
        metric = torch.empty((cells,), dtype=torch.float32, device=a.device)
    if reuse is None:
        reuse = torch.empty((cells,), dtype=torch.int32, device=a.device)
    if metric.shape != (cells,) or metric.dtype != torch.float32 or not metric.is_contiguous():
        raise ValueError(f"pyops.block_similarity: metric must be contiguous ({cells},) fp32")
    if reuse.shape != (cells,) or reuse.dtype != torch.int32 or not reuse.is_contiguous():
        raise ValueError(f"pyops.block_similarity: reuse must be contiguous ({cells},) int32")
    a = a.contiguous()
    b = _backend.resolve(op, a.device, backend)
    torch.ops.pyops.block_similarity(a, ref, state, metric, reuse, float(threshold), float(eps),
                                     rule_c, int(warmup), int(max_reuse), int(num_steps),
                                     int(last_steps), chunks, groups, bool(all_groups), wr, b)
    return reuse, metric


def cache_apply(out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                reuse: torch.Tensor, *, groups: int = 1, backend: Optional[str] = None) -> None:
    """Where group g reuses (``reuse[g] != 0``): ``out = x + residual``; elsewhere ``out`` is left
    as it is (so a computed output stays bit-exact). All of ``out, x, residual`` contiguous with
    the same shape; ``reuse`` (groups,) int32 on the same device. No host sync."""
    op = "cache_apply"
    for n, t in (("out", out), ("x", x), ("residual", residual)):
        check_tensor(op, n, t, FLOAT_DTYPES)
        if t.shape != out.shape or not t.is_contiguous():
            raise ValueError(f"pyops.cache_apply: {n} must be contiguous with out's shape")
    check_tensor(op, "reuse", reuse, (torch.int32,))
    check_same_device(op, out, x=x, residual=residual, reuse=reuse)
    if out.shape[0] % groups or reuse.shape != (groups,):
        raise ValueError(f"pyops.cache_apply: reuse must be ({groups},) and batch divisible")
    b = _backend.resolve(op, out.device, backend)
    torch.ops.pyops.cache_apply(out, x, residual, reuse, int(groups), b)

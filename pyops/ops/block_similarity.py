"""pyops::block_similarity: the public function, schema, fake, backends
(spec: pyops/reference/block_similarity.py; its companion op pyops::cache_apply is in
:mod:`pyops.ops.cache_apply`).

Destination-passing: the op mutates ``ref`` (the cached reference), ``state`` (per-cell step
counters), ``metric`` and ``reuse``. Every option is a plain int/float decided on the host; every
decision is made on the device and written to ``reuse`` (int32), never read back: no host sync,
CUDA-graph capturable.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor, overlaps
from .._op import binding_fake, define
from ..reference import block_similarity as _ref

OP = "block_similarity"
RULES = _ref.RULES
WRITE_REF = _ref.WRITE_REF
STATE_SIZE = _ref.STATE_SIZE


# ---- backends: a, ref contiguous (B, ...) ------------------------------------------------------
def _reference(a, refbuf, state, metric, reuse, threshold, eps, rule, warmup, max_reuse,
               num_steps, last_steps, chunks, groups, all_groups, write_ref) -> None:
    _ref.block_similarity(a, refbuf, state, metric, reuse, threshold=threshold, eps=eps,
                          rule=rule, warmup=warmup, max_reuse=max_reuse, num_steps=num_steps,
                          last_steps=last_steps, chunks=chunks, groups=groups,
                          all_groups=all_groups, write_ref=write_ref)


def _triton(a, refbuf, state, metric, reuse, threshold, eps, rule, warmup, max_reuse,
            num_steps, last_steps, chunks, groups, all_groups, write_ref) -> None:
    from ..triton_kernels import block_similarity as tk
    tk.block_similarity(a, refbuf, state, metric, reuse, threshold=threshold, eps=eps, rule=rule,
                        warmup=warmup, max_reuse=max_reuse, num_steps=num_steps,
                        last_steps=last_steps, chunks=chunks, groups=groups,
                        all_groups=all_groups, write_ref=write_ref)


def _cuda(a, refbuf, state, metric, reuse, threshold, eps, rule, warmup, max_reuse,
          num_steps, last_steps, chunks, groups, all_groups, write_ref) -> None:
    torch.ops.pyops._block_similarity_cuda(a, refbuf, state, metric, reuse, threshold, eps, rule,
                                           warmup, max_reuse, num_steps, last_steps, chunks,
                                           groups, all_groups, write_ref)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)
_backend.register(OP, "cuda", _cuda)


# ---- the op -------------------------------------------------------------------------------------
def _fake(a, ref, state, metric, reuse, threshold, eps, rule, warmup, max_reuse, num_steps,
          last_steps, chunks, groups, all_groups, write_ref, backend):
    return None


@define(OP, fake=_fake, mutates_args=("ref", "state", "metric", "reuse"))
def block_similarity_op(a: torch.Tensor, ref: torch.Tensor, state: torch.Tensor,
                        metric: torch.Tensor, reuse: torch.Tensor, threshold: float, eps: float,
                        rule: int, warmup: int, max_reuse: int, num_steps: int, last_steps: int,
                        chunks: int, groups: int, all_groups: bool, write_ref: int,
                        backend: str) -> None:
    _backend.impl(OP, backend)(a, ref, state, metric, reuse, threshold, eps, rule, warmup,
                               max_reuse, num_steps, last_steps, chunks, groups, all_groups,
                               write_ref)


binding_fake("_block_similarity_cuda")


# ---- the public function ------------------------------------------------------------------------
def new_state(cells: int = 1, device=None) -> torch.Tensor:
    """A fresh (cells, 4) fp32 state for :func:`block_similarity`: step 0, no reuses, nothing
    accumulated (layout: :data:`pyops.reference.block_similarity.STATE_SIZE` columns)."""
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
    Rules and formulas: :mod:`pyops.reference.block_similarity`.

    Raises ``TypeError`` for a dtype outside fp32/fp16/bf16 and ``ValueError`` for mismatched,
    overlapping or wrongly shaped buffers, indivisible ``groups``/``chunks``, an unknown
    ``rule``/``write_ref``, ``threshold < 0`` or ``eps <= 0``; all before any launch.
    """
    op = OP
    check_tensor(op, "a", a, FLOAT_DTYPES)
    check_tensor(op, "ref", ref, FLOAT_DTYPES)
    check_tensor(op, "state", state, (torch.float32,), min_ndim=2)
    check_same_device(op, a, reference=ref, state=state, metric=metric, reuse=reuse)
    if ref.shape != a.shape or ref.dtype != a.dtype:
        raise ValueError(f"pyops.block_similarity: ref {tuple(ref.shape)} {ref.dtype} must match "
                         f"a {tuple(a.shape)} {a.dtype}")
    if not ref.is_contiguous():
        raise ValueError("pyops.block_similarity: ref must be contiguous (it is written in place)")
    if not torch.compiler.is_compiling() and overlaps(ref, a):
        raise ValueError("pyops.block_similarity: ref must not overlap a in memory")
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
    args = (a, ref, state, metric, reuse, float(threshold), float(eps), rule_c, int(warmup),
            int(max_reuse), int(num_steps), int(last_steps), chunks, groups, bool(all_groups),
            wr, b)
    block_similarity_op(*args)
    return reuse, metric

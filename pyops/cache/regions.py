"""Cache state of one cached region in one context: :class:`Region` (step and block levels, a
region gated by one device decision) and :class:`ChunkRegion` (chunk level, one block).

Every field is declared here; the hooks (:mod:`pyops.cache.model`) and the chunk level
(:mod:`pyops.cache.chunk`) only fill them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


def persistent():
    """Context for allocating cache state that outlives one forward: plain tensors without
    autograd history even when the forward runs under ``torch.inference_mode()`` (inference
    tensors could not be updated in place by a later forward under ``torch.no_grad()``)."""
    return torch.inference_mode(False)


@dataclass
class Region:
    """Device state of one gated region (step level: the middle blocks; block level: one block).

    ref: the reference feature of :func:`pyops.block_similarity` (updated in place by the check);
    state: its (groups, 4) fp32 step counters; metric: (groups,) fp32, the last check's metric;
    flags: (2, groups) int32, row 0 all ones, row 1 the last check's decision; reuse: (groups,)
    int32, a view of ``flags[1]`` that the check writes (``reuse != 0``: the region was skipped);
    tally: (2, groups) int64, ``Σ flags`` over the checks since the counters were last zeroed
    (row 0: checks, row 1: reuses), added on the device after every check (one add, captured
    with the check, so graph replays count too); residual: one tensor per hidden stream,
    output − input at the last computed step.

    First-order forecast (``CacheConfig.forecast=1``; all None / empty at order 0), every field
    on the device and updated by device ops only (no host sync; the same ops run eagerly and
    inside a CUDA graph): residual_prev: one tensor per hidden stream, the residual of the
    computed step before the last one (``r0``; ``residual`` is ``r1``); clock: (groups,) fp32,
    this forward's step (``state[:, 0]`` copied before the check, which advances it in place);
    history: (groups, 3) fp32 ``[k1, k0, stored]``: the steps of ``residual`` and
    ``residual_prev`` and how many residuals of the current generation are stored (0–2; a
    computed step at clock 0 restarts it at 1), updated only where the region computed (inside
    the IF node's body in a capture, a device select without IF nodes); coef: (groups,) fp32,
    the last forward's coefficient ``(k − k1) / (k1 − k0)`` where it reused with two residuals
    stored, else 0. fixed: a CUDA graph captured this region, so the buffers' addresses are baked
    into it: a computed step copies ``r1`` into ``r0`` from then on; before that an eager
    computed step swaps the two buffers instead (no copy).

    Context parallelism (a process group of more than one rank; None otherwise): sums:
    (groups, 3) fp32, ``[Σ|a−ref|, Σ|ref|, fresh]`` all-reduced over the group; pair:
    (2, groups, 1, 2) fp32, the exact feature/reference pair the decision runs on
    (:mod:`pyops.cache.parallel`).
    """
    ref: Optional[torch.Tensor] = None
    state: Optional[torch.Tensor] = None
    metric: Optional[torch.Tensor] = None
    flags: Optional[torch.Tensor] = None
    reuse: Optional[torch.Tensor] = None
    tally: Optional[torch.Tensor] = None
    residual: list = field(default_factory=list)
    residual_prev: list = field(default_factory=list)
    clock: Optional[torch.Tensor] = None
    history: Optional[torch.Tensor] = None
    coef: Optional[torch.Tensor] = None
    fixed: bool = False
    sums: Optional[torch.Tensor] = None
    pair: Optional[torch.Tensor] = None
    # transient, within one forward
    inputs: Optional[list] = None
    run: bool = True
    token: Any = None
    mode: str = "eager"  # "eager", "if" (IF node in a capture), "select" (capture, no IF nodes)

    def reset(self) -> None:
        """Step counter back to 0 (a device write, no sync); the tally is kept."""
        if self.state is not None:
            self.state.zero_()

    def count(self) -> None:
        """Add this check's flags to the tally (one device add, no sync)."""
        if self.tally is None or self.tally.device != self.flags.device:
            with persistent():
                old = self.tally
                self.tally = torch.zeros(self.flags.shape, dtype=torch.int64,
                                         device=self.flags.device)
                if old is not None and old.shape == self.tally.shape:
                    self.tally.copy_(old)  # the model moved to another device: keep the counts
        self.tally.add_(self.flags)

    def reset_stats(self) -> None:
        """Counters back to 0 (a device write, no sync)."""
        if self.tally is not None:
            self.tally.zero_()


@dataclass
class ChunkRegion:
    """State of one block at chunk level (every decision on the device; :mod:`pyops.cache.chunk`).

    Data, per shape: ref: (B, N, D) input at the step each token was last computed; residual:
    ``[(B, N, D)]``, output − input per token at that step (both in x's dtype); state / metric /
    reuse: scratch of the per-chunk :func:`pyops.block_similarity` check, (groups·chunks, 4) fp32 /
    (groups·chunks,) fp32 / int32 (its decision outputs are unused: the ``budget`` most changed
    chunks are recomputed); last_chunks: (budget,) int64, the chunks recomputed at the last
    partial step.

    Step machine, per region: step_state: (1, 4) fp32 state of the one-cell check that decides
    full vs partial (its step counter wraps at ``num_steps``); step_ref: (1, 1) fp32 zeros, its
    reference; step_metric: (1,) fp32, its metric; fresh: (1, 1) fp32, 1 when the next forward
    must run the full block (cache empty, new shape, after an error), its feature; flags: (2,)
    int32, ``[1, partial]``; partial: (1,) int32, a view of ``flags[1:]`` that the check writes
    (1: the last forward ran the chunk path, 0: the full block); tally: (2,) int64, ``Σ flags``
    (forwards, partial steps) since the counters were last zeroed. warm_key: the (shape, dtype,
    device) at which the partial path last ran once on scratch copies (kernels compiled before
    a capture).
    """
    ref: Optional[torch.Tensor] = None
    state: Optional[torch.Tensor] = None
    metric: Optional[torch.Tensor] = None
    reuse: Optional[torch.Tensor] = None
    residual: list = field(default_factory=list)
    last_chunks: Optional[torch.Tensor] = None
    step_state: Optional[torch.Tensor] = None
    step_ref: Optional[torch.Tensor] = None
    step_metric: Optional[torch.Tensor] = None
    fresh: Optional[torch.Tensor] = None
    flags: Optional[torch.Tensor] = None
    partial: Optional[torch.Tensor] = None
    tally: Optional[torch.Tensor] = None
    warm_key: Any = None

    def reset(self) -> None:
        """Start a new generation: the step counter back to 0 (a device write, no sync; the
        cache and the tally are kept)."""
        if self.step_state is not None:
            self.step_state.zero_()

    def reset_stats(self) -> None:
        """Counters back to 0 (a device write, no sync)."""
        if self.tally is not None:
            self.tally.zero_()

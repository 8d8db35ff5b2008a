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
    """
    ref: Optional[torch.Tensor] = None
    state: Optional[torch.Tensor] = None
    metric: Optional[torch.Tensor] = None
    flags: Optional[torch.Tensor] = None
    reuse: Optional[torch.Tensor] = None
    tally: Optional[torch.Tensor] = None
    residual: list = field(default_factory=list)
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
    """State of one block at chunk level (steps counted on the host).

    ref: (B, N, D) input at the step each chunk was last computed; residual: ``[(B, N, D)]``,
    output − input per token at that step; state/metric/reuse: scratch buffers of the per-chunk
    :func:`pyops.block_similarity` check, (groups·chunks, 4) / (groups·chunks,) (the decision
    outputs are unused: the ``budget`` most changed chunks are recomputed); host_step: steps seen
    since the last wrap at ``num_steps``; last_chunks: (budget,) int64, the chunks recomputed at
    the last partial step; forwards / full: forwards of the block at chunk level since the
    counters were last zeroed / how many of them ran the full block (host ints: the host decides).
    """
    ref: Optional[torch.Tensor] = None
    state: Optional[torch.Tensor] = None
    metric: Optional[torch.Tensor] = None
    reuse: Optional[torch.Tensor] = None
    residual: list = field(default_factory=list)
    host_step: int = 0
    last_chunks: Optional[torch.Tensor] = None
    forwards: int = 0
    full: int = 0

    def reset(self) -> None:
        """Start a new generation: step counters back to 0 (the counters are kept)."""
        if self.state is not None:
            self.state.zero_()
        self.host_step = 0

    def reset_stats(self) -> None:
        """Counters back to 0."""
        self.forwards = self.full = 0

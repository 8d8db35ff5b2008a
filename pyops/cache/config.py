"""Cache configuration: :class:`CacheConfig` (how to cache) and :class:`BlockSpec` (where a
block's hidden streams are)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..ops.block_similarity import RULES
from . import parallel as _cp

LEVELS = ("step", "block", "chunk")
FORECAST_ORDERS = (0, 1)  # CacheConfig.forecast: Taylor order of the reused residual


@dataclass
class CacheConfig:
    """How to cache (modelled on diffusers' ``FirstBlockCacheConfig`` and cache-dit's DBCache).

    level: ``"step"``: the residual of the first ``fn`` blocks' last block gates every block after
        it up to the ``bn`` trailing ones, which are always computed (First-Block Cache / DBCache
        Fn-Bn); ``"block"``: each block between them compares its own input with the input at its
        last computed step and reuses its own residual.
        ``"chunk"`` (pyops DiT blocks only): each block between them splits its tokens into
        ``chunks`` chunks and recomputes the ``budget`` chunks whose input changed most since
        they were last computed (static shapes: the budget is fixed); recomputed queries attend
        to the keys/values of all tokens; the other chunks reuse their cached residual.
        Warm-up and last steps (counted on the device) run the full block; CUDA graphs need IF
        nodes (:mod:`pyops.cache.chunk`). ``threshold`` is unused.
    threshold: relative L1 threshold (strict ``<``: 0 never reuses, output is then bit-identical
        to the uncached model). Typical 0.05–0.25. The default 0.12 comes from the caching
        study (bench/bench_cache.py, docs/cache.md) on a digits-trained Flux
        (:mod:`pyops.models.digits`): with the other defaults and ``num_steps=28`` it skips 36 %
        of the 28 forwards' gated blocks at 0.5 % relative L1 of the final latent (the former
        default 0.08 skipped 18–21 % there; diffusers' ``FirstBlockCacheConfig`` defaults to
        0.05).
    rule: ``"last_computed"`` (compare with the last computed step) or ``"accumulate"``
        (TeaCache: sum the step-to-step distances until they pass the threshold).
    warmup: first steps always computed (>= 1). last_steps: last steps always computed, needs
        ``num_steps`` (the step counter wraps there, so graph replays need no reset).
    max_reuse: cap on consecutive reuses (-1: none).
    cfg_batched: the batch holds both CFG halves (first half cond): two groups with separate
        metrics and state; the decision is their AND (one forward runs both).
    alternate_contexts: forward calls cycle through these context names (e.g. ``("cond",
        "uncond")`` when a pipeline runs the CFG halves as two calls); each has its own state.
        ``CachedModel.context(name)`` sets the context explicitly instead.
    graph: inside a CUDA-graph capture, wrap skipped regions in IF nodes (``pyops.graphs``);
        without IF support a capture computes everything and selects on the device.
    forecast: Taylor order of the residual a reused region adds to its input (step and block
        levels; ``level="chunk"`` raises ``ValueError`` for 1). ``0`` (default): the residual
        of the last computed step as is (First-Block Cache / TeaCache reuse). ``1``: a
        first-order forecast from the residuals of the last two computed steps, the idea of
        TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion
        Models with TaylorSeers", arXiv 2503.06923: extrapolate cached features with finite
        differences over the step index instead of reusing them). With ``r1`` (output − input
        per hidden stream) computed at step ``k1`` and ``r0`` at step ``k0 < k1``, a region
        reused at step ``k`` outputs::

            out = x + r1 + (k − k1) / (k1 − k0) · (r1 − r0)

        formed in fp32 (``r1``, ``r0`` and the coefficient), rounded once to ``x``'s dtype
        (through :func:`pyops.cache_apply`). ``k`` is the check's step counter (forwards
        through the region since the start of the generation: ``reset()``, the wrap at
        ``num_steps``, or a refill after a new shape or an error). Until two residuals of the
        current generation exist (the first computed step, step 0, which is always computed,
        starts a new history) the coefficient is 0, i.e. order 0 exactly. ``forecast=1`` keeps
        the decisions (threshold, rule, warm-up, ``max_reuse``) unchanged; only what a reuse
        adds changes. Memory: one more residual buffer per hidden stream per gated region (the
        same shape and dtype as the stream: step level 1 region, block level one per gated
        block), a (groups, 3) + 2 × (groups,) fp32 bookkeeping per region, and at a reused
        step a transient fp32 tensor of one stream's size for the forecast. Everything is
        decided and formed on the device (no host sync, no allocation by data; CUDA-graph
        capturable): :class:`pyops.cache.regions.Region` documents the bookkeeping.
    process_group: context parallelism: the ranks that each hold a shard of the tokens and must
        take the same decisions (a ``torch.distributed`` ProcessGroup or a 1-D DeviceMesh).
        Each check all-reduces its ``[Σ|a−ref|, Σ|ref|]`` sums (SUM, on the device, no host
        sync) over the group before deciding, so every rank skips or computes together
        (:mod:`pyops.cache.parallel`). None (default): the diffusers context-parallel mesh when
        the model has one (``enable_parallelism``: ``model._parallel_config``), else no group.
        A group of one rank runs exactly the single-process path. ``level="chunk"`` under a
        group of more than one rank raises ``ValueError``.
    """
    level: str = "step"
    threshold: float = 0.12
    rule: str = "last_computed"
    warmup: int = 1
    last_steps: int = 1
    num_steps: int = 0
    max_reuse: int = -1
    fn: int = 1
    bn: int = 0
    cfg_batched: bool = False
    alternate_contexts: tuple = ()
    graph: bool = True
    eps: float = 1e-12
    backend: Optional[str] = None
    chunks: int = 8
    budget: int = 2
    forecast: int = 0
    process_group: Any = None

    def validate(self, n_blocks: int) -> None:
        """Raise ``ValueError`` for a config that cannot run on a model of ``n_blocks`` blocks."""
        if self.level not in LEVELS:
            raise ValueError(f"pyops.cache: level={self.level!r}; expected one of {LEVELS}")
        if self.rule not in RULES:
            raise ValueError(f"pyops.cache: rule={self.rule!r}; expected one of {sorted(RULES)}")
        if self.warmup < 1:
            raise ValueError("pyops.cache: warmup must be >= 1 (the first step fills the cache)")
        if self.fn < (1 if self.level == "step" else 0) or self.bn < 0:
            raise ValueError("pyops.cache: fn must be >= 1 at step level, bn >= 0")
        if self.fn + self.bn > n_blocks:
            raise ValueError(f"pyops.cache: fn + bn = {self.fn + self.bn} > {n_blocks} blocks")
        if not (self.threshold >= 0):
            raise ValueError("pyops.cache: threshold must be >= 0")
        if (not isinstance(self.forecast, int) or isinstance(self.forecast, bool)
                or self.forecast not in FORECAST_ORDERS):
            raise ValueError(f"pyops.cache: forecast={self.forecast!r}; expected one of "
                             f"{FORECAST_ORDERS} (the Taylor order of the reused residual)")
        if self.level == "chunk" and self.forecast:
            raise ValueError("pyops.cache: forecast=1 works at the step and block levels; "
                             "level='chunk' reuses per-token residuals of different steps and "
                             "has no forecast (use forecast=0)")
        if self.level == "chunk" and not (1 <= self.budget <= self.chunks):
            raise ValueError(f"pyops.cache: budget must be in [1, chunks={self.chunks}], got "
                             f"{self.budget}")

        if self.process_group is not None and _cp.resolve_group(self.process_group) is not None \
                and self.level == "chunk":
            raise _cp.chunk_error()

    def groups(self) -> int:
        """Decision groups per forward: 2 when the batch holds both CFG halves, else 1."""
        return 2 if self.cfg_batched else 1


@dataclass
class BlockSpec:
    """Where a block's hidden streams are: ``inputs`` names (also the first positional
    parameters, in order), ``outputs``: None when the block returns stream 0 alone, else the
    position of each stream in the returned tuple. Stream 0 is the one the check looks at."""
    inputs: tuple = ("hidden_states",)
    outputs: Optional[tuple] = None

    def streams_in(self, args, kwargs) -> list:
        return [kwargs[n] if n in kwargs else args[i] for i, n in enumerate(self.inputs)]

    def streams_out(self, out) -> list:
        return [out] if self.outputs is None else [out[j] for j in self.outputs]

    def pack(self, streams: Sequence[torch.Tensor]):
        if self.outputs is None:
            return streams[0]
        res: list = [None] * len(self.outputs)
        for s, j in zip(streams, self.outputs):
            res[j] = s
        return tuple(res)

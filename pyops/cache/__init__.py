"""Training-free caching for DiTs: the fused similarity check and the caching policies.

The check, :func:`block_similarity`, compares the current feature with a cached reference in one
pass and decides on the device whether the cached result may be reused (rules in
:mod:`pyops.reference.block_similarity`). Nothing is read back to the host: the decision lives in
an int32 device tensor that a CUDA-graph IF node (:mod:`pyops.graphs`) or the eager path reads.

Layout:

* the ops (public functions, schemas, fakes, backends) live in their op modules,
  :mod:`pyops.ops.block_similarity` (``block_similarity``, ``new_state``),
  :mod:`pyops.ops.cache_apply` (``cache_apply``) and :mod:`pyops.ops.chunk_scatter`
  (``chunk_scatter``, the chunk level's fused output and cache update); re-exported here;
* :mod:`pyops.cache.config`: :class:`CacheConfig`, :class:`BlockSpec`, ``LEVELS``;
* :mod:`pyops.cache.regions`: the per-region cache state (one dataclass per level kind);
* :mod:`pyops.cache.model`: :class:`CachedModel` (the hooks on a model's blocks, step and block
  levels), :func:`apply` (``pyops.cache_model``), :func:`find_blocks`;
* :mod:`pyops.cache.chunk`: the chunk level (pyops DiT blocks, via ``DiTBlock.forward_rows``;
  full vs partial decided on the device, two complementary IF nodes in a CUDA graph);
* :mod:`pyops.cache.parallel`: context parallelism (``CacheConfig.process_group``): the sums
  all-reduced across the ranks before the decision, so every rank decides the same;
* :mod:`pyops.cache.stats`: ``CachedModel.stats`` (hits, misses, skipped fraction; definitions).
"""
from __future__ import annotations

from ..ops.block_similarity import RULES, STATE_SIZE, WRITE_REF, block_similarity, new_state
from ..ops.cache_apply import cache_apply
from ..ops.chunk_scatter import chunk_scatter
from .config import LEVELS, BlockSpec, CacheConfig
from .model import CachedModel, apply, find_blocks

__all__ = [
    "block_similarity", "cache_apply", "chunk_scatter", "new_state", "RULES", "WRITE_REF",
    "STATE_SIZE", "LEVELS", "CacheConfig", "BlockSpec", "CachedModel", "apply", "find_blocks",
]

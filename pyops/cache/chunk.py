"""The chunk level of :mod:`pyops.cache` (pyops DiT blocks only).

Each gated block splits its N tokens into ``chunks`` equal chunks. At a partial step it measures,
per chunk, the relative L1 change of its input since the chunk was last computed (one
:func:`pyops.block_similarity` pass with ``chunks=``), recomputes the ``budget`` most changed
chunks with :meth:`pyops.models.dit.DiTBlock.forward_rows` (their queries attend to the keys and
values of all N tokens) and gives every other token its input plus its cached residual. Steps the
host counts as warm-up or last steps, a first call and a shape change run the full block.

The step counter is kept on the host (the full/partial choice changes what runs), so this level
runs eagerly only: inside a CUDA-graph capture it raises ``RuntimeError``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import graphs as _graphs
from ..ops.block_similarity import block_similarity, new_state
from .config import CacheConfig
from .regions import ChunkRegion, persistent


class ChunkLevel:
    """The chunk-level forward of the gated blocks of one :class:`~pyops.cache.CachedModel`
    (counts each forward and each full step in the region, :mod:`pyops.cache.stats`)."""

    def __init__(self, config: CacheConfig):
        self.config = config

    def _full_step(self, r: ChunkRegion, step: int, x: torch.Tensor) -> bool:
        cfg = self.config
        return (step < cfg.warmup or (cfg.num_steps > 0 and step >= cfg.num_steps - cfg.last_steps)
                or r.ref is None or r.ref.shape != x.shape or x.shape[1] % cfg.chunks != 0)

    def forward(self, r: ChunkRegion, block, orig: Callable, x: torch.Tensor,
                c: torch.Tensor) -> torch.Tensor:
        """One forward of ``block`` (a ``DiTBlock``) at chunk level with the state ``r``.

        ``orig``: the block's forward as it was before caching (called for full steps);
        ``x``: (B, N, D) hidden states; ``c``: (B, D) conditioning. Returns (B, N, D).
        Raises ``RuntimeError`` inside a CUDA-graph capture.
        """
        cfg = self.config
        if _graphs.capturing():
            raise RuntimeError("pyops.cache: level='chunk' picks full vs partial steps on the "
                               "host; it runs eagerly only (use level='step' or 'block' in CUDA "
                               "graphs)")
        step = r.host_step
        B, N, D = x.shape
        full = self._full_step(r, step, x)
        r.host_step = step + 1 if not (cfg.num_steps > 0 and step + 1 >= cfg.num_steps) else 0
        g = cfg.groups()
        r.forwards += 1
        r.full += int(full)
        if full:
            out = orig(x, c)
            with persistent():
                r.ref = x.detach().clone(memory_format=torch.contiguous_format)
                r.residual = [out.detach() - x.detach()]
                r.state = new_state(g * cfg.chunks, x.device)
                r.metric = torch.zeros(g * cfg.chunks, dtype=torch.float32, device=x.device)
                r.reuse = torch.zeros(g * cfg.chunks, dtype=torch.int32, device=x.device)
            return out
        # per-chunk change since the chunk was last computed (the decision outputs are unused)
        r.state[:, 0] = 1.0
        block_similarity(x.contiguous(), r.ref, r.state, threshold=0.0, chunks=cfg.chunks,
                         groups=g, write_ref="never", eps=cfg.eps, metric=r.metric, reuse=r.reuse,
                         backend=cfg.backend)
        m = torch.nan_to_num(r.metric.view(g, cfg.chunks), nan=float("inf")).amax(dim=0)
        idx = torch.topk(m, cfg.budget, sorted=False).indices.sort().values
        lc = N // cfg.chunks
        tok = (idx[:, None] * lc + torch.arange(lc, device=x.device)).reshape(-1)
        r.last_chunks = idx
        rows = block.forward_rows(x, c, tok)
        res = r.residual[0]
        out = x + res
        out.index_copy_(1, tok, rows)
        res.index_copy_(1, tok, rows - x.index_select(1, tok))
        r.ref.index_copy_(1, tok, x.index_select(1, tok).to(r.ref.dtype))
        return out

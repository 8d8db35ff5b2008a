"""The chunk level of :mod:`pyops.cache` (pyops DiT blocks only).

Each gated block splits its N tokens into ``chunks`` equal chunks. A *partial* step measures, per
chunk, the relative L1 change of its input since the chunk was last computed (one
:func:`pyops.block_similarity` pass with ``chunks=``), picks the ``budget`` most changed chunks on
the device (top-k), recomputes them with :meth:`pyops.models.dit.DiTBlock.forward_rows` (their
queries attend to the keys and values of all N tokens) and writes the output and the cache in one
pass with :func:`pyops.ops.chunk_scatter.chunk_scatter` (recomputed tokens: their new rows; every
other token: input + cached residual). A *full* step runs the whole block and refills the cache.

**Full or partial is decided on the device**, per block and forward, by a one-cell
:func:`pyops.block_similarity` check used as the step machine (its (1, 4) fp32 state counts steps
and wraps at ``num_steps``): full at the ``warmup`` first steps, at the ``last_steps`` last ones,
and whenever the cache must be (re)filled: first call, new shape / dtype / device, after an error,
after a forward whose N is not divisible by ``chunks`` (that forward runs the full block without
touching the cache). The refill need is a (1, 1) fp32 flag (``ChunkRegion.fresh``) fed to the check
as its feature against a zero reference: 1 gives the metric 1 / 1e-12, over the threshold 0.5, so
the check does not "reuse" (runs full); 0 gives 0, so only the step rules decide. The flag is
zeroed right after the check. The check writes ``ChunkRegion.partial`` (int32, 1 = partial).

* **Eager**: the flag is read on the host once per block (one sync, as at the step and block
  levels) and the chosen path runs on :mod:`pyops.graphs`' side stream.
* **Inside a CUDA-graph capture**: the full block and the partial path are captured into two IF
  nodes on the same flag (``run_when="zero"`` and ``"nonzero"``; complementary, so exactly one
  runs), both writing one output buffer allocated before them; replays choose on the device with
  no host work. Capture after one eager forward at the capture's shapes, then ``handle.reset()``,
  as at the step and block levels: buffers are allocated by eager forwards only (a capture that
  would allocate them raises ``RuntimeError``), and on CUDA the first eager forward at a shape also
  runs the partial path once on scratch copies, so its kernels (Triton compiles, cuBLAS on the side
  stream) exist before the capture. A capture without IF-node support
  (:func:`pyops.graphs.supported`) or with ``CacheConfig.graph=False`` raises ``RuntimeError``:
  the chunk level has no compute-everything fallback (it would cost more than the block).
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import graphs as _graphs
from ..ops.block_similarity import block_similarity, new_state
from ..ops.chunk_scatter import chunk_scatter
from .config import CacheConfig
from .regions import ChunkRegion, persistent

# The step machine's check: metric 0 (no refill) or 1 / GATE_EPS (refill) against GATE_THRESHOLD.
GATE_EPS = 1e-12
GATE_THRESHOLD = 0.5


def _capture_error(why: str) -> RuntimeError:
    return RuntimeError(f"pyops.cache: level='chunk' cannot be captured here: {why}. Run one "
                        f"eager forward at the capture's shapes first, then handle.reset() and "
                        f"capture (the same recipe as the step and block levels)")


class ChunkLevel:
    """The chunk-level forward of the gated blocks of one :class:`~pyops.cache.CachedModel`."""

    def __init__(self, config: CacheConfig):
        self.config = config

    # ---- buffers (host; eager forwards only) --------------------------------------------------
    def _prepare(self, r: ChunkRegion, x: torch.Tensor, chunkable: bool, capture: bool) -> None:
        cfg = self.config
        dev = x.device
        if r.step_state is None or r.step_state.device != dev:
            if capture:
                raise _capture_error("its step machine is not allocated on this device")
            with persistent():
                old = r.tally
                r.step_state = new_state(1, dev)
                r.step_ref = torch.zeros((1, 1), dtype=torch.float32, device=dev)
                r.step_metric = torch.zeros(1, dtype=torch.float32, device=dev)
                r.fresh = torch.ones((1, 1), dtype=torch.float32, device=dev)
                r.flags = torch.ones(2, dtype=torch.int32, device=dev)
                r.partial = r.flags[1:]  # the check writes it; flags[0] stays 1 (counts forwards)
                r.partial.zero_()
                r.tally = torch.zeros(2, dtype=torch.int64, device=dev)
                if old is not None:
                    r.tally.copy_(old)  # the model moved: keep the counts
        if chunkable and (r.ref is None or r.ref.shape != x.shape or r.ref.dtype != x.dtype
                          or r.ref.device != dev):
            if capture:
                raise _capture_error(f"no cache buffers for x {tuple(x.shape)} {x.dtype}")
            cells = cfg.groups() * cfg.chunks
            with persistent():
                r.ref = torch.zeros(x.shape, dtype=x.dtype, device=dev)
                r.residual = [torch.zeros(x.shape, dtype=x.dtype, device=dev)]
                r.state = new_state(cells, dev)
                r.metric = torch.zeros(cells, dtype=torch.float32, device=dev)
                r.reuse = torch.zeros(cells, dtype=torch.int32, device=dev)
                r.last_chunks = torch.zeros(cfg.budget, dtype=torch.int64, device=dev)
                r.fresh.fill_(1.0)
            r.warm_key = None

    # ---- the step machine (device) ----------------------------------------------------------
    def _decide(self, r: ChunkRegion, chunkable: bool) -> None:
        """Write ``r.partial`` (1: partial step), advance the step counter, count; no sync."""
        cfg = self.config
        block_similarity(r.fresh, r.step_ref, r.step_state, threshold=GATE_THRESHOLD,
                         warmup=cfg.warmup, num_steps=cfg.num_steps,
                         last_steps=cfg.last_steps if cfg.num_steps > 0 else 0,
                         write_ref="never", eps=GATE_EPS, metric=r.step_metric,
                         reuse=r.partial, backend=cfg.backend)
        if chunkable:
            r.fresh.zero_()
        else:  # no chunk path at this N: full, and the cache (other shape) refills next time
            r.partial.zero_()
            r.fresh.fill_(1.0)
        r.tally.add_(r.flags)

    # ---- the two paths ----------------------------------------------------------------------
    def _full(self, r: ChunkRegion, orig: Callable, x, c, out=None) -> torch.Tensor:
        y = orig(x, c)
        r.ref.copy_(x)
        torch.sub(y, x, out=r.residual[0])
        if out is None:
            return y
        out.copy_(y)
        return out

    def _partial(self, r: ChunkRegion, block, x, c, out, res, ref, record: bool = True) -> None:
        cfg = self.config
        g, lc = cfg.groups(), x.shape[1] // cfg.chunks
        r.state[:, 0].fill_(1.0)  # past warm-up: the per-chunk check only measures (a fill kernel)
        block_similarity(x, r.ref, r.state, threshold=0.0, chunks=cfg.chunks, groups=g,
                         write_ref="never", eps=cfg.eps, metric=r.metric, reuse=r.reuse,
                         backend=cfg.backend)
        m = torch.nan_to_num(r.metric.view(g, cfg.chunks), nan=float("inf")).amax(dim=0)
        idx = torch.topk(m, cfg.budget, sorted=False).indices.sort().values
        if record:
            r.last_chunks.copy_(idx)
        tok = (idx[:, None] * lc + torch.arange(lc, device=x.device)).reshape(-1)
        rows = block.forward_rows(x, c, tok)
        chunk_scatter(out, x, res, rows, tok, ref, backend=cfg.backend)

    def _warm(self, r: ChunkRegion, block, x, c) -> None:
        """First forward at a shape on CUDA, when graphs with IF nodes are possible: run the
        partial path once on scratch copies (the cache is untouched) so that its kernels exist
        before a capture. Eager-only configurations (``graph=False``) skip it."""
        key = (tuple(x.shape), x.dtype, x.device)
        if (not x.is_cuda or r.warm_key == key or not self.config.graph
                or not _graphs.supported()[0]):
            return
        self._partial(r, block, x, c, torch.empty_like(x), r.residual[0].clone(), r.ref.clone(),
                      record=False)
        r.warm_key = key

    # ---- the forward ------------------------------------------------------------------------
    def forward(self, r: ChunkRegion, block, orig: Callable, x: torch.Tensor,
                c: torch.Tensor) -> torch.Tensor:
        """One forward of ``block`` (a ``DiTBlock``) at chunk level with the state ``r``.

        ``orig``: the block's forward as it was before caching (the full step); ``x``: (B, N, D)
        hidden states; ``c``: (B, D) conditioning. Returns (B, N, D) in x's dtype. Eager: one
        host read of the decision. Inside a CUDA-graph capture: two IF nodes, no host read.
        Raises ``RuntimeError`` in a capture that cannot be made (module docstring).
        """
        cfg = self.config
        capture = _graphs.capturing()
        if capture and not cfg.graph:
            raise _capture_error("CacheConfig.graph=False (the chunk level needs IF nodes)")
        if capture and not _graphs.supported()[0]:
            raise _capture_error(f"no CUDA IF nodes ({_graphs.supported()[1]})")
        chunkable = x.shape[1] % cfg.chunks == 0
        self._prepare(r, x, chunkable, capture)
        self._decide(r, chunkable)
        if not chunkable:
            return orig(x, c)
        xc = x.contiguous()
        if capture:
            out = torch.empty_like(xc)
            for when in ("zero", "nonzero"):  # full block / partial path, exactly one runs
                run, tok = _graphs.begin(r.partial, 0, run_when=when)
                try:
                    if run and when == "zero":
                        self._full(r, orig, x, c, out)
                    elif run:
                        self._partial(r, block, xc, c, out, r.residual[0], r.ref)
                finally:
                    _graphs.end(tok)
            return out
        run_full, tok = _graphs.begin(r.partial, 0, run_when="zero")  # the one host read
        try:
            if run_full:
                out = self._full(r, orig, x, c)
                self._warm(r, block, xc, c)
            else:
                out = torch.empty_like(xc)
                self._partial(r, block, xc, c, out, r.residual[0], r.ref)
        except BaseException:
            r.fresh.fill_(1.0)  # the cache may be half written: the next forward refills it
            raise
        finally:
            _graphs.end(tok)
        return out

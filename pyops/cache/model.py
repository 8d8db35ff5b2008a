"""The caching hooks: :class:`CachedModel` (step and block levels; the chunk level is delegated
to :mod:`pyops.cache.chunk`), :func:`apply` (``pyops.cache_model``), :func:`find_blocks` and the
autograd refusal.

Each gated block's ``forward`` instance attribute is replaced by a wrapper (restored exactly by
:meth:`CachedModel.remove`); a forward pre-hook on the model refuses autograd and advances the
alternating CFG context. The wrappers compose the ops :func:`pyops.block_similarity` and
:func:`pyops.cache_apply` with the IF-node regions of :mod:`pyops.graphs`.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Optional

import torch
from torch import nn

from .. import graphs as _graphs
from ..ops.block_similarity import block_similarity, new_state
from ..ops.cache_apply import cache_apply
from . import parallel as _cp
from .chunk import ChunkLevel
from .config import BlockSpec, CacheConfig
from .regions import ChunkRegion, Region, persistent
from .stats import snapshot


def find_blocks(model: nn.Module) -> tuple[list, list]:
    """(blocks in execution order, their BlockSpecs) for the known models."""
    name = type(model).__name__
    if name == "FluxTransformer2DModel":
        spec = BlockSpec(("hidden_states", "encoder_hidden_states"), (1, 0))
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        return blocks, [spec] * len(blocks)
    if name in ("WanTransformer3DModel", "WanVACETransformer3DModel"):
        blocks = list(model.blocks)
        return blocks, [BlockSpec(("hidden_states",))] * len(blocks)
    from ..models.dit import DiT
    if isinstance(model, DiT):
        blocks = list(model.blocks)
        return blocks, [BlockSpec(("x",))] * len(blocks)
    raise TypeError(f"pyops.cache: do not know the blocks of {name}; pass blocks= and specs=")


# Every module (model and block) a live CachedModel has hooked -> that handle (weakly: the
# handle lives as long as the hooks that reference it). Used to refuse a second cache_model.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
_MISSING = object()


def _grad_source(args, kwargs, module: Optional[nn.Module]) -> Optional[str]:
    """The first tensor argument (one level into tuples/lists/dicts) or parameter of
    ``module`` that requires grad, as words; None when nothing does."""
    for k, v in list(enumerate(args)) + list(kwargs.items()):
        vals = v.values() if isinstance(v, dict) else v if isinstance(v, (tuple, list)) else (v,)
        for t in vals:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                return f"argument {k!r}" if isinstance(k, str) else f"positional argument {k}"
    if module is not None:
        for n, p in module.named_parameters():
            if p.requires_grad:
                return f"parameter {n!r} of {type(module).__name__}"
    return None


def _grad_error(source: str) -> RuntimeError:
    return RuntimeError(
        f"pyops.cache: a cached model runs without autograd, but it was called with gradients "
        f"enabled and {source} requires grad. Caching is an inference feature: a reused step "
        f"adds last step's cached residual, which has no autograd history, so no correct "
        f"gradient exists. Call it under `with torch.no_grad():` or `with "
        f"torch.inference_mode():` (calling the handle returned by pyops.cache_model does this "
        f"for you), or call .remove() on the handle to backpropagate through the uncached model.")


class CachedModel:
    """Handle returned by :func:`apply` (``pyops.cache_model``).

    Caching lives in hooks on the model's blocks, so both ``handle(*args, **kwargs)`` and the
    model itself (``model(*args, **kwargs)``, e.g. inside a diffusers pipeline) run cached and
    share one cache state. ``remove()`` restores the model exactly.

    Gradients: caching is an inference feature (a reused step adds last step's residual, which
    carries no autograd history). Calling the **handle** runs the model under
    ``torch.no_grad()`` and returns what the model returns (tensors without autograd history);
    it raises ``RuntimeError`` if gradients are enabled and a tensor argument requires grad.
    Calling the **model** directly with gradients enabled while a tensor argument or one of its
    parameters requires grad (e.g. a freshly loaded model outside ``torch.no_grad()``) raises a
    ``RuntimeError`` that names ``torch.no_grad()`` / ``torch.inference_mode()``, before any
    cache state changes. With gradients enabled and nothing requiring grad it runs normally.
    Any mix of ``torch.no_grad()`` and ``torch.inference_mode()`` calls works.

    Applying a second cache to a model (or block) that a live handle already caches raises
    ``ValueError``: call ``.remove()`` on the first handle, then ``pyops.cache_model`` again.
    """

    def __init__(self, model: nn.Module, config: CacheConfig, blocks=None, specs=None):
        if blocks is None:
            blocks, specs = find_blocks(model)
        elif specs is None:
            specs = [BlockSpec()] * len(blocks)
        config.validate(len(blocks))
        for what, mod in [("model", model)] + [(f"block {i}", b) for i, b in enumerate(blocks)]:
            owner = _ACTIVE.get(mod)
            if owner is not None and owner() is not None and not owner()._removed:
                raise ValueError(
                    f"pyops.cache_model: this {what} ({type(mod).__name__}) is already cached by "
                    f"another CachedModel handle; call .remove() on that handle first, then "
                    f"pyops.cache_model again (two stacked caches would gate on each other's "
                    f"cached outputs)")
        self.model, self.config, self.blocks, self.specs = model, config, list(blocks), specs
        self._contexts: dict[str, dict[int, Region | ChunkRegion]] = {}
        self._ctx = "default"
        self._calls = 0
        self._removed = False
        self._final: Optional[dict] = None  # the stats at remove()
        n = len(self.blocks)
        self.mid = (config.fn, n - config.bn)  # [start, end) of the gated blocks
        first = config.fn - 1 if config.level == "step" else config.fn
        j = _cp.split_hook_block(self.blocks, range(max(first, 0), self.mid[1]))
        if j is not None:
            raise _cp.split_hook_error(j, self.blocks[j])
        if config.level == "chunk":
            from ..models.dit import DiTBlock
            if not all(isinstance(b, DiTBlock) for b in self.blocks):
                raise TypeError("pyops.cache: level='chunk' needs pyops DiT blocks (it "
                                "recomputes a token subset inside the block)")
        # the chunk level's forward of the gated blocks (None at step and block level)
        self._chunk = ChunkLevel(config) if config.level == "chunk" else None
        # what each block had as an instance attribute `forward` before (usually nothing)
        self._prior = [vars(b).get("forward", _MISSING) for b in self.blocks]
        self._wrappers = []
        for i, blk in enumerate(self.blocks):
            w = self._wrap(i, blk.forward)
            blk.forward = w
            self._wrappers.append(w)
        self._pre = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        ref = weakref.ref(self)
        for mod in [model] + self.blocks:
            _ACTIVE[mod] = ref

    # ---- public -----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """Call the cached model: same arguments and return value as ``model(*args, **kwargs)``,
        run under ``torch.no_grad()``. Raises ``RuntimeError`` after :meth:`remove`, or when
        gradients are enabled and a tensor argument requires grad (see the class docstring)."""
        if self._removed:
            raise RuntimeError("pyops.cache: this CachedModel was removed (.remove()); call the "
                               "model itself (uncached) or pyops.cache_model(model, config) "
                               "again")
        if torch.is_grad_enabled():
            src = _grad_source(args, kwargs, None)
            if src is not None:
                raise _grad_error(src)
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def remove(self) -> None:
        """Restore the model exactly (block ``forward`` attributes, hooks; cache state freed).
        Idempotent; the handle cannot be called afterwards."""
        if self._removed:
            return
        for blk, w, prior in zip(self.blocks, self._wrappers, self._prior):
            if vars(blk).get("forward") is w:
                if prior is _MISSING:
                    del blk.forward
                else:
                    blk.forward = prior
        self._pre.remove()
        self._final = None if _graphs.capturing() else self._snapshot()
        for mod in [self.model] + self.blocks:
            owner = _ACTIVE.get(mod)
            if owner is not None and owner() is self:
                del _ACTIVE[mod]
        self._contexts.clear()
        self._removed = True

    @contextlib.contextmanager
    def context(self, name: str):
        """Run forwards under the state of context ``name`` (e.g. "cond" / "uncond")."""
        prev, self._ctx = self._ctx, name
        try:
            yield self
        finally:
            self._ctx = prev

    def reset(self) -> None:
        """Start a new generation: every step counter back to 0 (device writes, no sync). The
        stats are kept (:meth:`reset_stats` zeroes them)."""
        for regions in self._contexts.values():
            for r in regions.values():
                r.reset()
        self._calls = 0

    @property
    def stats(self) -> dict:
        """Hits, misses and the fraction of gated block computes skipped, per region and in total.

        Returns a new plain dict (ints and floats; definitions in :mod:`pyops.cache.stats`)::

            {"checks": int, "hits": int, "misses": int, "skipped": float,
             "regions": {key: {"checks", "hits", "misses", "skipped", "blocks", ...}},
             "contexts": {name: {"checks", "hits", "misses", "skipped", "regions"}}}

        ``key``: -1 for the step level's gated middle, the block index at the block and chunk
        levels. Counts cover every forward since the handle was made or :meth:`reset_stats`,
        CUDA-graph replays included (every level counts on the device: an int64 add per
        decision, captured with it). Reading it syncs the device once (eager forwards never
        sync for it); after :meth:`remove` it returns the counts at removal. Raises
        ``RuntimeError`` inside a CUDA-graph capture.
        """
        if self._removed:
            return self._final if self._final is not None else self._snapshot()
        return self._snapshot()

    def reset_stats(self) -> None:
        """Zero the counters of :attr:`stats` (device writes, no sync)."""
        for regions in self._contexts.values():
            for r in regions.values():
                r.reset_stats()
        self._final = None

    def _snapshot(self) -> dict:
        c = self.config
        return snapshot(self._contexts if not self._removed else {},
                        step_blocks=self.mid[1] - self.mid[0], chunks=c.chunks, budget=c.budget)

    def regions(self, context: Optional[str] = None) -> dict:
        return self._contexts.get(context or self._ctx, {})

    def reuse_flags(self, context: Optional[str] = None) -> dict:
        """{region: reuse tensor} of the last forward (device tensors; reading them syncs)."""
        return {k: r.reuse for k, r in self.regions(context).items() if r.reuse is not None}

    # ---- internals --------------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        """Model forward pre-hook: refuse autograd (before any state changes), then advance the
        alternating context."""
        if torch.is_grad_enabled():
            src = _grad_source(args, kwargs, module)
            if src is not None:
                raise _grad_error(src)
        if self.config.alternate_contexts:
            self._advance(module, args)
        return None

    def _advance(self, module, args):
        names = self.config.alternate_contexts
        self._ctx = names[self._calls % len(names)]
        self._calls += 1

    def _region(self, key: int):
        """The state of region ``key`` in the current context (created empty on first use)."""
        regions = self._contexts.setdefault(self._ctx, {})
        if key not in regions:
            regions[key] = ChunkRegion() if self._chunk is not None else Region()
        return regions[key]

    def _groups(self) -> int:
        return self.config.groups()

    def _cp_group(self):
        """The process group whose ranks must take the same decisions (``config.process_group``
        or the model's diffusers context-parallel mesh), None for one rank or no group."""
        return _cp.resolve_group(self.config.process_group, self.model)

    def _check(self, key: int, feature: torch.Tensor) -> Region:
        c = self.config
        r = self._region(key)
        g = self._groups()
        group = self._cp_group()  # None: decide locally (one fused op, as without a group)
        fresh = (r.ref is None or r.ref.shape != feature.shape or r.ref.dtype != feature.dtype
                 or r.ref.device != feature.device)  # a model moved to another device
        if fresh:
            with persistent():
                r.ref = torch.zeros(feature.shape, dtype=feature.dtype, device=feature.device)
                r.state = new_state(g, feature.device)
                r.metric = torch.zeros(g, dtype=torch.float32, device=feature.device)
                r.flags = torch.ones((2, g), dtype=torch.int32, device=feature.device)
                r.reuse = r.flags[1]  # the check writes row 1; row 0 stays 1 (counts checks)
                r.reuse.zero_()
                if c.forecast:
                    r.clock = torch.zeros(g, dtype=torch.float32, device=feature.device)
            r.residual = []
        if group is not None:  # context parallel: all-reduce the sums (and restarts) first
            if r.sums is None or r.sums.shape[0] != g or r.sums.device != feature.device:
                r.sums, r.pair = _cp.new_buffers(g, feature.device)
            _cp.reduce_sums(feature, r.ref, r.state, r.sums, group, groups=g, fresh=fresh)
        if c.forecast:  # this forward's step, before the check advances the counter in place
            r.clock.copy_(r.state[:, 0])
        kw = dict(threshold=c.threshold, rule=c.rule, warmup=c.warmup, max_reuse=c.max_reuse,
                  num_steps=c.num_steps, last_steps=c.last_steps if c.num_steps > 0 else 0,
                  groups=g, all_groups=g > 1, eps=c.eps, metric=r.metric, reuse=r.reuse,
                  backend=c.backend)
        if group is None:
            block_similarity(feature, r.ref, r.state, **kw)
        else:
            _cp.decide_from_sums(feature, r.ref, r.state, r.sums, r.pair, **kw)
        r.count()
        return r

    def _begin(self, r: Region, streams: list) -> None:
        """Enter a gated region whose inputs are ``streams``."""
        r.inputs = list(streams)
        if len(r.residual) != len(streams) or any(
                a.shape != b.shape for a, b in zip(r.residual, streams)):
            with persistent():
                r.residual = [torch.zeros(s.shape, dtype=s.dtype, device=s.device)
                              for s in streams]
                if self.config.forecast:
                    dev = streams[0].device
                    g = self._groups()
                    r.residual_prev = [torch.zeros_like(b) for b in r.residual]
                    r.history = torch.zeros((g, 3), dtype=torch.float32, device=dev)
                    r.coef = torch.zeros(g, dtype=torch.float32, device=dev)
        if _graphs.capturing():
            r.fixed = True  # the graph holds the residual buffers' addresses: never swap them
        cap = self.config.graph and _graphs.capturing()
        if _graphs.capturing() and not (cap and _graphs.supported()[0]):
            r.mode, r.run, r.token = "select", True, None  # compute, select on the device
            return
        r.mode = "if" if cap else "eager"
        r.run, r.token = _graphs.begin(r.reuse, 0, run_when="zero")

    def _finish(self, r: Region, streams_out: Optional[list]) -> list:
        """Leave the region: update the residual cache if it ran, apply it where reused."""
        ins = r.inputs
        g = self._groups()
        fc = self.config.forecast
        if r.run and fc:
            self._store_forecast(r, streams_out, ins)
        elif r.run:
            for buf, o, i in zip(r.residual, streams_out, ins):
                if r.mode == "select":
                    keep = (r.reuse != 0).repeat_interleave(o.shape[0] // g)
                    keep = keep.view(-1, *([1] * (o.dim() - 1)))
                    buf.copy_(torch.where(keep, buf, o - i))
                else:
                    torch.sub(o, i, out=buf)
        if r.token is not None:
            _graphs.end(r.token)
        if fc:
            self._coefficient(r)
        if r.mode == "eager":
            if not r.run:
                streams_out = []
                for j, (i, buf) in enumerate(zip(ins, r.residual)):
                    i = i.contiguous()
                    o = torch.empty_like(i)
                    res = self._forecast(r, j) if fc else buf.contiguous()
                    cache_apply(o, i, res, r.reuse, groups=g, backend=self.config.backend)
                    streams_out.append(o)
        else:  # "if" / "select": outputs hold the body's values; overwrite where reused
            streams_out = [o.contiguous() for o in streams_out]
            for j, (o, i, buf) in enumerate(zip(streams_out, ins, r.residual)):
                res = self._forecast(r, j) if fc else buf
                cache_apply(o, i.contiguous(), res, r.reuse, groups=g,
                            backend=self.config.backend)
        r.inputs, r.token = None, None
        return streams_out

    # ---- first-order forecast (CacheConfig.forecast = 1) -------------------------------------
    def _rows(self, flag: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-group (groups,) tensor repeated over the batch rows of ``like`` and shaped to
        broadcast against it: (B, 1, ..., 1)."""
        b, g = like.shape[0], self._groups()
        rows = flag.view(g, 1).expand(g, b // g).reshape(b)  # no data-dependent size: no sync
        return rows.view(b, *([1] * (like.dim() - 1)))

    def _store_forecast(self, r: Region, streams_out: list, ins: list) -> None:
        """A computed step (the region's body ran): ``r0 <- r1``, ``r1 <- out − in`` and the
        history ``[k1, k0, stored] <- [k, k1, stored + 1 (capped at 2; 1 when k == 0)]``, all
        by device ops. Mode "select" (a capture without IF nodes: the body ran whatever the
        decision) updates only the groups that did not reuse."""
        k = r.clock
        k1, n = r.history[:, 0], r.history[:, 2]
        n_new = torch.where(k == 0, torch.ones_like(n), (n + 1).clamp_max(2.0))
        new = torch.stack([k, k1, n_new], dim=1)
        if r.mode == "select":
            keep = r.reuse != 0
            for r1, r0, o, i in zip(r.residual, r.residual_prev, streams_out, ins):
                rows = self._rows(keep, r1)
                r0.copy_(torch.where(rows, r0, r1))
                r1.copy_(torch.where(rows, r1, o - i))
            r.history.copy_(torch.where(keep.view(-1, 1), r.history, new))
            return
        if r.mode == "eager" and not r.fixed:
            r.residual, r.residual_prev = r.residual_prev, r.residual  # r0 <- r1: no copy
        else:  # inside a capture (and after one): the graph holds both buffers' addresses
            for r1, r0 in zip(r.residual, r.residual_prev):
                r0.copy_(r1)
        for buf, o, i in zip(r.residual, streams_out, ins):
            torch.sub(o, i, out=buf)
        r.history.copy_(new)

    def _coefficient(self, r: Region) -> None:
        """``coef = (k − k1) / (k1 − k0)`` where the region reuses and two residuals of this
        generation are stored, else 0 (device ops; ``k1 > k0`` whenever two are stored)."""
        k1, k0, n = r.history[:, 0], r.history[:, 1], r.history[:, 2]
        c = (r.clock - k1) / (k1 - k0).clamp_min(1.0)
        r.coef.copy_(torch.where((r.reuse != 0) & (n >= 2), c, torch.zeros_like(c)))

    def _forecast(self, r: Region, j: int) -> torch.Tensor:
        """Stream ``j``'s forecast residual ``r1 + coef · (r1 − r0)`` in fp32 (contiguous, the
        stream's shape); equal to ``r1`` where ``coef`` is 0."""
        r1 = r.residual[j].float()
        f = r1 - r.residual_prev[j].float()
        return f.mul_(self._rows(r.coef, f)).add_(r1).contiguous()

    def _abort(self, r: Region) -> None:
        """A block body raised inside an open region: close the region (side stream, nesting
        depth, capture) and forget the region's cache, whose check already counted this step
        as computed; the next forward starts it afresh (computes)."""
        tok, r.token, r.inputs = r.token, None, None
        r.ref = None
        if tok is not None:
            try:
                _graphs.end(tok)
            except Exception:  # noqa: BLE001 - the body's exception is the one to report
                pass

    def _wrap(self, i: int, orig: Callable) -> Callable:
        spec = self.specs[i]
        blk = self.blocks[i]
        start, stop = self.mid
        level = self.config.level
        first = start - 1 if level == "step" else start  # first block that touches the cache

        def forward(*args, **kwargs):
            # removed: pass through (a wrapper installed over this one afterwards, e.g. diffusers'
            # enable_parallelism hooks, keeps calling it; remove() cannot unhook it there)
            if self._removed or start >= stop or not (first <= i < stop):
                return orig(*args, **kwargs)
            if torch.is_grad_enabled():  # the block called directly (the model's hook refuses)
                src = _grad_source(args, kwargs, blk)
                if src is not None:
                    raise _grad_error(src)
            if level == "chunk":
                if self._cp_group() is not None:
                    raise _cp.chunk_error()
                return self._chunk.forward(self._region(i), blk, orig, *args, **kwargs)
            if level == "block":
                ins = spec.streams_in(args, kwargs)
                r = self._check(i, ins[0].contiguous())
                self._begin(r, ins)
                try:
                    outs = spec.streams_out(orig(*args, **kwargs)) if r.run else None
                except BaseException:
                    self._abort(r)
                    raise
                return spec.pack(self._finish(r, outs))
            # step level
            if i == start - 1:  # the gate: its residual decides for the whole middle
                ins = spec.streams_in(args, kwargs)
                out = orig(*args, **kwargs)
                feat = spec.streams_out(out)[0] - ins[0]
                self._check(-1, feat.contiguous())
                return out
            r = self._region(-1)
            if i == start:
                self._begin(r, spec.streams_in(args, kwargs))
            try:
                out = orig(*args, **kwargs) if r.run else spec.pack(spec.streams_in(args, kwargs))
            except BaseException:
                self._abort(r)
                raise
            if i == stop - 1:
                outs = spec.streams_out(out) if r.run else None
                return spec.pack(self._finish(r, outs))
            return out

        return forward


def apply(model: nn.Module, config: Optional[CacheConfig] = None, *, blocks=None,
          specs=None) -> CachedModel:
    """Install caching on ``model`` (pyops DiT, diffusers Flux or Wan, or ``blocks=`` + ``specs=``).

    Returns a :class:`CachedModel` handle. The hooks live on the model, so ``handle(*args,
    **kwargs)`` and ``model(*args, **kwargs)`` both run cached, with one shared state; the handle
    returns what the model returns, computed under ``torch.no_grad()``. Caching is inference
    only: calling the model with gradients enabled while a parameter or tensor argument requires
    grad raises ``RuntimeError`` (use ``torch.no_grad()`` / ``torch.inference_mode()``).
    ``handle.remove()`` restores the model exactly; a model (or block) that a live handle
    already caches is refused with ``ValueError`` (remove the first handle, then apply again).

    Eager forwards read each decision on the host once (a device sync per gated region per
    forward: the only one). Forwards captured in a torch CUDA graph put each gated region in a
    CUDA IF node set by the check kernel: replays skip on the device with no sync (chunk level:
    the full block and the chunk path in two complementary IF nodes, :mod:`pyops.cache.chunk`).
    Capture after one eager forward at the capture's shapes, then ``handle.reset()``.

    Raises: ``ValueError`` for a bad config, an already cached model, or a block the cache
    wraps whose inputs diffusers' context parallelism already splits (``enable_parallelism``
    before ``cache_model`` on a model whose plan splits at a block, e.g. Wan's ``blocks.0``:
    call ``cache_model`` first), ``TypeError`` for a model
    whose blocks are unknown (pass ``blocks=``/``specs=``) or ``level="chunk"`` on non-pyops blocks.
    """
    return CachedModel(model, config or CacheConfig(), blocks, specs)

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
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, overlaps
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
    groups = int(groups)
    if groups < 1 or out.shape[0] % groups or reuse.shape != (groups,):
        raise ValueError(f"pyops.cache_apply: reuse must be ({groups},) and batch divisible")
    b = _backend.resolve(op, out.device, backend)
    torch.ops.pyops.cache_apply(out, x, residual, reuse, int(groups), b)


# ==================================================================================================
# Policies
# ==================================================================================================
import contextlib  # noqa: E402
import weakref  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

from torch import nn  # noqa: E402

from . import graphs as _graphs  # noqa: E402

LEVELS = ("step", "block", "chunk")


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
        to the keys/values of all tokens; the other chunks reuse their cached residual. Steps
        the host counts as warm-up / last steps run the full block. ``threshold`` is unused.
    threshold: relative L1 threshold (strict ``<``: 0 never reuses, output is then bit-identical
        to the uncached model). Typical 0.05–0.25.
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
    """
    level: str = "step"
    threshold: float = 0.08
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

    def validate(self, n_blocks: int) -> None:
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
        if self.level == "chunk" and not (1 <= self.budget <= self.chunks):
            raise ValueError(f"pyops.cache: budget must be in [1, chunks={self.chunks}], got "
                             f"{self.budget}")


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
    from .models.dit import DiT
    if isinstance(model, DiT):
        blocks = list(model.blocks)
        return blocks, [BlockSpec(("x",))] * len(blocks)
    raise TypeError(f"pyops.cache: do not know the blocks of {name}; pass blocks= and specs=")


@dataclass
class _Region:
    """Device state of one gated region in one context."""
    ref: Optional[torch.Tensor] = None
    state: Optional[torch.Tensor] = None
    metric: Optional[torch.Tensor] = None
    reuse: Optional[torch.Tensor] = None
    residual: list = field(default_factory=list)
    host_step: int = 0                          # chunk level: steps counted on the host
    last_chunks: Optional[torch.Tensor] = None  # chunk level: chunks recomputed last forward
    # transient, within one forward
    inputs: Optional[list] = None
    run: bool = True
    token: Any = None
    mode: str = "eager"


# Every module (model and block) a live CachedModel has hooked -> that handle (weakly: the
# handle lives as long as the hooks that reference it). Used to refuse a second cache_model.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
_MISSING = object()


def _persistent():
    """Context for allocating cache state that outlives one forward: plain tensors without
    autograd history even when the forward runs under ``torch.inference_mode()`` (inference
    tensors could not be updated in place by a later forward under ``torch.no_grad()``)."""
    return torch.inference_mode(False)


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
        self._contexts: dict[str, dict[int, _Region]] = {}
        self._ctx = "default"
        self._calls = 0
        self._removed = False
        self.stats = {"checks": 0}
        n = len(self.blocks)
        self.mid = (config.fn, n - config.bn)  # [start, end) of the gated blocks
        if config.level == "chunk":
            from .models.dit import DiTBlock
            if not all(isinstance(b, DiTBlock) for b in self.blocks):
                raise TypeError("pyops.cache: level='chunk' needs pyops DiT blocks (it "
                                "recomputes a token subset inside the block)")
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
        """Start a new generation: every step counter back to 0 (device writes, no sync)."""
        for regions in self._contexts.values():
            for r in regions.values():
                if r.state is not None:
                    r.state.zero_()
                r.host_step = 0  # chunk level counts steps on the host
        self._calls = 0

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

    def _region(self, key: int) -> _Region:
        return self._contexts.setdefault(self._ctx, {}).setdefault(key, _Region())

    def _groups(self) -> int:
        return 2 if self.config.cfg_batched else 1

    def _check(self, key: int, feature: torch.Tensor) -> _Region:
        c = self.config
        r = self._region(key)
        g = self._groups()
        if r.ref is None or r.ref.shape != feature.shape or r.ref.dtype != feature.dtype:
            with _persistent():
                r.ref = torch.zeros(feature.shape, dtype=feature.dtype, device=feature.device)
                r.state = new_state(g, feature.device)
                r.metric = torch.zeros(g, dtype=torch.float32, device=feature.device)
                r.reuse = torch.zeros(g, dtype=torch.int32, device=feature.device)
            r.residual = []
        block_similarity(feature, r.ref, r.state, threshold=c.threshold, rule=c.rule,
                         warmup=c.warmup, max_reuse=c.max_reuse, num_steps=c.num_steps,
                         last_steps=c.last_steps if c.num_steps > 0 else 0, groups=g,
                         all_groups=g > 1, eps=c.eps, metric=r.metric, reuse=r.reuse,
                         backend=c.backend)
        self.stats["checks"] += 1
        return r

    def _begin(self, r: _Region, streams: list) -> None:
        """Enter a gated region whose inputs are ``streams``."""
        r.inputs = list(streams)
        if len(r.residual) != len(streams) or any(
                a.shape != b.shape for a, b in zip(r.residual, streams)):
            with _persistent():
                r.residual = [torch.zeros(s.shape, dtype=s.dtype, device=s.device)
                              for s in streams]
        cap = self.config.graph and _graphs.capturing()
        if _graphs.capturing() and not (cap and _graphs.supported()[0]):
            r.mode, r.run, r.token = "select", True, None  # compute, select on the device
            return
        r.mode = "if" if cap else "eager"
        r.run, r.token = _graphs.begin(r.reuse, 0, run_when="zero")

    def _finish(self, r: _Region, streams_out: Optional[list]) -> list:
        """Leave the region: update the residual cache if it ran, apply it where reused."""
        ins = r.inputs
        g = self._groups()
        if r.run:
            for buf, o, i in zip(r.residual, streams_out, ins):
                if r.mode == "select":
                    keep = (r.reuse != 0).repeat_interleave(o.shape[0] // g)
                    keep = keep.view(-1, *([1] * (o.dim() - 1)))
                    buf.copy_(torch.where(keep, buf, o - i))
                else:
                    torch.sub(o, i, out=buf)
        if r.token is not None:
            _graphs.end(r.token)
        if r.mode == "eager":
            if not r.run:
                streams_out = []
                for i, buf in zip(ins, r.residual):
                    i = i.contiguous()
                    o = torch.empty_like(i)
                    cache_apply(o, i, buf.contiguous(), r.reuse, groups=g,
                                backend=self.config.backend)
                    streams_out.append(o)
        else:  # "if" / "select": outputs hold the body's values; overwrite where reused
            streams_out = [o.contiguous() for o in streams_out]
            for o, i, buf in zip(streams_out, ins, r.residual):
                cache_apply(o, i.contiguous(), buf, r.reuse, groups=g,
                            backend=self.config.backend)
        r.inputs, r.token = None, None
        return streams_out

    def _abort(self, r: _Region) -> None:
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
            if start >= stop or not (first <= i < stop):
                return orig(*args, **kwargs)
            if torch.is_grad_enabled():  # the block called directly (the model's hook refuses)
                src = _grad_source(args, kwargs, blk)
                if src is not None:
                    raise _grad_error(src)
            if level == "chunk":
                return self._chunk_forward(i, orig, *args, **kwargs)
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


def _dit_block_rows(blk, x: torch.Tensor, c: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """DiTBlock.forward for the query tokens ``tok`` only; keys/values from all tokens of x."""
    import torch.nn.functional as F
    from .models.dit import modulate
    B, N, D = x.shape
    sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(F.silu(c)).chunk(6, dim=-1)
    h = modulate(blk.norm1(x), sh1, sc1)
    qkv = blk.qkv(h).view(B, N, 3, blk.heads, D // blk.heads).permute(2, 0, 3, 1, 4)
    q = qkv[0].index_select(2, tok)
    a = F.scaled_dot_product_attention(q, qkv[1], qkv[2]).transpose(1, 2).reshape(B, -1, D)
    xs = x.index_select(1, tok) + g1.unsqueeze(1) * blk.proj(a)
    h2 = modulate(blk.norm2(xs), sh2, sc2)
    return xs + g2.unsqueeze(1) * blk.fc2(F.gelu(blk.fc1(h2), approximate="tanh"))


def _chunk_forward(self, i: int, orig: Callable, x: torch.Tensor, c: torch.Tensor):
    cfg = self.config
    if _graphs.capturing():
        raise RuntimeError("pyops.cache: level='chunk' picks full vs partial steps on the host; "
                           "it runs eagerly only (use level='step' or 'block' in CUDA graphs)")
    r = self._region(i)
    step = r.host_step
    B, N, D = x.shape
    full = (step < cfg.warmup or (cfg.num_steps > 0 and step >= cfg.num_steps - cfg.last_steps)
            or r.ref is None or r.ref.shape != x.shape or N % cfg.chunks)
    r.host_step = step + 1 if not (cfg.num_steps > 0 and step + 1 >= cfg.num_steps) else 0
    if full:
        out = orig(x, c)
        g = self._groups()
        with _persistent():
            r.ref = x.detach().clone(memory_format=torch.contiguous_format)
            r.residual = [out.detach() - x.detach()]
            r.state = new_state(g * cfg.chunks, x.device)
            r.metric = torch.zeros(g * cfg.chunks, dtype=torch.float32, device=x.device)
            r.reuse = torch.zeros(g * cfg.chunks, dtype=torch.int32, device=x.device)
        return out
    g = self._groups()
    # per-chunk change since the chunk was last computed (the decision outputs are unused)
    r.state[:, 0] = 1.0
    block_similarity(x.contiguous(), r.ref, r.state, threshold=0.0, chunks=cfg.chunks,
                     groups=g, write_ref="never", eps=cfg.eps, metric=r.metric, reuse=r.reuse,
                     backend=cfg.backend)
    self.stats["checks"] += 1
    m = torch.nan_to_num(r.metric.view(g, cfg.chunks), nan=float("inf")).amax(dim=0)
    idx = torch.topk(m, cfg.budget, sorted=False).indices.sort().values
    lc = N // cfg.chunks
    tok = (idx[:, None] * lc + torch.arange(lc, device=x.device)).reshape(-1)
    r.last_chunks = idx
    rows = _dit_block_rows(self.blocks[i], x, c, tok)
    res = r.residual[0]
    out = x + res
    out.index_copy_(1, tok, rows)
    res.index_copy_(1, tok, rows - x.index_select(1, tok))
    r.ref.index_copy_(1, tok, x.index_select(1, tok).to(r.ref.dtype))
    return out


CachedModel._chunk_forward = _chunk_forward


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
    CUDA IF node set by the check kernel: replays skip on the device with no sync.

    Raises: ``ValueError`` for a bad config or an already cached model, ``TypeError`` for a model
    whose blocks are unknown (pass ``blocks=``/``specs=``) or ``level="chunk"`` on non-pyops blocks.
    """
    return CachedModel(model, config or CacheConfig(), blocks, specs)

"""Caching on a trained model: pyops' caches against diffusers' and cache-dit's at equal quality.

    python bench/bench_cache.py [--out bench/out] [--full | --quick] [--device cuda]
                                [--preset study] [--samples 200] [--steps 28,50]
                                [--thresholds 0,0.3] [--methods pyops,FBC]

The model is ``pyops.models.digits.trained_flux(preset)``: a small stock diffusers
``FluxTransformer2DModel`` trained with rectified flow on scikit-learn's digits (weights cached
in ``~/.cache/pyops``), so every cache applies to it unchanged and, unlike random weights, its
sampling trajectory has the step-to-step similarity caches exploit. Preset: ``"study"`` on CUDA
(loaded from the cache; trained on the GPU when no cached file exists), ``"quick"`` for
``--quick`` (the default on a CPU); ``--preset`` overrides. fp32 on every device (the model is
tiny and launch-bound: bf16 would add rounding, not speed).

For every step count (default run: 28; ``--full``: 28 and 50), one fixed batch of noise
(``--samples``, 200 on CUDA, 50 on a CPU; labels ``i % 10``, no guidance), flow Euler through
``TrainedFlux.sample`` (pyops' ``FewStepSampler``), and one row per method and knob:

* ``uncached``: the reference (its images, time and Fréchet distance);
* ``pyops step``: ``pyops.cache_model(model, CacheConfig(level="step", threshold, num_steps,
  ...))``, eager. Rows marked "FBC rule" use ``warmup=1, last_steps=0, fn=1, bn=0`` (the rule of
  diffusers' First-Block Cache: same decisions expected); the others pyops' own settings
  (``last_steps=1``, ``rule="accumulate"``, ``max_reuse``);
* ``pyops step graph`` (CUDA): the same caches, one forward captured in a CUDA graph with the gated
  blocks in an IF node set by the check kernel (no host sync); ``uncached graph``: the captured
  forward without a cache (what the graph alone gains);
* ``pyops block``: ``level="block"``; ``pyops chunk``: a note (it needs pyops DiT blocks);
* diffusers (``model.enable_cache(cfg)`` inside ``model.cache_context("cond")``, then
  ``disable_cache()``): ``FirstBlockCacheConfig`` (threshold), ``FasterCacheConfig`` (attention
  every N steps, ``is_guidance_distilled=True``: no CFG here), ``PyramidAttentionBroadcastConfig``
  (attention every N steps in timesteps (100, 800)), ``TaylorSeerCacheConfig`` (interval;
  attention modules, or ``use_lite_mode`` = whole blocks), ``MagCacheConfig`` (threshold; its
  ``mag_ratios`` from diffusers' own ``calibrate=True`` run on a second noise batch);
* ``cache-dit DBCache``: ``cache_dit.enable_cache(model, cache_config=DBCacheConfig(Fn, Bn,
  residual_diff_threshold, max_warmup_steps=1, num_inference_steps))`` on a bare transformer,
  removed with ``cache_dit.disable_cache(model)``; ``model`` is a deep copy of the transformer
  taken before any method ran, made anew for every row: cache-dit 1.5.3's removal leaves the
  model changed (its own Flux forward stays as an instance attribute, and its per-forward swap
  of the block lists re-registers ``single_transformer_blocks`` and ``transformer_blocks`` last,
  so the children's order changes; diffusers' FirstBlockCache and MagCache take their head and
  tail blocks in that order, and both broke at the next step count on the model cache-dit had
  used: FBC with "'NoneType' object is not subscriptable", MagCache's calibration printing
  nothing).

After every row the shared model is checked to be as it was before the step count's first row:
one forward on a few samples (bit-identical), and its structure (``structure``: per module its
children, parameters and buffers in order, instance attributes, torch and diffusers hooks; one
forward cannot see a child order or a leftover forward that computes the same). A row that
leaves it changed is noted, and the model is replaced by a fresh copy of the untouched one for
the rows after it.

A method that is missing or fails gives a row with a note. Columns: ``skipped``: the fraction of
block computes skipped, counted the same way for every method (forward pre-hooks on a module
that runs only when a block's body computes: Flux double blocks' ``norm1``, single blocks'
``norm``; in the CUDA graph from the cache's device flags); ``attn skipped``: the same for the
attention (``attn.to_q``); ``s`` (CUDA only): median wall time of one generation (3 timed after
the counted one; CPU times are no performance numbers and stay blank); ``speed-up``: uncached
``s`` / ``s``; ``rel L1`` / ``PSNR``: final images vs the uncached images; ``FD``: Fréchet
distance to the held-out real digits (lower is better); ``matched``: within the tolerance below.
A second table, "at matched quality", gives per method the largest skipped fraction (and, on
CUDA, the best speed-up) among its rows with rel L1 <= 0.05 vs uncached AND FD <= 1.1 x the
uncached FD (same step count). ``cache.png`` plots rel L1 against the skipped fraction (and
against the speed-up on CUDA), one series per method.
"""
# Run length on an H200, estimated (not measured; no GPU run of this version yet):
#   default, ~55 s: start-up (torch, diffusers, pyops) ~6 s; the "study" weights from
#     ~/.cache/pyops, or trained on the GPU when not cached (~30 s: 1,500 AdamW steps of a
#     6-block model at batch 64, launch-bound at an assumed ~20 ms per step); 28 steps x 18
#     rows x (1 counted + 3 timed generations of ~0.1 s each: 28 eager forwards of ~3.5 ms,
#     launch-bound, at 200 samples x 68 tokens) ~7 s; cache-dit's import (it imports
#     transformers) ~10 s when installed; MagCache calibration, four graph captures, Frechet
#     distances ~3 s. ~25 s when the weights are cached.
#   --full, ~4 min: 28 and 50 steps x 75 rows, the same cost per generation (~0.2 s at 50).
# estimate-h200-s: 55
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import inspect
import io
import os
import re
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

import pyops  # noqa: E402,F401
from pyops import cache as C  # noqa: E402
from pyops import graphs as G  # noqa: E402

NAME = "cache"
DEFAULT_BUDGET_S = 70  # soft, from the start of the run (model loading included)
TIMED_REPS = 3         # timed generations per row on CUDA (median)
COLUMNS = ["steps", "method", "knob", "skipped", "attn skipped", "s", "speed-up", "rel L1",
           "PSNR", "FD", "matched", "note"]
MATCH_COLUMNS = ["steps", "method", "rows matched", "max skipped", "knob (max skipped)",
                 "max attn skipped", "best speed-up", "knob (best speed-up)", "rel L1", "FD",
                 "note"]

# the tolerance of "matched quality" (the headline): vs the uncached images of the same noise
# and vs the uncached model's Fréchet distance at the same step count
TOL_REL_L1 = 0.05
TOL_FD_RATIO = 1.1
MATCH_RULE = (f"matched quality: rel L1 <= {TOL_REL_L1} vs the uncached images (same noise) AND "
              f"FD <= {TOL_FD_RATIO} x the uncached model's FD (same step count)")

# methods, in run order (cache-dit last; it runs on its own copy of the model)
M_UNC, M_UNC_GRAPH = "uncached", "uncached graph"
M_STEP, M_GRAPH, M_BLOCK, M_CHUNK = "pyops step", "pyops step graph", "pyops block", "pyops chunk"
M_FBC, M_FASTER, M_PAB = "diffusers FBC", "diffusers FasterCache", "diffusers PAB"
M_TAYLOR, M_MAG = "diffusers TaylorSeer", "diffusers MagCache"
M_CDIT = "cache-dit DBCache"
METHODS = (M_UNC, M_UNC_GRAPH, M_STEP, M_GRAPH, M_BLOCK, M_CHUNK, M_FBC, M_FASTER, M_PAB,
           M_TAYLOR, M_MAG, M_CDIT)
DIFFUSERS_CONFIG = {M_FBC: "FirstBlockCacheConfig", M_FASTER: "FasterCacheConfig",
                    M_PAB: "PyramidAttentionBroadcastConfig", M_TAYLOR: "TaylorSeerCacheConfig",
                    M_MAG: "MagCacheConfig"}


# ---- what runs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cfg:
    """One row: ``method`` with its ``knob`` (a label) and ``params`` (name, value) pairs;
    ``threshold``: the numeric threshold where the method has one (else None); ``fbc_rule``:
    a pyops configuration whose decisions equal diffusers' First-Block Cache."""
    method: str
    knob: str
    params: tuple = ()
    threshold: Optional[float] = None
    fbc_rule: bool = False

    def p(self) -> dict:
        return dict(self.params)


FBC_RULE = (("warmup", 1), ("last_steps", 0), ("fn", 1), ("bn", 0), ("rule", "last_computed"))


def _fbc(thr: float, method: str = M_STEP) -> Cfg:
    if method == M_FBC:  # diffusers' own: the threshold is its only knob
        return Cfg(method, f"thr {thr:g}", (("threshold", thr),), thr)
    return Cfg(method, f"thr {thr:g} (FBC rule)", FBC_RULE + (("threshold", thr),), thr, True)


def _own(rule: str, thr: float, last: int = 1, max_reuse: int = -1,
         method: str = M_STEP) -> Cfg:
    knob = f"thr {thr:g}, {rule}, last {last}" + (f", max reuse {max_reuse}"
                                                  if max_reuse >= 0 else "")
    return Cfg(method, knob, (("warmup", 1), ("last_steps", last), ("fn", 1), ("bn", 0),
                              ("rule", rule), ("max_reuse", max_reuse), ("threshold", thr)), thr)


def _block(rule: str, thr: float) -> Cfg:
    return Cfg(M_BLOCK, f"thr {thr:g}, {rule}, last 1",
               (("warmup", 1), ("last_steps", 1), ("fn", 1), ("bn", 0), ("rule", rule),
                ("threshold", thr)), thr)


def _every(method: str, n: int) -> Cfg:
    return Cfg(method, f"attention every {n} steps", (("n", n),))


def _taylor(n: int, lite: bool) -> Cfg:
    return Cfg(M_TAYLOR, f"interval {n}" + (", lite (whole blocks)" if lite else
                                            ", attention"),
               (("interval", n), ("lite", lite)))


def _mag(thr: float) -> Cfg:
    return Cfg(M_MAG, f"thr {thr:g}, max skip 3, calibrated", (("threshold", thr),), thr)


def _cdit(thr: float, fn: int = 1, bn: int = 0) -> Cfg:
    return Cfg(M_CDIT, f"thr {thr:g}, F{fn}B{bn}, warmup 1",
               (("threshold", thr), ("Fn", fn), ("Bn", bn)), thr, fn == 1 and bn == 0)


FBC_THRESHOLDS = {"quick": "0,0.3", "default": "0,0.3", "full": "0,0.05,0.1,0.2,0.3,0.4,0.5,0.7"}
STEPS = {"quick": "28", "default": "28", "full": "28,50"}


def configs(mode: str, fbc_thresholds) -> tuple:
    """The rows of one step count for run size ``mode`` (``fbc_thresholds``: the thresholds of
    the First-Block-Cache-rule rows of pyops, diffusers FBC and cache-dit)."""
    fbc = [float(t) for t in fbc_thresholds]
    nz = [t for t in fbc if t > 0]
    if mode == "quick":
        own = [_own("accumulate", 0.5)]
        block = [_block("last_computed", 0.3)]
        every = [2]
        taylor = [_taylor(3, False)]
        mag = [0.06]
        cdit = [_cdit(t) for t in nz]
    elif mode == "default":
        own = [_own("accumulate", 0.5), _own("accumulate", 0.8)]
        block = [_block("last_computed", 0.3)]
        every = [2]
        taylor = [_taylor(3, False), _taylor(3, True)]
        mag = [0.06]
        cdit = [_cdit(t) for t in nz]
    else:
        own = ([_own("accumulate", t) for t in (0.2, 0.3, 0.5, 0.8, 1.2)]
               + [_own("last_computed", t, max_reuse=3) for t in (0.3, 0.5, 0.8)])
        block = ([_block("last_computed", t) for t in (0.1, 0.2, 0.3, 0.5)]
                 + [_block("accumulate", t) for t in (0.3, 0.5)])
        every = [2, 3, 4]
        taylor = [_taylor(n, lite) for lite in (False, True) for n in (2, 3, 5)]
        mag = [0.03, 0.06, 0.12, 0.24]
        cdit = [_cdit(t) for t in fbc] + [_cdit(t, 1, 1) for t in (0.3, 0.5)]
    rows = ([Cfg(M_UNC, "")]
            + [_fbc(t) for t in fbc] + own
            + [Cfg(M_UNC_GRAPH, "")]
            + [_fbc(t, M_GRAPH) for t in fbc]  # the graph: the FBC-rule rows and pyops' own
            + [Cfg(M_GRAPH, c.knob, c.params, c.threshold) for c in (own if mode == "full"
                                                                       else own[:1])]
            + block + [Cfg(M_CHUNK, "")]
            + [_fbc(t, M_FBC) for t in fbc]
            + [_every(M_FASTER, n) for n in every] + [_every(M_PAB, n) for n in every]
            + taylor + [_mag(t) for t in mag] + cdit)
    return tuple(rows)


def select(mode: str, steps=None, thresholds=None):
    """(step counts, rows per step count) of a run size; ``steps`` / ``thresholds``
    (comma-separated strings) override the step counts / the First-Block-Cache-rule
    thresholds."""
    st = [int(x) for x in (steps or STEPS[mode]).split(",")]
    thr = [float(x) for x in (thresholds or FBC_THRESHOLDS[mode]).split(",")]
    return st, configs(mode, thr)


# ---- counting block and attention computes ------------------------------------------------------
class Counter:
    """Forward pre-hooks on a module inside every transformer block that runs only when the
    block body computes (Flux double blocks: ``norm1``; single blocks: ``norm``) and on each
    block's ``attn.to_q`` (runs only when the attention computes). Installed for one generation,
    removed before the timed ones."""

    def __init__(self, model):
        self.model = model
        self.blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        self.handles = []
        self.block_calls = self.attn_calls = 0

    @staticmethod
    def _probe(block):
        return block.norm1 if hasattr(block, "norm1") else block.norm

    def __enter__(self):
        self.block_calls = self.attn_calls = 0

        def on_block(*_):
            self.block_calls += 1

        def on_attn(*_):
            self.attn_calls += 1
        for b in self.blocks:
            self.handles.append(self._probe(b).register_forward_pre_hook(on_block))
            self.handles.append(b.attn.to_q.register_forward_pre_hook(on_attn))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False


class Clock:
    """The current scheduler timestep (σ·1000, as diffusers' pipelines report it) for the
    caches that ask for one (PAB, FasterCache): a forward pre-hook on the transformer steps
    through the flow schedule's timesteps on the host (one forward per step; no device read)."""

    def __init__(self, model, steps: int):
        from pyops.sampler import flow_schedule
        self.ts = [float(t) for t in flow_schedule(steps, shift=1.0).timesteps]
        self.i, self.now = 0, self.ts[0]
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.now = self.ts[self.i % len(self.ts)]
        self.i += 1

    def reset(self):
        self.i, self.now = 0, self.ts[0]

    def __call__(self):
        return self.now

    def remove(self):
        self.handle.remove()


class Unavailable(Exception):
    """A method that cannot run here (not installed, not applicable): a note row."""


# ---- is the model as it was? ---------------------------------------------------------------------
_ABSENT = "<absent>"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
# an attribute a method may leave behind when the class has none: its neutral value
# (diffusers keeps an empty hook registry on each module after disable_cache)
_NEUTRAL = {"_diffusers_hook": ()}


def _token(v, owner=None, name=None):
    """A comparable stand-in for an attribute's value: numbers, strings and None by value,
    anything else by identity; ``owner.name`` bound to ``owner`` from the class's own function
    of that name stands for that function (diffusers' hook removal leaves each block's
    ``forward`` so: the same as the class's)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if (owner is not None and isinstance(v, types.MethodType) and v.__self__ is owner
            and v.__func__ is inspect.getattr_static(type(owner), name, None)):
        v = v.__func__
    return ("object", id(v))


def structure(model: torch.nn.Module) -> dict:
    """What a cache must leave as it found it, beyond the numbers of one forward: per module
    (by qualified name) its type and its instance attributes: children, parameters and buffers
    as (name, object) in registration order; torch's hook dicts by size; diffusers' hook
    registry by hook names; anything else by value (numbers, strings, None) or identity (an
    instance ``forward`` left behind shows here). Compare two with :func:`structure_diff`."""
    out = {}
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = {}
        for k, v in vars(m).items():
            if k in ("_modules", "_parameters", "_buffers"):
                attrs[k] = tuple((n, id(x)) for n, x in v.items())
            elif k in _HOOK_DICTS:
                attrs[k] = len(v)
            elif k == "_diffusers_hook":
                attrs[k] = tuple(getattr(v, "hooks", {}) or ())
            else:
                attrs[k] = _token(v, m, k)
        out[name] = (type(m), attrs)
    return out


def structure_diff(before: dict, after: dict) -> list:
    """The differences between two :func:`structure` records, one short line each (empty:
    the same). An attribute present on one side only is compared with the class's value (or
    its neutral value in ``_NEUTRAL``), so ``x._cache_config = None`` over a class attribute
    ``None`` is no difference."""
    def cls_value(cls, k):
        if k in _NEUTRAL:
            return _NEUTRAL[k]
        v = inspect.getattr_static(cls, k, _ABSENT)
        return v if v is _ABSENT else _token(v)

    diffs = []
    for name in list(before) + [n for n in after if n not in before]:
        where = name or "model"
        if name not in after or name not in before:
            diffs.append(f"{where}: module {'gone' if name not in after else 'added'}")
            continue
        (tb, ab), (ta, aa) = before[name], after[name]
        if tb is not ta:
            diffs.append(f"{where}: type {tb.__name__} -> {ta.__name__}")
            continue
        for k in list(ab) + [k for k in aa if k not in ab]:
            vb = ab[k] if k in ab else cls_value(tb, k)
            va = aa[k] if k in aa else cls_value(ta, k)
            if vb == va:
                continue
            kind = {"_modules": "children", "_parameters": "parameters",
                    "_buffers": "buffers"}.get(k)
            if kind and sorted(vb) == sorted(va):
                what = f"{kind} re-registered in another order ({', '.join(n for n, _ in va)})"
            elif kind:
                what = f"{kind} changed"
            elif k not in ab or k not in aa:
                what = f"attribute {k} {'left behind' if k not in ab else 'removed'}"
            else:
                what = f"attribute {k} changed"
            diffs.append(f"{where}: {what}")
    return diffs


# ---- the run -------------------------------------------------------------------------------------
@dataclass
class Ctx:
    """One step count's run. ``pristine``: a deep copy of the transformer taken before any
    method ran (the source of a method's private copy and of the repair after a leak; None:
    copies come from the shared model as it is); ``private``: the model of the method running
    now when it has its own copy (cache-dit), else None; ``layout``: ``structure`` of the shared
    model when the context was made (the restore check after every row)."""
    tm: object                 # the TrainedFlux
    device: torch.device
    steps: int
    noise: torch.Tensor
    labels: torch.Tensor
    n_blocks: int
    ref_images: Optional[torch.Tensor] = None
    ref_fd: Optional[float] = None
    base_s: Optional[float] = None
    probe_out: Optional[torch.Tensor] = None
    mag_ratios: dict = field(default_factory=dict)
    pristine: Optional[torch.nn.Module] = None
    private: Optional[torch.nn.Module] = None
    layout: Optional[dict] = None

    def __post_init__(self):
        if self.layout is None:
            self.layout = structure(self.shared)

    @property
    def shared(self):
        """The transformer every method but cache-dit caches in place."""
        return self.tm.transformer

    @property
    def model(self):
        """The model the running method caches (and the counters watch)."""
        return self.private if self.private is not None else self.tm.transformer

    def fresh_copy(self) -> torch.nn.Module:
        """A deep copy of the untouched transformer (``pristine``, else the shared one)."""
        return copy.deepcopy(self.pristine if self.pristine is not None else self.shared)

    def sample(self, model=None):
        if model is None:
            model = self.private  # None: the shared transformer
        return self.tm.sample(self.noise, self.labels, self.steps, model=model)

    def probe(self) -> torch.Tensor:
        """One forward of the bare model on a few samples (checks that a method's removal
        restored the model)."""
        n = min(8, self.noise.shape[0])
        with torch.no_grad():
            return self.tm.velocity(self.noise[:n], torch.tensor(0.5, device=self.device),
                                    self.labels[:n])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _pyops(ctx: Ctx, cfg: Cfg, level: str):
    p = cfg.p()
    cc = C.CacheConfig(level=level, threshold=p["threshold"], rule=p["rule"],
                       warmup=p["warmup"], last_steps=p["last_steps"], num_steps=ctx.steps,
                       max_reuse=p.get("max_reuse", -1), fn=p["fn"], bn=p["bn"])
    h = C.apply(ctx.model, cc)
    try:
        def gen():
            h.reset()
            return ctx.sample()
        yield gen, None
    finally:
        h.remove()


@contextlib.contextmanager
def _graph(ctx: Ctx, cfg: Optional[Cfg]):
    """One forward captured in a CUDA graph and replayed once per step (the sampler's Euler
    update stays eager); with ``cfg``, the pyops step cache inside it (IF nodes)."""
    if ctx.device.type != "cuda":
        raise Unavailable("CUDA only (CUDA graphs with IF nodes)")
    h = None
    cc = None
    if cfg is not None:
        ok, why = G.supported()
        if not ok:
            raise Unavailable(f"IF nodes unavailable: {why}")
        p = cfg.p()
        cc = C.CacheConfig(level="step", threshold=p["threshold"], rule=p["rule"],
                           warmup=p["warmup"], last_steps=p["last_steps"], num_steps=ctx.steps,
                           max_reuse=p.get("max_reuse", -1), fn=p["fn"], bn=p["bn"])
        h = C.apply(ctx.model, cc)
    g = None
    try:
        model, dev = ctx.model, ctx.device
        cond = ctx.tm.cond(ctx.labels)
        sx = ctx.noise.clone()
        st = torch.full((ctx.noise.shape[0],), 1.0, device=dev)
        with torch.no_grad():
            model(hidden_states=sx, timestep=st, return_dict=False, **cond)  # eager warm-up
            torch.cuda.synchronize(dev)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                so = model(hidden_states=sx, timestep=st, return_dict=False, **cond)[0]
        flag = h.regions()[-1].reuse if h is not None else None
        skips = torch.zeros((), dtype=torch.int32, device=dev)

        def replay(hidden_states, timestep, return_dict=False, **_):
            sx.copy_(hidden_states)
            st.copy_(timestep)
            g.replay()
            if flag is not None:
                skips.add_(flag[0])
            return (so,)

        def gen():
            if h is not None:
                h.reset()
            skips.zero_()
            return ctx.sample(model=replay)

        def counts():
            gated = ctx.n_blocks - cc.fn - cc.bn if cc is not None else 0
            done = ctx.steps * ctx.n_blocks - int(skips) * gated
            return done, done  # a skipped block skips its attention too
        yield gen, counts
    finally:
        g = None  # frees the graph and its memory pool
        if h is not None:
            h.remove()


def _diffusers_cls(method: str):
    import diffusers
    name = DIFFUSERS_CONFIG[method]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise Unavailable(f"the installed diffusers {diffusers.__version__} has no {name}")
    return cls


def _mag_ratios(ctx: Ctx) -> list:
    """MagCache's magnitude ratios for this model and step count from diffusers' own
    calibration mode (``MagCacheConfig(calibrate=True)``, which prints them at the last step),
    on a second noise batch (seed 1), never the evaluated one."""
    if ctx.steps in ctx.mag_ratios:
        return ctx.mag_ratios[ctx.steps]
    cls = _diffusers_cls(M_MAG)
    model = ctx.model
    model.enable_cache(cls(calibrate=True, num_inference_steps=ctx.steps))
    buf = io.StringIO()
    try:
        noise = ctx.tm.noise(ctx.noise.shape[0], seed=1)
        with contextlib.redirect_stdout(buf), model.cache_context("cond"):
            ctx.tm.sample(noise, ctx.labels, ctx.steps)
        model._reset_stateful_cache()
    finally:
        model.disable_cache()
    lists = re.findall(r"\[[^\[\]]*\]", buf.getvalue())
    ratios = ast.literal_eval(lists[-1]) if lists else None
    if not isinstance(ratios, list) or len(ratios) != ctx.steps:
        raise RuntimeError(f"MagCache calibration printed no {ctx.steps} ratios: "
                           f"{buf.getvalue()[-200:]!r}")
    ctx.mag_ratios[ctx.steps] = [float(r) for r in ratios]
    return ctx.mag_ratios[ctx.steps]


@contextlib.contextmanager
def _diffusers(ctx: Ctx, cfg: Cfg):
    cls = _diffusers_cls(cfg.method)
    p = cfg.p()
    model = ctx.model
    clock = Clock(model, ctx.steps)
    try:
        if cfg.method == M_FBC:
            dc = cls(threshold=cfg.threshold)
        elif cfg.method == M_FASTER:
            dc = cls(spatial_attention_block_skip_range=p["n"],
                     spatial_attention_timestep_skip_range=(-1, 681),
                     is_guidance_distilled=True, current_timestep_callback=clock,
                     tensor_format="BCHW")
        elif cfg.method == M_PAB:
            dc = cls(spatial_attention_block_skip_range=p["n"],
                     spatial_attention_timestep_skip_range=(100, 800),
                     current_timestep_callback=clock)
        elif cfg.method == M_TAYLOR:
            dc = cls(cache_interval=p["interval"], disable_cache_before_step=3, max_order=1,
                     taylor_factors_dtype=torch.float32, use_lite_mode=p["lite"])
        elif cfg.method == M_MAG:
            dc = cls(threshold=cfg.threshold, max_skip_steps=3, retention_ratio=0.2,
                     num_inference_steps=ctx.steps, mag_ratios=_mag_ratios(ctx))
        else:
            raise ValueError(cfg.method)
        model.enable_cache(dc)
        try:
            def gen():
                clock.reset()
                with model.cache_context("cond"):
                    out = ctx.sample()
                model._reset_stateful_cache()
                return out
            yield gen, None
        finally:
            model.disable_cache()
    finally:
        clock.remove()


def _import_cache_dit():
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    try:
        import cache_dit
    except Exception as e:  # noqa: BLE001 - ImportError, or a dependency failing to import
        raise Unavailable(
            f"cache-dit not importable ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
            f"pip install cache-dit (it pulls transformers, so it is not in the bench extra; "
            f"bench/fetch_wheels.sh's PEERS bring it to the GPU machine)") from None
    return cache_dit


@contextlib.contextmanager
def _cache_dit(ctx: Ctx, cfg: Cfg):
    cache_dit = _import_cache_dit()
    p = cfg.p()
    cc = cache_dit.DBCacheConfig(Fn_compute_blocks=p["Fn"], Bn_compute_blocks=p["Bn"],
                                 residual_diff_threshold=p["threshold"], max_warmup_steps=1,
                                 num_inference_steps=ctx.steps)
    # its own copy: cache-dit's removal leaves the model changed (see the module docstring)
    model = ctx.fresh_copy()
    ctx.private = model
    try:
        cache_dit.enable_cache(model, cache_config=cc)
        try:
            # the context refreshes itself after num_inference_steps forwards: one per
            # generation
            yield ctx.sample, None
        finally:
            cache_dit.disable_cache(model)
    finally:
        ctx.private = None


def provider(ctx: Ctx, cfg: Cfg):
    """The context manager of a row's method: yields (generate, device counts or None)."""
    m = cfg.method
    if m == M_UNC:
        return contextlib.nullcontext((ctx.sample, None))
    if m == M_UNC_GRAPH:
        return _graph(ctx, None)
    if m == M_STEP:
        return _pyops(ctx, cfg, "step")
    if m == M_BLOCK:
        return _pyops(ctx, cfg, "block")
    if m == M_GRAPH:
        return _graph(ctx, cfg)
    if m == M_CHUNK:
        raise Unavailable("not applicable: level='chunk' recomputes a token subset inside "
                          "pyops DiT blocks (pyops.models.dit); this model's blocks are "
                          "diffusers Flux blocks")
    if m in DIFFUSERS_CONFIG:
        return _diffusers(ctx, cfg)
    if m == M_CDIT:
        return _cache_dit(ctx, cfg)
    raise ValueError(m)


def _quality(ctx: Ctx, row: dict, x: torch.Tensor) -> None:
    from pyops.models import digits as D
    img = ctx.tm.images(x).cpu()
    row["rel L1"] = D.rel_l1(img, ctx.ref_images)
    row["PSNR"] = D.psnr(img, ctx.ref_images)
    row["FD"] = ctx.tm.frechet_distance(img)


def _matched(row: dict, ref_fd: Optional[float]) -> Optional[bool]:
    if row.get("rel L1") is None or row.get("FD") is None or ref_fd is None:
        return None
    return row["rel L1"] <= TOL_REL_L1 and row["FD"] <= TOL_FD_RATIO * ref_fd


def run_row(ctx: Ctx, cfg: Cfg, timed: Optional[bool] = None) -> dict:
    """Run one row: one generation with the counting hooks (its images give the quality
    columns), then, on CUDA (``timed``: None = on CUDA only), ``TIMED_REPS`` timed generations
    without them (median), each checked to equal the first."""
    if timed is None:
        timed = ctx.device.type == "cuda"
    row = dict(steps=ctx.steps, method=cfg.method, knob=cfg.knob, threshold=cfg.threshold,
               **{"fbc rule": cfg.fbc_rule, "params": cfg.p()})
    notes = []
    try:
        with provider(ctx, cfg) as (gen, device_counts):
            with torch.no_grad():
                with Counter(ctx.model) as cnt:
                    x = gen()
                _sync(ctx.device)
                if device_counts is not None:
                    blocks, attn = device_counts()
                else:
                    blocks, attn = cnt.block_calls, cnt.attn_calls
                total = ctx.steps * ctx.n_blocks
                row["skipped"] = 1.0 - blocks / total
                row["attn skipped"] = 1.0 - attn / total
                if timed:
                    times = []
                    for _ in range(TIMED_REPS):
                        _sync(ctx.device)
                        t0 = time.perf_counter()
                        x2 = gen()
                        _sync(ctx.device)
                        times.append(time.perf_counter() - t0)
                    row["s"] = statistics.median(times)
                    if not torch.equal(x2, x):
                        from pyops.models import digits as D
                        notes.append(f"a repeated generation differs (rel L1 "
                                     f"{D.rel_l1(x2, x):.1e}): state kept between runs?")
        if cfg.method == M_UNC:
            ctx.ref_images = ctx.tm.images(x).cpu()
            ctx.base_s = row.get("s")
        _quality(ctx, row, x)
        if cfg.method == M_UNC:
            ctx.ref_fd = row["FD"]
        if row.get("s") and ctx.base_s:
            row["speed-up"] = ctx.base_s / row["s"]
        row["matched"] = _matched(row, ctx.ref_fd)
    except Unavailable as e:
        notes.append(str(e))
    except Exception as e:  # noqa: BLE001 - one broken method must not lose the others
        for k in ("skipped", "attn skipped", "s", "speed-up", "rel L1", "PSNR", "FD", "matched"):
            row.pop(k, None)  # a failed row carries no numbers, only its note
        notes.append(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                     [:200])
        print(f"[bench_cache] {cfg.method} {cfg.knob}: {notes[-1]}", file=sys.stderr)
        if ctx.device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(ctx.device)
    if cfg.method != M_UNC:
        _check_restored(ctx, notes)
    if notes:
        row["note"] = "; ".join(notes)
    return row


def _check_restored(ctx: Ctx, notes: list) -> None:
    """After a row: is the shared model as it was (one forward bit-identical to
    ``ctx.probe_out``, the same ``structure`` as ``ctx.layout``)? If not, a note, and (with
    ``ctx.pristine``) a fresh copy of the untouched model replaces it for the rows after."""
    leaked = False
    if ctx.probe_out is not None:
        try:
            if not torch.equal(ctx.probe(), ctx.probe_out):
                notes.append("the model is NOT restored after removing this method")
                leaked = True
        except Exception as e:  # noqa: BLE001
            notes.append(f"restore check failed: {type(e).__name__}")
            leaked = True
    if ctx.layout is not None:
        diffs = structure_diff(ctx.layout, structure(ctx.shared))
        if diffs:
            notes.append("the model's structure is NOT restored after removing this method: "
                         + "; ".join(diffs[:3]) + (f" (+{len(diffs) - 3} more)"
                                                   if len(diffs) > 3 else ""))
            leaked = True
    if leaked and ctx.pristine is not None:
        ctx.tm.transformer = ctx.fresh_copy()
        ctx.layout = structure(ctx.shared)
        notes.append("the bench replaced it with a copy of the untouched model for the next "
                     "rows")


# ---- the headline table and the plot --------------------------------------------------------------
def matched_table(rows: list) -> U.Table:
    """Per (steps, method): the largest skipped fraction and the best speed-up among the rows
    within the tolerance (``MATCH_RULE``)."""
    t = U.Table("At matched quality (per method: the best of its rows within the tolerance)",
                MATCH_COLUMNS, notes=[
                    MATCH_RULE + ". max skipped / max attn skipped: the largest fractions of "
                    "block / attention computes skipped among those rows, knob: the row with "
                    "the largest skipped fraction (ties: the larger attention fraction, then "
                    "the better speed-up), rel L1 / FD: that row's; best speed-up (CUDA only): "
                    "the largest among those rows. Blank: no row within the tolerance, or not "
                    "measured."])
    keys = list(dict.fromkeys((r["steps"], r["method"]) for r in rows if r["method"] != M_UNC))
    for steps, method in keys:
        mine = [r for r in rows if r["steps"] == steps and r["method"] == method]
        measured = [r for r in mine if r.get("skipped") is not None]
        ok = [r for r in measured if r.get("matched")]
        out = dict(steps=steps, method=method, **{"rows matched": f"{len(ok)}/{len(measured)}"})
        if not measured:
            out["note"] = "; ".join(sorted({r.get("note") or "" for r in mine}))[:200]
        if ok:
            best = max(ok, key=lambda r: (r["skipped"], r["attn skipped"],
                                          r.get("speed-up") or 0.0))
            out.update({"max skipped": best["skipped"], "knob (max skipped)": best["knob"],
                        "max attn skipped": max(r["attn skipped"] for r in ok),
                        "rel L1": best["rel L1"], "FD": best["FD"]})
            timed = [r for r in ok if r.get("speed-up") is not None]
            if timed:
                fast = max(timed, key=lambda r: r["speed-up"])
                out.update({"best speed-up": fast["speed-up"],
                            "knob (best speed-up)": fast["knob"]})
        t.rows.append(out)
    return t


def write_png(path: Path, rows: list, env: dict, title: str) -> Optional[str]:
    """rel L1 (log) against the skipped fraction and, where measured, the speed-up; one series
    per method. Returns None when written, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"matplotlib not importable ({type(e).__name__}); pip install matplotlib"
    pts = [r for r in rows if r.get("skipped") is not None and r.get("rel L1") is not None
           and r["method"] != M_UNC]
    if not pts:
        return "no measured rows to plot"
    timed = any(r.get("speed-up") is not None for r in pts)
    floor = 1e-6
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(13 if timed else 7.5, 5.2),
                             squeeze=False)
    card = env.get("gpu") or "CPU (skip fractions and quality only; no times)"
    fig.suptitle(f"bench_cache: {title}\n{card}, {env.get('date', '')[:10]}; dashed: the "
                 f"tolerance rel L1 = {TOL_REL_L1}; rel L1 = 0 drawn at {floor:g}", fontsize=9)
    markers = {28: "o", 50: "s"}
    cmap = plt.get_cmap("tab20")
    methods = list(dict.fromkeys(r["method"] for r in pts))
    for k, method in enumerate(methods):
        mine = [r for r in pts if r["method"] == method]
        attn_only = all(r["skipped"] == 0 for r in mine) and any(r["attn skipped"] > 0
                                                                  for r in mine)
        label = method + (" (attention skipped)" if attn_only else "")
        for steps in sorted({r["steps"] for r in mine}):
            rs = [r for r in mine if r["steps"] == steps]
            kw = dict(color=cmap(k % 20), marker=markers.get(steps, "^"), lw=0.8,
                      ls="-" if steps == min(markers) else ":", label=f"{label}, {steps} steps")
            xy = sorted((r["attn skipped"] if attn_only else r["skipped"],
                         max(r["rel L1"], floor)) for r in rs)
            axes[0, 0].plot([a for a, _ in xy], [b for _, b in xy], **kw)
            if timed:
                xy = sorted((r["speed-up"], max(r["rel L1"], floor)) for r in rs
                            if r.get("speed-up"))
                if xy:
                    axes[0, 1].plot([a for a, _ in xy], [b for _, b in xy], **kw)
    for ax, xl in zip(axes[0], ["fraction of block computes skipped (attention-only caches: "
                                "of attention computes)", "speed-up vs uncached (eager)"]):
        ax.set_yscale("log")
        ax.axhline(TOL_REL_L1, color="k", lw=0.8, ls="--")
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel("rel L1 of the images vs uncached", fontsize=8)
        ax.grid(alpha=0.3)
    if timed:
        axes[0, 1].axvline(1.0, color="k", lw=0.8)
    axes[0, -1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return None


# ---- main -----------------------------------------------------------------------------------------
def _preset_file(preset: str, train_device: str) -> Optional[Path]:
    """The cached weights file of ``preset`` trained on ``train_device`` if it exists."""
    from pyops.models import digits as D
    p = D.model_path(preset, train_device=train_device)
    return p if p.is_file() else None


def load_model(preset: str, device: torch.device):
    """(TrainedFlux on ``device`` in fp32, a note on where its weights came from)."""
    from pyops.models import digits as D
    train_device = "cpu"
    if device.type == "cuda":  # cached weights of either device, else train on the GPU
        train_device = next((d for d in ("cuda", "cpu") if _preset_file(preset, d)), "cuda")
    cached = _preset_file(preset, train_device) is not None
    if not cached:
        print(f"[bench_cache] training the digits Flux, preset {preset!r}, on {train_device} "
              f"(cached in {D.cache_dir()} afterwards)", flush=True)
    t0 = time.perf_counter()
    tm = D.trained_flux(preset, device=device, train_device=train_device)
    where = (f"weights from {D.cache_dir()} (trained on {tm.info.get('device')})" if cached else
             f"weights trained now on {train_device} in {time.perf_counter() - t0:.0f} s")
    return tm, where


def parser() -> argparse.ArgumentParser:
    p = U.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--preset", default=None, choices=("quick", "study"),
                   help="the trained model (default: study; --quick: quick)")
    p.add_argument("--samples", type=int, default=None,
                   help="images per generation (default: 200 on CUDA, 50 on a CPU)")
    p.add_argument("--steps", default=None,
                   help="comma-separated step counts (default run: 28; --full: 28,50)")
    p.add_argument("--thresholds", default=None,
                   help="comma-separated thresholds of the First-Block-Cache-rule rows (pyops, "
                        "diffusers FBC, cache-dit; default run: 0,0.3)")
    p.add_argument("--methods", default=None,
                   help="comma-separated substrings: run only the methods whose name contains "
                        "one (the uncached reference always runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on a CPU: 1, so that parallel test runs do "
                        "not oversubscribe the cores; CPU times are not reported anyway)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = U.resolve_run(args, DEFAULT_BUDGET_S)
    budget = U.Budget(args.budget_s)
    if device.type != "cuda" or args.threads:
        torch.set_num_threads(args.threads or 1)
    with contextlib.suppress(Exception):
        from diffusers.utils import logging as dlog
        dlog.set_verbosity_error()  # FasterCache's "experimental" warnings, per row
    env = U.env_record(device)
    env["run"] = args.mode
    preset = args.preset or ("quick" if args.mode == "quick" else "study")
    samples = args.samples or (200 if device.type == "cuda" else 50)
    steps_list, rows_cfg = select(args.mode, args.steps, args.thresholds)
    if args.methods:
        keys = [k.strip().lower() for k in args.methods.split(",") if k.strip()]
        rows_cfg = tuple(c for c in rows_cfg if c.method == M_UNC
                         or any(k in c.method.lower() for k in keys))
    title = f"digits Flux ({preset}), {samples} samples, fp32"
    table = U.Table(f"Caching at equal noise: {title}", COLUMNS, notes=[
        "skipped / attn skipped: fraction of block / attention computes skipped (forward "
        "pre-hooks on each block's norm1 (double) / norm (single) and attn.to_q; in the CUDA "
        "graph: the cache's device flags x the gated blocks); s: median of "
        f"{TIMED_REPS} timed generations after the counted one (CUDA only; blank on a CPU); "
        "speed-up: uncached s / s; rel L1, PSNR (dB, inf = identical): final images vs the "
        "uncached images of the same noise; FD: Frechet distance to the held-out real digits "
        "in the digits classifier's features (lower is better).",
        MATCH_RULE + " (column matched).",
        "pyops 'FBC rule': CacheConfig(level='step', warmup=1, last_steps=0, fn=1, bn=0, "
        "rule='last_computed'): the decisions of diffusers' FirstBlockCacheConfig at the same "
        "threshold; cache-dit F1B0 with max_warmup_steps=1 is the same rule.",
        "uncached graph / pyops step graph: one forward captured in a CUDA graph, replayed per "
        "step (the Euler update stays eager); their speed-up includes the graph's own gain "
        "(compare with uncached graph).",
        "diffusers FasterCache / PAB / TaylorSeer (attention mode) skip attention only; "
        "TaylorSeer lite skips whole blocks (predicting the output projection); MagCache's "
        "mag_ratios come from diffusers' calibrate=True run on a second noise batch (seed 1).",
        "No guidance (one forward per step); labels i % 10."])
    matched = matched_table([])
    png = Path(args.out) / f"{NAME}.png"
    png.unlink(missing_ok=True)  # never leave an earlier run's plot beside this run's table

    def save(_t=None):
        nonlocal matched
        matched = matched_table(table.rows)
        U.write_results(args.out, NAME, [table, matched], env)
    table.on_add = save
    try:
        tm, where = load_model(preset, device)
    except Exception as e:  # noqa: BLE001 - e.g. scikit-learn or diffusers missing
        table.notes.append(f"no model: {type(e).__name__}: {e}"[:300])
        save()
        print(f"bench_cache: cannot build the trained model: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    tm.to(device=device, dtype=torch.float32)
    env["model"] = f"{title}; {where}; train info {tm.info}"
    table.notes.insert(0, f"model: pyops.models.digits.trained_flux({preset!r}): "
                          f"{len(tm.transformer.transformer_blocks)} double + "
                          f"{len(tm.transformer.single_transformer_blocks)} single blocks, "
                          f"{tm.config.tokens} image tokens; {where}.")
    n_blocks = len(tm.transformer.transformer_blocks) + len(
        tm.transformer.single_transformer_blocks)
    labels = torch.arange(samples) % 10
    noise = tm.noise(samples, seed=0)
    pristine = copy.deepcopy(tm.transformer)  # before any method touched it
    for steps in steps_list:
        ctx = Ctx(tm, device, steps, noise, labels, n_blocks, pristine=pristine)
        ctx.probe_out = ctx.probe()
        for cfg in rows_cfg:
            if budget.spent() and cfg.method != M_UNC:
                table.add(steps=steps, method=cfg.method, knob=cfg.knob,
                          threshold=cfg.threshold, note="skipped: time budget spent")
                continue
            row = run_row(ctx, cfg)
            table.add(**row)
            print("  " + "  ".join(f"{k}={U._fmt(row[k])}" for k in COLUMNS
                                   if row.get(k) is not None), flush=True)
            if cfg.method == M_UNC and ctx.ref_images is None:
                break  # no reference: nothing else can be compared
    try:
        why = write_png(png, table.rows, env, title)
    except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the tables
        why = f"plotting failed: {type(e).__name__}: {e}"[:200]
    table.notes.append(f"plot: {png.name}" if why is None else f"no PNG: {why}")
    save()
    print(U.env_markdown(env) + "\n\n" + table.markdown() + "\n\n" + matched.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())

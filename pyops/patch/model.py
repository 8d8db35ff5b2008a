"""``pyops.patch``: one call that puts pyops into a DiT transformer; :class:`PatchHandle`."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import Optional, Union

import torch
from torch import nn

from ..nn import LayerDecision, QuantConfig, QuantLinear, QuantReport, decide
from . import blocks as _blocks
from .attention import register_diffusers_backends, routed_sdpa
from .config import PatchConfig

__all__ = ["patch", "PatchHandle", "PatchReport"]

# every module a live handle has patched -> the handle (weakly); refuses a second patch
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


@dataclass
class PatchReport:
    """What :func:`pyops.patch` did: ``quant`` (the linears' :class:`pyops.QuantReport`, or None),
    ``attention`` [(module name, route)], ``blocks`` [(block name, "fused" or why not)],
    ``cache`` (a description or None). ``str(report)`` prints a summary."""
    quant: Optional[QuantReport] = None
    attention: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    cache: Optional[str] = None
    notes: list = field(default_factory=list)

    @property
    def fused(self) -> list:
        return [n for n, why in self.blocks if why == "fused"]

    def __str__(self) -> str:
        lines = []
        if self.quant is not None:
            q = self.quant
            lines.append(f"linears: {len(q.quantized)} quantized, {len(q.skipped)} kept "
                         f"({100 * q.weight_fraction(q.quantized):.1f} % of the linear weights)")
        else:
            lines.append("linears: unchanged")
        routes: dict = {}
        for _, r in self.attention:
            routes[r] = routes.get(r, 0) + 1
        lines.append("attention: " + (", ".join(r if r.startswith("kept") else f"{n} x {r}"
                                                for r, n in routes.items()) or "unchanged"))
        if self.blocks:
            lines.append(f"fused blocks: {len(self.fused)} of {len(self.blocks)}")
            why: dict = {}
            for _, w in self.blocks:
                if w != "fused":
                    why[w] = why.get(w, 0) + 1
            lines += [f"  kept ({n}): {w}" for w, n in why.items()]
        lines += self.notes
        lines.append(f"cache: {self.cache or 'none'}")
        return "\n".join(lines)


def _is_diffusers(model: nn.Module) -> bool:
    return any(c.__module__.startswith("diffusers.") for c in type(model).__mro__)


def _dispatch_processors(model: nn.Module):
    """[(name, processor)] of diffusers attention modules whose processor calls diffusers'
    attention dispatcher, and the names of those whose processor does not."""
    with_dispatch, without = [], []
    for name, m in model.named_modules():
        proc = getattr(m, "processor", None)
        if proc is None or not callable(proc) or isinstance(m, nn.ModuleList):
            continue
        if hasattr(proc, "_attention_backend"):
            with_dispatch.append((name, proc))
        else:
            without.append(name)
    return with_dispatch, without


class PatchHandle:
    """Returned by :func:`pyops.patch`. ``report`` (:class:`PatchReport`), ``config`` (the
    validated :class:`PatchConfig`), ``cache`` (the :class:`pyops.CachedModel` or None),
    ``sampler(guidance=, model_dtype=, **fixed)`` (a :class:`pyops.FewStepSampler` on the patched model, with
    ``config.sampler``), ``remove()``.
    """

    def __init__(self, model: nn.Module, config: PatchConfig):
        self.model, self.config = model, config
        self.report = PatchReport()
        self.cache = None
        self._linears: list = []      # (parent, child name, original module, its device)
        self._processors: list = []   # (processor, previous _attention_backend)
        self._hooks: list = []
        self._forwards: list = []     # (block, installed bound forward)
        self._removed = False

    # ---- building ----------------------------------------------------------------------------
    def _patch_linears(self) -> None:
        """quantize_model's decisions, applied one layer at a time so that each replaced bf16
        weight leaves the GPU (keep_originals "cpu"/"none") before the next layer is quantized:
        GPU memory never exceeds the bf16 model plus one quantized layer (quantizing every
        layer first would hold 1.5x the weights)."""
        cfg = self.config
        qc = cfg.quant or QuantConfig()
        qc = replace(qc, format=cfg.linear,
                     backend=cfg.backend if cfg.backend is not None else qc.backend)
        report = QuantReport()
        # names only: a list of the modules would keep every replaced original alive (and, with
        # keep_originals="none", on the GPU) until the loop ends
        targets = [n for n, m in self.model.named_modules() if type(m) is nn.Linear]
        for name in targets:
            mod = self.model.get_submodule(name)
            fmt, reason = decide(name, mod, qc)
            w = mod.weight
            d = LayerDecision(name, (mod.out_features, mod.in_features), fmt, reason,
                              w.numel() * w.element_size())
            report.layers.append(d)
            if fmt is None:
                continue
            q = QuantLinear.from_linear(mod, fmt, backend=qc.backend)
            d.bytes_after = q.qweight.nbytes
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, q)
            if cfg.keep_originals == "cpu" and w.device.type != "cpu":
                mod.to("cpu")
            self._linears.append((parent, child, None if cfg.keep_originals == "none" else mod,
                                  q))
        self.report.quant = report

    def _patch_attention(self) -> None:
        cfg = self.config
        p = cfg.attention
        if p == "auto":
            p, why = auto_attention(self.model)
            if p is None:
                self.report.attention.append(("(model)", f"kept: {why}"))
                return
        with_dispatch, without = ([], []) if not _is_diffusers(self.model) else \
            _dispatch_processors(self.model)
        if with_dispatch:
            try:
                member = register_diffusers_backends(cfg.backend)[p]
            except (ImportError, AttributeError):  # a dispatcher layout this code does not know:
                # its native backend calls F.scaled_dot_product_attention, which the override
                # below routes
                without += [n for n, _ in with_dispatch]
                with_dispatch = []
        # HunyuanVideo passes a key-padding mask for its text tokens on every call
        note = (" (falls back to torch SDPA: the model passes an attention mask)"
                if type(self.model).__name__.startswith("HunyuanVideo") else "")
        if with_dispatch:
            seen = set()
            for name, proc in with_dispatch:
                # diffusers' context parallelism (enable_parallelism, before or after the patch)
                # runs the pyops backends through pyops.patch.context_parallel
                if id(proc) not in seen:
                    seen.add(id(proc))
                    self._processors.append((proc, vars(proc).get("_attention_backend",
                                                                  _MISSING)))
                    proc._attention_backend = member
                self.report.attention.append((name, f"diffusers backend {member.value}{note}"))
        if without or not _is_diffusers(self.model):
            # F.scaled_dot_product_attention calls: routed while the model's forward runs
            # plain assignments (no context-manager object), which torch.compile traces
            routed = routed_sdpa(p, cfg.backend)
            F = torch.nn.functional
            saved: list = []

            def enter(module, args):
                saved.append(F.scaled_dot_product_attention)
                F.scaled_dot_product_attention = routed

            def leave(module, args, out):
                if saved:
                    F.scaled_dot_product_attention = saved.pop()

            self._hooks.append(self.model.register_forward_pre_hook(enter))
            self._hooks.append(self.model.register_forward_hook(leave, always_call=True))
            names = without or ["(model)"]
            self.report.attention += [(n, f"sdpa override {p}{note}") for n in names]

    def _patch_blocks(self) -> None:
        for name, m in self.model.named_modules():
            if type(m).__name__ not in _blocks.FUSED_BLOCKS:
                continue
            fwd, why = _blocks.plan(m)
            if fwd is not None:
                if "forward" in vars(m):
                    why = "block already has an instance forward (another patch or cache)"
                else:
                    self._forwards.append((m, _blocks.install(m, fwd, self.config.backend)))
            self.report.blocks.append((name, why))

    # ---- public -------------------------------------------------------------------------------
    def sampler(self, *, guidance: Optional[float] = None, model_dtype=None,
                model: Optional[nn.Module] = None, **fixed):
        """A :class:`pyops.FewStepSampler` for ``config.sampler`` (a preset name) on the patched
        model: diffusers transformers through :func:`pyops.diffusers_model` (``fixed``: keyword
        arguments passed to the transformer on every call), other models called as
        ``model(x, t, **cond)``. guidance: CFG scale (None: none). model_dtype: the latent dtype
        the model gets (default: the dtype of the model's first parameter). model: what the
        sampler calls instead of the patched module, e.g. ``torch.compile(transformer)`` (the
        compiled wrapper runs the patched module). Raises ValueError when the config names no
        sampler."""
        from ..sampler import FewStepSampler, diffusers_model, preset
        if self.config.sampler is None:
            raise ValueError("pyops.patch: no sampler in the PatchConfig (sampler='flux-schnell' "
                             "or another pyops.preset name)")
        sched, kw = preset(self.config.sampler)
        target = self.model if model is None else model
        fn = diffusers_model(target, **fixed) if _is_diffusers(self.model) else target
        if model_dtype is None:
            p = next(self.model.parameters(), None)
            model_dtype = p.dtype if p is not None and p.is_floating_point() else None
        return FewStepSampler(fn, sched, guidance=guidance, model_dtype=model_dtype,
                              backend=self.config.backend, **kw)

    def remove(self) -> None:
        """Restore the model: the cache, fused forwards, attention routes and (unless
        ``keep_originals="none"``, which warns) the original linears, bit for bit. Idempotent."""
        if self._removed:
            return
        wrapped = [type(b).__name__ for b, bound in self._forwards
                   if vars(b).get("forward") is not bound
                   and not (self.cache is not None and vars(b).get("forward") in
                            self.cache._wrappers)]
        if wrapped:
            raise RuntimeError(
                f"pyops.patch: remove() found {len(wrapped)} fused block(s) ({wrapped[0]}, ...) "
                f"whose forward was wrapped after patch() (e.g. pyops.cache_model applied on "
                f"the patched model); remove that wrapper first (its handle's .remove()), then "
                f"this patch. Nothing was changed.")
        if self.cache is not None:
            self.cache.remove()
        for blk, bound in self._forwards:
            if vars(blk).get("forward") is bound:
                del blk.forward
            vars(blk).pop("_pyops_backend", None)
        for proc, prev in self._processors:
            if prev is _MISSING:
                vars(proc).pop("_attention_backend", None)
            else:
                proc._attention_backend = prev
        for h in self._hooks:
            h.remove()
        lost = 0
        for parent, child, orig, q in self._linears:
            if orig is None:
                lost += 1
                continue
            # the model may have been moved or cast since patch(): the original follows the
            # quantized layer's current device and (through its bias, which model.to(dtype)
            # casts) its current dtype
            dev = q.weight.device
            dt = q.bias.dtype if q.bias is not None else orig.weight.dtype
            if orig.weight.device != dev or orig.weight.dtype != dt:
                orig.to(device=dev, dtype=dt)
            setattr(parent, child, orig)
        owner = _ACTIVE.get(self.model)
        if owner is not None and owner() is self:
            del _ACTIVE[self.model]
        self._removed = True
        if lost:
            import warnings
            warnings.warn(f"pyops.patch: remove() kept {lost} quantized linears "
                          f"(keep_originals='none' dropped the originals)", stacklevel=2)

    def __repr__(self) -> str:
        return f"PatchHandle({type(self.model).__name__}, removed={self._removed})\n{self.report}"


_MISSING = object()


def auto_attention(model: nn.Module) -> tuple[Optional[str], str]:
    """(precision or None, why) for ``PatchConfig(attention="auto")``: a precision only where a
    measurement in bench/RESULTS.md shows pyops attention faster than torch's SDPA on the
    model's GPU. H200 (sm_90), 2026-11-30: INT8 0.42-0.97x cuDNN SDPA end to end
    (bench/RESULTS.md section 1), so none today; other GPUs are unmeasured."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cuda":
        return None, "attention='auto' uses pyops attention only on a GPU where it is measured faster"
    major, minor = torch.cuda.get_device_capability(p.device)
    if (major, minor) == (9, 0):
        return None, ("on sm_90 pyops attention measured 0.42-0.97x cuDNN SDPA (H200, "
                      "bench/RESULTS.md); pass attention='int8' to use it anyway")
    return None, (f"pyops attention is unmeasured on sm_{major}{minor}; pass attention='int8' "
                  f"to use it")


def patch(model: nn.Module, config: Union[PatchConfig, dict, None] = None) -> PatchHandle:
    """Make a DiT transformer fast with pyops, in place; returns a :class:`PatchHandle`.

    In this order: linears -> :class:`pyops.QuantLinear` (``config.linear``, the skip policy);
    fused block forwards (``config.fuse``, FP8 only; diffusers Flux double/single blocks, Wan
    blocks, SD3 joint blocks, HunyuanVideo double blocks, the embedded DiT); attention -> :func:`pyops.attention` (``config.attention``), via
    diffusers' attention dispatcher where the model's processors use it (backend
    ``pyops_<precision>``, set per processor) and an ``F.scaled_dot_product_attention`` override
    around the model's forward otherwise (diffusers SD3, the embedded DiT, any other model);
    then :func:`pyops.cache_model` (``config.cache``). Works with ``torch.compile`` of the patched
    model (compile after patching) and with the CUDA-graph sampler (``handle.sampler()``).

    model: a diffusers ``FluxTransformer2DModel``, ``SD3Transformer2DModel``,
        ``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel``, the embedded
        :class:`pyops.models.dit.DiT`, or any ``nn.Module`` (linears and SDPA calls are found
        generically; fusion and caching need a known model).
    config: a :class:`PatchConfig`, a dict of its fields, or None (defaults: FP8 linears, fusion
        on, attention "auto" (kept where pyops attention is not measured faster: everywhere
        today), no cache).

    Inference only. ``handle.remove()`` restores the model bit for bit (with the default
    ``keep_originals="cpu"``, the replaced bf16 linears wait in host memory).
    Raises TypeError for a model that is not an ``nn.Module`` or a bad config type, ValueError
    for bad config values or a model another live handle has patched (``remove()`` it first).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pyops.patch: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if config is None:
        config = PatchConfig()
    elif isinstance(config, dict):
        config = PatchConfig(**config)
    elif not isinstance(config, PatchConfig):
        raise TypeError(f"pyops.patch: config must be a pyops.PatchConfig, a dict or None, got "
                        f"{type(config).__name__}")
    cfg = config.validated()
    owner = _ACTIVE.get(model)
    if owner is not None and owner() is not None and not owner()._removed:
        raise ValueError("pyops.patch: this model is already patched by a live PatchHandle; "
                         "call .remove() on it first")
    h = PatchHandle(model, cfg)
    try:
        if cfg.linear is not None:
            h._patch_linears()
        if cfg.fuse and cfg.linear == "fp8":
            h._patch_blocks()
        elif cfg.fuse:
            h.report.notes.append(f"fused blocks: none (fuse needs linear='fp8', got "
                                  f"{cfg.linear!r})")
        if cfg.attention is not None:
            h._patch_attention()
        if cfg.cache is not None:
            from ..cache import apply as cache_apply_model
            cache_cfg = cfg.cache
            if cfg.backend is not None and cache_cfg.backend is None:
                cache_cfg = replace(cache_cfg, backend=cfg.backend)
            h.cache = cache_apply_model(model, cache_cfg)
            h.report.cache = f"{cfg.cache.level} level, threshold {cfg.cache.threshold}"
    except BaseException:
        h.remove()
        raise
    _ACTIVE[model] = weakref.ref(h)
    return h

"""Attention routing for :func:`pyops.patch`: a diffusers attention backend and an SDPA override.

* diffusers (0.35+) models whose attention processors call ``dispatch_attention_fn`` (Flux,
  Wan, HunyuanVideo, QwenImage, ...): :func:`register_diffusers_backends` adds one backend per
  precision, named ``"pyops_<precision>"`` (``pyops_int8``, ``pyops_fp8``, ``pyops_int8_fp16pv``,
  ``pyops_nvfp4``, ``pyops_bf16``), to diffusers' registry, so ``transformer.
  set_attention_backend("pyops_int8")`` and ``with diffusers.attention_backend("pyops_int8"):``
  work like any built-in backend. ``pyops.patch`` sets it per processor (the process-wide active
  backend stays as it is; the names stay registered).
  diffusers' backend names form a closed ``Enum``; the names are added to its member maps, the
  way other projects plug backends into this dispatcher. The backends take part in diffusers'
  context parallelism (``enable_parallelism``: Ulysses, ring): :mod:`.context_parallel`.
* any other model calling ``F.scaled_dot_product_attention`` (diffusers SD3's
  ``JointAttnProcessor2_0``, the embedded DiT, your own): :func:`sdpa_override` routes those
  calls through :func:`pyops.sdpa` while it is active. ``pyops.patch`` enters it around the
  model's forward (forward pre/post hooks, traced by ``torch.compile(fullgraph=True)``). The
  override replaces a process-wide function: while a patched forward runs, SDPA calls of other
  threads go through pyops too, and two patched models must not run their forwards concurrently
  in two threads (the last one to finish could leave the override in place).

Both fall back to torch's own SDPA (one warning per reason) where pyops attention does not
apply: an attention mask, dropout, head_dim > 128 on a GPU, gradients.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch

from ..ops.attention import _warn_once, attention, sdpa, sdpa_fallback_reason, torch_sdpa
from ..reference.attention import PRECISIONS

__all__ = ["BACKEND_PREFIX", "backend_name", "register_diffusers_backends", "sdpa_override",
           "diffusers_attention"]

BACKEND_PREFIX = "pyops_"


OP_BACKENDS = ("cuda", "triton", "reference")


def backend_name(precision: str, backend: Optional[str] = None) -> str:
    """The diffusers backend name of a pyops attention precision: ``"pyops_int8"`` (the op's
    auto backend choice) or, with an explicit op backend, ``"pyops_int8_reference"`` etc."""
    if precision not in PRECISIONS:
        raise ValueError(f"pyops: unknown attention precision {precision!r}; expected one of "
                         f"{PRECISIONS}")
    if backend is None:
        return BACKEND_PREFIX + precision
    if backend not in OP_BACKENDS:
        raise ValueError(f"pyops: unknown attention backend {backend!r}; expected one of "
                         f"{OP_BACKENDS} or None")
    return f"{BACKEND_PREFIX}{precision}_{backend}"


def diffusers_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                        scale=None, enable_gqa=False, _parallel_config=None, *,
                        precision: str = "int8", backend: Optional[str] = None) -> torch.Tensor:
    """diffusers' attention-backend contract: query/key/value (B, S, H, D) ("bshd"), output
    (B, Sq, Hq, D) in query's dtype. Runs :func:`pyops.attention` with ``precision``; GQA when
    Hq is a multiple of Hk. With diffusers' context parallelism (``_parallel_config``, set by
    ``enable_parallelism``): :func:`pyops.patch.context_parallel.cp_attention` (Ulysses, ring,
    both; its docstring lists the fallbacks and errors)."""
    b = backend if backend is not None or query.is_cuda else "reference"
    reason = sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, True, b, "bshd")
    if _parallel_config is not None:
        from .context_parallel import cp_attention
        return cp_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                            enable_gqa, _parallel_config, precision=precision, backend=b,
                            reason=reason)
    if reason is not None:
        _warn_once("diffusers:" + reason, f"pyops attention: falling back to torch SDPA for "
                   f"{reason}")
        return torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale,
                          query.shape[2] != key.shape[2], layout="bshd")
    return attention(query, key, value, layout="bshd", scale=scale, precision=precision,
                     causal=is_causal, backend=b)


def _make_backend(precision: str, backend: Optional[str]):
    # diffusers passes the keyword arguments whose names the function's signature lists
    def fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
           enable_gqa=False, _parallel_config=None):
        return diffusers_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                   enable_gqa, _parallel_config, precision=precision,
                                   backend=backend)
    fn.__name__ = fn.__qualname__ = backend_name(precision, backend) + "_attention"
    return fn


def register_diffusers_backends(backend: Optional[str] = None) -> dict:
    """Register ``pyops_<precision>`` for every precision in diffusers' attention dispatcher
    (with ``backend``: ``pyops_<precision>_<backend>``, which run that op backend); idempotent.
    The names stay registered for the rest of the process (``remove()`` of a patch only resets
    the processors). Where diffusers has context parallelism (``enable_parallelism``),
    the names are registered as capable of it (:mod:`pyops.patch.context_parallel`).
    Returns {precision: backend enum member}. Raises ImportError when diffusers
    is missing or has no attention dispatcher (diffusers < 0.35), AttributeError when its
    registry has another layout."""
    try:
        from diffusers.models import attention_dispatch as ad
    except ImportError as e:
        raise ImportError("pyops: diffusers' attention dispatcher (diffusers >= 0.35) is needed "
                          "to route a diffusers model's attention through pyops") from e
    E, reg = ad.AttentionBackendName, ad._AttentionBackendRegistry
    for attr in ("_backends", "_constraints", "_supported_arg_names"):
        if not isinstance(getattr(reg, attr, None), dict):
            raise AttributeError(f"pyops: diffusers {getattr(ad, '__version__', '')} has an "
                                 f"attention registry without {attr}; cannot add a backend")
    # context parallelism: diffusers' templated Ulysses / ring attention (checked against
    # 0.42.1) and its set of capable backend names (values), which enable_parallelism checks
    cp_ok = (callable(getattr(ad, "_templated_context_parallel_attention", None))
             and isinstance(getattr(reg, "_supports_context_parallel", None), set))
    members = {}
    for p in PRECISIONS:
        name = backend_name(p, backend)
        member = E._value2member_map_.get(name)
        if member is None:
            member = str.__new__(E, name)
            member._name_, member._value_ = name.upper(), name
            E._member_map_[member._name_] = member
            E._value2member_map_[name] = member
        if member not in reg._backends:
            fn = _make_backend(p, backend)
            register = getattr(reg, "register", None)
            if callable(register) and cp_ok and \
                    "supports_context_parallel" in inspect.signature(register).parameters:
                # diffusers' own decorator keeps its tables consistent
                register(member, supports_context_parallel=True)(fn)
            elif callable(register):
                register(member)(fn)
            else:
                reg._backends[member] = fn
                reg._constraints[member] = []
                reg._supported_arg_names[member] = set(inspect.signature(fn).parameters)
        if cp_ok:  # also for a name registered before this flag existed
            reg._supports_context_parallel.add(member.value)
        members[p] = member
    return members


@contextlib.contextmanager
def sdpa_override(precision: str = "int8", *, backend: Optional[str] = None):
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through :func:`pyops.sdpa`
    (``precision``, ``backend``) inside the ``with`` block; restored on exit (nesting works).

    ``backend=None`` runs the auto choice on CUDA tensors and the PyTorch reference on CPU
    tensors (pyops.sdpa alone falls back to torch's SDPA on a CPU). Masks, dropout and the other
    cases :func:`pyops.sdpa` lists fall back to torch's SDPA with a one-time warning.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"pyops.sdpa_override: precision={precision!r}; expected one of "
                         f"{PRECISIONS}")
    F = torch.nn.functional
    prev = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = routed_sdpa(precision, backend)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = prev


def routed_sdpa(precision: str, backend: Optional[str] = None):
    """An ``F.scaled_dot_product_attention`` replacement that calls :func:`pyops.sdpa` with
    ``precision`` (``backend=None``: auto on CUDA tensors, the reference on CPU tensors)."""
    def routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        b = backend if backend is not None or query.is_cuda else "reference"
        return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                    precision=precision, backend=b)
    routed.__name__ = routed.__qualname__ = f"pyops_sdpa_{precision}"
    return routed

"""Whole-model drop-in: :func:`patch` puts pyops's quantized linears, fused producers, quantized
attention and (optionally) caching into a DiT transformer in one call.

    handle = pyops.patch(transformer, pyops.PatchConfig(linear="fp8", attention="int8"))
    out = transformer(...)          # or torch.compile(transformer), or a diffusers pipeline
    handle.remove()                 # the original model, bit for bit

Layout: :mod:`pyops.patch.config` (:class:`PatchConfig`), :mod:`pyops.patch.model`
(:func:`patch`, :class:`PatchHandle`, :class:`PatchReport`), :mod:`pyops.patch.attention`
(the diffusers attention backends ``pyops_<precision>`` and :func:`sdpa_override`),
:mod:`pyops.patch.blocks` (the fused block forwards).
"""
from __future__ import annotations

import sys as _sys
import types as _types

from .attention import backend_name, register_diffusers_backends, sdpa_override
from .config import PatchConfig
from .model import PatchHandle, PatchReport, patch

__all__ = ["patch", "PatchConfig", "PatchHandle", "PatchReport", "sdpa_override",
           "register_diffusers_backends", "backend_name"]


class _CallableModule(_types.ModuleType):
    """``pyops.patch`` is both this package and the function: ``pyops.patch(model, config)``
    calls :func:`patch`, and ``pyops.patch.blocks`` etc. stay importable."""

    def __call__(self, model, config=None):
        return patch(model, config)


_sys.modules[__name__].__class__ = _CallableModule

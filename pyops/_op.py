"""Define a pyops custom op once: the registered torch op, its fake, and the eager fast path.

Every GPU entry point is a real PyTorch op in namespace ``pyops`` (so torch.compile, export and
CUDA graphs see it), but a Python custom op costs microseconds per call in eager mode, which is
a large share of a small kernel. ``define`` returns an ``Op`` that, in plain eager mode with real
tensors, calls the implementation directly, and otherwise (torch.compile, export, fake tensors,
any dispatch mode, autograd-tracked inputs) goes through the registered op so tracing sees it.
The implementation is the same function in both cases, so the two paths cannot drift apart.

The pattern (an op object with a direct eager path) follows Dao-AILab/quack
``quack/dsl/torch_library_op.py``; this is our own code.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ._checks import eager_fast_path


class Op:
    """A registered ``pyops::<name>`` op. Call it like the implementation.

    ``op.impl`` is the Python implementation, ``op.op`` the ``torch.library`` custom op
    (``torch.ops.pyops.<name>``)."""

    def __init__(self, name: str, impl: Callable, fake: Callable,
                 mutates_args: Iterable[str] = ()):
        self.name = name
        self.impl = impl
        self.op = torch.library.custom_op(f"pyops::{name}", impl, mutates_args=tuple(mutates_args))
        self.op.register_fake(fake)

    def __call__(self, *args):
        if eager_fast_path(*(a for a in args if isinstance(a, torch.Tensor))):
            return self.impl(*args)
        return self.op(*args)

    def __repr__(self) -> str:
        return f"pyops.Op({self.name!r})"


def define(name: str, *, fake: Callable, mutates_args: Iterable[str] = ()):
    """Decorator: register the annotated function as ``pyops::<name>`` with ``fake`` as its
    fake (meta) implementation; returns the ``Op``. The schema is inferred from the type hints
    (``torch.library.custom_op``); ``mutates_args`` names the arguments the op writes."""
    def wrap(impl: Callable) -> Op:
        return Op(name, impl, fake, mutates_args)
    return wrap


def binding_fake(binding: str, fake: Callable = lambda *args: None) -> None:
    """Give the CUDA extension's destination-passing entry point ``pyops::<binding>`` (e.g.
    ``_quantize_fp8_cuda``) a fake, so it can be traced and opchecked on its own; a no-op when
    the extension is not loaded or lacks the binding. Bindings return nothing, hence the default
    fake."""
    from . import _backend
    if _backend.extension_status()[0] and hasattr(torch.ops.pyops, binding):
        torch.library.register_fake(f"pyops::{binding}")(fake)

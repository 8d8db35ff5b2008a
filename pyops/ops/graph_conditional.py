"""pyops::_graph_set_conditional: the Python wrapper and the fake of the CUDA graph IF-node setter
(kernel: csrc/graph_conditional.cu; binding: csrc/bindings/graph_conditional.cpp; user:
:mod:`pyops.graphs`).

The op is defined by the compiled extension only (there is no Triton or reference backend: it
exists to set a CUDA graph conditional handle, which only a kernel inside a captured graph can
do). Schema: ``_graph_set_conditional(Tensor flag, int index, int handle, bool invert) -> ()``:
one thread reads ``flag[index]`` on the device and sets the conditional ``handle`` to
``flag[index] != 0`` (``invert``: ``== 0``). It writes no tensor, so its fake does nothing and
returns None; it is registered when the extension provides the op, so the op can be traced
(torch.compile, FakeTensorMode) and checked with ``torch.library.opcheck`` like every other op.
"""
from __future__ import annotations

import torch

from .. import _backend
from .._op import binding_fake

OP = "_graph_set_conditional"
QUALNAME = f"pyops::{OP}"


def status() -> tuple[bool, str]:
    """(available, why): whether the compiled extension is loaded and defines the op."""
    ok, why = _backend.extension_status()
    if not ok:
        return False, why
    if not hasattr(torch.ops.pyops, OP):
        return False, f"pyops._C lacks {OP}"
    return True, "ok"


def _fake(flag, index, handle, invert) -> None:
    """The fake (meta) implementation: the op writes no tensor and returns nothing."""
    return None


def signed_handle(handle: int) -> int:
    """A ``cudaGraphConditionalHandle`` (unsigned 64-bit) as the schema's signed int64 (two's
    complement: the binding casts it back to uint64). Raises ``ValueError`` outside
    [0, 2**64)."""
    h = int(handle)
    if not 0 <= h < 2 ** 64:
        raise ValueError(f"pyops.graph_conditional: handle {h} is not an unsigned 64-bit value")
    return h - 2 ** 64 if h >= 2 ** 63 else h


def graph_set_conditional(flag: torch.Tensor, index: int, handle: int, *,
                          run_when: str = "zero") -> None:
    """Launch the setter on the current (capturing) stream: at graph replay the IF node of
    ``handle`` runs its body when ``flag[index]`` is zero (``run_when="zero"``) or non-zero
    (``"nonzero"``).

    ``flag``: contiguous int32 CUDA tensor; ``index`` in [0, flag.numel()); ``handle``: the
    unsigned 64-bit value from ``cudaGraphConditionalHandleCreate``. Must be called while the
    current stream is capturing a CUDA graph (the binding refuses otherwise).

    Raises ``ValueError`` for a bad ``run_when``, ``flag``, ``index`` or ``handle`` and
    ``RuntimeError`` when the extension lacks the op; all before any launch.
    """
    if run_when not in ("zero", "nonzero"):
        raise ValueError(f"pyops.graph_conditional: run_when must be 'zero' or 'nonzero', got "
                         f"{run_when!r}")
    if not isinstance(flag, torch.Tensor) or flag.dtype != torch.int32 or not flag.is_contiguous():
        raise ValueError("pyops.graph_conditional: flag must be a contiguous int32 tensor")
    if not flag.is_cuda:
        raise ValueError(f"pyops.graph_conditional: flag must be a CUDA tensor, got {flag.device}")
    index = int(index)
    if not 0 <= index < flag.numel():
        raise ValueError(f"pyops.graph_conditional: flag index {index} out of range for "
                         f"{flag.numel()} elements")
    h = signed_handle(handle)
    ok, why = status()
    if not ok:
        raise RuntimeError(f"pyops.graph_conditional: the setter is unavailable: {why}")
    torch.ops.pyops._graph_set_conditional(flag, index, h, run_when == "zero")


binding_fake(OP, _fake)  # only when the extension defines the op

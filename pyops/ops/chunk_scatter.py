"""pyops::chunk_scatter: the public function, schema, fake, backends
(spec: pyops/reference/chunk_scatter.py; Triton kernels: triton_kernels/chunk_scatter.py; no CUDA
kernel yet).

Destination-passing: the op writes ``out`` and updates ``residual`` and ``ref`` in place at the
recomputed tokens. The token index is a device tensor read on the device: no host sync,
CUDA-graph capturable. Used by the chunk level of :mod:`pyops.cache`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor, overlaps
from .._op import define
from ..reference import chunk_scatter as _ref

OP = "chunk_scatter"


# ---- backends: out, x, residual, ref contiguous (B, N, D); rows (B, T, D); tokens (T,) int64 ----
def _reference(out, x, residual, rows, tokens, ref) -> None:
    _ref.chunk_scatter(out, x, residual, rows, tokens, ref)


def _triton(out, x, residual, rows, tokens, ref) -> None:
    from ..triton_kernels import chunk_scatter as tk
    tk.chunk_scatter(out, x, residual, rows, tokens, ref)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)


# ---- the op -------------------------------------------------------------------------------------
def _fake(out, x, residual, rows, tokens, ref, backend):
    return None


@define(OP, fake=_fake, mutates_args=("out", "residual", "ref"))
def chunk_scatter_op(out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                     rows: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor,
                     backend: str) -> None:
    _backend.impl(OP, backend)(out, x, residual, rows, tokens, ref)


# ---- the public function ------------------------------------------------------------------------
def chunk_scatter(out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor,
                  tokens: torch.Tensor, ref: torch.Tensor, *,
                  backend: Optional[str] = None) -> None:
    """The chunk level's output and cache update in one pass (spec and formulas:
    :mod:`pyops.reference.chunk_scatter`).

    At the tokens listed in ``tokens`` (recomputed): ``out = rows`` (bits),
    ``residual = rows − x`` and ``ref = x`` (bits); at every other token ``out = x + residual``.
    Sums and differences in fp32, rounded once to the dtype (what torch's ``x + residual`` gives),
    so the result equals ``out = x + residual; out[:, tokens] = rows; residual[:, tokens] = rows
    − x[:, tokens]; ref[:, tokens] = x[:, tokens]`` bit for bit.

    ``out, x, residual, ref``: contiguous (B, N, D); ``rows``: contiguous (B, T, D); one float
    dtype (fp32 / fp16 / bf16) for all five; ``tokens``: (T,) int64 on the same device, distinct
    values in [0, N) (read on the device, never on the host: an entry outside [0, N) is ignored,
    a repeated entry leaves unspecified which of its rows is used). ``out`` must not overlap any
    other argument, nor ``residual`` and ``ref`` each other or x / rows. No host sync.

    Raises ``TypeError`` for a wrong dtype and ``ValueError`` for a wrong shape, a
    non-contiguous or overlapping buffer, or tensors on different devices; all before any launch.
    """
    op = OP
    for n, t in (("out", out), ("x", x), ("residual", residual), ("rows", rows), ("ref", ref)):
        check_tensor(op, n, t, FLOAT_DTYPES)
        if t.dim() != 3 or not t.is_contiguous():
            raise ValueError(f"pyops.chunk_scatter: {n} must be a contiguous (B, N, D) tensor, "
                             f"got shape {tuple(t.shape)} strides {t.stride()}")
        if t.dtype != x.dtype:
            raise TypeError(f"pyops.chunk_scatter: {n} is {t.dtype}, x is {x.dtype}; all five "
                            f"must have one dtype")
    check_tensor(op, "tokens", tokens, (torch.int64,))
    check_same_device(op, x, out=out, residual=residual, rows=rows, tokens=tokens)
    if ref.device != x.device:  # (check_same_device's own parameter is called ref)
        raise ValueError(f"pyops.chunk_scatter: ref is on {ref.device} but the input is on "
                         f"{x.device}")
    B, N, D = x.shape
    for n, t in (("out", out), ("residual", residual), ("ref", ref)):
        if t.shape != x.shape:
            raise ValueError(f"pyops.chunk_scatter: {n} {tuple(t.shape)} must have x's shape "
                             f"{tuple(x.shape)}")
    T = tokens.numel()
    if tokens.dim() != 1 or rows.shape != (B, T, D):
        raise ValueError(f"pyops.chunk_scatter: tokens must be (T,) and rows (B, T, D) = "
                         f"({B}, T, {D}), got tokens {tuple(tokens.shape)}, rows "
                         f"{tuple(rows.shape)}")
    if not torch.compiler.is_compiling():
        pairs = [("out", out, "x", x), ("out", out, "residual", residual),
                 ("out", out, "rows", rows), ("out", out, "ref", ref),
                 ("residual", residual, "x", x), ("residual", residual, "rows", rows),
                 ("residual", residual, "ref", ref), ("ref", ref, "x", x),
                 ("ref", ref, "rows", rows)]
        for na, a, nb, b in pairs:
            if overlaps(a, b):
                raise ValueError(f"pyops.chunk_scatter: {na} must not overlap {nb} in memory")
    b = _backend.resolve(op, x.device, backend)
    chunk_scatter_op(out, x, residual, rows, tokens.contiguous(), ref, b)

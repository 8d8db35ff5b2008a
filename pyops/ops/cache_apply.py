"""pyops::cache_apply: the public function, schema, fake, backends
(spec: ``cache_apply`` in pyops/reference/block_similarity.py; kernels beside
``block_similarity``'s in triton_kernels/block_similarity.py and csrc/).

Destination-passing: where group ``g`` reuses (``reuse[g] != 0``, written on the device by
:func:`pyops.ops.block_similarity.block_similarity`) ``out = x + residual``; elsewhere ``out`` is
not written. The decision is read on the device: no host sync, CUDA-graph capturable.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from .._op import binding_fake, define
from ..reference import block_similarity as _ref

OP = "cache_apply"


# ---- backends: out, x, residual contiguous (B, ...) of one shape; reuse (groups,) int32 --------
def _reference(out, x, residual, reuse, groups) -> None:
    _ref.cache_apply(out, x, residual, reuse, groups)


def _triton(out, x, residual, reuse, groups) -> None:
    from ..triton_kernels import block_similarity as tk
    tk.cache_apply(out, x, residual, reuse, groups)


def _cuda(out, x, residual, reuse, groups) -> None:
    torch.ops.pyops._cache_apply_cuda(out, x, residual, reuse, groups)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)
_backend.register(OP, "cuda", _cuda)


# ---- the op -------------------------------------------------------------------------------------
def _fake(out, x, residual, reuse, groups, backend):
    return None


@define(OP, fake=_fake, mutates_args=("out",))
def cache_apply_op(out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                   reuse: torch.Tensor, groups: int, backend: str) -> None:
    _backend.impl(OP, backend)(out, x, residual, reuse, groups)


binding_fake("_cache_apply_cuda")


# ---- the public function ------------------------------------------------------------------------
def cache_apply(out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                reuse: torch.Tensor, *, groups: int = 1, backend: Optional[str] = None) -> None:
    """Where group g reuses (``reuse[g] != 0``): ``out = x + residual``; elsewhere ``out`` is left
    as it is (so a computed output stays bit-exact).

    ``out, x, residual``: contiguous, one shape (B, ...) and a float dtype (fp32/fp16/bf16); the
    sum is formed in fp32 and rounded once to ``out``'s dtype (reference:
    :func:`pyops.reference.block_similarity.cache_apply`). ``reuse``: (groups,) int32 on the same
    device; batch row ``b`` belongs to group ``b // (B // groups)``. No host sync.

    Raises ``TypeError`` for a wrong dtype and ``ValueError`` for a non-contiguous or mismatched
    buffer or ``reuse`` not (groups,) with B divisible by groups; all before any launch.
    """
    op = OP
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
    cache_apply_op(out, x, residual, reuse, groups, b)

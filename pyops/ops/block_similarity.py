"""pyops::block_similarity and pyops::cache_apply: schema, fake, backends
(spec: pyops/reference/block_similarity.py).

Both are destination-passing: ``block_similarity`` mutates ``ref`` (the cached reference),
``state`` (per-cell step counters), ``metric`` and ``reuse``; ``cache_apply`` mutates ``out``.
Every option is a plain int/float decided on the host; every decision is made on the device and
written to ``reuse`` (int32), never read back: no host sync, CUDA-graph capturable.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import block_similarity as ref

OP = "block_similarity"
APPLY_OP = "cache_apply"


# ---- backends: a, ref contiguous (B, ...) ------------------------------------------------------
def _reference(a, refbuf, state, metric, reuse, threshold, eps, rule, warmup, max_reuse,
               num_steps, last_steps, chunks, groups, all_groups, write_ref) -> None:
    ref.block_similarity(a, refbuf, state, metric, reuse, threshold=threshold, eps=eps, rule=rule,
                         warmup=warmup, max_reuse=max_reuse, num_steps=num_steps,
                         last_steps=last_steps, chunks=chunks, groups=groups,
                         all_groups=all_groups, write_ref=write_ref)


def _triton(a, refbuf, state, metric, reuse, threshold, eps, rule, warmup, max_reuse,
            num_steps, last_steps, chunks, groups, all_groups, write_ref) -> None:
    from ..triton_kernels import block_similarity as tk
    tk.block_similarity(a, refbuf, state, metric, reuse, threshold=threshold, eps=eps, rule=rule,
                        warmup=warmup, max_reuse=max_reuse, num_steps=num_steps,
                        last_steps=last_steps, chunks=chunks, groups=groups,
                        all_groups=all_groups, write_ref=write_ref)


def _cuda(a, refbuf, state, metric, reuse, threshold, eps, rule, warmup, max_reuse,
          num_steps, last_steps, chunks, groups, all_groups, write_ref) -> None:
    torch.ops.pyops._block_similarity_cuda(a, refbuf, state, metric, reuse, threshold, eps, rule,
                                           warmup, max_reuse, num_steps, last_steps, chunks,
                                           groups, all_groups, write_ref)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)
_backend.register(OP, "cuda", _cuda)


def _apply_reference(out, x, residual, reuse, groups) -> None:
    ref.cache_apply(out, x, residual, reuse, groups)


def _apply_triton(out, x, residual, reuse, groups) -> None:
    from ..triton_kernels import block_similarity as tk
    tk.cache_apply(out, x, residual, reuse, groups)


def _apply_cuda(out, x, residual, reuse, groups) -> None:
    torch.ops.pyops._cache_apply_cuda(out, x, residual, reuse, groups)


_backend.register(APPLY_OP, "reference", _apply_reference)
_backend.register(APPLY_OP, "triton", _apply_triton)
_backend.register(APPLY_OP, "cuda", _apply_cuda)


# ---- the ops ------------------------------------------------------------------------------------
def block_similarity_impl(a, refbuf, state, metric, reuse, threshold, eps, rule, warmup,
                          max_reuse, num_steps, last_steps, chunks, groups, all_groups,
                          write_ref, backend) -> None:
    _backend.impl(OP, backend)(a, refbuf, state, metric, reuse, threshold, eps, rule, warmup,
                               max_reuse, num_steps, last_steps, chunks, groups, all_groups,
                               write_ref)


@torch.library.custom_op("pyops::block_similarity",
                         mutates_args=("ref", "state", "metric", "reuse"))
def block_similarity_op(a: torch.Tensor, ref: torch.Tensor, state: torch.Tensor,
                        metric: torch.Tensor, reuse: torch.Tensor, threshold: float, eps: float,
                        rule: int, warmup: int, max_reuse: int, num_steps: int, last_steps: int,
                        chunks: int, groups: int, all_groups: bool, write_ref: int,
                        backend: str) -> None:
    block_similarity_impl(a, ref, state, metric, reuse, threshold, eps, rule, warmup, max_reuse,
                          num_steps, last_steps, chunks, groups, all_groups, write_ref, backend)


@block_similarity_op.register_fake
def _(a, ref, state, metric, reuse, threshold, eps, rule, warmup, max_reuse, num_steps,
      last_steps, chunks, groups, all_groups, write_ref, backend):
    return None


def cache_apply_impl(out, x, residual, reuse, groups, backend) -> None:
    _backend.impl(APPLY_OP, backend)(out, x, residual, reuse, groups)


@torch.library.custom_op("pyops::cache_apply", mutates_args=("out",))
def cache_apply_op(out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                   reuse: torch.Tensor, groups: int, backend: str) -> None:
    cache_apply_impl(out, x, residual, reuse, groups, backend)


@cache_apply_op.register_fake
def _(out, x, residual, reuse, groups, backend):
    return None


def _register_cuda_fakes() -> None:
    for name in ("_block_similarity_cuda", "_cache_apply_cuda"):
        if hasattr(torch.ops.pyops, name):
            torch.library.register_fake(f"pyops::{name}")(lambda *a: None)


if _backend.extension_status()[0]:
    _register_cuda_fakes()

"""pyops::sample_step: schema, fake, backends (spec: pyops/reference/sample_step.py).

Destination-passing: ``state`` is read as the current latent and overwritten with the next one
(in place), ``x_out`` (optional) receives the same values in its own dtype, so a CUDA-graph
captured loop keeps static buffers. Coefficients are plain floats decided on the host before
the op runs (see ``reference.step_coefficients``); nothing is read back from the device.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reference import sample_step as ref

OP = "sample_step"


# ---- backends: all tensors contiguous, same numel; state updated in place ------------------------
def _reference(state, x_out, cond, uncond, noise, alpha, beta, zeta, guidance) -> None:
    y = ref.sample_step(state, cond, uncond, noise, alpha, beta, zeta, guidance)
    if x_out is not None:
        x_out.copy_(y)
    state.copy_(y)


def _triton(state, x_out, cond, uncond, noise, alpha, beta, zeta, guidance) -> None:
    from ..triton_kernels import sample_step as tk
    tk.sample_step(state, x_out, cond, uncond, noise, alpha, beta, zeta, guidance)


def _cuda(state, x_out, cond, uncond, noise, alpha, beta, zeta, guidance) -> None:
    torch.ops.pyops._sample_step_cuda(state, x_out, cond, uncond, noise, alpha, beta, zeta,
                                      guidance)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)
_backend.register(OP, "cuda", _cuda)


def sample_step_impl(state: torch.Tensor, x_out: Optional[torch.Tensor], cond: torch.Tensor,
                     uncond: Optional[torch.Tensor], noise: Optional[torch.Tensor], alpha: float,
                     beta: float, zeta: float, guidance: float, backend: str) -> None:
    _backend.impl(OP, backend)(state, x_out, cond, uncond, noise, alpha, beta, zeta, guidance)


@torch.library.custom_op("pyops::sample_step", mutates_args=("state", "x_out"))
def sample_step_op(state: torch.Tensor, x_out: Optional[torch.Tensor], cond: torch.Tensor,
                   uncond: Optional[torch.Tensor], noise: Optional[torch.Tensor], alpha: float,
                   beta: float, zeta: float, guidance: float, backend: str) -> None:
    sample_step_impl(state, x_out, cond, uncond, noise, alpha, beta, zeta, guidance, backend)


@sample_step_op.register_fake
def _(state, x_out, cond, uncond, noise, alpha, beta, zeta, guidance, backend):
    return None


def _register_cuda_fakes() -> None:
    if hasattr(torch.ops.pyops, "_sample_step_cuda"):
        torch.library.register_fake("pyops::_sample_step_cuda")(lambda *a: None)


if _backend.extension_status()[0]:
    _register_cuda_fakes()

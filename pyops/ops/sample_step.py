"""pyops::sample_step: public function, schema, fake, backends (spec:
pyops/reference/sample_step.py).

Destination-passing: ``state`` is read as the current latent and overwritten with the next one
(in place), ``x_out`` (optional) receives the same values in its own dtype, so a CUDA-graph
captured loop keeps static buffers. Coefficients are plain floats decided on the host before
the op runs (see ``reference.step_coefficients``); nothing is read back from the device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor, overlaps
from .._op import binding_fake, define
from ..reference import sample_step as ref
from ..reference.sample_step import StepCoefficients

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


def _fake(state, x_out, cond, uncond, noise, alpha, beta, zeta, guidance, backend):
    return None


@define(OP, fake=_fake, mutates_args=("state", "x_out"))
def sample_step_op(state: torch.Tensor, x_out: Optional[torch.Tensor], cond: torch.Tensor,
                   uncond: Optional[torch.Tensor], noise: Optional[torch.Tensor], alpha: float,
                   beta: float, zeta: float, guidance: float, backend: str) -> None:
    _backend.impl(OP, backend)(state, x_out, cond, uncond, noise, alpha, beta, zeta, guidance)


binding_fake("_sample_step_cuda")  # the CUDA entry point (when built): traceable, opcheck-able


# ---- the public function -----------------------------------------------------------------------
def sample_step(state: torch.Tensor, cond: torch.Tensor, coefficients: StepCoefficients, *,
                uncond: Optional[torch.Tensor] = None, guidance: float = 1.0,
                noise: Optional[torch.Tensor] = None, x_out: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> torch.Tensor:
    """One fused sampler step, in place: ``state <- α·state + β·p + ζ·noise`` with
    ``p = uncond + guidance·(cond − uncond)`` (or ``cond``); ``x_out`` (optional) gets the same
    values in its own dtype. Returns ``state``. All tensors share a shape; fp32/bf16/fp16 each.

    The formula and how (α, β, ζ) fold a schedule step, prediction type and update rule are
    :mod:`pyops.reference.sample_step` (the spec every backend matches bit for bit; build the
    coefficients with ``reference.sample_step.step_coefficients``). state, x_out: written in
    place, contiguous, not overlapping each other. noise: fresh standard normal noise, required
    when ζ ≠ 0 (not read when ζ = 0). backend: ``None`` = auto (the choice and its environment
    overrides are shown by ``pyops.info()``), or ``"reference"``, ``"triton"``, ``"cuda"``.
    Raises TypeError for a tensor that is not fp32/bf16/fp16 or coefficients that are not a
    :class:`StepCoefficients`; ValueError for mismatched shapes or devices, an empty tensor,
    non-contiguous ``state``/``x_out``, overlapping ``x_out``, non-finite coefficients or
    guidance, missing noise, guidance ≠ 1 without ``uncond`` or an unknown backend name;
    RuntimeError for a backend that cannot run on this device. All before any launch.
    """
    op = OP
    check_tensor(op, "state", state, dtypes=FLOAT_DTYPES)
    check_tensor(op, "cond", cond, dtypes=FLOAT_DTYPES)
    for name, t in (("uncond", uncond), ("noise", noise), ("x_out", x_out)):
        if t is not None:
            check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
            if t.shape != state.shape:
                raise ValueError(f"pyops.{op}: {name} has shape {tuple(t.shape)}, state has "
                                 f"{tuple(state.shape)}")
    if cond.shape != state.shape:
        raise ValueError(f"pyops.{op}: cond has shape {tuple(cond.shape)}, state has "
                         f"{tuple(state.shape)}")
    check_same_device(op, state, cond=cond, uncond=uncond, noise=noise, x_out=x_out)
    if not state.is_contiguous() or (x_out is not None and not x_out.is_contiguous()):
        raise ValueError(f"pyops.{op}: state and x_out are written in place and must be "
                         f"contiguous")
    if x_out is not None and (x_out is state or (not torch.compiler.is_compiling()
                                                 and overlaps(x_out, state))):
        raise ValueError(f"pyops.{op}: x_out must not overlap state in memory")
    if not isinstance(coefficients, StepCoefficients):
        raise TypeError(f"pyops.{op}: coefficients must be a StepCoefficients, got "
                        f"{type(coefficients).__name__}")
    a, b, z = coefficients.alpha, coefficients.beta, coefficients.zeta
    if not all(math.isfinite(v) for v in (a, b, z, guidance)):
        raise ValueError(f"pyops.{op}: non-finite coefficient in {coefficients} or guidance "
                         f"{guidance}")
    if z != 0.0 and noise is None:
        raise ValueError(f"pyops.{op}: the step needs fresh noise (zeta={z}) but noise is None")
    if uncond is None and guidance != 1.0:
        raise ValueError(f"pyops.{op}: guidance={guidance} given without uncond")
    cond = cond.contiguous()
    uncond = uncond.contiguous() if uncond is not None else None
    noise = noise.contiguous() if (noise is not None and z != 0.0) else None
    b_name = _backend.resolve(OP, state.device, backend)
    args = (state, x_out, cond, uncond, noise, float(a), float(b), float(z), float(guidance))
    sample_step_op(*args, b_name)
    return state

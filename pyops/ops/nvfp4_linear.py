"""pyops::nvfp4_linear: x (bf16/fp16) x NVFP4 weight (schema, fake, backends, policy).

Backends (destination-passing: ``impl(x, data, scales, global_scale, K, bias, out, variant)``):

* ``triton`` with variant ``"fused"``: W4A16 GEMM dequantizing E2M1 x E4M3 exactly in the main
  loop (``triton_kernels/nvfp4_linear.py``); the decode/small-M path.
* ``triton`` with variant ``"dequant"``: a Triton pass writes the weight in x's dtype (each weight
  rounded once), then cuBLAS via ``torch.nn.functional.linear``: a transient (N, K) buffer, for
  large M where a dense GEMM's speed matters more than the extra weight pass.
* ``reference``: ``pyops/reference/nvfp4_linear.py``.

No native W4A4 (Blackwell ``tl.dot_scaled`` / block-scaled ``torch._scaled_mm``) path yet.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _backend
from ..reference import nvfp4_linear as ref

OP = "nvfp4_linear"
VARIANTS = ("fused", "dequant")


def _reference(x, data, scales, g, K: int, bias, out, variant: str) -> None:
    out.copy_(ref.nvfp4_linear(x, data, scales, g, K, bias, out.dtype))


def _triton(x, data, scales, g, K: int, bias, out, variant: str) -> None:
    from ..triton_kernels import nvfp4_linear as tk
    if variant == "dequant":
        w = torch.empty((data.shape[0], K), dtype=x.dtype, device=x.device)
        tk.dequantize_weight(data, scales, g, K, w)
        b = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
        if b is None:
            torch.mm(x, w.t(), out=out)
        else:
            torch.addmm(b, x, w.t(), out=out)
        return
    tk.nvfp4_linear(x, data, scales, g, K, bias, out)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)


def pick_variant(M: int, N: int, K: int) -> str:
    """Per-shape choice between the fused W4A16 kernel and dequantize + cuBLAS.

    TO BE SET BY MEASUREMENT ON THE GPU (bench/bench_linear.py); unmeasured. Default: fused for
    M < 1024 (weight bytes dominate; the fused kernel reads 4.5 bits a weight), dequantize +
    cuBLAS bf16 above (the extra pass writes 2 bytes a weight, a few % of a large-M GEMM, and the
    GEMM runs at cuBLAS speed). ``PYOPS_NVFP4_LINEAR_VARIANT=fused|dequant`` forces one.
    """
    forced = os.environ.get("PYOPS_NVFP4_LINEAR_VARIANT", "")
    if forced in VARIANTS:
        return forced
    return "fused" if M < 1024 else "dequant"


def resolve(device: torch.device, backend: Optional[str], dtype: torch.dtype) -> str:
    want = _backend.requested(OP, backend)
    if want is not None:
        ok, why = _backend.available(OP, want, device)
        if ok and want == "triton" and dtype == torch.float32:
            ok, why = False, "the Triton W4A16 kernel takes bf16/fp16 activations"
        if not ok:
            raise RuntimeError(f"pyops: backend {want!r} requested for {OP} cannot run: {why}")
        return want
    if device.type == "cuda" and dtype != torch.float32 and \
            _backend.available(OP, "triton", device)[0]:
        return "triton"
    return "reference"


def nvfp4_linear_impl(x, data, scales, global_scale, K: int, bias, backend: str,
                      variant: str) -> torch.Tensor:
    out = torch.empty((x.shape[0], data.shape[0]), dtype=x.dtype, device=x.device)
    _backend.impl(OP, backend)(x, data, scales, global_scale, K, bias, out, variant)
    return out


@torch.library.custom_op("pyops::nvfp4_linear", mutates_args=())
def nvfp4_linear_op(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                    global_scale: torch.Tensor, K: int, bias: Optional[torch.Tensor],
                    backend: str, variant: str) -> torch.Tensor:
    return nvfp4_linear_impl(x, data, scales, global_scale, K, bias, backend, variant)


@nvfp4_linear_op.register_fake
def _(x, data, scales, global_scale, K, bias, backend, variant):
    return x.new_empty((x.shape[0], data.shape[0]))

"""pyops::fp8_linear: FP8 W8A8 GEMM with row-wise scales (schema, fake, backends, policy).

Backends (destination-passing: ``impl(xq, x_scale, wq, w_scale, bias, out)``):

* ``cuda``: ``torch._scaled_mm`` row-wise (scale_a (M,1), scale_b (1,N) fp32, bias, bf16 out):
  cuBLASLt/CUTLASS inside torch, not pyops' own extension, so its availability is decided here
  (CUDA device with sm_90+, K and N multiples of 16, bf16 output) and not by ``pyops._C``.
  It takes the bias in the output dtype, so an fp32 bias is rounded to bf16 first (the spec and
  the Triton kernel add it in fp32): a documented difference of at most one bf16 rounding.
* ``triton``: ``triton_kernels/fp8_linear.py`` (any shape, bf16/fp16/fp32 output).
* ``reference``: ``pyops/reference/fp8_linear.py``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _backend
from ..reference import fp8_linear as ref

OP = "fp8_linear"

# torch._scaled_mm's use_fast_accum: False keeps cuBLAS/CUTLASS promoting the FP8 MMA's partial
# sums into fp32 (accurate on long K). True is a few percent faster; to be decided on the GPU.
SCALED_MM_FAST_ACCUM = os.environ.get("PYOPS_SCALED_MM_FAST_ACCUM", "0") not in ("", "0")


def _reference(xq, xs, wq, ws, bias, out) -> None:
    out.copy_(ref.fp8_linear(xq, xs, wq, ws, bias, out.dtype))


def _triton(xq, xs, wq, ws, bias, out) -> None:
    from ..triton_kernels import fp8_linear as tk
    tk.fp8_linear(xq, xs.reshape(-1).contiguous(), wq, ws.reshape(-1).contiguous(), bias, out)


def _cuda(xq, xs, wq, ws, bias, out) -> None:
    M, N = out.shape
    if bias is not None and bias.dtype != out.dtype:
        bias = bias.to(out.dtype)  # _scaled_mm wants the bias in the output dtype
    torch._scaled_mm(xq.contiguous(), wq.contiguous().t(),
                     scale_a=xs.reshape(M, 1).contiguous(), scale_b=ws.reshape(1, N).contiguous(),
                     bias=bias, out_dtype=out.dtype, use_fast_accum=SCALED_MM_FAST_ACCUM,
                     out=out)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton, min_capability=(8, 9))  # fp8 operands: sm_89+
_backend.register(OP, "cuda", _cuda)


# ---- backend choice -----------------------------------------------------------------------------
def scaled_mm_available(device: torch.device, N: int, K: int, out_dtype: torch.dtype
                        ) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "torch._scaled_mm provider needs CUDA tensors"
    if not hasattr(torch, "_scaled_mm"):
        return False, "this torch has no torch._scaled_mm"
    major, minor = _backend.device_capability(device)
    if (major, minor) < (9, 0):
        return False, f"row-wise torch._scaled_mm needs sm_90+, device is sm_{major}{minor}"
    if K % 16 or N % 16:
        return False, f"torch._scaled_mm needs K and N multiples of 16 (K={K}, N={N})"
    if out_dtype != torch.bfloat16:
        return False, f"row-wise torch._scaled_mm writes bf16 only (asked {out_dtype})"
    return True, "torch._scaled_mm row-wise"


_backend._AVAILABILITY[(OP, "cuda")] = (  # interim; shape-independent part
    lambda device, **shape: scaled_mm_available(torch.device(device), 16, 16, torch.bfloat16))


# ---- auto policy: which GEMM to prefer, per device and shape ------------------------------------
# Measured: NVIDIA H200 (sm_90), 2026-11-30, torch 2.11, Triton 3.6, pyops 8d8b3ea,
# bench/RESULTS.md section 1, table "Linear" (bench/bench_linear.py; x bf16 =
# cuBLAS bf16 ms / ms, the per-token activation quantization included). "cuda"
# (torch._scaled_mm) vs "triton", x bf16:
#   M K N             cuda  triton        M K N              cuda  triton
#   4608 3072 3072    1.24  0.51          9216 3072 3072     1.25  0.62
#   4608 3072 12288   1.38  0.59          9216 3072 12288    1.56  0.64
#   4608 12288 3072   1.28  0.49          9216 12288 3072    1.24  0.52
#   4608 3072 15360   1.52  0.65          32760 5120 5120    1.42  0.63
#   4608 15360 3072   1.28  0.49          1 3072 3072        0.07  0.06
#   16 3072 3072      0.21  0.15          1 12288 3072       0.39  0.29
#   1 3072 12288      0.22  0.23
# _scaled_mm wins every shape but (1, 3072, 12288), where Triton's 0.23 vs 0.22 is inside the
# run-to-run spread of the same table (its "auto" column, which resolves to _scaled_mm at that
# shape, read 0.20): a tie, not a measured Triton win. So on sm_90: _scaled_mm at every shape.
# Other capabilities are unmeasured and keep the previous rule: _scaled_mm wherever it can run
# (rowwise _scaled_mm needs sm_90+, so sm_89 gets Triton through the fallback in resolve()).
# One answer for every device today; a per-capability, per-shape rule goes in auto_backend when
# a measurement shows Triton winning somewhere.


def auto_backend(capability: tuple[int, int], M: int, N: int, K: int) -> str:
    """The GEMM backend auto mode prefers for x (M, K) @ W (N, K).T on a device of compute
    ``capability`` (major, minor): ``"cuda"`` (torch._scaled_mm) or ``"triton"``.

    A preference only: ``resolve`` checks that it can run (``scaled_mm_available``: bf16 output,
    K and N multiples of 16, sm_90+) and falls back otherwise. Source of the sm_90 rule: the
    H200 measurement cited in the comment above; other capabilities unmeasured (same answer).
    """
    return "cuda"


def resolve(device: torch.device, backend: Optional[str], M: int, N: int, K: int,
            out_dtype: torch.dtype) -> str:
    """The backend ``pyops.linear`` runs an FP8 GEMM with (called by ``pyops.qlinear``).

    An explicit ``backend`` (or ``PYOPS_BACKEND_FP8_LINEAR`` / ``PYOPS_BACKEND``) wins and
    raises RuntimeError if it cannot run; auto: the reference off CUDA, else ``auto_backend``'s
    preference if it can run, else the other GEMM, else the reference. The capability comes from
    ``_backend.device_capability`` (cached, safe under torch.compile)."""
    want = _backend.requested(OP, backend)
    if want == "cuda":
        ok, why = scaled_mm_available(device, N, K, out_dtype)
        if not ok:
            raise RuntimeError(f"pyops: backend 'cuda' requested for {OP} cannot run: {why}")
        return want
    if want is not None:
        ok, why = _backend.available(OP, want, device)
        if not ok:
            raise RuntimeError(f"pyops: backend {want!r} requested for {OP} cannot run: {why}")
        return want
    if device.type != "cuda":
        return "reference"
    scaled_mm_ok = scaled_mm_available(device, N, K, out_dtype)[0]
    if scaled_mm_ok and auto_backend(_backend.device_capability(device), M, N, K) == "cuda":
        return "cuda"
    if _backend.available(OP, "triton", device)[0]:
        return "triton"
    return "cuda" if scaled_mm_ok else "reference"


# ---- the op -------------------------------------------------------------------------------------
def fp8_linear_impl(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
                    w_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                    backend: str) -> torch.Tensor:
    out = torch.empty((xq.shape[0], wq.shape[0]), dtype=out_dtype, device=xq.device)
    _backend.impl(OP, backend)(xq, x_scale, wq, w_scale, bias, out)
    return out


@torch.library.custom_op("pyops::fp8_linear", mutates_args=())
def fp8_linear_op(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
                  w_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                  backend: str) -> torch.Tensor:
    return fp8_linear_impl(xq, x_scale, wq, w_scale, bias, out_dtype, backend)


@fp8_linear_op.register_fake
def _(xq, x_scale, wq, w_scale, bias, out_dtype, backend):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)

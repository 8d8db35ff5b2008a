"""weight_only_linear: W8A16 / W4A16 linear for small M (public function, op, backends, policy).

Op ``pyops::weight_only_linear(x, data, scales, global_scale?, fmt, K, bias?, backend) -> out``
on 2-D operands: ``x`` (M, K) bf16/fp16 (fp32: the reference), the weight's tensors in format
``fmt`` ("fp8": data e4m3 (N, K), scales fp32 (N,), no global scale; "nvfp4": data uint8
(N, ceil(K/16)*8), scales e4m3 bytes (N, ceil(K/16)), global_scale fp32 (1,)), ``bias`` (N,) or
None; ``out`` (M, N) in x's dtype. Spec: ``pyops/reference/weight_only_linear.py``: the
activations are not quantized, the weight is decoded exactly. Backends (destination-passing:
``impl(x, data, scales, global_scale, fmt, K, bias, out)``):

* ``cuda``: ``csrc/weight_only_linear.cu``, a weight-streaming skinny GEMM (mma.sync with the
  weight as the A operand, split-K chosen by ``cuda_split_k``). UNVERIFIED ON HARDWARE: it has
  been compiled for sm_90a / sm_100a but never run, so auto mode does not pick it.
* ``triton``: ``triton_kernels/weight_only_linear.py`` (FP8: its W8A16 kernel; NVFP4: the fused
  W4A16 kernel of ``nvfp4_linear``). bf16/fp16 activations.
* ``reference``: ``pyops/reference/weight_only_linear.py``.

The public function is ``weight_only_linear(x, qweight, bias, backend=)``; ``pyops.linear``
routes small-M calls to it where ``pyops/ops/linear.py``'s policy says so (no shape today).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .. import _backend
from .._checks import check_same_device, check_tensor
from .._op import binding_fake, define
from ..reference import weight_only_linear as ref
from ..weights import ACT_DTYPES, FP8Weight, NVFP4Weight, QuantizedWeight, check_linear_bias, \
    linear_lead_shape
from .quantize_fp8 import FP8Tensor

OP = "weight_only_linear"
FORMATS = ref.FORMATS
FORMAT_CODE = {"fp8": 0, "nvfp4": 1}  # pyops_weight_format_t (csrc/include/pyops/...h)
HALF_DTYPES = (torch.bfloat16, torch.float16)
# The CUDA kernel's split-K granularity (k per chunk): PYOPS_WOL_FP8_CHUNK_K /
# PYOPS_WOL_NVFP4_CHUNK_K in csrc/include/pyops/weight_only_linear.h.
CHUNK_K = {"fp8": 64, "nvfp4": 128}
ROWS_PER_CTA = 16      # weight rows per CTA (one m16n8k16 A tile)
M_PER_CTA = 64         # tokens per CTA (grid.z walks M in these tiles)
MIN_CHUNKS_PER_SPLIT = 8  # each split keeps every warp of a CTA busy for a few chunks


# ---- backends: destination-passing --------------------------------------------------------------
def _reference(x, data, scales, g, fmt: str, K: int, bias, out) -> None:
    out.copy_(ref.weight_only_linear(x, data, scales, g, fmt, K, bias, out.dtype))


def _triton(x, data, scales, g, fmt: str, K: int, bias, out) -> None:
    from ..triton_kernels import weight_only_linear as tk
    tk.weight_only_linear(x, data, scales, g, fmt, K, bias, out)


def cuda_split_k(M: int, N: int, K: int, fmt: str, num_sms: int) -> int:
    """The split-K factor the CUDA kernel runs x (M, K) @ W (N, K).T with: enough CTAs for about
    four per SM (a weight-bandwidth-bound kernel needs many loads in flight), each split keeping
    at least ``MIN_CHUNKS_PER_SPLIT`` K chunks. A starting point, not a measurement."""
    chunks = max(1, -(-K // CHUNK_K[fmt]))
    ctas = -(-N // ROWS_PER_CTA) * -(-M // M_PER_CTA)
    want = -(-4 * num_sms // max(ctas, 1))
    return max(1, min(want, chunks // MIN_CHUNKS_PER_SPLIT))


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cuda(x, data, scales, g, fmt: str, K: int, bias, out) -> None:
    M, N = out.shape
    if x.stride(1) != 1 or (M > 1 and x.stride(0) < K):
        x = x.contiguous()  # the kernel reads each row's k contiguously; rows may not overlap
    split = cuda_split_k(M, N, K, fmt, _num_sms(x.device))
    ws = (torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1
          else None)
    torch.ops.pyops._weight_only_linear_cuda(x, data, scales, g, FORMAT_CODE[fmt], bias, split,
                                             out, ws)


def _half(device, dtype=None, **_) -> tuple[bool, str]:
    if dtype is not None and dtype not in HALF_DTYPES:
        return False, f"takes bf16/fp16 activations (x is {dtype}; fp32 runs the reference)"
    return True, ""


def triton_available(device, dtype=None, **_) -> tuple[bool, str]:
    ok, why = _half(device, dtype)
    return _backend.triton_runs(torch.device(device)) if ok else (ok, "Triton " + why)


def cuda_available(device, dtype=None, **_) -> tuple[bool, str]:
    """(ok, why) of the CUDA kernel: bf16/fp16 x (an fp32 x in auto mode must fall through to
    the reference, not reach the binding's dtype check), pyops._C built for the device, sm_89+."""
    ok, why = _half(device, dtype)
    return _backend._cuda_backend_ok(OP, torch.device(device)) if ok else (ok, "the CUDA kernel "
                                                                            + why)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton, available=triton_available)
_backend.register(OP, "cuda", _cuda, min_capability=(8, 9),  # e4m3x2 cvt: sm_89+
                  available=cuda_available)
binding_fake("_weight_only_linear_cuda")


# ---- auto policy --------------------------------------------------------------------------------
# Nothing measured: no GPU has run this op yet, and its CUDA kernel is unverified on hardware.
# So auto mode prefers Triton on every device (a CUDA device without Triton falls through to
# the next backend that can run). To be replaced by a per-capability, per-shape rule from
# bench/bench_linear.py's table once a GPU has measured (and verified) the CUDA kernel.
POLICY_SOURCE = ("unmeasured: no GPU has run weight_only_linear; its CUDA kernel is unverified "
                 "on hardware, so auto prefers Triton")


def auto_backend(capability: tuple[int, int], M: Optional[int] = None, N: Optional[int] = None,
                 K: Optional[int] = None, **_) -> str:
    """The backend auto mode prefers on CUDA: ``"triton"`` everywhere today (``POLICY_SOURCE``).
    A preference only: ``_backend.resolve`` falls back where it cannot run."""
    return "triton"


_backend.register_policy(OP, auto_backend, POLICY_SOURCE)


# ---- the op -------------------------------------------------------------------------------------
def _fake(x, data, scales, global_scale, fmt, K, bias, backend):
    return x.new_empty((x.shape[0], data.shape[0]))


@define(OP, fake=_fake)
def weight_only_linear_op(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                          global_scale: Optional[torch.Tensor], fmt: str, K: int,
                          bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    out = torch.empty((x.shape[0], data.shape[0]), dtype=x.dtype, device=x.device)
    _backend.impl(OP, backend)(x, data, scales, global_scale, fmt, K, bias, out)
    return out


# ---- public function ----------------------------------------------------------------------------
def weight_operands(qweight: QuantizedWeight) -> tuple:
    """(data, scales, global_scale, fmt, N, K) of a quantized weight, as the op takes them."""
    if isinstance(qweight, FP8Weight):
        N, K = qweight.shape
        check_same_device("linear", qweight.data, scale=qweight.scale)
        return qweight.data, qweight.scale.reshape(N), None, "fp8", N, K
    if isinstance(qweight, NVFP4Weight):
        N, K = qweight.shape
        check_same_device("linear", qweight.data, scales=qweight.scales,
                          global_scale=qweight.global_scale)
        return (qweight.data, qweight.scales.view(torch.uint8), qweight.global_scale, "nvfp4",
                N, K)
    raise TypeError(f"pyops.weight_only_linear: qweight must come from pyops.quantize_weight, "
                    f"got {type(qweight).__name__}")


def weight_only_linear(x: Union[torch.Tensor, FP8Tensor], qweight: QuantizedWeight,
                       bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None
                       ) -> torch.Tensor:
    """``x @ W.T + bias`` with a quantized weight and unquantized activations (W8A16 / W4A16):
    (..., K) -> (..., N) in x's dtype. The small-M path (M = tokens = prod of x's leading dims,
    up to about 64): a weight-bandwidth-bound problem, where reading the weight in 8 or 4.5 bits
    is the win and quantizing the activations would only add a pass.

    x: (..., K) bf16/fp16 (fp32: the reference only), or an ``FP8Tensor`` (dequantized first).
    qweight: ``FP8Weight`` (W8A16) or ``NVFP4Weight`` (W4A16) from ``pyops.quantize_weight``.
    bias: (N,) float or None, added in fp32. backend: ``"cuda"`` (pyops' weight-streaming
    kernel, unverified on hardware), ``"triton"``, ``"reference"`` or None (auto: the reference
    off CUDA, ``auto_backend``'s preference on CUDA); env ``PYOPS_BACKEND_WEIGHT_ONLY_LINEAR`` /
    ``PYOPS_BACKEND``. Error: the weight is decoded exactly and multiplied with fp32
    accumulation, one rounding to x's dtype (``pyops/reference/weight_only_linear.py``).
    Errors (before any launch): TypeError for a wrong dtype or weight type; ValueError for a
    shape or device mismatch; RuntimeError for a requested backend that cannot run.
    """
    data, scales, g, fmt, N, K = weight_operands(qweight)
    if isinstance(x, FP8Tensor):
        x = x.dequantize()
    check_tensor("weight_only_linear", "x", x, dtypes=ACT_DTYPES)
    lead = linear_lead_shape(x.shape, K, "x")
    if x.device != data.device:
        raise ValueError(f"pyops.linear: x is on {x.device} but the weight is on {data.device}")
    check_linear_bias(bias, N, x)
    if bias is not None:
        bias = bias.contiguous()  # both kernels read bias[n] at bias + n
    M = math.prod(lead)
    b = _backend.resolve(OP, x.device, backend, M=M, N=N, K=K, dtype=x.dtype)
    y = weight_only_linear_op(x.reshape(M, K), data, scales, g, fmt, K, bias, b)
    return y.view(*lead, N)

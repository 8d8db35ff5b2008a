"""gelu_quant: GELU + per-token FP8 e4m3 quantization in one pass (public function, op, backends;
spec: pyops/reference/gelu_quant.py).

The op ``pyops::gelu_quant(x, approximate, y_dtype, backend)`` takes x (..., K) with any strides
(arguments already checked by ``pyops.gelu_quant``) and returns ``[q, scale]`` or, when
``y_dtype`` is given, ``[q, scale, y]``: q float8_e4m3fn with x's shape, scale fp32 (M,) for the
M = numel / K rows, y (x's shape, ``y_dtype``). A list because a schema cannot return an optional
tensor.

Backends are destination-passing on the (M, K) view: ``fn(x2, approximate, q, q_scale, y)``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, as_2d, check_tensor
from .._op import binding_fake, define
from ..reference import gelu_quant as ref
from .quantize_fp8 import FP8Tensor

OP = "gelu_quant"
APPROX_CODE = {"tanh": 0, "none": 1}  # the C ABI's PYOPS_GELU_TANH / PYOPS_GELU_ERF


# ---- backends ------------------------------------------------------------------------------------
def _reference(x2, approximate, q, q_scale, y) -> None:
    rq, rs, ry = ref.gelu_quant(x2, approximate)
    q.copy_(rq)
    q_scale.copy_(rs)
    if y is not None:
        y.copy_(ry)


def _triton(x2, approximate, q, q_scale, y) -> None:
    from ..triton_kernels import gelu_quant as tk
    tk.gelu_quant(x2, APPROX_CODE[approximate], q, q_scale, y)


def _cuda(x2, approximate, q, q_scale, y) -> None:
    torch.ops.pyops._gelu_quant_cuda(x2, APPROX_CODE[approximate], q, q_scale, y)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)
_backend.register(OP, "cuda", _cuda)


# ---- the op --------------------------------------------------------------------------------------
def _fake(x, approximate, y_dtype, backend):
    K = x.shape[-1]
    M = x.numel() // K if x.dim() != 2 else x.shape[0]
    out = [x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
           x.new_empty((M,), dtype=torch.float32)]
    if y_dtype is not None:
        out.append(x.new_empty(x.shape, dtype=y_dtype))
    return out


@define(OP, fake=_fake)
def gelu_quant_op(x: torch.Tensor, approximate: str, y_dtype: Optional[torch.dtype],
                  backend: str) -> list[torch.Tensor]:
    K = x.shape[-1]
    x2 = as_2d(x)
    M = x2.shape[0]
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    y = torch.empty((M, K), dtype=y_dtype, device=x.device) if y_dtype is not None else None
    if M > 0 and K > 0:
        _backend.impl(OP, backend)(x2, approximate, q, s, y)
    out = [q.view(x.shape), s]
    if y is not None:
        out.append(y.view(x.shape))
    return out


binding_fake("_gelu_quant_cuda")  # the CUDA entry point (when built): traceable, opcheck-able


# ---- public API ---------------------------------------------------------------------------------
def gelu_quant(x: torch.Tensor, *, approximate: str = "tanh",
               y_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None
               ) -> Union[FP8Tensor, tuple[FP8Tensor, torch.Tensor]]:
    """GELU + per-token FP8 e4m3 quantization in one pass: the input of an FP8 W8A8 MLP-out
    linear (``pyops.linear(pyops.gelu_quant(h), qweight, bias)``).

    ``y = GELU(x)`` in fp32, then exactly ``pyops.quantize_fp8(y, "row")`` of that fp32 y
    (spec: ``pyops/reference/gelu_quant.py``). GELU from Hendrycks & Gimpel 2016, "Gaussian
    Error Linear Units (GELUs)", arXiv:1606.08415:

    * ``approximate="tanh"``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, the
      ``torch.nn.GELU(approximate="tanh")`` of diffusers' DiT MLPs (Flux, SD3, Wan, HunyuanVideo);
    * ``approximate="none"``: ``0.5 x (1 + erf(x / sqrt(2)))``, ``torch.nn.GELU()``.

    x: (..., K), at least 1-D, bf16/fp16/fp32, any strides, not empty; CUDA (or CPU: the
        reference; the Triton interpreter with ``TRITON_INTERPRET=1``).
    y_dtype: None, or torch.float32 / bfloat16 / float16 to also return y in that dtype. With
        float32, ``quantize_fp8(y, "row")`` reproduces the returned q and scale bit for bit.
    backend: ``"cuda" | "triton" | "reference"`` or None (auto; env ``PYOPS_BACKEND_GELU_QUANT``
        / ``PYOPS_BACKEND``).

    Returns a ``FP8Tensor`` (data: x's shape, float8_e4m3fn; scale: (*x.shape[:-1], 1) fp32,
    the dequantization scale per row; granularity "row"; dtype x.dtype), or ``(FP8Tensor, y)``
    when y_dtype is given. The backends' y differ from the reference's by at most
    4 * 2^-24 * (|x| + |y|) (their own tanh/erf; ``pyops/reference/gelu_quant.py``). A row whose
    x holds inf/NaN gets scale NaN and codes 0 (dequantizes to NaN); other rows are unaffected.

    Errors, raised before any launch: TypeError (x not a tensor, dtype not bf16/fp16/fp32,
    y_dtype), ValueError (0-dim or empty x, x not on CUDA/CPU, unknown approximate or backend),
    RuntimeError (an explicitly requested backend that cannot run here, e.g. ``"cuda"`` on CPU
    tensors).
    """
    check_tensor(OP, "x", x)
    if not isinstance(approximate, str) or approximate not in APPROX_CODE:
        raise ValueError(f"pyops.{OP}: unknown approximate {approximate!r}; expected 'tanh' or "
                         f"'none' (as torch.nn.GELU)")
    if y_dtype is not None and y_dtype not in FLOAT_DTYPES:
        raise TypeError(f"pyops.{OP}: y_dtype must be None, torch.float32, torch.bfloat16 or "
                        f"torch.float16, got {y_dtype!r}")
    b = _backend.resolve(OP, x.device, backend)
    out = gelu_quant_op(x, approximate, y_dtype, b)
    fp8 = FP8Tensor(out[0], out[1].view(*x.shape[:-1], 1), "row", x.dtype)
    if y_dtype is None:
        return fp8
    return fp8, out[2]

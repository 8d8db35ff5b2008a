"""Quantized linear layers: ``quantize_weight`` and ``linear``.

    qw = pyops.quantize_weight(w, "fp8")      # or "nvfp4"; w is (out_features, in_features)
    y  = pyops.linear(x, qw, bias)            # x (..., K) bf16/fp16 (or an FP8Tensor) -> (..., N)

* ``"fp8"``: W8A8. Weight e4m3 with one fp32 scale per output channel (``quantize_fp8(w, "row")``);
  activations quantized per token on the fly (``quantize_fp8(x, "row")``) unless ``x`` is an
  already-quantized row-granularity ``FP8Tensor`` (e.g. from ``pyops.norm_modulate_quant``).
  GEMM: ``torch._scaled_mm`` row-wise or the Triton kernel (policy in ``pyops/ops/fp8_linear.py``).
* ``"nvfp4"``: W4A16. Weight E2M1 + E4M3 per 16 + fp32 global (``quantize_nvfp4``), activations
  stay bf16/fp16; the weight is dequantized exactly inside the GEMM (Hopper has no FP4 MMA).
  On sm_100/103/120/121 the ``"w4a4"`` variant is chosen instead (UNVERIFIED ON HARDWARE):
  activations quantized to NVFP4 per call, native block-scaled FP4 GEMM (``torch._scaled_mm``)
  with the weight's 128x4-swizzled scales (``NVFP4Weight.swizzled_scales()``, built once, cached).

Quantized weights hold plain tensors plus small metadata: ``state_dict()`` /
``from_state_dict()`` and ``pyops.nn.QuantLinear`` buffers save and load with ``torch.save``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ._checks import check_same_device, check_tensor, eager_fast_path
from .ops import fp8_linear as _fp8
from .ops import nvfp4_linear as _nv4
from .ops.quantize_fp8 import FP8Tensor, dequantize_fp8, quantize_fp8
from .ops.quantize_nvfp4 import dequantize_nvfp4, quantize_nvfp4

FORMATS = ("fp8", "nvfp4")
_FORMAT_ALIASES = {"fp8": "fp8", "fp8_e4m3": "fp8", "e4m3": "fp8", "w8a8": "fp8",
                   "nvfp4": "nvfp4", "fp4": "nvfp4", "w4a16": "nvfp4"}
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def canonical_format(fmt) -> str:
    try:
        return _FORMAT_ALIASES[fmt.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"pyops: unknown weight format {fmt!r}; expected one of "
                         f"{FORMATS}") from None


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"pyops: unknown dtype {name!r}")
    return d


class QuantizedWeight:
    """Common surface of the packed weights: shape, nbytes, dequantize, state dict."""
    format: str = ""

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def metadata(self) -> dict:
        return {"format": self.format, "shape": list(self.shape), "dtype": _dtype_name(self.dtype)}

    def state_dict(self) -> dict:
        return dict(self.tensors())

    def to(self, device) -> "QuantizedWeight":
        return type(self).from_state_dict({k: v.to(device) for k, v in self.tensors().items()},
                                          self.metadata())

    def __repr__(self) -> str:
        N, K = self.shape
        return (f"{type(self).__name__}(out_features={N}, in_features={K}, {self._describe()}, "
                f"nbytes={self.nbytes} ({self.bits_per_weight():.2f} bits/weight), "
                f"dtype={_dtype_name(self.dtype)}, device={self.device})")


@dataclass(repr=False)
class FP8Weight(QuantizedWeight):
    """e4m3 codes (N, K) and fp32 per-output-channel scales (N, 1): ``W ~= data * scale``."""
    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype = torch.bfloat16  # the dtype the weight had (dequantize's default)
    format = "fp8"

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def tensors(self) -> dict:
        return {"data": self.data, "scale": self.scale}

    def _describe(self) -> str:
        return "e4m3 + fp32 per-channel scales"

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_fp8(self.data, self.scale, "row", dtype or self.dtype)

    @classmethod
    def from_state_dict(cls, tensors: dict, metadata: dict) -> "FP8Weight":
        return cls(tensors["data"], tensors["scale"], _dtype_from_name(metadata["dtype"]))


@dataclass(repr=False)
class NVFP4Weight(QuantizedWeight):
    """NVFP4: ``data`` uint8 (N, ceil(K/16)*8), ``scales`` e4m3 (N, ceil(K/16)),
    ``global_scale`` fp32 (1,): ``W ~= e2m1 * scales * global_scale``."""
    data: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    K: int
    dtype: torch.dtype = torch.bfloat16
    # 128x4-swizzled, padded copy of ``scales`` for the W4A4 GEMM (not saved: derived data)
    _scales_swizzled: Optional[torch.Tensor] = field(default=None, compare=False)
    format = "nvfp4"

    def swizzled_scales(self) -> torch.Tensor:
        """``scales`` in the Blackwell block-scaled-GEMM layout: e4m3 (roundup(N,128),
        roundup(ceil(K/16),4)), 128x4 tiles (``pyops.reference.quantize_nvfp4.swizzle_scales``).
        Built once and cached on this object, and per ``scales`` tensor across NVFP4Weight
        objects that share it (``QuantLinear.qweight`` builds a new one per forward)."""
        if self._scales_swizzled is not None:
            return self._scales_swizzled
        s = self.scales
        if torch.compiler.is_compiling():  # traced: no Python-side cache
            return _swizzle_scales(s)
        hit = _SWIZZLED.get(s)
        if hit is None or hit[0] != s._version:
            hit = (s._version, _swizzle_scales(s))
            _SWIZZLED[s] = hit
        self._scales_swizzled = hit[1]
        return hit[1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.K))

    def tensors(self) -> dict:
        return {"data": self.data, "scales": self.scales, "global_scale": self.global_scale}

    def _describe(self) -> str:
        return "e2m1 + e4m3 per-16 scales + fp32 global scale"

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_nvfp4(self.data, self.scales, self.global_scale, self.K,
                                dtype=dtype or self.dtype)

    @classmethod
    def from_state_dict(cls, tensors: dict, metadata: dict) -> "NVFP4Weight":
        return cls(tensors["data"], tensors["scales"], tensors["global_scale"],
                   int(metadata["shape"][1]), _dtype_from_name(metadata["dtype"]))


_SWIZZLED = WeakTensorKeyDictionary()  # scales tensor -> (its _version, swizzled copy)


def _swizzle_scales(s: torch.Tensor) -> torch.Tensor:
    from .reference.quantize_nvfp4 import swizzle_scales
    return swizzle_scales(s.view(torch.float8_e4m3fn)).contiguous()


def weight_from_state_dict(tensors: dict, metadata: dict) -> QuantizedWeight:
    fmt = canonical_format(metadata["format"])
    return (FP8Weight if fmt == "fp8" else NVFP4Weight).from_state_dict(tensors, metadata)


def quantize_weight(w: torch.Tensor, format: str = "fp8", *, backend: Optional[str] = None,
                    swizzle_scales: Optional[bool] = None) -> QuantizedWeight:
    """Pack a (out_features, in_features) weight as ``"fp8"`` or ``"nvfp4"`` (see module doc).

    swizzle_scales (nvfp4): also build the 128x4-swizzled scales the W4A4 GEMM reads, now
    (True), never here (False: lazily at the first W4A4 call) or when ``w``'s device has native
    NVFP4 (None)."""
    fmt = canonical_format(format)
    if isinstance(w, torch.nn.Parameter):
        w = w.detach()
    check_tensor("quantize_weight", "w", w)
    if w.dim() != 2:
        raise ValueError(f"pyops.quantize_weight: w must be 2-D (out_features, in_features), got "
                         f"shape {tuple(w.shape)}")
    if fmt == "fp8":
        t = quantize_fp8(w, "row", backend=backend)
        return FP8Weight(t.data.contiguous(), t.scale.reshape(-1, 1).contiguous(), w.dtype)
    t = quantize_nvfp4(w, backend=backend)
    qw = NVFP4Weight(t.data.contiguous(), t.scales.contiguous(), t.global_scale,
                     w.shape[1], w.dtype)
    if swizzle_scales is None:
        swizzle_scales = _nv4.native_fp4_supported(w.device)[0]
    if swizzle_scales:
        qw.swizzled_scales()
    return qw


# ---- linear -------------------------------------------------------------------------------------
def _check_bias(bias, N: int, ref: torch.Tensor) -> None:
    if bias is None:
        return
    check_tensor("linear", "bias", bias)
    if bias.shape != (N,):
        raise ValueError(f"pyops.linear: bias has shape {tuple(bias.shape)}, expected ({N},)")
    check_same_device("linear", ref, bias=bias)


def linear(x: Union[torch.Tensor, FP8Tensor], qweight: QuantizedWeight,
           bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None
           ) -> torch.Tensor:
    """``x @ W.T + bias`` with a quantized weight; output (..., N) in x's dtype.

    x: (..., K) bf16/fp16 (fp32 too; the reference computes it) or, for FP8 weights, an
    ``FP8Tensor`` with row (per-token) granularity whose ``dtype`` sets the output dtype.
    backend: ``"cuda"`` (FP8 only: torch._scaled_mm), ``"triton"``, ``"reference"`` or None
    (auto: per-shape policy on CUDA, the reference on CPU; env ``PYOPS_BACKEND_FP8_LINEAR`` /
    ``PYOPS_BACKEND_NVFP4_LINEAR`` / ``PYOPS_BACKEND``).
    """
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"pyops.linear: qweight must come from pyops.quantize_weight, got "
                        f"{type(qweight).__name__}")
    N, K = qweight.shape
    if qweight.format == "fp8":
        return _linear_fp8(x, qweight, bias, backend, N, K)
    if isinstance(x, FP8Tensor):  # W4A16 takes the activation in high precision
        x = x.dequantize()
    return _linear_nvfp4(x, qweight, bias, backend, N, K)


def _lead_shape(x_shape, K: int, what: str):
    if len(x_shape) < 1 or x_shape[-1] != K:
        raise ValueError(f"pyops.linear: {what} has shape {tuple(x_shape)}; the weight's "
                         f"in_features is {K}")
    return tuple(x_shape[:-1])


def _linear_fp8(x, qw: FP8Weight, bias, backend, N: int, K: int) -> torch.Tensor:
    if isinstance(x, FP8Tensor):
        if x.granularity != "row":
            raise ValueError(f"pyops.linear: a pre-quantized FP8Tensor input must have row "
                             f"(per-token) granularity, got {x.granularity!r}")
        check_tensor("linear", "x.data", x.data, dtypes=(torch.float8_e4m3fn,))
        check_tensor("linear", "x.scale", x.scale, dtypes=(torch.float32,))
        lead = _lead_shape(x.data.shape, K, "x.data")
        M = math.prod(lead)
        if x.scale.numel() != M:
            raise ValueError(f"pyops.linear: x.scale has {x.scale.numel()} elements, expected "
                             f"one per row ({M})")
        out_dtype = x.dtype if x.dtype in _ACT_DTYPES else torch.bfloat16
        xq, xs, dev = x.data.reshape(M, K), x.scale.reshape(M), x.data.device
        check_same_device("linear", x.data, scale=x.scale)
    else:
        check_tensor("linear", "x", x, dtypes=_ACT_DTYPES)
        lead = _lead_shape(x.shape, K, "x")
        M = math.prod(lead)
        out_dtype, dev = x.dtype, x.device
        xq = xs = None
    if dev != qw.data.device:
        raise ValueError(f"pyops.linear: x is on {dev} but the weight is on {qw.data.device}")
    check_same_device("linear", qw.data, scale=qw.scale)
    _check_bias(bias, N, qw.data)
    b = _fp8.resolve(dev, backend, M, N, K, out_dtype)
    if xq is None:
        # The GEMM backend names ("cuda" = torch._scaled_mm) are not the quantizer's, so the
        # quantizer picks its own (all give identical bits); the reference GEMM gets the reference.
        t = quantize_fp8(x, "row", backend="reference" if b == "reference" else None)
        xq, xs = t.data.reshape(M, K), t.scale.reshape(M)
    ws = qw.scale.reshape(N)
    if eager_fast_path(xq, xs, qw.data, ws, bias):
        y = _fp8.fp8_linear_impl(xq, xs, qw.data, ws, bias, out_dtype, b)
    else:
        y = torch.ops.pyops.fp8_linear(xq, xs, qw.data, ws, bias, out_dtype, b)
    return y.view(*lead, N)


def _linear_nvfp4(x, qw: NVFP4Weight, bias, backend, N: int, K: int) -> torch.Tensor:
    check_tensor("linear", "x", x, dtypes=_ACT_DTYPES)
    lead = _lead_shape(x.shape, K, "x")
    M = math.prod(lead)
    check_same_device("linear", qw.data, x=x, scales=qw.scales, global_scale=qw.global_scale)
    _check_bias(bias, N, x)
    b = _nv4.resolve(x.device, backend, x.dtype)
    x2 = x.reshape(M, K)
    # native W4A4 only where the Triton backend runs on an NVFP4 device (never for the reference)
    variant = _nv4.pick_variant(M, N, K, x.device if b == "triton" else None)
    # the "w4a4" variant takes the swizzled scales (its contract; see pyops/ops/nvfp4_linear.py)
    scales = (qw.swizzled_scales() if variant == "w4a4" else qw.scales).view(torch.uint8)
    if eager_fast_path(x2, qw.data, scales, qw.global_scale, bias):
        y = _nv4.nvfp4_linear_impl(x2, qw.data, scales, qw.global_scale, K, bias, b, variant)
    else:
        y = torch.ops.pyops.nvfp4_linear(x2, qw.data, scales, qw.global_scale, K, bias, b,
                                         variant)
    return y.view(*lead, N)

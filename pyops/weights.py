"""Quantized weight containers and ``quantize_weight``.

    qw = pyops.quantize_weight(w, "fp8")      # or "nvfp4"; w is (out_features, in_features)
    y  = pyops.linear(x, qw, bias)            # pyops/ops/linear.py

* ``"fp8"`` (``FP8Weight``): e4m3 codes (N, K) with one fp32 scale per output channel
  (``quantize_fp8(w, "row")``); the W8A8 GEMM is ``pyops/ops/fp8_linear.py``.
* ``"nvfp4"`` (``NVFP4Weight``): E2M1 codes packed two a byte + E4M3 scale per 16 + fp32 global
  (``quantize_nvfp4``); the GEMM is ``pyops/ops/nvfp4_linear.py``. The 128x4-swizzled scale copy
  that the W4A4 (native FP4) GEMM reads is derived data, built once and cached
  (``NVFP4Weight.swizzled_scales()``).

Quantized weights hold plain tensors plus small metadata: ``state_dict()`` / ``metadata()`` /
``from_state_dict()`` (and ``pyops.nn.QuantLinear`` buffers) save and load with ``torch.save``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ._checks import check_same_device, check_tensor
from .ops.quantize_fp8 import dequantize_fp8, quantize_fp8
from .ops.quantize_nvfp4 import dequantize_nvfp4, quantize_nvfp4

FORMATS = ("fp8", "nvfp4")
# activation dtypes a quantized linear takes (fp32: the reference only, for NVFP4 weights)
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FORMAT_ALIASES = {"fp8": "fp8", "fp8_e4m3": "fp8", "e4m3": "fp8", "w8a8": "fp8",
                   "nvfp4": "nvfp4", "fp4": "nvfp4", "w4a16": "nvfp4"}


def canonical_format(fmt) -> str:
    """``"fp8"`` or ``"nvfp4"`` for a format name or alias (``"e4m3"``, ``"w8a8"``, ``"fp4"``,
    ``"w4a16"``, ...; case-insensitive). ValueError for anything else."""
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
    """The ``FP8Weight`` / ``NVFP4Weight`` that ``state_dict()`` + ``metadata()`` describe."""
    fmt = canonical_format(metadata["format"])
    return (FP8Weight if fmt == "fp8" else NVFP4Weight).from_state_dict(tensors, metadata)


def quantize_weight(w: torch.Tensor, format: str = "fp8", *, backend: Optional[str] = None,
                    swizzle_scales: Optional[bool] = None) -> QuantizedWeight:
    """Pack a weight ``w`` (out_features N, in_features K), bf16/fp16/fp32, for ``pyops.linear``.

    format: ``"fp8"`` -> ``FP8Weight`` (``quantize_fp8(w, "row")``: e4m3 + one fp32 scale per
    output channel, amax / 448) or ``"nvfp4"`` -> ``NVFP4Weight`` (``quantize_nvfp4(w)``: E2M1 +
    E4M3 per 16 + fp32 global amax / (448 * 6)); aliases as ``canonical_format``. The weight
    remembers ``w.dtype`` (``dequantize``'s default). backend: the quantizer's (bit-identical
    across backends). swizzle_scales (nvfp4): also build the 128x4-swizzled scales the W4A4 GEMM
    reads, now (True), never here (False: lazily at the first W4A4 call) or when ``w``'s device
    has native NVFP4 (None: ``pyops.ops.nvfp4_linear.reads_swizzled_scales``). Errors:
    ValueError for an unknown format or a w that is not 2-D; TypeError for a non-float w."""
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
        from .ops.nvfp4_linear import reads_swizzled_scales  # (that module imports this one)
        swizzle_scales = reads_swizzled_scales(w.device)
    if swizzle_scales:
        qw.swizzled_scales()
    return qw


# ---- operand checks shared by the quantized linear ops ------------------------------------------
def linear_lead_shape(x_shape, K: int, what: str) -> tuple:
    """The leading dims of a linear input of shape (..., K); ValueError if the last is not K."""
    if len(x_shape) < 1 or x_shape[-1] != K:
        raise ValueError(f"pyops.linear: {what} has shape {tuple(x_shape)}; the weight's "
                         f"in_features is {K}")
    return tuple(x_shape[:-1])


def check_linear_bias(bias: Optional[torch.Tensor], N: int, ref: torch.Tensor) -> None:
    """bias: None or a float (N,) tensor on ``ref``'s device (TypeError / ValueError)."""
    if bias is None:
        return
    check_tensor("linear", "bias", bias)
    if bias.shape != (N,):
        raise ValueError(f"pyops.linear: bias has shape {tuple(bias.shape)}, expected ({N},)")
    check_same_device("linear", ref, bias=bias)

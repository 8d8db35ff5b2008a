"""GELU + per-token FP8 e4m3 quantization: the reference and spec.

Input: ``x`` viewed as (M, K) rows (tokens), bf16/fp16/fp32, any strides.

Everything in fp32 (x widened exactly), each operation rounded on its own, in this order:

    xf = float32(x)
    approximate="tanh" (Hendrycks & Gimpel 2016, "Gaussian Error Linear Units (GELUs)",
    arXiv:1606.08415, section 2; the formula of torch.nn.GELU(approximate="tanh")):
        inner = xf + 0.044715 * ((xf * xf) * xf)
        t     = tanh(sqrt(2/pi) * inner)
    approximate="none" (the exact GELU, x * Phi(x), same paper; torch.nn.GELU()):
        t     = erf(xf * (1/sqrt(2)))
    y = (0.5 * xf) * (1 + t)
    q, s = quantize_fp8(y, "row")    # pyops/reference/quantize_fp8.py, bit for bit, on fp32 y

The constants are the fp32 roundings of 0.044715, sqrt(2/pi) = 0.7978845608028654 and
1/sqrt(2) = 0.7071067811865476 (``GELU_KAPPA``, ``SQRT_2_OVER_PI``, ``SQRT1_2``). ``q``/``s``
follow the FP8 per-token spec exactly: ``s = max(amax|y| / 448, FLT_MIN)``,
``q = e4m3(clamp(y / s, -448, 448))``. A row whose y holds inf/NaN gets ``s = NaN`` and codes 0;
y is non-finite exactly where x is (+inf -> +inf; -inf and NaN -> NaN), so a non-finite x poisons
its own row only.

Backends compute tanh / erf their own way (torch's CPU and CUDA functions differ too), so their
y differs from this one by a few fp32 ulps *of the terms of the formula*: the contract is

    |y_backend - y_reference| <= Y_ULPS * 2^-24 * (|xf| + |y_reference|)

(``Y_ULPS`` below; a bound relative to ``|y|`` alone cannot hold for x below about -3, where
``1 + t`` cancels and this very reference is off from the exact GELU by many ulps of y). What
every backend must honour exactly is the last line: the q/s it returns are ``quantize_fp8`` of
the fp32 y it computed (and returns, when asked for y in fp32).
"""
from __future__ import annotations

import math

import torch

from .quantize_fp8 import quantize_fp8

APPROXIMATE = ("tanh", "none")
GELU_KAPPA = 0.044715  # the cubic term's coefficient (Hendrycks & Gimpel 2016, section 2)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # 0.7978845608028654
SQRT1_2 = math.sqrt(0.5)  # 1/sqrt(2) = 0.7071067811865476
Y_ULPS = 4  # backend y vs this y, in 2^-24 (|x| + |y|) (see the module docstring)


def _f32(c: float, like: torch.Tensor) -> torch.Tensor:
    """The fp32 rounding of a constant, as a 0-dim tensor (so no backend widens it)."""
    return torch.tensor(c, dtype=torch.float32, device=like.device)


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """y = GELU(x) in fp32 for any float x, each operation rounded in fp32 (the spec above)."""
    if approximate not in APPROXIMATE:
        raise ValueError(f"unknown approximate {approximate!r}; expected one of {APPROXIMATE}")
    xf = x.float()
    if approximate == "tanh":
        inner = xf + _f32(GELU_KAPPA, xf) * ((xf * xf) * xf)
        t = torch.tanh(_f32(SQRT_2_OVER_PI, xf) * inner)
    else:
        t = torch.erf(xf * _f32(SQRT1_2, xf))
    return (_f32(0.5, xf) * xf) * (1.0 + t)


def gelu_quant(x: torch.Tensor, approximate: str = "tanh"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> (q float8_e4m3fn (M, K), s fp32 (M,), y fp32 (M, K))."""
    y = gelu(x, approximate)
    q, s = quantize_fp8(y, "row")
    return q, s, y

"""Fused LayerNorm/RMSNorm + adaLN modulate + per-token FP8 quantization: the reference and spec.

Input: ``x`` viewed as (M, D) rows (tokens), bf16/fp16/fp32. Optional per-channel ``weight`` and
``bias`` (D,), optional modulation ``shift`` / ``scale`` given per *modulation row* as (Bm, D):
row m of x uses modulation row ``m // (M // Bm)`` (Bm = 1 broadcasts one vector to every token;
for x = (B, N, D) and shift (B, D), every token of batch b uses shift[b]).

Everything in fp32 (inputs widened exactly), each operation rounded on its own:

    xf   = float32(x)
    LayerNorm ("layer"), two-pass:
        mean = sum(xf) / D                         # over the row
        d    = xf - mean
        var  = sum(d * d) / D                      # biased variance, as torch.nn.LayerNorm
        rstd = 1 / sqrt(var + eps)
        n    = d * rstd
    RMSNorm ("rms"):
        ms   = sum(xf * xf) / D
        rstd = 1 / sqrt(ms + eps)
        n    = xf * rstd
    n = n * float32(weight)          if weight is given
    n = n + float32(bias)            if bias is given
    y = n * (1 + float32(scale))     if scale is given   ((1 + scale) rounded to fp32 first)
    y = y + float32(shift)           if shift is given
    q, s = quantize_fp8(y, "row")    # pyops/reference/quantize_fp8.py, bit for bit, on fp32 y

so ``q``/``s`` follow the FP8 per-token spec exactly: ``s = max(amax|y| / 448, FLT_MIN)``,
``q = e4m3(clamp(y / s, -448, 448))``; a row whose y holds inf/NaN (any non-finite x in the row
makes the whole row NaN through the mean) gets ``s = NaN`` and codes 0.

Backends may sum in another order (the row reductions), so their y differs from this one by a
few fp32 ulps; what every backend must honour exactly is the last line: the q/s it returns are
``quantize_fp8`` of the fp32 y it computed (and returns, when asked for y in fp32).
"""
from __future__ import annotations

from typing import Optional

import torch

from .quantize_fp8 import quantize_fp8

NORMS = ("layer", "rms")


def expand_modulation(t: Optional[torch.Tensor], M: int) -> Optional[torch.Tensor]:
    """(Bm, D) modulation rows -> (M, D): modulation row i covers rows [i*M/Bm, (i+1)*M/Bm)."""
    if t is None:
        return None
    t = t.reshape(-1, t.shape[-1])
    Bm = t.shape[0]
    if M % Bm != 0:
        raise ValueError(f"{Bm} modulation rows do not divide {M} rows")
    return t.float().repeat_interleave(M // Bm, dim=0)


def norm_modulate(x: torch.Tensor, shift: Optional[torch.Tensor] = None,
                  scale: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, norm: str = "layer",
                  eps: float = 1e-6) -> torch.Tensor:
    """y in fp32 for x (M, D); shift/scale (Bm, D) (or None); weight/bias (D,) (or None)."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    M, D = x.shape
    xf = x.float()
    if norm == "layer":
        mean = xf.sum(dim=1, keepdim=True) / D
        d = xf - mean
        var = (d * d).sum(dim=1, keepdim=True) / D
        n = d * (1.0 / torch.sqrt(var + eps))
    else:
        ms = (xf * xf).sum(dim=1, keepdim=True) / D
        n = xf * (1.0 / torch.sqrt(ms + eps))
    if weight is not None:
        n = n * weight.float()
    if bias is not None:
        n = n + bias.float()
    if scale is not None:
        n = n * (1.0 + expand_modulation(scale, M))
    if shift is not None:
        n = n + expand_modulation(shift, M)
    return n


def norm_modulate_quant(x: torch.Tensor, shift: Optional[torch.Tensor] = None,
                        scale: Optional[torch.Tensor] = None,
                        weight: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None, norm: str = "layer",
                        eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, D) -> (q float8_e4m3fn (M, D), s fp32 (M,), y fp32 (M, D))."""
    y = norm_modulate(x, shift, scale, weight, bias, norm, eps)
    q, s = quantize_fp8(y, "row")
    return q, s, y

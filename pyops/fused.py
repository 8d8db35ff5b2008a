"""Fused DiT-block ops: ``norm_modulate_quant`` (LayerNorm/RMSNorm + adaLN modulate + FP8)."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import _backend
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, eager_fast_path
from .ops import norm_modulate_quant as _nmq
from .ops.quantize_fp8 import FP8Tensor

_NORM_ALIASES = {"layer": "layer", "layernorm": "layer", "layer_norm": "layer", "ln": "layer",
                 "rms": "rms", "rmsnorm": "rms", "rms_norm": "rms"}
_OP = "norm_modulate_quant"


def _norm(norm: str) -> str:
    try:
        return _NORM_ALIASES[norm.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"pyops.{_OP}: unknown norm {norm!r}; expected 'layer' or 'rms'") \
            from None


def _modulation_rows(name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """shift/scale in any accepted shape -> (Bm, D) with Bm in {1, B} (3-D x) or {1, M} (2-D)."""
    D = x.shape[-1]
    if x.dim() == 3:
        B = x.shape[0]
        ok = {(D,), (1, D), (B, D), (1, 1, D), (B, 1, D)}
        want = f"({B}, {D}), ({B}, 1, {D}) or ({D},)"
    else:
        M = x.shape[0]
        ok = {(D,), (1, D), (M, D)}
        want = f"({M}, {D}) (one row per token) or ({D},)"
    if tuple(t.shape) not in ok:
        raise ValueError(f"pyops.{_OP}: {name} has shape {tuple(t.shape)}; for x of shape "
                         f"{tuple(x.shape)} expected {want}")
    t = t.reshape(-1, D)
    return t if t.stride(1) == 1 or D == 1 else t.contiguous()


def norm_modulate_quant(x: torch.Tensor, shift: Optional[torch.Tensor] = None,
                        scale: Optional[torch.Tensor] = None, *, norm: str = "layer",
                        weight: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None, eps: float = 1e-6,
                        y_dtype: Optional[torch.dtype] = None,
                        backend: Optional[str] = None
                        ) -> Union[FP8Tensor, tuple[FP8Tensor, torch.Tensor]]:
    """LayerNorm/RMSNorm + adaLN modulate + per-token FP8 e4m3 quantization, in one pass.

    ``y = norm(x) * (1 + scale) + shift`` in fp32 (spec: ``pyops/reference/norm_modulate_quant.py``),
    then exactly ``pyops.quantize_fp8(y, "row")`` of that fp32 y.

    x: (B, N, D) or (M, D), bf16/fp16/fp32, any strides.
    shift, scale: None, (D,), or one row per batch element: (B, D) / (B, 1, D) for 3-D x,
        (M, D) (one per token) for 2-D x.
    norm: ``"layer"`` (LayerNorm, biased variance) or ``"rms"`` (RMSNorm).
    weight, bias: optional (D,) elementwise affine of the norm (applied before modulation).
    eps: added to the variance (mean square for RMSNorm).
    y_dtype: None, or torch.float32 / bfloat16 / float16 to also return y in that dtype. With
        float32, ``quantize_fp8(y, "row")`` reproduces the returned q and scale bit for bit.
    backend: ``"cuda" | "triton" | "reference"`` or None (auto; env
        ``PYOPS_BACKEND_NORM_MODULATE_QUANT`` / ``PYOPS_BACKEND``).

    Returns a ``FP8Tensor`` (data x's shape float8_e4m3fn, scale (*x.shape[:-1], 1) fp32,
    granularity "row"), ready to be a pre-quantized activation of an FP8 GEMM; or
    ``(FP8Tensor, y)`` when y_dtype is given. A row whose y holds inf/NaN gets scale NaN and
    codes 0 (a non-finite x poisons its own row only; a non-finite shift/scale channel poisons
    the rows that use it).
    """
    check_tensor(_OP, "x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"pyops.{_OP}: x must be (B, N, D) or (M, D), got shape "
                         f"{tuple(x.shape)}")
    nrm = _norm(norm)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"pyops.{_OP}: eps must be a finite number >= 0, got {eps!r}")
    if y_dtype is not None and y_dtype not in FLOAT_DTYPES:
        raise TypeError(f"pyops.{_OP}: y_dtype must be None, torch.float32, torch.bfloat16 or "
                        f"torch.float16, got {y_dtype!r}")
    D = x.shape[-1]
    params = {"weight": weight, "bias": bias, "shift": shift, "scale": scale}
    for name, t in params.items():
        if t is not None:
            check_tensor(_OP, name, t)
    check_same_device(_OP, x, **params)
    for name in ("weight", "bias"):
        t = params[name]
        if t is not None:
            if tuple(t.shape) != (D,):
                raise ValueError(f"pyops.{_OP}: {name} has shape {tuple(t.shape)}, expected "
                                 f"({D},)")
            params[name] = t.contiguous()
    for name in ("shift", "scale"):
        if params[name] is not None:
            params[name] = _modulation_rows(name, params[name], x)
    sh, sc = params["shift"], params["scale"]
    if sh is not None and sc is not None and sh.shape[0] != sc.shape[0]:
        rows = max(sh.shape[0], sc.shape[0])  # one of them is a single broadcast row
        sh, sc = sh.expand(rows, D), sc.expand(rows, D)
        params["shift"], params["scale"] = sh, sc
    given = [t for t in params.values() if t is not None]
    if len({t.dtype for t in given}) > 1:  # mixed dtypes: widen all (exact; math is fp32)
        params = {k: (t.float() if t is not None else None) for k, t in params.items()}
    b = _backend.resolve(_nmq.OP, x.device, backend)
    args = (x, params["shift"], params["scale"], params["weight"], params["bias"], nrm,
            float(eps), y_dtype, b)
    if eager_fast_path(x, *given):
        out = _nmq.norm_modulate_quant_impl(*args)
    else:
        out = torch.ops.pyops.norm_modulate_quant(*args)
    fp8 = FP8Tensor(out[0], out[1].view(*x.shape[:-1], 1), "row", x.dtype)
    if y_dtype is None:
        return fp8
    return fp8, out[2]

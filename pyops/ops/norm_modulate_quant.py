"""norm_modulate_quant: fused LayerNorm/RMSNorm + adaLN modulation + per-token FP8 quantization
(public function, op, backends; spec: pyops/reference/norm_modulate_quant.py).

Op arguments are already normalized by the public function (``pyops.norm_modulate_quant``):
x (..., D) any strides; shift/scale None or (Bm, D) with unit stride along D, Bm dividing the
number of rows M (row m uses modulation row m // (M // Bm)); weight/bias None or (D,)
contiguous; weight/bias/shift/scale of one dtype. Returns ``[q, scale]`` or, when ``y_dtype``
is given, ``[q, scale, y]``: q float8_e4m3fn with x's shape, scale fp32 (M,), y (x's shape,
``y_dtype``). A list because a schema cannot return an optional tensor.

Backends are destination-passing on the (M, D) view: ``fn(x2, weight, bias, shift, scale, rms,
eps, q, q_scale, y)``.
"""
from __future__ import annotations

from typing import Optional

import math
from typing import Union

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, as_2d, check_same_device, check_tensor
from .._op import binding_fake, define
from ..reference import norm_modulate_quant as ref
from .quantize_fp8 import FP8Tensor

OP = "norm_modulate_quant"
NORM_CODE = {"layer": 0, "rms": 1}


# ---- backends ------------------------------------------------------------------------------------
def _reference(x2, weight, bias, shift, scale, rms, eps, q, q_scale, y) -> None:
    rq, rs, ry = ref.norm_modulate_quant(x2, shift, scale, weight, bias,
                                         "rms" if rms else "layer", eps)
    q.copy_(rq)
    q_scale.copy_(rs)
    if y is not None:
        y.copy_(ry)


def _triton(x2, weight, bias, shift, scale, rms, eps, q, q_scale, y) -> None:
    from ..triton_kernels import norm_modulate_quant as tk
    tk.norm_modulate_quant(x2, weight, bias, shift, scale, rms, eps, q, q_scale, y)


def _cuda(x2, weight, bias, shift, scale, rms, eps, q, q_scale, y) -> None:
    torch.ops.pyops._norm_modulate_quant_cuda(x2, weight, bias, shift, scale, int(rms),
                                              float(eps), q, q_scale, y)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)
_backend.register(OP, "cuda", _cuda)


# ---- the op --------------------------------------------------------------------------------------
def _fake(x, shift, scale, weight, bias, norm, eps, y_dtype, backend):
    D = x.shape[-1]
    M = x.numel() // D if x.dim() != 2 else x.shape[0]
    out = [x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
           x.new_empty((M,), dtype=torch.float32)]
    if y_dtype is not None:
        out.append(x.new_empty(x.shape, dtype=y_dtype))
    return out


@define(OP, fake=_fake)
def norm_modulate_quant_op(x: torch.Tensor, shift: Optional[torch.Tensor],
                           scale: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], norm: str, eps: float,
                           y_dtype: Optional[torch.dtype], backend: str) -> list[torch.Tensor]:
    D = x.shape[-1]
    x2 = as_2d(x)
    M = x2.shape[0]
    q = torch.empty((M, D), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    y = torch.empty((M, D), dtype=y_dtype, device=x.device) if y_dtype is not None else None
    if M > 0 and D > 0:
        _backend.impl(OP, backend)(x2, weight, bias, shift, scale, norm == "rms", float(eps),
                                   q, s, y)
    out = [q.view(x.shape), s]
    if y is not None:
        out.append(y.view(x.shape))
    return out


binding_fake("_norm_modulate_quant_cuda")  # the CUDA entry point (when built): traceable, opcheck-able


# ---- public API ---------------------------------------------------------------------------------
_NORM_ALIASES = {"layer": "layer", "layernorm": "layer", "layer_norm": "layer", "ln": "layer",
                 "rms": "rms", "rmsnorm": "rms", "rms_norm": "rms"}


def _norm(norm: str) -> str:
    try:
        return _NORM_ALIASES[norm.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"pyops.{OP}: unknown norm {norm!r}; expected 'layer' or 'rms'") \
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
        raise ValueError(f"pyops.{OP}: {name} has shape {tuple(t.shape)}; for x of shape "
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
    check_tensor(OP, "x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"pyops.{OP}: x must be (B, N, D) or (M, D), got shape "
                         f"{tuple(x.shape)}")
    nrm = _norm(norm)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"pyops.{OP}: eps must be a finite number >= 0, got {eps!r}")
    if y_dtype is not None and y_dtype not in FLOAT_DTYPES:
        raise TypeError(f"pyops.{OP}: y_dtype must be None, torch.float32, torch.bfloat16 or "
                        f"torch.float16, got {y_dtype!r}")
    D = x.shape[-1]
    params = {"weight": weight, "bias": bias, "shift": shift, "scale": scale}
    for name, t in params.items():
        if t is not None:
            check_tensor(OP, name, t)
    check_same_device(OP, x, **params)
    for name in ("weight", "bias"):
        t = params[name]
        if t is not None:
            if tuple(t.shape) != (D,):
                raise ValueError(f"pyops.{OP}: {name} has shape {tuple(t.shape)}, expected "
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
    b = _backend.resolve(OP, x.device, backend)
    args = (x, params["shift"], params["scale"], params["weight"], params["bias"], nrm,
            float(eps), y_dtype, b)
    out = norm_modulate_quant_op(*args)
    fp8 = FP8Tensor(out[0], out[1].view(*x.shape[:-1], 1), "row", x.dtype)
    if y_dtype is None:
        return fp8
    return fp8, out[2]

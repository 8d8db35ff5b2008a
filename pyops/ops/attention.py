"""attention / sdpa: quantized flash-attention forward (public functions, op, backends).

Public: ``attention(q, k, v, *, layout, scale, precision, causal, return_lse, backend)`` and the
SDPA drop-in ``sdpa(query, key, value, ...)``. Inference only (no autograd), forward,
non-causal or causal (top-left, as ``F.scaled_dot_product_attention``), any Sq and Sk, GQA/MQA
(Hq a multiple of Hk), bf16/fp16 in and out, any strides, lse on request. The quantization
recipe, the two NVFP4 kernel paths and the accuracy measurements behind the defaults are in
``docs/attention.md``; the spec is ``pyops/reference/attention.py``.

Op: ``pyops::attention(q, k, v, layout, precision, causal, scale, backend) -> (out, lse)``. q, k,
v in the user's layout ("bhsd": (B, H, S, D); "bshd": (B, S, H, D)), any strides, bf16/fp16;
``out`` is contiguous in the same layout and dtype, ``lse`` (B, Hq, Sq) fp32 (natural log).
``scale`` is always a float here (the public function resolves None to 1/sqrt(D)).

Backends (``impl(qh, kh, vh, out_h, lse, precision, causal, scale)`` on (B, H, S, D) views):

* ``triton``: pre-pass ``triton_kernels/attention_quant.py`` + ``triton_kernels/attention.py``.
  head_dim 64 and 128 native; smaller ones are zero-padded to 64, 65..127 to 128 (exact: zero
  channels add nothing to Q K^T, the padded V channels are dropped). Larger: error (the public
  function sends those to the reference with a warning). NVFP4 runs the native ``tl.dot_scaled``
  QK^T where ``_backend.native_fp4`` says so (sm_100/103/120/121, unverified on hardware) and an
  exact fp16 emulation elsewhere.
* ``cuda`` (UNVERIFIED: written and compiled for sm_90a without a GPU): the same Triton
  pre-pass, then the sm_90a wgmma kernel ``csrc/attention.cu`` (binding
  ``pyops::_attention_cuda``) instead of the Triton kernel. Precision "int8", head_dim 64 and 128,
  compute capability 9.0 exactly, ``pyops._C`` built with sm_90a; an explicit request for
  anything else raises before any launch (``cuda_available``). Never chosen automatically: the
  policy prefers ``triton`` until ``bench/RESULTS.md`` shows the CUDA kernel faster.
* ``reference``: ``pyops/reference/attention.py``: ``simulated_attention`` (the quantized
  recipe in fp32) for quantized precisions, plain fp32 attention for "bf16".
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .. import _backend
from .._checks import check_same_device, check_tensor
from .._op import binding_fake, define
from ..reference import attention as ref
from ..reference.attention import PRECISIONS

OP = "attention"
NATIVE_HEAD_DIMS = (64, 128)


def padded_head_dim(D: int) -> int:
    for n in NATIVE_HEAD_DIMS:
        if D <= n:
            return n
    return D


def _reference(qh, kh, vh, out_h, lse, precision, causal, scale) -> None:
    o, l = ref.simulated_attention(qh, kh, vh, precision, scale, causal)
    out_h.copy_(o)
    lse.copy_(l)


def _pad_d(x: torch.Tensor, Dp: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, Dp - x.shape[-1]))


def _triton(qh, kh, vh, out_h, lse, precision, causal, scale) -> None:
    from ..triton_kernels import attention as tk
    from ..triton_kernels import attention_quant as tq
    D = qh.shape[-1]
    Dp = padded_head_dim(D)
    if Dp not in NATIVE_HEAD_DIMS:
        raise ValueError(f"pyops.attention: the Triton kernel supports head_dim <= 128, got {D}")
    o_k = out_h
    if Dp != D:
        qh, kh, vh = _pad_d(qh, Dp), _pad_d(kh, Dp), _pad_d(vh, Dp)
        o_k = torch.empty((*out_h.shape[:-1], Dp), dtype=out_h.dtype, device=out_h.device)
    Hq, Sk = qh.shape[1], kh.shape[2]
    if precision == "bf16":
        tk.attention_fwd(qh, kh, vh, None, None, None, None, o_k, lse, precision, causal, scale,
                         Hq)
    else:
        native = precision == "nvfp4" and _backend.native_fp4(qh.device)
        bf = tq.quantize_qkv(qh, kh, vh, precision, scale, native=native)
        vt = bf["vt"].transpose(-1, -2)[:, :, :Sk]
        tk.attention_fwd(bf["qc"], bf["kc"], vt, bf["qs"], bf["ks"], bf["vs"], bf["qb"], o_k,
                         lse, precision, causal, scale, Hq, bf.get("qsb"), bf.get("ksb"))
    if Dp != D:
        out_h.copy_(o_k[..., :D])


# ---- cuda: the sm_90a kernel (csrc/attention.cu), int8 only --------------------------------------
CUDA_PRECISIONS = ("int8",)
CUDA_HEAD_DIMS = (64, 128)
CUDA_CAPABILITY = (9, 0)  # wgmma: sm_90a code runs on compute capability 9.0 only


def cuda_available(device, precision: Optional[str] = None, D: Optional[int] = None,
                   **_) -> tuple[bool, str]:
    """(ok, why) of backend ``cuda``: ``pyops._C`` loaded with ``_attention_cuda`` and built
    for sm_90a, a compute capability 9.0 device, and (when given) precision "int8" and head_dim
    64 or 128. Static facts only (traceable under torch.compile)."""
    device = torch.device(device)
    if precision is not None and precision not in CUDA_PRECISIONS:
        return False, (f"the CUDA attention kernel runs precision 'int8' only, got "
                       f"{precision!r} (backend='triton' runs every precision)")
    if D is not None and D not in CUDA_HEAD_DIMS:
        return False, (f"the CUDA attention kernel supports head_dim 64 and 128, got {D} "
                       f"(backend='triton' pads other head dims)")
    ok, why = _backend._cuda_backend_ok(OP, device)
    if not ok:
        return ok, why
    cap = _backend.device_capability(device)
    if tuple(cap) != CUDA_CAPABILITY:
        return False, (f"the CUDA attention kernel is sm_90a code (wgmma): it needs compute "
                       f"capability 9.0, device is sm_{cap[0]}{cap[1]}")
    if "90a" not in _backend.extension_facts().archs:
        return False, (f"pyops._C was built for sm_{', sm_'.join(_backend.extension_archs())}, "
                       f"not sm_90a (the kernel needs the wgmma 'a' features)")
    return True, "sm_90a wgmma kernel (unverified on hardware)"


def _cuda(qh, kh, vh, out_h, lse, precision, causal, scale) -> None:
    from ..triton_kernels import attention_quant as tq
    D = qh.shape[-1]
    if precision not in CUDA_PRECISIONS or D not in CUDA_HEAD_DIMS:  # resolve() refuses these
        raise ValueError(f"pyops.attention: the CUDA kernel runs precision 'int8' at head_dim "
                         f"64 or 128, got {precision!r} at {D}")
    bf = tq.quantize_qkv(qh, kh, vh, precision, scale)
    torch.ops.pyops._attention_cuda(bf["qc"], bf["qs"], bf["qb"], bf["kc"], bf["ks"], bf["vt"],
                                    bf["vs"], out_h, lse, bool(causal))


# Measured: nothing yet. The H200 run of 2026-11-30 (bench/RESULTS.md section 1, "Attention")
# predates the CUDA kernel; its Triton kernel reached 492-556 TFLOPS (kernel only).
POLICY_SOURCE = ("H200 2026-11-30: the CUDA kernel is unmeasured; Triton stays the default "
                 "until bench/RESULTS.md shows the CUDA kernel faster")


def auto_backend(capability, **_) -> str:
    """The automatic preference on a CUDA device: ``triton`` everywhere (``POLICY_SOURCE``)."""
    return "triton"


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton, min_capability=(8, 9))  # fp8/int8 MMAs, fp8 casts
# on_tensor_device: its pre-pass is a Triton launch (the binding guards its own device)
_backend.register(OP, "cuda", _cuda, available=cuda_available, on_tensor_device=True)
_backend.register_policy(OP, auto_backend, POLICY_SOURCE)


def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhsd" else x.transpose(1, 2)


def _attention_fake(q, k, v, layout, precision, causal, scale, backend):
    qh = to_bhsd(q, layout)
    B, Hq, Sq, _ = qh.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, Sq), dtype=torch.float32)


@define(OP, fake=_attention_fake)
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str,
                 precision: str, causal: bool, scale: float, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    qh, kh, vh, out_h = (to_bhsd(t, layout) for t in (q, k, v, out))
    B, Hq, Sq, _ = qh.shape
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    _backend.impl(OP, backend)(qh, kh, vh, out_h, lse, precision, causal, scale)
    return out, lse


binding_fake("_attention_cuda")  # the CUDA entry point (when built): traceable, opcheck-able


# ---- public API ---------------------------------------------------------------------------------
LAYOUTS = ("bhsd", "bshd")
DTYPES = (torch.bfloat16, torch.float16)
_WARNED: set = set()


# The SDPA that pyops.sdpa falls back to: torch's builtin, which is what
# ``F.scaled_dot_product_attention`` is (torch 2.11-2.13). Never looked up through
# ``torch.nn.functional``, which users patch (``F.scaled_dot_product_attention = pyops.sdpa``):
# the fallback would then call itself.
_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


def _warn_once(key: str, msg: str) -> None:
    # never while torch.compile traces (Dynamo cannot trace warnings.warn: fullgraph would fail)
    if key not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(key)
        warnings.warn(msg, stacklevel=3)


def _check(q, k, v, layout, precision, scale):
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dtypes=DTYPES, min_ndim=4)
        if t.dim() != 4:
            raise ValueError(f"pyops.attention: {name} must be 4-D, got shape {tuple(t.shape)}")
    check_same_device(op, q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"pyops.attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, "
                        f"{v.dtype})")
    if layout not in LAYOUTS:
        raise ValueError(f"pyops.attention: layout must be one of {LAYOUTS}, got {layout!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"pyops.attention: precision must be one of {PRECISIONS}, got "
                         f"{precision!r}")
    qh, kh, vh = (to_bhsd(t, layout) for t in (q, k, v))
    B, Hq, Sq, D = qh.shape
    if kh.shape[0] != B or vh.shape[0] != B:
        raise ValueError(f"pyops.attention: batch sizes differ: q {B}, k {kh.shape[0]}, "
                         f"v {vh.shape[0]}")
    if kh.shape != vh.shape:
        raise ValueError(f"pyops.attention: k and v shapes differ ({tuple(k.shape)} vs "
                         f"{tuple(v.shape)}) in layout {layout!r}")
    if kh.shape[-1] != D:
        raise ValueError(f"pyops.attention: head_dim of q ({D}) and k/v ({kh.shape[-1]}) differ")
    Hk = kh.shape[1]
    if Hq % Hk:
        raise ValueError(f"pyops.attention: query heads ({Hq}) must be a multiple of kv heads "
                         f"({Hk}) in layout {layout!r}")
    if scale is not None:
        s = float(scale)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"pyops.attention: scale must be finite and > 0, got {scale}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str = "bhsd",
              scale: Optional[float] = None, precision: str = "int8", causal: bool = False,
              return_lse: bool = False, backend: Optional[str] = None):
    """Softmax attention with dynamically quantized Q, K, P, V (recipe: ``docs/attention.md``).

    q (B, Hq, Sq, D), k and v (B, Hk, Sk, D) for ``layout="bhsd"`` ((B, S, H, D) for "bshd"),
    bf16 or fp16, any strides. Returns the output (same layout as q, contiguous, q's dtype) and,
    with ``return_lse``, the log-sum-exp of the scaled scores (B, Hq, Sq) fp32 (natural log).
    precision: "int8" | "fp8" | "int8_fp16pv" | "nvfp4" (native dot_scaled QK^T on sm_100 /
    sm_120, emulated elsewhere) | "bf16".
    backend: "triton" | "cuda" | "reference" | None (auto: Triton on CUDA, the reference on
    CPU). "cuda" is the sm_90a wgmma kernel (UNVERIFIED on hardware; precision "int8", head_dim
    64/128, compute capability 9.0); auto never picks it (policy ``POLICY_SOURCE``).
    head_dim: any D >= 1 in every precision (the kernel pads 1..127, larger runs the reference
    with a warning; see the module docstring).

    Precisions: "int8" (default: INT8 QK, FP8 PV, the SageAttention2 recipe), "fp8" (FP8 QK,
    FP8 PV), "int8_fp16pv" (accuracy first: INT8 QK, fp16 PV), "nvfp4" (Q, K and P in NVFP4, V
    in FP8), "bf16" (no quantization). Accuracy of each, measured against fp64 on CPU:
    ``docs/attention.md``.

    inf / NaN (no host sync to check; the spec is ``pyops/reference/attention.py``): every
    statistic over tokens (Q's per-channel amax for the Q/K smoothing, K's per-channel max/min
    for its shift and the smoothing) leaves out token rows holding inf/NaN, and such a row gets
    per-token scale NaN and codes 0. So a bad query row gives NaN in its own output row and lse
    only, the other rows are computed exactly as without it (SDPA: the same); a bad key row
    gives NaN in every query row that attends to it (SDPA: the same for NaN; for inf SDPA can
    keep rows whose score is -inf, here they are NaN too). V is scaled per channel over all
    keys: a V channel holding inf/NaN gets scale NaN, i.e. that channel is NaN in every output
    row of its kv head (non-causal SDPA: the same; causal SDPA keeps the earlier rows).
    "bf16" quantizes nothing and follows the same softmax arithmetic as SDPA.

    Raises TypeError / ValueError (before any launch) for: dtypes other than bf16/fp16 or
    differing, tensors that are not 4-D or empty, devices that differ, an unknown layout or
    precision, mismatched batch / head_dim / k-v shapes, Hq not a multiple of Hk, a scale that
    is not finite and > 0, head_dim > 128 with an explicit ``backend="triton"``, and (Triton)
    batch * heads > 65535. RuntimeError (before any launch) for an explicit backend that cannot
    run here, e.g. ``backend="cuda"`` with a precision other than "int8", a head_dim other than
    64/128, a device other than sm_90 or a ``pyops._C`` without sm_90a code.
    """
    _check(q, k, v, layout, precision, scale)
    D = q.shape[-1]
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    b = _backend.resolve(OP, q.device, backend, precision=precision, D=D)
    if b == "triton" and padded_head_dim(D) not in NATIVE_HEAD_DIMS:
        if _backend.requested(OP, backend) is not None:
            raise ValueError(f"pyops.attention: the Triton kernel supports head_dim <= 128 "
                             f"(64 and 128 natively, 1..127 zero-padded), got {D}; "
                             f"backend='reference' runs any head_dim")
        _warn_once(f"hd{D}", f"pyops.attention: head_dim {D} > 128 is not supported by the "
                   f"kernel; running the PyTorch reference (slow)")
        b = "reference"
    elif b == "triton" and D not in NATIVE_HEAD_DIMS:
        _warn_once(f"pad{D}", f"pyops.attention: head_dim {D} is zero-padded to "
                   f"{padded_head_dim(D)} (an extra copy of q, k, v)")
    out, lse = attention_op(q, k, v, layout, precision, bool(causal), sc, b)
    return (out, lse) if return_lse else out


def sdpa_fallback_reason(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                         enable_gqa: bool = False, backend: Optional[str] = None,
                         layout: str = "bhsd") -> Optional[str]:
    """Why an SDPA-style call cannot run ``pyops.attention`` (the words of the one-time
    warning), or None when it can: an ``attn_mask``, ``dropout_p > 0``, inputs that need
    gradients, inputs that are not 4-D bf16/fp16, head dims above 128 or a value head dim other
    than the query's, differing head counts without ``enable_gqa``, CPU tensors unless
    ``backend`` is given. ``layout``: "bhsd" (SDPA) or "bshd" (diffusers' dispatcher)."""
    if attn_mask is not None:
        return "attn_mask"
    if dropout_p > 0.0:
        return "dropout_p > 0"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "inputs that require grad (pyops.attention is forward only)"
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in DTYPES
           for t in (query, key, value)):
        return "inputs other than 4-D bf16/fp16"
    if query.shape[-1] > 128 or value.shape[-1] != query.shape[-1]:
        return "head_dim > 128 or value head_dim != query head_dim"
    h = 1 if layout == "bhsd" else 2
    if query.shape[h] != key.shape[h] and not enable_gqa:
        return "differing head counts without enable_gqa"
    if query.device.type != "cuda" and backend is None:
        return "CPU tensors"
    return None


def torch_sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
               layout: str = "bhsd") -> torch.Tensor:
    """torch's builtin SDPA (never through ``torch.nn.functional``, which users patch), in
    ``layout``; the fallback of :func:`sdpa` and of the diffusers backend."""
    if layout == "bshd":
        out = torch_sdpa(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                         attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return out.transpose(1, 2)
    kw = {"enable_gqa": enable_gqa} if enable_gqa else {}
    return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                       is_causal=is_causal, scale=scale, **kw)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
         enable_gqa: bool = False, *, precision: str = "int8", backend: Optional[str] = None):
    """Drop-in for ``F.scaled_dot_product_attention`` (e.g. to patch a model's attention).

    Runs ``pyops.attention`` (bhsd layout) when it can; falls back to torch's builtin SDPA
    (never through ``torch.nn.functional``, so patching
    ``torch.nn.functional.scaled_dot_product_attention = pyops.sdpa`` cannot recurse) with a
    one-time warning per reason (``sdpa_fallback_reason``): an ``attn_mask``,
    ``dropout_p > 0``, inputs that need gradients, inputs that are not 4-D bf16/fp16, head dims
    above 128, differing head counts without ``enable_gqa`` (torch then raises as it would),
    key/value head dims that differ, and CPU tensors unless ``backend`` is given.
    """
    reason = sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, enable_gqa, backend)
    if reason is not None:
        _warn_once("sdpa:" + reason, f"pyops.sdpa: falling back to "
                   f"F.scaled_dot_product_attention for {reason}")
        return torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return attention(query, key, value, layout="bhsd", scale=scale, precision=precision,
                     causal=is_causal, backend=backend)

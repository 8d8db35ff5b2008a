"""pyops::attention: quantized flash-attention forward (schema, fake, backends).

Schema: ``attention(q, k, v, layout, precision, causal, scale, backend) -> (out, lse)``. q, k, v
in the user's layout ("bhsd": (B, H, S, D); "bshd": (B, S, H, D)), any strides, bf16/fp16;
``out`` is contiguous in the same layout and dtype, ``lse`` (B, Hq, Sq) fp32 (natural log).
``scale`` is always a float here (the public function resolves None to 1/sqrt(D)).

Backends (``impl(qh, kh, vh, out_h, lse, precision, causal, scale)`` on (B, H, S, D) views):

* ``triton``: pre-pass ``triton_kernels/attention_quant.py`` + ``triton_kernels/attention.py``.
  head_dim 64 and 128 native; smaller ones are zero-padded to 64, 65..127 to 128 (exact: zero
  channels add nothing to Q K^T, the padded V channels are dropped). Larger: error (the public
  function sends those to the reference with a warning).
* ``reference``: ``pyops/reference/attention.py``: ``simulated_attention`` (the quantized
  recipe in fp32) for quantized precisions, plain fp32 attention for "bf16".
"""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import attention as ref

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
        native = precision == "nvfp4" and tk.native_fp4_supported(qh.device)
        bf = tq.quantize_qkv(qh, kh, vh, precision, scale, native=native)
        vt = bf["vt"].transpose(-1, -2)[:, :, :Sk]
        tk.attention_fwd(bf["qc"], bf["kc"], vt, bf["qs"], bf["ks"], bf["vs"], bf["qb"], o_k,
                         lse, precision, causal, scale, Hq, bf.get("qsb"), bf.get("ksb"))
    if Dp != D:
        out_h.copy_(o_k[..., :D])


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton, min_capability=(8, 9))  # fp8/int8 MMAs, fp8 casts


def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhsd" else x.transpose(1, 2)


def attention_impl(q, k, v, layout: str, precision: str, causal: bool, scale: float,
                   backend: str):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    qh, kh, vh, out_h = (to_bhsd(t, layout) for t in (q, k, v, out))
    B, Hq, Sq, _ = qh.shape
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    _backend.impl(OP, backend)(qh, kh, vh, out_h, lse, precision, causal, scale)
    return out, lse


@torch.library.custom_op("pyops::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str,
                 precision: str, causal: bool, scale: float, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_impl(q, k, v, layout, precision, causal, scale, backend)


@attention_op.register_fake
def _(q, k, v, layout, precision, causal, scale, backend):
    qh = to_bhsd(q, layout)
    B, Hq, Sq, _ = qh.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, Sq), dtype=torch.float32)

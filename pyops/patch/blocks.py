"""Fused block forwards for :func:`pyops.patch`: each activation that feeds FP8 linears is
produced already quantized, by the op that computes it.

* ``norm_modulate_quant`` (LayerNorm + adaLN modulate + per-token FP8 in one pass) produces the
  input of the QKV linears, the single-stream MLP-in linear and the MLP-in linear;
* ``gelu_quant`` (GELU + per-token FP8) produces the input of the MLP-out linear.

The ``FP8Tensor`` goes to the block's own attention module and linears (``pyops.linear`` takes
a pre-quantized row-granularity input), so the attention processor, its backend and its
rotary embedding are the model's own. Each forward below is the diffusers 0.42 forward of its
block (``diffusers/models/transformers/transformer_flux.py``: ``FluxTransformerBlock``,
``FluxSingleTransformerBlock``; ``transformer_wan.py``: ``WanTransformerBlock``;
``diffusers/models/attention.py``: SD3's ``JointTransformerBlock`` (not the SD3.5 dual-attention
variant); ``transformer_hunyuan_video.py``: ``HunyuanVideoTransformerBlock``, the double-stream
block; its single-stream block splits and re-joins the normalized tokens inside the processor,
so it keeps its forward) or the embedded DiT's (``pyops/models/dit.py``), with those producers swapped in; everything else (gates,
residuals, dtype casts, the fp16 clip) is unchanged. The numerics differ from the unfused model
only where fusion removes a rounding: the fused y is quantized from fp32, the unfused path rounds
the normalized, modulated activation to the model dtype first (tests/test_patch.py bounds it).

:func:`plan` checks a block before anything is installed: every consumer of a fused activation
must be an FP8 ``QuantLinear`` and the processor the stock one; otherwise the block keeps its
forward and the reason goes into the report.
"""
from __future__ import annotations

import types
from typing import Callable, Optional

import torch
from torch import nn

from ..nn import QuantLinear
from ..ops.norm_modulate_quant import norm_modulate_quant
from ..ops.gelu_quant import gelu_quant
from ..ops.quantize_fp8 import FP8Tensor

__all__ = ["plan", "install", "FUSED_BLOCKS"]


def _fp8(m) -> bool:
    return isinstance(m, QuantLinear) and m.format == "fp8"


def _nmq(ln: nn.Module, x: torch.Tensor, shift: Optional[torch.Tensor],
         scale: Optional[torch.Tensor], backend: Optional[str]) -> FP8Tensor:
    """``ln(x) * (1 + scale) + shift`` quantized per token; ln an ``nn.LayerNorm`` (any
    affine); shift/scale (B, D), (B, 1, D) or per token (B, N, D)."""
    w, b = ln.weight, ln.bias
    if shift is not None and shift.dim() == 3 and shift.shape[1] != 1:  # per-token modulation
        B, N, D = x.shape
        q = norm_modulate_quant(x.reshape(B * N, D), shift.reshape(B * N, D),
                                scale.reshape(B * N, D), weight=w, bias=b, eps=ln.eps,
                                backend=backend)
        return FP8Tensor(q.data.view(B, N, D), q.scale.view(B, N, 1), "row", q.dtype)
    return norm_modulate_quant(x, shift, scale, weight=w, bias=b, eps=ln.eps, backend=backend)


def _gelu_quant(h: torch.Tensor, approximate: str, backend: Optional[str]) -> FP8Tensor:
    return gelu_quant(h, approximate=approximate, backend=backend)


def _ff(ff: nn.Module, xq: FP8Tensor, backend: Optional[str]) -> torch.Tensor:
    """diffusers ``FeedForward`` (GELU(proj) -> Dropout -> Linear) on a quantized input; the
    GELU output is produced quantized for the MLP-out linear."""
    act = ff.net[0]
    return ff.net[2](_gelu_quant(act.proj(xq), act.approximate, backend))


# ---- preconditions ---------------------------------------------------------------------------
def _is_layernorm(m) -> bool:
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def _ff_ok(ff) -> Optional[str]:
    net = getattr(ff, "net", None)
    if net is None or len(net) != 3:
        return "feed-forward is not GELU -> Dropout -> Linear"
    act = net[0]
    if (type(act).__name__ != "GELU" or not hasattr(act, "proj")
            or getattr(act, "approximate", None) not in ("tanh", "none")
            or not isinstance(net[1], nn.Dropout)):
        return "feed-forward is not GELU -> Dropout -> Linear"
    if net[1].p > 0:
        return "feed-forward dropout p > 0 (the fused forward is for inference)"
    if not (_fp8(act.proj) and _fp8(net[2])):
        return "a feed-forward linear is not an FP8 QuantLinear"
    return None


def _attn_ok(attn, processor_class: str, *, self_kv: bool = True, added: bool = False
             ) -> Optional[str]:
    if type(attn.processor).__name__ != processor_class:
        return f"attention processor {type(attn.processor).__name__} (fused needs {processor_class})"
    if getattr(attn, "fused_projections", False):
        names = ["to_qkv"] if self_kv else ["to_q"]
        if added:
            names.append("to_added_qkv")
    else:
        names = ["to_q", "to_k", "to_v"] if self_kv else ["to_q"]
        if added:
            names += ["add_q_proj", "add_k_proj", "add_v_proj"]
    for n in names:
        if not _fp8(getattr(attn, n, None)):
            return f"attention linear {n} is not an FP8 QuantLinear"
    return None


def _ada_ok(norm, n_chunks: int) -> Optional[str]:
    if getattr(norm, "emb", None) is not None:
        return "adaLN with its own embedding (class labels)"
    lin, ln = getattr(norm, "linear", None), getattr(norm, "norm", None)
    if not (isinstance(lin, nn.Module) and _is_layernorm(ln)):
        return f"{type(norm).__name__} without a LayerNorm"
    if getattr(lin, "out_features", None) != n_chunks * ln.normalized_shape[0]:
        return f"{type(norm).__name__} with another number of modulation vectors"
    return None


def _first(*reasons) -> Optional[str]:
    return next((r for r in reasons if r is not None), None)


def _double_stream_ok(processor: str) -> Callable:
    """The precondition of a two-stream block (Flux, HunyuanVideo): adaLN-Zero on both streams,
    joint attention with the stock ``processor``, LayerNorm + GELU MLP on both streams."""
    def ok(b) -> Optional[str]:
        return _first(_ada_ok(b.norm1, 6), _ada_ok(b.norm1_context, 6),
                      _attn_ok(b.attn, processor, added=True),
                      None if _is_layernorm(b.norm2) and _is_layernorm(b.norm2_context)
                      else "norm2 is not a LayerNorm", _ff_ok(b.ff), _ff_ok(b.ff_context))
    return ok


def _flux_single_ok(b) -> Optional[str]:
    return _first(_ada_ok(b.norm, 3), _attn_ok(b.attn, "FluxAttnProcessor"),
                  None if _fp8(b.proj_mlp) else "proj_mlp is not an FP8 QuantLinear")


def _wan_ok(b) -> Optional[str]:
    n2 = None
    if not isinstance(b.norm2, nn.Identity):
        n2 = _first(None if _is_layernorm(b.norm2) else "norm2 is not a LayerNorm",
                    _attn_ok(b.attn2, "WanAttnProcessor", self_kv=False))
    return _first(None if _is_layernorm(b.norm1) and _is_layernorm(b.norm3)
                  else "norm1/norm3 is not a LayerNorm",
                  _attn_ok(b.attn1, "WanAttnProcessor"), n2, _ff_ok(b.ffn))


def _sd3_ok(b) -> Optional[str]:
    if b.use_dual_attention:
        return "SD3.5 dual attention (attn2) is not fused"
    if b._chunk_size is not None:
        return "chunked feed-forward"
    ctx = (_first(_ada_ok(b.norm1_context, 6),
                  None if _is_layernorm(b.norm2_context) else "norm2_context is not a LayerNorm",
                  _ff_ok(b.ff_context))
           if not b.context_pre_only else
           (None if type(b.norm1_context).__name__ == "AdaLayerNormContinuous"
            and _is_layernorm(b.norm1_context.norm) else "unexpected norm1_context"))
    return _first(_ada_ok(b.norm1, 6), ctx,
                  _attn_ok(b.attn, "JointAttnProcessor2_0", added=True),
                  None if _is_layernorm(b.norm2) else "norm2 is not a LayerNorm", _ff_ok(b.ff))


def _dit_ok(b) -> Optional[str]:
    for n in ("qkv", "fc1", "fc2"):
        if not _fp8(getattr(b, n)):
            return f"{n} is not an FP8 QuantLinear"
    return None


# ---- the fused forwards --------------------------------------------------------------------------
def _flux_double_forward(self, hidden_states, encoder_hidden_states, temb,
                         image_rotary_emb=None, joint_attention_kwargs=None):
    be = self._pyops_backend
    n1, n1c = self.norm1, self.norm1_context
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
        n1.linear(n1.silu(temb)).chunk(6, dim=1)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
        n1c.linear(n1c.silu(temb)).chunk(6, dim=1)
    xq = _nmq(n1.norm, hidden_states, shift_msa, scale_msa, be)
    cq = _nmq(n1c.norm, encoder_hidden_states, c_shift_msa, c_scale_msa, be)
    attention_outputs = self.attn(hidden_states=xq, encoder_hidden_states=cq,
                                  image_rotary_emb=image_rotary_emb,
                                  **(joint_attention_kwargs or {}))
    attn_output, context_attn_output = attention_outputs[0], attention_outputs[1]

    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    hq = _nmq(self.norm2, hidden_states, shift_mlp, scale_mlp, be)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * _ff(self.ff, hq, be)
    if len(attention_outputs) == 3:
        hidden_states = hidden_states + attention_outputs[2]

    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    ecq = _nmq(self.norm2_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp, be)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * _ff(
        self.ff_context, ecq, be)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _flux_single_forward(self, hidden_states, encoder_hidden_states, temb,
                         image_rotary_emb=None, joint_attention_kwargs=None):
    be = self._pyops_backend
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    shift_msa, scale_msa, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)
    xq = _nmq(self.norm.norm, hidden_states, shift_msa, scale_msa, be)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(xq))
    attn_output = self.attn(hidden_states=xq, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out(hidden_states)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _wan_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
    be = self._pyops_backend
    if temb.ndim == 4:  # (B, S, 6, D): Wan2.2 TI2V, per-token modulation
        mods = (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        mods = [m.squeeze(2) for m in mods]
    else:               # (B, 6, D): Wan2.1 / Wan2.2 14B
        mods = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods

    xq = _nmq(self.norm1, hidden_states, shift_msa, scale_msa, be)
    attn_output = self.attn1(xq, None, None, rotary_emb)
    hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

    if isinstance(self.norm2, nn.Identity):
        n2 = hidden_states
    else:
        n2 = _nmq(self.norm2, hidden_states, None, None, be)
    hidden_states = hidden_states + self.attn2(n2, encoder_hidden_states, None, None)

    yq = _nmq(self.norm3, hidden_states, c_shift_msa, c_scale_msa, be)
    ff_output = _ff(self.ffn, yq, be)
    return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


def _sd3_forward(self, hidden_states, encoder_hidden_states, temb,
                 joint_attention_kwargs=None):
    be = self._pyops_backend
    n1, n1c = self.norm1, self.norm1_context
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
        n1.linear(n1.silu(temb)).chunk(6, dim=1)
    xq = _nmq(n1.norm, hidden_states, shift_msa, scale_msa, be)
    if self.context_pre_only:  # AdaLayerNormContinuous: (scale, shift), emb in x's dtype
        c_scale, c_shift = n1c.linear(n1c.silu(temb).to(encoder_hidden_states.dtype)).chunk(2, 1)
        cq = _nmq(n1c.norm, encoder_hidden_states, c_shift, c_scale, be)
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
            n1c.linear(n1c.silu(temb)).chunk(6, dim=1)
        cq = _nmq(n1c.norm, encoder_hidden_states, c_shift_msa, c_scale_msa, be)
    attn_output, context_attn_output = self.attn(hidden_states=xq, encoder_hidden_states=cq,
                                                 **(joint_attention_kwargs or {}))
    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    hq = _nmq(self.norm2, hidden_states, shift_mlp, scale_mlp, be)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * _ff(self.ff, hq, be)
    if self.context_pre_only:
        return None, hidden_states
    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    ecq = _nmq(self.norm2_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp, be)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * _ff(
        self.ff_context, ecq, be)
    return encoder_hidden_states, hidden_states


def _hunyuan_double_forward(self, hidden_states, encoder_hidden_states, temb,
                            attention_mask=None, freqs_cis=None, *args, **kwargs):
    be = self._pyops_backend
    n1, n1c = self.norm1, self.norm1_context
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
        n1.linear(n1.silu(temb)).chunk(6, dim=1)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
        n1c.linear(n1c.silu(temb)).chunk(6, dim=1)
    xq = _nmq(n1.norm, hidden_states, shift_msa, scale_msa, be)
    cq = _nmq(n1c.norm, encoder_hidden_states, c_shift_msa, c_scale_msa, be)
    attn_output, context_attn_output = self.attn(hidden_states=xq, encoder_hidden_states=cq,
                                                 attention_mask=attention_mask,
                                                 image_rotary_emb=freqs_cis)
    hidden_states = hidden_states + attn_output * gate_msa.unsqueeze(1)
    encoder_hidden_states = encoder_hidden_states + context_attn_output * c_gate_msa.unsqueeze(1)
    hq = _nmq(self.norm2, hidden_states, shift_mlp, scale_mlp, be)
    ecq = _nmq(self.norm2_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp, be)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * _ff(self.ff, hq, be)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * _ff(
        self.ff_context, ecq, be)
    return hidden_states, encoder_hidden_states


def _dit_forward(self, x, c):
    be = self._pyops_backend
    B, N, D = x.shape
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(torch.nn.functional.silu(c)).chunk(6, -1)
    hq = _nmq(self.norm1, x, sh1, sc1, be)
    q, k, v = self.qkv(hq).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
    x = x + g1.unsqueeze(1) * self.proj(a)
    h2 = _nmq(self.norm2, x, sh2, sc2, be)
    return x + g2.unsqueeze(1) * self.fc2(_gelu_quant(self.fc1(h2), "tanh", be))


# class name -> (module the class lives in (prefix), precondition, fused forward)
FUSED_BLOCKS: dict[str, tuple[str, Callable, Callable]] = {
    "FluxTransformerBlock": ("diffusers.", _double_stream_ok("FluxAttnProcessor"),
                             _flux_double_forward),
    "FluxSingleTransformerBlock": ("diffusers.", _flux_single_ok, _flux_single_forward),
    "WanTransformerBlock": ("diffusers.", _wan_ok, _wan_forward),
    "JointTransformerBlock": ("diffusers.", _sd3_ok, _sd3_forward),
    "HunyuanVideoTransformerBlock": ("diffusers.",
                                     _double_stream_ok("HunyuanVideoAttnProcessor2_0"),
                                     _hunyuan_double_forward),
    "DiTBlock": ("pyops.models.dit", _dit_ok, _dit_forward),
}


def plan(block: nn.Module) -> tuple[Optional[Callable], str]:
    """(fused forward or None, reason) for one module."""
    entry = FUSED_BLOCKS.get(type(block).__name__)
    if entry is None or not type(block).__module__.startswith(entry[0]):
        return None, "no fused forward for this block"
    _, ok, fwd = entry
    try:
        why = ok(block)
    except AttributeError as e:  # another diffusers version's block layout
        why = f"unexpected block layout ({e})"
    return (None, why) if why is not None else (fwd, "fused")


def install(block: nn.Module, fwd: Callable, backend: Optional[str]) -> Callable:
    """Set ``block.forward`` (an instance attribute) to the fused forward; returns it."""
    block._pyops_backend = backend
    bound = types.MethodType(fwd, block)
    block.forward = bound
    return bound

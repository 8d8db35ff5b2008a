"""pyops attention inside diffusers' context parallelism (``ModelMixin.enable_parallelism``).

The ``pyops_<precision>`` backends (:mod:`pyops.patch.attention`) are registered as context
parallel capable. When diffusers hands a backend its ``_parallel_config``, :func:`cp_attention`
runs diffusers' own ``_templated_context_parallel_attention`` (written against diffusers
0.42.1, ``diffusers/models/attention_dispatch.py``) with :func:`forward_op`, i.e.
:func:`pyops.attention` on what each rank holds:

* Ulysses (``ulysses_degree > 1``): after diffusers' all-to-all a rank holds H / ulysses_degree
  heads over the whole sequence. pyops quantizes per head (K mid-range shift, Q/K channel
  smoothing, V channel scales: statistics over all tokens of one head; per-token Q/K scales),
  so each head sees the statistics of a single-process run; the output equals the
  single-process one up to fp32 summation order when the gathered sequence keeps the
  single-process token order (tests/test_context_parallel.py checks it). A model that splits
  several streams (Flux splits text and image tokens separately) gathers its tokens in another
  order; the key-block-wise P quantization (block of 64 keys, ``pyops/reference/attention.py``)
  then groups keys differently: the same recipe, different rounding. Attention that diffusers
  runs without the parallel config on sharded queries (Wan's cross-attention: local query
  tokens against the whole text) sees the Q channel amax (Q/K smoothing) of the local tokens.
* Ring (``ring_degree > 1``): a rank runs :func:`pyops.attention` of its query shard against
  each key/value shard in turn (statistics of that shard only) and diffusers merges the partial
  (out, lse) pairs (``out = prev - sigmoid(lse - prev_lse) * (prev - out)``, in fp32 by default:
  ``ContextParallelConfig.convert_to_fp32``). pyops' lse is the exact log-sum-exp of the
  scaled scores (the K shift is added back), so the merge weights are those of the shard's
  softmax. Each partial output is returned in the input dtype (pyops.attention has no fp32
  output), so the ring adds one rounding of the partials (bf16: 2^-9 relative) before the merge.
* Both (unified): diffusers' Ulysses all-to-all, then the ring.

Inference only: :func:`backward_op` raises. The cases pyops attention does not run (an
attention mask, dropout, inputs that need gradients, inputs other than bf16/fp16, head_dim > 128;
the list of ``pyops.ops.attention.sdpa_fallback_reason``) go, with a
one-time warning, to diffusers' ``"native"`` backend with the same parallel config (torch SDPA
inside diffusers' Ulysses all-to-all; it gathers a key mask) when ``ring_degree == 1``. With
``ring_degree > 1`` they raise ValueError: the native backend returns no lse, which the ring
merge needs. Causal attention and differing query / key-value head counts (GQA) raise
ValueError: diffusers' templated context parallel attention refuses them for every backend
(its Ulysses all-to-all reshapes the keys with the query head count; the native fallback would
fail there too).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..ops.attention import _warn_once, attention

__all__ = ["cp_attention", "forward_op", "backward_op"]


def forward_op(ctx, query, key, value, attn_mask=None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
               return_lse: bool = False, _save_ctx: bool = True, _parallel_config=None, *,
               precision: str, backend: str):
    """diffusers' context-parallel ``forward_op`` contract for :func:`pyops.attention`:
    query (B, Sq, H, D), key/value (B, Sk, H, D) bf16/fp16 on this rank; returns out (B, Sq, H,
    D) in query's dtype, and with ``return_lse`` also lse (B, Sq, H) fp32 (natural log of the
    softmax denominator of the scaled scores, as diffusers' ring merge expects). ``ctx`` is
    unused (nothing is saved: no backward). Masks, dropout and causal never reach it
    (:func:`cp_attention` routes them elsewhere); ValueError if they do."""
    if attn_mask is not None or dropout_p > 0.0 or is_causal:
        raise ValueError("pyops context-parallel forward_op: attn_mask, dropout and causal are "
                         "not supported (pyops.patch.context_parallel.cp_attention routes them)")
    out, lse = attention(query, key, value, layout="bshd", scale=scale, precision=precision,
                         backend=backend, return_lse=True)
    if return_lse:
        return out, lse.transpose(1, 2).contiguous()
    return out


def backward_op(ctx, grad_out, *args, **kwargs):
    """Always raises RuntimeError: pyops attention is forward only (no backward kernel)."""
    raise RuntimeError("pyops attention has no backward pass (inference only); for training "
                       "under context parallelism use a diffusers backend with a backward, "
                       "e.g. set_attention_backend('_native_cudnn') or 'flash'")


def cp_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                 parallel_config, *, precision: str, backend: str,
                 reason: Optional[str]) -> torch.Tensor:
    """Attention of one rank under diffusers' context parallelism (``parallel_config`` from
    ``enable_parallelism``): query/key/value (B, S_local, H, D) as diffusers' dispatcher passes
    them; returns (B, S_local, H, D) in query's dtype. ``reason``: why pyops attention cannot
    run these inputs (``sdpa_fallback_reason``) or None. Routes as the module docstring says;
    ValueError for causal attention, differing query / key-value head counts, and a fallback
    case with ``ring_degree > 1``."""
    from diffusers.models import attention_dispatch as ad

    cp = parallel_config.context_parallel_config
    if is_causal:
        raise ValueError("pyops attention under context parallelism: causal attention is not "
                         "supported (diffusers' templated context parallel attention refuses "
                         "it for every backend)")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"pyops attention under context parallelism: {query.shape[2]} query heads vs "
            f"{key.shape[2]} key/value heads (GQA) is not supported: diffusers' templated "
            f"context parallel attention refuses GQA, and its Ulysses all-to-all splits the "
            f"key heads by the query head count, for every backend")
    if reason is not None:
        if cp.ring_degree > 1:
            raise ValueError(
                f"pyops attention under ring context parallelism (ring_degree="
                f"{cp.ring_degree}) cannot run {reason}, and diffusers' native backend cannot "
                f"ring (it returns no lse); use ulysses_degree only, or a backend such as "
                f"'_native_cudnn' / 'flash' for this model")
        _warn_once("diffusers-cp:" + reason, f"pyops attention: falling back to diffusers' "
                   f"'native' context-parallel attention (torch SDPA) for {reason}")
        native = ad._AttentionBackendRegistry._backends[ad.AttentionBackendName.NATIVE]
        return native(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                      is_causal=False, scale=scale, enable_gqa=enable_gqa,
                      _parallel_config=parallel_config)
    fwd = functools.partial(forward_op, precision=precision, backend=backend)
    return ad._templated_context_parallel_attention(
        query, key, value, None, 0.0, False, scale, False, False, forward_op=fwd,
        backward_op=backward_op, _parallel_config=parallel_config)

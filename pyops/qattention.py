"""Quantized attention: ``pyops.attention`` and the SDPA-compatible ``pyops.sdpa``.

Inference only (no autograd), forward, non-causal or causal (top-left, as
``F.scaled_dot_product_attention``), any Sq and Sk (tails masked; Sq != Sk for cross attention),
GQA/MQA (Hq a multiple of Hk), bf16/fp16 in and out, any strides (the inputs are never copied
or mutated, except zero-padded copies for head dims other than 64/128), lse on request.

Head dims: every precision takes every head_dim >= 1. The Triton kernel runs 64 and 128
natively and zero-pads 1..127 to the next of them (a copy of Q/K/V; exact: zero channels add
nothing to Q K^T, give code 0 and are dropped from the output; nvfp4's 16-channel blocks and the
Hadamard rotation's power-of-two width come out of the same padding); above 128 the op runs the
PyTorch reference (slow) with a warning, and an explicit ``backend="triton"`` raises ValueError.

Quantization recipe (spec: ``pyops/reference/attention.py``; kernels:
``triton_kernels/attention_quant.py`` pre-pass, ``triton_kernels/attention.py``)
---------------------------------------------------------------------------------------------
1. K smoothing: subtract the per-(batch, kv head, channel) mid-range (max + min) / 2 over all
   tokens. Exact for softmax (a per-query constant); the lse adds ``scale * Q . shift`` back.
   Mid-range rather than mean: one stats pass gives both the shift and |K - shift|'s channel
   amax; measured equal to the mean in accuracy (reference, 256 tokens, D 64/128: within
   +-0.0004 cosine on every precision).
2. Q/K channel smoothing: t_c = sqrt(amax|K_c| / amax|Q_c|); K /= t, Q *= t (exact).
3. A shared orthonormal Hadamard rotation of Q and K along D (exact; generated in registers).
   Measured in the reference on outlier inputs (K with per-channel means and x20 outlier
   channels, 3x Q with x5 channels; B1 H2 S256; cos vs fp64, D=128): INT8 QK + FP8 PV: smoothing
   of K alone 0.9912, + channel smoothing 0.9993, + rotation 0.9990, + both 0.99955; without K
   smoothing 0.955. FP8 QK: 0.9930 / 0.9947 / 0.9812 / 0.9976. Both transforms are on by
   default; they cost the pre-pass one [64 x D] @ [D x D] product per 64 tokens (tf32 on GPU).
4. Q and K: per-token symmetric scales (the finest granularity whose cost in the kernel is one
   multiply per score: Q's scale folds into the max and the exp2 FMA). Measured against
   64-token blocks with the full recipe (B1 H2 S256 D128, INT8 QK): outlier cos 0.99956 vs
   0.99943, relL1 0.0264 vs 0.0295; random 0.0349 vs 0.0357; with K smoothing alone the gap is
   larger (outlier 0.9912 vs 0.9792).
   fp8: e4m3 with amax/448; int8: round-to-nearest-even with amax/127; nvfp4: E2M1 codes with
   E4M3 scales per 16 channels and an fp32 per-token second level.
5. P: p = exp2(s - m) is in [0, 1], quantized with the fixed scale 448 to e4m3 (no per-block
   amax needed). Measured: the scale barely matters for accuracy (without it, cos 0.99678 vs
   0.99677 at D=64): e4m3's subnormals already hold p down to 2^-9 and smaller p contribute
   little. It is kept because it costs nothing.
6. V: per-channel FP8 scales over all tokens (amax/448), codes stored transposed so the PV
   MMA's B operand is K-major; "int8_fp16pv" stores fp16 codes and fp16 P instead.
7. PV: each key block's product is a fresh fp32 MMA result added to the fp32 accumulator
   (promotion once per key block); the row sum l uses the unquantized p.

Precisions: "int8" (default: INT8 QK, FP8 PV, the SageAttention2 recipe), "fp8" (FP8 QK, FP8
PV), "int8_fp16pv" (accuracy first: INT8 QK, fp16 PV), "nvfp4" (the Blackwell recipe: Q and K
in NVFP4 (E2M1, E4M3 per 16 channels, fp32 per token), P in two levels (E2M1, E4M3 per 16 keys,
fp32 per row and key block = the block's row max / 2688), V in FP8), "bf16" (no quantization:
16-bit MMAs in the input dtype).

nvfp4 has two kernel paths, chosen per call by ``triton_kernels.attention.native_fp4_supported``
(compute capability 10.x or 12.x, not the interpreter; ``PYOPS_NVFP4_NATIVE=0`` forces emulation):
* NATIVE (sm_100/103, sm_120/121; UNVERIFIED: no Blackwell GPU was available): the pre-pass
  writes packed E2M1 codes (two per byte along D, element 2i in the low nibble) and E4M3 block
  scale bytes; QK^T is ``tl.dot_scaled(q, q_sb, "e2m1", k^T, k_sb, "e2m1")`` with float8e4nv
  scales (group 16 deduced from the scale shape), times the fp32 per-token levels as before.
  PV stays emulated (P decoded exactly to fp16, V's e4m3 to fp16, fp16 MMA): the hardware has
  no NVFP4 x FP8 instruction (``kind::mxf4nvf4`` needs both operands E2M1; ``kind::mxf8f6f4``
  takes UE8M0 scales in blocks of 32). A ``dot_scaled(P, P_sb, "e2m1", V, None, "e4m3")``
  compiles with Triton 3.9 to ``tcgen05.mma kind::f16`` on sm_100 and bf16 ``mma.sync`` on
  sm_120 (the decomposition), i.e. the same arithmetic as our explicit decode; a native PV
  needs V in NVFP4 too (SageAttention3 does that), a recipe change not measured here.
* EMULATED (Hopper, the interpreter, anything else): the pre-pass and the kernel decode the
  NVFP4 values exactly to fp16 and run fp16 MMAs -- the arithmetic ``tl.dot_scaled`` performs
  on Hopper -- so it measures the recipe's accuracy, not FP4 speed. Both paths quantize
  with the same arithmetic (native: ``_nvfp4_parts``, which also yields the packed codes and
  scale bytes; emulated: ``_nvfp4_values_2d``, the same values without a rank-3 reshape, see
  ``triton_kernels/attention.py``, "NVFP4 on sm_90"); they differ only in how QK^T is
  multiplied.

``tl.dot_scaled`` facts (found 2026, sources below):
* Signature (3.9 ``triton/language/core.py``): ``dot_scaled(lhs, lhs_scale, lhs_format, rhs,
  rhs_scale, rhs_format, acc=None, fast_math=False, lhs_k_pack=True, rhs_k_pack=True,
  out_dtype=float32)``; formats e2m1, e4m3, e5m2, bf16, fp16 (``semantic.dot_scaled``); e2m1 is
  two codes per uint8, first element in the low bits, packed along K unless k_pack=False;
  scale shape [M, K/group] for lhs and [N, K/group] for rhs (not transposed); the group size
  is deduced from the shapes (``ir.deduce_scale_factor``): 32 for uint8 E8M0 scales, 16 for
  float8e4nv (E4M3) scales = NVFP4. The docstring still only mentions E8M0. ``fast_math``
  skips the NaN/inf handling of the software upcast. Only fp32 accumulation.
* What it lowers to, checked here by compiling ahead of time with Triton 3.9 and its ptxas
  (``tests/test_attention_build.py``; no GPU): e2m1 x e2m1 with E4M3 scales per 16 ->
  sm_100 ``tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16``, sm_120
  ``mma.sync.aligned.m16n8k64...kind::mxf4nvf4.block_scale.scale_vec::4X...e2m1.e2m1.f32.ue4m3``,
  sm_90 bf16 ``wgmma`` (decomposed: values upcast to bf16, scales multiplied in).
* Interpreter (3.9 ``runtime/interpreter.py``, ``_dot_scaled_scale_to_f32``): scales are
  decoded as E8M0 whatever their dtype, so an E4M3-scaled call is only right for power-of-two
  scales; the CPU test uses a pre-pass hook that rounds block scales to powers of two and
  feeds the E8M0 byte of the same value (``_fp4_scales``), then requires the native kernel to
  equal the emulated one bit for bit (it catches e.g. a swapped nibble order).
* Triton 3.6 (the H100 target): NOT verified (no 3.6 here). History from the Triton repo:
  NVFP4 with float8e4nv scales crashed on sm_120 with 3.4 (triton-lang/triton#7549, 2025-07);
  native MXFP4/NVFP4 on sm_120 was proposed in #8430 (2025-10); sm_121 was only added to the
  native path by #10010 (2026-04, "falls through to DecomposeScaledBlocked ... bf16"); the
  Hopper/software decomposition learned E4M3 scales with group 16 only in #9772 (2026-03-18,
  "current decomposition expects block = 32"). So on 3.6 an NVFP4 dot_scaled on Hopper may
  be rejected or wrong -- another reason Hopper keeps the explicit fp16 emulation -- and the
  native Blackwell path should be run with Triton >= 3.9 (what was compiled here).

Accuracy measured on CPU, cosine / relative L1 vs fp64, bf16 inputs.
Simulated reference (block_n 64), B1 Hq4 Hk2 Sq200 Sk300:
  D128 random : fp8 .99873/.0500 int8 .99936/.0356 int8_fp16pv .99996/.0089 nvfp4 .98670/.162
  D128 outlier: fp8 .99705/.0591 int8 .99952/.0274 int8_fp16pv .99987/.0106 nvfp4 .96676/.182
  D64  random : fp8 .99871/.0499 int8 .99937/.0354 int8_fp16pv .99996/.0084 nvfp4 .98582/.165
  D64  outlier: fp8 .99725/.0477 int8 .99958/.0250 int8_fp16pv .99994/.0049 nvfp4 .96930/.128
Triton kernel in the interpreter (16x16 blocks), B1 Hq4 Hk2 Sq64 Sk80: within 0.001 cosine of
these (e.g. D128 random int8 0.99942/0.0338, outlier int8 0.99953/0.0273; bf16 0.999999/0.0014).
The default is "int8" because FP8 QK misses SageAttention2's random-input accuracy (relL1 0.050
> 0.038) while INT8 QK meets it at the same H100 tensor-core rate. Targets of the issue met in
the reference: random cos >= 0.9993 and relL1 <= 0.038 (int8), outlier cos >= 0.995 (int8, fp8,
int8_fp16pv), accuracy-first relL1 <= 0.015 (int8_fp16pv). nvfp4 meets none of them: next to int8 (random cos .99936 / relL1 .0356) and fp8
(.99873 / .0500) it loses about 0.013 cosine and triples the relative L1 (.98670 / .162) on
random inputs, and on outlier inputs falls to .967 / .182 against int8's .99952 / .0274 --
4-bit Q, K and P cost about 4x fp8's error with the same transforms. The native path quantizes
identically, so its accuracy should match these up to fp32 summation order (unmeasured).

Still to be justified by a GPU measurement (none could be made: no GPU was available, and
nothing in ``bench/RESULTS.md`` comes from this op yet): every speed claim; the block sizes and
stage counts; the pre-pass cost (two launches, K and V read twice); whether the rotation's tf32
product and the per-token scales cost measurable time; whether Triton folds ``acc * alpha +
dot(P, V)`` into the FP8 MMA's accumulator (which would undo the per-block promotion); FP8 vs
INT8 QK speed; accuracy on the GPU itself (the interpreter computes the dots in fp32).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from . import _backend
from ._checks import check_same_device, check_tensor, eager_fast_path
from .ops import attention as _op
from .reference.attention import PRECISIONS

LAYOUTS = ("bhsd", "bshd")
DTYPES = (torch.bfloat16, torch.float16)
_WARNED: set = set()


# The SDPA that pyops.sdpa falls back to: torch's builtin, which is what
# ``F.scaled_dot_product_attention`` is (torch 2.11-2.13). Never looked up through
# ``torch.nn.functional``, which users patch (``F.scaled_dot_product_attention = pyops.sdpa``):
# the fallback would then call itself.
_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
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
    qh, kh, vh = (_op.to_bhsd(t, layout) for t in (q, k, v))
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
    """Softmax attention with dynamically quantized Q, K, P, V (see the module docstring).

    q (B, Hq, Sq, D), k and v (B, Hk, Sk, D) for ``layout="bhsd"`` ((B, S, H, D) for "bshd"),
    bf16 or fp16, any strides. Returns the output (same layout as q, contiguous, q's dtype) and,
    with ``return_lse``, the log-sum-exp of the scaled scores (B, Hq, Sq) fp32 (natural log).
    precision: "int8" | "fp8" | "int8_fp16pv" | "nvfp4" (native dot_scaled QK^T on sm_100 /
    sm_120, emulated elsewhere) | "bf16".
    backend: "triton" | "reference" | None (auto: Triton on CUDA, the reference on CPU).
    head_dim: any D >= 1 in every precision (the kernel pads 1..127, larger runs the reference
    with a warning; see the module docstring).

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
    batch * heads > 65535.
    """
    _check(q, k, v, layout, precision, scale)
    D = q.shape[-1]
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    b = _backend.resolve(_op.OP, q.device, backend)
    if b == "triton" and _op.padded_head_dim(D) not in _op.NATIVE_HEAD_DIMS:
        if _backend.requested(_op.OP, backend) is not None:
            raise ValueError(f"pyops.attention: the Triton kernel supports head_dim <= 128 "
                             f"(64 and 128 natively, 1..127 zero-padded), got {D}; "
                             f"backend='reference' runs any head_dim")
        _warn_once(f"hd{D}", f"pyops.attention: head_dim {D} > 128 is not supported by the "
                   f"kernel; running the PyTorch reference (slow)")
        b = "reference"
    elif b == "triton" and D not in _op.NATIVE_HEAD_DIMS:
        _warn_once(f"pad{D}", f"pyops.attention: head_dim {D} is zero-padded to "
                   f"{_op.padded_head_dim(D)} (an extra copy of q, k, v)")
    if eager_fast_path(q, k, v):
        out, lse = _op.attention_impl(q, k, v, layout, precision, bool(causal), sc, b)
    else:
        out, lse = torch.ops.pyops.attention(q, k, v, layout, precision, bool(causal), sc, b)
    return (out, lse) if return_lse else out


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
         enable_gqa: bool = False, *, precision: str = "int8", backend: Optional[str] = None):
    """Drop-in for ``F.scaled_dot_product_attention`` (e.g. to patch a model's attention).

    Runs ``pyops.attention`` (bhsd layout) when it can; falls back to torch's builtin SDPA
    (never through ``torch.nn.functional``, so patching
    ``torch.nn.functional.scaled_dot_product_attention = pyops.sdpa`` cannot recurse) with a
    one-time warning per reason for: an ``attn_mask``,
    ``dropout_p > 0``, inputs that need gradients, inputs that are not 4-D bf16/fp16, head dims
    above 128, differing head counts without ``enable_gqa`` (torch then raises as it would),
    key/value head dims that differ, and CPU tensors unless ``backend`` is given.
    """
    reason = None
    if attn_mask is not None:
        reason = "attn_mask"
    elif dropout_p > 0.0:
        reason = "dropout_p > 0"
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        reason = "inputs that require grad (pyops.attention is forward only)"
    elif any(not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in DTYPES
             for t in (query, key, value)):
        reason = "inputs other than 4-D bf16/fp16"
    elif query.shape[-1] > 128 or value.shape[-1] != query.shape[-1]:
        reason = "head_dim > 128 or value head_dim != query head_dim"
    elif query.shape[1] != key.shape[1] and not enable_gqa:
        reason = "differing head counts without enable_gqa"
    elif query.device.type != "cuda" and backend is None:
        reason = "CPU tensors"
    if reason is not None:
        _warn_once("sdpa:" + reason, f"pyops.sdpa: falling back to "
                   f"F.scaled_dot_product_attention for {reason}")
        kw = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale, **kw)
    return attention(query, key, value, layout="bhsd", scale=scale, precision=precision,
                     causal=is_causal, backend=backend)

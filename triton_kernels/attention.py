"""Flash-attention forward with quantized QK^T and PV. Spec: ``pyops/reference/attention.py``
(``simulated_attention``: same block-by-block arithmetic; fp32 summation order may differ).

Host entry (destination-passing, current stream, no host sync)::

    attention_fwd(qc, kc, vt, qs, ks, vs, qb, out, lse, precision, causal, sm_scale)

with the pre-pass buffers of ``attention_quant.quantize_qkv`` (or, for ``precision="bf16"``,
the raw q (B,Hq,Sq,D), k, v (B,Hk,Sk,D) strided views and no scales). ``out`` (B, Hq, Sq, D)
any strides, in the input dtype; ``lse`` (B, Hq, Sq) fp32 or None.

Per program: BLOCK_M query rows of one head (grid (cdiv(Sq, BLOCK_M), B * Hq); GQA maps query
head h to kv head h // (Hq // Hk)). Main loop over BLOCK_N keys:

    S   = dot(Qc, Kc^T)                  fp8 x fp8 -> fp32, int8 x int8 -> int32, fp16 (nvfp4
                                         decoded) -> fp32; times s_q[i] * s_k[j] (s_q includes
                                         scale * log2 e) -- raw 16-bit: times scale * log2 e
    m'  = max(m, rowmax S); p = exp2(S - m'); alpha = exp2(m - m'); l = l * alpha + rowsum p
    P   fp8: e4m3(p * 448)   fp16: fp16(p)   raw: the input dtype
        nvfp4 (emulated): g = rowmax(p) / 2688 per row, E4M3 per 16 keys, E2M1; decoded
        exactly to fp16 (V's e4m3 codes too), fp16 MMA, the block's product times g
    acc = acc * alpha + dot(P, V)        a fresh fp32 product per key block, added in fp32
    out = acc / l * s_v / p_scale;  lse = (m + log2 l) * ln 2 + qb

Tails are masked (keys j >= Sk get -inf, rows i >= Sq are not stored); causal is top-left.
Offsets are int64. Under the interpreter (CPU) the operands are decoded to fp32 with exact bit
arithmetic and the dots run in fp32 (the interpreter's fp8/bf16 casts and bf16 dot are wrong);
on a GPU the dots take the fp8/int8/fp16/bf16 operands natively. Conversions follow SOFT
(``_cvt.use_soft_cvt``), not INTERPRET, so the GPU branch can also run under the interpreter
(test hook ``GPU_BRANCH_IN_INTERPRETER``) and ``PYOPS_TRITON_SOFT_CVT=1`` reaches every cast.

NVFP4 on sm_90 (the emulated path). Measured on an H200 (Triton 3.6): "nvfp4" gave cos 0.728 (D
64) / 0.832 (D 128) against fp32 at (1, 2, 256, D) where the simulated reference gives 0.986,
while int8, fp8 and int8_fp16pv were right (the GPU test run of 2026-11-30; the benchmark's
accuracy columns in bench/RESULTS.md section 1 show the same: cos ~0.83 / ~0.73); the
interpreter tests passed. Read against the compiled semantics, the nvfp4 path is made of pieces
shared with those correct precisions (loads, V's e4m3 bytes, the fp32 softmax, the hardware fp32
-> e4m3 cast, which the quantizer GPU tests of that run compared bit for bit with the host
reference without a failure), exact steps (fp16 MMAs of e2m1 x e4m3 values; V's e4m3 -> fp16
decode, one cvt.rn.f16x2.e4m3x2 per pair whose element order Triton's lowering keeps) and one
construct no other precision used: a rank-3 ``tl.reshape`` of a dot result to (rows, n/16, 16),
reduced along the 16s and broadcast back -- P here (from the QK^T MMA layout), Q/K in the
pre-pass (from the Hadamard dot) -- a layout path the interpreter (numpy) cannot exercise and
Triton's 3-D reduce/reshape lowering has had wrong-result bugs in before (e.g.
triton-lang/triton#4116: right under TRITON_INTERPRET=1, wrong compiled). Both kernels now
compute each 16-element group's scale as a masked row max on the 2-D tile (one more row
reduction per group) and build no rank-3 tensor (tests/test_attention_build.py compiles both for
sm_90 and checks). This is the cause by elimination, NOT verified on hardware (no GPU here);
tests/test_attention_nvfp4.py holds the GPU checks that name the failing stage (pre-pass codes
bit for bit, this kernel against the recipe on the pre-pass's own buffers, the op against the
simulated reference on the same input).

Config (``pick_config``): int8 at D=128 on sm_90 uses the best of an H200 block-size sweep
(BLOCK_M 64, BLOCK_N 128, 4 warps, 3 stages: 519 TFLOPS end to end at the Wan shape against 471
for the old default; ``MEASURED_CONFIGS``). Everything else keeps the unmeasured starting points:
D=128: BLOCK_M 128, BLOCK_N 128 (fp8/int8) or 64, 8 warps, 3 stages; D=64: BLOCK_M 128,
BLOCK_N 128, 4 warps.
No TMA descriptors or warp specialization (not attempted: unverifiable here).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._cvt import (ATTENTION_KINDS, E2M1_MAX, KIND_FP8, KIND_FP16, KIND_INT8, KIND_NVFP4,
                   KIND_RAW, LN2, LOG2E, NVFP4_BLOCK, as_kernel_input, as_kernel_output,
                   e2m1_round, e4m3_bits, e4m3_to_f32, e8m0_nearest, f32_to_out, load_f32,
                   nvfp4_block_scales, nvfp4_global_scale, out_kind, use_soft_cvt)

FORCE_CONFIG: Optional[dict] = None  # test hook (small blocks for the interpreter)
# test hook: under the interpreter, run the kernel's GPU branch (native operand dtypes: fp16
# codes, fp8 bytes bitcast and decoded to fp16, fp16 dots) instead of its fp32 decode. Exact
# for "nvfp4" (the interpreter multiplies fp16 operands exactly); conversions still follow
# SOFT, since the interpreter's own fp8 casts are inexact.
GPU_BRANCH_IN_INTERPRETER = False
# The kernel's QK and PV constexprs are the ``qk`` and ``p`` kinds of ``_cvt.ATTENTION_KINDS``:
# QK KIND_RAW (16-bit input), KIND_FP8, KIND_INT8, KIND_NVFP4 (emulated: fp16 decoded codes);
# PV KIND_RAW, KIND_FP8 (P x 448), KIND_FP16, KIND_NVFP4 (two-level NVFP4 P x fp8 V, emulated:
# decoded exactly to fp16 operands).


@triton.jit
def _operand(ptr, offs, mask, KIND: tl.constexpr, IS_BF16: tl.constexpr,
             INTERPRET: tl.constexpr, HAS_MASK: tl.constexpr = True):
    """Load a dot operand. On the GPU the native type (fp8 bitcast from bytes, int8, 16-bit);
    under the interpreter exact fp32 values. HAS_MASK=False: an unmasked (vectorizable) load on
    the GPU (the interpreter always masks; it is not about speed there)."""
    if INTERPRET:
        if KIND == KIND_FP8:
            x = e4m3_to_f32(tl.load(ptr + offs, mask=mask, other=0), True)
        elif KIND == KIND_INT8:
            x = tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)
        else:
            x = load_f32(ptr, offs, mask, IS_BF16)
    else:
        if HAS_MASK:
            x = tl.load(ptr + offs, mask=mask, other=0)
        else:
            x = tl.load(ptr + offs)
        if KIND == KIND_FP8:
            x = x.to(tl.float8e4nv, bitcast=True)
    return x


@triton.jit
def _fp4_scales(ptr, offs, mask, INTERPRET: tl.constexpr):
    """E4M3 block-scale bytes -> the dot_scaled scale operand: float8e4nv on the GPU (NVFP4,
    group 16). Under the 3.9 interpreter, whose dot_scaled decodes scales as E8M0 only, the byte
    of 2^round(log2(value)) -- exact only for power-of-two scales (the pow2_scales test hook);
    zero stays byte 0 (2^-127; its codes are all zero)."""
    b = tl.load(ptr + offs, mask=mask, other=0)
    if INTERPRET:
        r = e8m0_nearest(e4m3_to_f32(b, True))
    else:
        r = b.to(tl.float8e4nv, bitcast=True)
    return r


@triton.jit
def _attn_block(acc, l_i, m_i, q, qsc, rows, n0, Sk, k_ptr, kbase, sks, skd, v_ptr, vbase,
                svs, svd, ks_ptr, ksbase, c_raw, d, qsb, ksb_ptr,
                QK: tl.constexpr, PV: tl.constexpr, IS_BF16: tl.constexpr,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, P_SCALE: tl.constexpr,
                BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr, NATIVE_FP4: tl.constexpr,
                D: tl.constexpr, SOFT: tl.constexpr):
    """One key block of the online softmax. MASK: the block may hold keys >= Sk or (CAUSAL)
    keys past the diagonal; unmasked blocks skip every per-score select."""
    cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    cmask = cols < Sk
    if NATIVE_FP4:  # packed E2M1 K^T [D/2, BLOCK_N] (packed along D) + E4M3 [BLOCK_N, D/16]
        dh = tl.arange(0, D // 2)
        ds = tl.arange(0, D // NVFP4_BLOCK)
        kt = tl.load(k_ptr + kbase + cols[None, :] * sks + dh[:, None] * skd,
                     mask=cmask[None, :], other=0)
        ksb = _fp4_scales(ksb_ptr, (ksbase + cols[:, None]) * (D // NVFP4_BLOCK) + ds[None, :],
                          cmask[:, None], INTERPRET)
    else:
        kt = _operand(k_ptr, kbase + cols[None, :] * sks + d[:, None] * skd, cmask[None, :], QK,
                      IS_BF16 and QK == KIND_RAW, INTERPRET, MASK)  # [D, BLOCK_N]
    # V operand: E4M3 bytes for PV fp8 and nvfp4 (ATTENTION_KINDS' v), 16-bit for PV raw (the
    # input) and fp16 (fp16 codes)
    v = _operand(v_ptr, vbase + cols[:, None] * svs + d[None, :] * svd, cmask[:, None],
                 KIND_FP8 if (PV == KIND_FP8 or PV == KIND_NVFP4) else KIND_RAW,
                 IS_BF16 and PV == KIND_RAW, INTERPRET, MASK)  # [BLOCK_N, D]
    if NATIVE_FP4:  # NVFP4 x NVFP4 -> fp32 (tcgen05 / mma.sync kind::mxf4nvf4, block 16)
        s = tl.dot_scaled(q, qsb, "e2m1", kt, ksb, "e2m1")
    elif INTERPRET:
        s = tl.dot(q, kt, input_precision="ieee")
    elif QK == KIND_INT8:
        s = tl.dot(q, kt).to(tl.float32)
    else:
        s = tl.dot(q, kt)
    # scores in log2 units are s * qsc[i] * ksc[j]; qsc > 0 is folded into the max and the
    # exp2 argument (one FMA), so only ksc costs a multiply per score
    if QK != KIND_RAW:
        if MASK:
            ksc = tl.load(ks_ptr + ksbase + cols, mask=cmask, other=0.0)
        else:
            ksc = tl.load(ks_ptr + ksbase + cols)
        s = s * ksc[None, :]
    if MASK:
        valid = cmask[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        s = tl.where(valid, s, float("-inf"))
    if QK != KIND_RAW:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qsc)
        p = tl.math.exp2(s * qsc[:, None] - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * c_raw)
        p = tl.math.exp2(s * c_raw - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if PV == KIND_FP8:
        if INTERPRET:
            pq = e4m3_to_f32(e4m3_bits(p * P_SCALE, True), True)
        else:
            pq = (p * P_SCALE).to(tl.float8e4nv)
    elif PV == KIND_FP16:
        if INTERPRET:
            pq = p.to(tl.float16).to(tl.float32)
        else:
            pq = p.to(tl.float16)
    elif PV == KIND_NVFP4:  # NVFP4 P: fp32 per row (block row max / 2688), E4M3 per 16
        # keys, E2M1
        g = nvfp4_global_scale(tl.max(p, axis=1))
        # the E4M3 scale of each 16-key group, broadcast back over its keys; kept 2-D (no
        # rank-3 reshape of the dot result: module docstring, "NVFP4 on sm_90")
        sb = nvfp4_block_scales(p, g, BLOCK_N, SOFT)  # p >= 0
        den = sb * g[:, None]
        e = e2m1_round(tl.minimum(tl.math.div_rn(p, tl.where(den > 0, den, 1.0)), E2M1_MAX))
        pq = tl.where(sb > 0, e * sb, 0.0)
        if not INTERPRET:
            pq = pq.to(tl.float16)  # e2m1 x e4m3: exact in fp16
            v = v.to(tl.float16)  # e4m3 -> fp16: exact
    else:
        if INTERPRET:
            pq = p
        else:
            pq = p.to(v.dtype)
    if INTERPRET:
        pv = tl.dot(pq, v, input_precision="ieee")
    else:
        pv = tl.dot(pq, v)
    if PV == KIND_NVFP4:
        pv = pv * g[:, None]
    # a fresh fp32 product per key block, added in fp32 (FP8 MMA partial sums never span
    # more than one key block)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, qb_ptr, o_ptr, lse_ptr,
                     qsb_ptr, ksb_ptr,
                     Hq, GROUP, Sq, Sk, c_raw,
                     sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                     sob, soh, sos, sod,
                     QK: tl.constexpr, PV: tl.constexpr, IS_BF16: tl.constexpr,
                     OUT_KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_LSE: tl.constexpr,
                     P_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr, SOFT: tl.constexpr,
                     NATIVE_FP4: tl.constexpr = False):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Sq
    d = tl.arange(0, D)
    if NATIVE_FP4:  # packed E2M1 Q [BLOCK_M, D/2] + E4M3 block scales [BLOCK_M, D/16]
        dh = tl.arange(0, D // 2)
        ds = tl.arange(0, D // NVFP4_BLOCK)
        q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqs + dh[None, :] * sqd,
                    mask=rmask[:, None], other=0)
        qsb = _fp4_scales(qsb_ptr, (bh.to(tl.int64) * Sq + rows[:, None]) * (D // NVFP4_BLOCK)
                          + ds[None, :], rmask[:, None], INTERPRET)
    else:
        q = _operand(q_ptr, b * sqb + h * sqh + rows[:, None] * sqs + d[None, :] * sqd,
                     rmask[:, None], QK, IS_BF16 and QK == KIND_RAW, INTERPRET)
        qsb = rmask  # unused
    if QK != KIND_RAW:
        qsc = tl.load(qs_ptr + bh.to(tl.int64) * Sq + rows, mask=rmask, other=1.0)
    else:
        qsc = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    kbase = b * skb + hk * skh
    vbase = b * svb + hk * svh
    bhk = b * (Hq // GROUP) + hk
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    # key blocks [0, n_full) need no mask; [n_full, hi) hold the Sk tail or the diagonal
    n_full = (Sk // BLOCK_N) * BLOCK_N
    hi = Sk
    if CAUSAL:
        n_full = tl.minimum(n_full, ((pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qsc, rows, n0, Sk, k_ptr, kbase, sks, skd,
                                    v_ptr, vbase, svs, svd, ks_ptr, bhk * Sk, c_raw, d,
                                    qsb, ksb_ptr, QK, PV, IS_BF16, False, CAUSAL, P_SCALE,
                                    BLOCK_N, INTERPRET, NATIVE_FP4, D, SOFT)
    for n0 in range(n_full, hi, BLOCK_N):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qsc, rows, n0, Sk, k_ptr, kbase, sks, skd,
                                    v_ptr, vbase, svs, svd, ks_ptr, bhk * Sk, c_raw, d,
                                    qsb, ksb_ptr, QK, PV, IS_BF16, True, CAUSAL, P_SCALE,
                                    BLOCK_N, INTERPRET, NATIVE_FP4, D, SOFT)
    o = acc / l_i[:, None]
    if PV != KIND_RAW:
        vsc = tl.load(vs_ptr + bhk * D + d)
        o = o * (vsc / P_SCALE)[None, :]
    tl.store(o_ptr + b * sob + h * soh + rows[:, None] * sos + d[None, :] * sod,
             f32_to_out(o, OUT_KIND, SOFT), mask=rmask[:, None])
    if HAS_LSE:
        lse = (m_i + tl.math.log2(l_i)) * LN2
        if QK != KIND_RAW:
            lse = lse + tl.load(qb_ptr + bh.to(tl.int64) * Sq + rows, mask=rmask, other=0.0)
        tl.store(lse_ptr + bh.to(tl.int64) * Sq + rows, lse, mask=rmask)


# Measured configurations, (capability, D, precision) -> config. H200 (sm_90), Triton 3.6,
# 2026-11-30, block-size sweep of the int8 kernel at the Wan 480p shape (1, 40, 32760, 128), end
# to end incl. the pre-pass (bench/RESULTS.md, section 1, "Block-size sweep"):
# (BLOCK_M 128, BLOCK_N 128, 8 warps, 3 stages) 471 TFLOPS (the old default), (64, 128, 4, 3)
# 519, (128, 128, 4, 2) 352, (128, 64, 8, 4) 412, (128, 64, 4, 3) 304. Other precisions, head
# dims and GPUs were not swept: they keep the starting points below.
MEASURED_CONFIGS = {
    ((9, 0), 128, "int8"): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
}


def pick_config(D: int, precision: str, interpret: bool,
                capability: Optional[tuple] = None) -> dict:
    """The kernel's launch configuration: FORCE_CONFIG (tests), the interpreter's small blocks,
    a measured entry of MEASURED_CONFIGS for this GPU (``capability``), else the unmeasured
    starting points."""
    if FORCE_CONFIG is not None:
        return dict(FORCE_CONFIG)
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    measured = MEASURED_CONFIGS.get((tuple(capability or ()), D, precision))
    if measured is not None:
        return dict(measured)
    quant = precision in ("fp8", "int8")
    if D <= 64:
        return dict(BLOCK_M=128, BLOCK_N=128 if quant else 64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128 if quant else 64, num_warps=8, num_stages=3)


def attention_fwd(q, k, v, qs, ks, vs, qb, out, lse, precision: str, causal: bool,
                  sm_scale: float, Hq: int, qsb=None, ksb=None) -> None:
    """q (B,Hq,Sq,D) codes or raw, k (B,Hk,Sk,D), v as a (B,Hk,Sk,D) view (for quantized
    precisions: vt (B,Hk,D,Sk_pad) transposed, i.e. ``vt.transpose(-1, -2)[:, :, :Sk]``).
    nvfp4 native (``qsb``/``ksb`` given: ``quantize_qkv(..., native=True)``): q/k are packed
    E2M1 codes (..., D/2) uint8 and qsb/ksb the E4M3 block-scale bytes (..., D/16); QK^T runs
    through ``tl.dot_scaled``: the caller decides (``pyops._backend.native_fp4``: sm_100/103
    tcgen05.mma kind::mxf4nvf4 block16, sm_120/121 mma.sync kind::mxf4nvf4 scale_vec::4X ue4m3,
    the instructions the 3.9 compiler emits ahead of time, tests/test_attention_build.py);
    elsewhere (Hopper, the interpreter) nvfp4 runs emulated."""
    native = qsb is not None
    B, _, Sq, D = q.shape
    if native:
        D = 2 * D
    Hk, Sk = k.shape[1], k.shape[2]
    interp = q.device.type != "cuda"
    soft = use_soft_cvt(out)
    kinterp = interp and not GPU_BRANCH_IN_INTERPRETER
    kinds = ATTENTION_KINDS[precision]
    QK, PV = kinds.qk, kinds.p
    cfg = pick_config(D, precision, interp,
                      None if interp else torch.cuda.get_device_capability(q.device))
    is_bf16 = out.dtype == torch.bfloat16
    if QK == KIND_RAW:
        qk_, kk_, vk_ = (as_kernel_input(t) if interp else t for t in (q, k, v))
    else:
        qk_, kk_ = q, k
        vk_ = v
    ok = as_kernel_output(out, soft)
    dummy = out if QK == KIND_RAW else qs
    if B * Hq > 65535:  # CUDA's grid-y limit
        raise ValueError(f"pyops.attention: batch * heads = {B * Hq} exceeds 65535; split the "
                         f"batch")
    grid = (triton.cdiv(Sq, cfg["BLOCK_M"]), B * Hq)
    _attn_fwd_kernel[grid](
        qk_, kk_, vk_, dummy if qs is None else qs, dummy if ks is None else ks,
        dummy if vs is None else vs, dummy if qb is None else qb, ok,
        lse if lse is not None else dummy,
        qsb if native else dummy, ksb if native else dummy,
        Hq, Hq // Hk, Sq, Sk, float(sm_scale) * LOG2E.value,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        QK=QK, PV=PV, IS_BF16=is_bf16, OUT_KIND=out_kind(out.dtype), CAUSAL=bool(causal),
        HAS_LSE=lse is not None, P_SCALE=kinds.p_scale, D=D, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], INTERPRET=kinterp, SOFT=soft, NATIVE_FP4=native,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

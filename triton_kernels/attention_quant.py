"""Attention pre-pass: quantize Q, K (smoothed) and V into the attention kernel's layout.

Spec: ``pyops/reference/attention.py`` (``quantize_qkv``). Two launches on the current stream, no
host sync, every buffer sized from shapes only:

1. ``_qkv_stats_kernel`` (grid: heads x NCH token chunks): per-channel partial statistics
   over a chunk of tokens: amax |Q| (per query head), max K and min K, amax |V| (per kv head).
   The K shift, the Q/K channel smoothing and V's per-channel scale all need a reduction over
   *every* token before the first code can be written, so this pass cannot be folded into the
   quantize pass without a grid-wide barrier.
2. ``_qkv_quant_kernel`` (grid: one program per BT tokens of a Q head or a KV head): reduces the
   NCH partials (fixed order: deterministic), then shift / channel-smooth / rotate (Hadamard
   generated in registers: H[i, j] = (-1)^popcount(i & j) / sqrt(D)) / quantize per token and
   writes: codes, per-token scales (Q's times scale * log2 e), the lse correction of each query
   row, V's codes transposed ((B, Hk, D, Sk_pad): the PV MMA's B operand K-major, as FP8 wgmma
   wants) and V's per-channel scales.

Both read the inputs with any strides (int64 offsets). Reads: Q once... K and V twice (stats +
quantize); writes one byte per element (fp8/int8) or two (fp16 codes). Counted in every
benchmark number of pyops.attention.

inf/NaN (the reference's rule): the statistics leave out Q and K token rows holding inf/NaN; such
a row, after the transforms, is quantized as zeros and gets scale NaN (Q: lse correction NaN); a
V channel holding inf/NaN (its partial amax stored as NaN) gets scale NaN and codes 0. Explicit
selects, not NaN propagation: tl.max / tl.maximum drop NaN (maxNum, GPU and interpreter alike).

Kinds (``_cvt.ATTENTION_KINDS``: ``qk`` -> QK_KIND, ``v`` -> PV_KIND): Q/K codes KIND_FP8 (e4m3
uint8 bytes), KIND_INT8, KIND_NVFP4 (E2M1 x E4M3-per-16 decoded exactly to fp16, or with
``native`` packed E2M1 codes + E4M3 scale bytes; per-token fp32 second level in the scale); V
codes KIND_FP8 (e4m3 bytes) or KIND_FP16.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._cvt import (ATTENTION_KINDS, E2M1_MAX, FLT_MIN, INT8_MAX, KIND_FP8, KIND_FP16,
                   KIND_INT8, KIND_NVFP4, LN2, LOG2E, NVFP4_BLOCK, as_kernel_input, e2m1_codes,
                   e2m1_pack, e2m1_round, e4m3_bits, e4m3_to_f32, f32_to_int8, fp8_codes,
                   fp8_scale, fp8_scaled, load_f32, nvfp4_block_scale, nvfp4_block_scales,
                   nvfp4_global_scale, nvfp4_pow2_scale, use_soft_cvt)

MAX_CHUNKS = 32
# storage dtype of each code kind (Q/K codes, V codes)
_CODE_DTYPE = {KIND_FP8.value: torch.uint8, KIND_INT8.value: torch.int8,
               KIND_NVFP4.value: torch.float16, KIND_FP16.value: torch.float16}


@triton.jit
def _finite_rows(x):
    """x (R, C) -> (R,) bool: the row holds no inf and no NaN."""
    return tl.min(tl.where(tl.abs(x) < float("inf"), 1, 0), axis=1) > 0


@triton.jit
def _qkv_stats_kernel(q_ptr, k_ptr, v_ptr, qa_ptr, kmx_ptr, kmn_ptr, va_ptr,
                      n_qh, Hq, Hk, Sq, Sk, chq, chk, NCH,
                      sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                      IS_BF16: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    ch = tl.program_id(1)
    d = tl.arange(0, D)
    tt = tl.arange(0, BT)
    if pid < n_qh:
        b = (pid // Hq).to(tl.int64)
        h = (pid % Hq).to(tl.int64)
        base = b * sqb + h * sqh
        amax = tl.zeros([D], dtype=tl.float32)
        t_lo = ch * chq
        t_hi = tl.minimum(t_lo + chq, Sq)
        for t0 in range(t_lo, t_hi, BT):
            rows = t0 + tt.to(tl.int64)
            m = (rows < t_hi)[:, None]
            x = load_f32(q_ptr, base + rows[:, None] * sqs + d[None, :] * sqd, m, IS_BF16)
            x = tl.where(_finite_rows(x)[:, None], x, 0.0)  # non-finite tokens left out
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
        tl.store(qa_ptr + (pid.to(tl.int64) * NCH + ch) * D + d, amax)
    else:
        p = pid - n_qh
        b = (p // Hk).to(tl.int64)
        h = (p % Hk).to(tl.int64)
        kbase = b * skb + h * skh
        vbase = b * svb + h * svh
        kmx = tl.full([D], float("-inf"), dtype=tl.float32)
        kmn = tl.full([D], float("inf"), dtype=tl.float32)
        va = tl.zeros([D], dtype=tl.float32)
        vbad = tl.zeros([D], dtype=tl.int32)
        t_lo = ch * chk
        t_hi = tl.minimum(t_lo + chk, Sk)
        for t0 in range(t_lo, t_hi, BT):
            rows = t0 + tt.to(tl.int64)
            m = (rows < t_hi)[:, None]
            x = load_f32(k_ptr, kbase + rows[:, None] * sks + d[None, :] * skd, m, IS_BF16)
            ok = m & _finite_rows(x)[:, None]  # non-finite tokens left out
            kmx = tl.maximum(kmx, tl.max(tl.where(ok, x, float("-inf")), axis=0))
            kmn = tl.minimum(kmn, tl.min(tl.where(ok, x, float("inf")), axis=0))
            y = load_f32(v_ptr, vbase + rows[:, None] * svs + d[None, :] * svd, m, IS_BF16)
            va = tl.maximum(va, tl.max(tl.abs(y), axis=0))
            vbad = tl.maximum(vbad, tl.max(tl.where(tl.abs(y) < float("inf"), 0, 1), axis=0))
        o = (p.to(tl.int64) * NCH + ch) * D + d
        tl.store(kmx_ptr + o, kmx)
        tl.store(kmn_ptr + o, kmn)
        tl.store(va_ptr + o, tl.where(vbad > 0, float("nan"), va))  # NaN: channel not finite


@triton.jit
def _hadamard(D: tl.constexpr, LOG_D: tl.constexpr, RSQRT_D: tl.constexpr):
    i = tl.arange(0, D)[:, None]
    j = tl.arange(0, D)[None, :]
    a = i & j
    par = tl.zeros([D, D], dtype=tl.int32)
    for bit in tl.static_range(LOG_D):
        par = par ^ ((a >> bit) & 1)
    return tl.where(par == 0, RSQRT_D, -RSQRT_D).to(tl.float32)


@triton.jit
def _nvfp4_parts(x, SOFT: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
                 POW2: tl.constexpr):
    """x (BT, D) fp32 -> (s (BT,) fp32 per-token second level, E4M3 block-scale bytes
    (BT, D/16) uint8, their fp32 values, E2M1 values v (BT, D/16, 16) in [-6, 6] before
    rounding). POW2 (test hook): block scales rounded up to powers of two (the interpreter's
    dot_scaled decodes scales as E8M0 only)."""
    s = nvfp4_global_scale(tl.max(tl.abs(x), axis=1))
    xb = tl.reshape(x, [BT, D // NVFP4_BLOCK, NVFP4_BLOCK])
    bam = tl.max(tl.abs(xb), axis=2)
    sb = nvfp4_block_scale(bam, s[:, None])
    if POW2:
        sb = nvfp4_pow2_scale(sb)
    sbits = e4m3_bits(sb, SOFT)
    sb = e4m3_to_f32(sbits, SOFT)
    den = sb * s[:, None]
    v = tl.math.div_rn(xb, tl.where(den > 0, den, 1.0)[:, :, None])
    v = tl.minimum(tl.maximum(v, -E2M1_MAX), E2M1_MAX)
    v = tl.where((sb > 0)[:, :, None], v, 0.0)
    return s, sbits, sb, v


@triton.jit
def _nvfp4_values_2d(x, SOFT: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
                     POW2: tl.constexpr):
    """The emulated path's NVFP4 quantization, without rank-3 tensors: x (BT, D) fp32 ->
    (decoded values e2m1 * E4M3 block scale (BT, D) fp32, per-token second level s (BT,)).

    The same arithmetic as ``_nvfp4_parts`` (the native path, which needs the packed codes and
    the scale bytes), element for element. The E4M3 scale of each 16-channel block is computed
    from a masked row max and broadcast back over its 16 channels, so x (on the GPU the result
    of the Hadamard dot) is never reshaped to (BT, D/16, 16): see ``attention.py``'s module
    docstring, "NVFP4 on sm_90"."""
    a = tl.abs(x)
    s = nvfp4_global_scale(tl.max(a, axis=1))
    sb = nvfp4_block_scales(a, s, D, SOFT, POW2)
    den = sb * s[:, None]
    v = tl.math.div_rn(x, tl.where(den > 0, den, 1.0))
    v = tl.minimum(tl.maximum(v, -E2M1_MAX), E2M1_MAX)
    return tl.where(sb > 0, e2m1_round(v) * sb, 0.0), s


@triton.jit
def _pack_e2m1(v, R: tl.constexpr, C: tl.constexpr):
    """E2M1 values v (any shape with R * C elements) -> (R, C/2) uint8 codes, element 2i in the
    low nibble (the NVFP4 / tl.dot_scaled packing along the reduction dim)."""
    lo, hi = tl.split(tl.reshape(e2m1_codes(v), [R, C // 2, 2]))
    return e2m1_pack(lo, hi)


@triton.jit
def _quant_tokens(x, KIND: tl.constexpr, SOFT: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
                  POW2: tl.constexpr = False):
    """x (BT, D) fp32 -> (codes to store, per-token scale (BT,))."""
    amax = tl.max(tl.abs(x), axis=1)
    if KIND == KIND_FP8:
        s = fp8_scale(amax)
        c = fp8_codes(x, s[:, None], SOFT)
    elif KIND == KIND_INT8:
        s = tl.maximum(tl.math.div_rn(amax, INT8_MAX), FLT_MIN)
        c = f32_to_int8(tl.math.div_rn(x, s[:, None]))
    else:  # KIND_NVFP4 emulated: per-token fp32 s, E4M3 per 16 channels, E2M1; stored decoded
        val, s = _nvfp4_values_2d(x, SOFT, BT, D, POW2)
        c = val.to(tl.float16)  # e2m1 x e4m3: exact in fp16
    return c, s


@triton.jit
def _qkv_quant_kernel(q_ptr, k_ptr, v_ptr, qa_ptr, kmx_ptr, kmn_ptr, va_ptr,
                      qc_ptr, qs_ptr, qb_ptr, kc_ptr, ks_ptr, vt_ptr, vs_ptr, qsb_ptr, ksb_ptr,
                      n_qprog, nqt, nkt, Hq, Hk, GROUP, Sq, Sk, Sk_pad, NCH, c_log2,
                      sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                      QK_KIND: tl.constexpr, PV_KIND: tl.constexpr, SMOOTH_K: tl.constexpr,
                      SMOOTH_QK: tl.constexpr, ROTATE: tl.constexpr, IS_BF16: tl.constexpr,
                      SOFT: tl.constexpr, INTERPRET: tl.constexpr, D: tl.constexpr,
                      LOG_D: tl.constexpr, RSQRT_D: tl.constexpr, BT: tl.constexpr,
                      NCH_P: tl.constexpr, NATIVE: tl.constexpr = False,
                      POW2: tl.constexpr = False):
    pid = tl.program_id(0)
    d = tl.arange(0, D)
    tt = tl.arange(0, BT)
    ci = tl.arange(0, NCH_P)
    cm = (ci < NCH)[:, None]
    is_q = pid < n_qprog
    qbh = pid // nqt
    kp = tl.maximum(pid - n_qprog, 0)
    kbh = kp // nkt
    b = tl.where(is_q, qbh // Hq, kbh // Hk)
    hk = tl.where(is_q, (qbh % Hq) // GROUP, kbh % Hk)
    tb = tl.where(is_q, pid % nqt, kp % nkt)
    bh = qbh
    bhk = (b * Hk + hk).to(tl.int64)
    # ---- per-channel statistics of this (b, kv head): fixed-order reductions of the partials
    sofs = (bhk * NCH + ci[:, None]) * D + d[None, :]
    kmx = tl.max(tl.load(kmx_ptr + sofs, mask=cm, other=float("-inf")), axis=0)
    kmn = tl.min(tl.load(kmn_ptr + sofs, mask=cm, other=float("inf")), axis=0)
    if SMOOTH_K:
        shift = (kmx + kmn) * 0.5
        ka = (kmx - kmn) * 0.5
    else:
        shift = tl.zeros([D], dtype=tl.float32)
        ka = tl.maximum(tl.abs(kmx), tl.abs(kmn))
    if SMOOTH_QK:
        qa = tl.zeros([D], dtype=tl.float32)
        for g in range(GROUP):
            qofs = (((b * Hq + hk * GROUP + g).to(tl.int64)) * NCH + ci[:, None]) * D + d[None, :]
            qa = tl.maximum(qa, tl.max(tl.load(qa_ptr + qofs, mask=cm, other=0.0), axis=0))
        t = tl.sqrt_rn(tl.math.div_rn(tl.maximum(ka, FLT_MIN), tl.maximum(qa, FLT_MIN)))
    if is_q:
        rows = tb.to(tl.int64) * BT + tt
        rm = rows < Sq
        base = (b.to(tl.int64) * sqb + (bh % Hq).to(tl.int64) * sqh)
        x = load_f32(q_ptr, base + rows[:, None] * sqs + d[None, :] * sqd, rm[:, None], IS_BF16)
        if SMOOTH_K:
            qb = tl.sum(x * shift[None, :], axis=1) * (c_log2 * LN2)
        else:
            qb = tl.zeros([BT], dtype=tl.float32)
        if SMOOTH_QK:
            x = x * t[None, :]
        if ROTATE:
            x = tl.dot(x, _hadamard(D, LOG_D, RSQRT_D), input_precision="ieee" if INTERPRET
                       else "tf32")
        ok = _finite_rows(x)  # a row holding inf/NaN: codes 0, scale and lse correction NaN
        x = tl.where(ok[:, None], x, 0.0)
        obh = bh.to(tl.int64)
        if NATIVE:  # packed E2M1 codes (Sq, D/2) + E4M3 scale bytes (Sq, D/16)
            s, sbits, sb, v = _nvfp4_parts(x, SOFT, BT, D, POW2)
            dh = tl.arange(0, D // 2)
            ds = tl.arange(0, D // NVFP4_BLOCK)
            tl.store(qc_ptr + (obh * Sq + rows[:, None]) * (D // 2) + dh[None, :],
                     _pack_e2m1(v, BT, D), mask=rm[:, None])
            tl.store(qsb_ptr + (obh * Sq + rows[:, None]) * (D // NVFP4_BLOCK) + ds[None, :],
                     sbits,
                     mask=rm[:, None])
        else:
            c, s = _quant_tokens(x, QK_KIND, SOFT, BT, D, POW2)
            tl.store(qc_ptr + (obh * Sq + rows[:, None]) * D + d[None, :], c, mask=rm[:, None])
        tl.store(qs_ptr + obh * Sq + rows, tl.where(ok, s * c_log2, float("nan")), mask=rm)
        tl.store(qb_ptr + obh * Sq + rows, tl.where(ok, qb, float("nan")), mask=rm)
    else:
        rows = tb.to(tl.int64) * BT + tt
        rm = rows < Sk
        kbase = b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        x = load_f32(k_ptr, kbase + rows[:, None] * sks + d[None, :] * skd, rm[:, None], IS_BF16)
        x = x - shift[None, :]
        if SMOOTH_QK:
            x = tl.math.div_rn(x, t[None, :])
        x = tl.where(rm[:, None], x, 0.0)
        if ROTATE:
            x = tl.dot(x, _hadamard(D, LOG_D, RSQRT_D), input_precision="ieee" if INTERPRET
                       else "tf32")
        ok = _finite_rows(x)  # a row holding inf/NaN: codes 0, scale NaN
        x = tl.where(ok[:, None], x, 0.0)
        if NATIVE:
            s, sbits, sb, v = _nvfp4_parts(x, SOFT, BT, D, POW2)
            dh = tl.arange(0, D // 2)
            ds = tl.arange(0, D // NVFP4_BLOCK)
            tl.store(kc_ptr + (bhk * Sk + rows[:, None]) * (D // 2) + dh[None, :],
                     _pack_e2m1(v, BT, D), mask=rm[:, None])
            tl.store(ksb_ptr + (bhk * Sk + rows[:, None]) * (D // NVFP4_BLOCK) + ds[None, :],
                     sbits,
                     mask=rm[:, None])
        else:
            c, s = _quant_tokens(x, QK_KIND, SOFT, BT, D, POW2)
            tl.store(kc_ptr + (bhk * Sk + rows[:, None]) * D + d[None, :], c, mask=rm[:, None])
        tl.store(ks_ptr + bhk * Sk + rows, tl.where(ok, s, float("nan")), mask=rm)
        # V: per-channel scale over all tokens, codes written transposed (B, Hk, D, Sk_pad);
        # a channel holding inf/NaN (a NaN partial): scale NaN, codes 0
        vp = tl.load(va_ptr + sofs, mask=cm, other=0.0)
        vnan = tl.max(tl.where(vp == vp, 0, 1), axis=0) > 0
        vs = tl.where(vnan, float("nan"), fp8_scale(tl.max(vp, axis=0)))
        vbase = b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        y = load_f32(v_ptr, vbase + rows[:, None] * svs + d[None, :] * svd, rm[:, None], IS_BF16)
        y = fp8_scaled(y, vs[None, :])
        if PV_KIND == KIND_FP8:
            yc = e4m3_bits(y, SOFT)
        else:
            yc = y.to(tl.float16)
        yc = tl.where(vnan[None, :], tl.zeros_like(yc), yc)
        tl.store(vt_ptr + (bhk * D + d[None, :]) * Sk_pad + rows[:, None], yc, mask=rm[:, None])
        if tb == 0:
            tl.store(vs_ptr + bhk * D + d, vs)


def prepass_buffers(B, Hq, Hk, Sq, Sk, D, precision, device, native: bool = False):
    """Allocate the pre-pass outputs (shapes only). ``native`` (nvfp4 only): qc/kc hold packed
    E2M1 codes (..., D/2) uint8 and qsb/ksb the E4M3 block-scale bytes (..., D/16)."""
    kinds = ATTENTION_KINDS[precision]
    qk = kinds.qk
    if qk not in _CODE_DTYPE:
        raise ValueError(f"precision {precision!r} has no pre-pass (not quantized)")
    cdt, vdt = _CODE_DTYPE[qk], _CODE_DTYPE[kinds.v]
    sk_pad = triton.cdiv(Sk, 16) * 16
    f32 = dict(dtype=torch.float32, device=device)
    u8 = dict(dtype=torch.uint8, device=device)
    if native:
        if qk != KIND_NVFP4.value:
            raise ValueError(f"native packed codes exist for nvfp4 only, not {precision!r}")
        nbs = D // NVFP4_BLOCK.value
        extra = dict(qsb=torch.empty((B, Hq, Sq, nbs), **u8),
                     ksb=torch.empty((B, Hk, Sk, nbs), **u8))
        dq, cdt = D // 2, torch.uint8
    else:
        extra, dq = {}, D
    return dict(
        qc=torch.empty((B, Hq, Sq, dq), dtype=cdt, device=device),
        qs=torch.empty((B, Hq, Sq), **f32), qb=torch.empty((B, Hq, Sq), **f32),
        kc=torch.empty((B, Hk, Sk, dq), dtype=cdt, device=device), **extra,
        ks=torch.empty((B, Hk, Sk), **f32),
        vt=torch.empty((B, Hk, D, sk_pad), dtype=vdt, device=device),
        vs=torch.empty((B, Hk, D), **f32), sk_pad=sk_pad)


def quantize_qkv(q, k, v, precision: str, sm_scale: float, *, smooth_k: bool = True,
                 smooth_qk: bool = True, rotate: bool = True, block_t: int = 64,
                 native: bool = False, pow2_scales: bool = False) -> dict:
    """q (B, Hq, Sq, D), k/v (B, Hk, Sk, D) as strided views (bf16/fp16/fp32) -> buffers dict.

    ``native`` (nvfp4): packed E2M1 codes + E4M3 scale bytes for the ``tl.dot_scaled`` kernel
    (see ``prepass_buffers``). ``pow2_scales`` (test hook, nvfp4): block scales rounded up to
    powers of two, the only E4M3 scales the 3.9 interpreter's E8M0-only dot_scaled decodes."""
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    dev = q.device
    interp = dev.type != "cuda"
    soft = use_soft_cvt(q)
    out = prepass_buffers(B, Hq, Hk, Sq, Sk, D, precision, dev, native)
    kinds = ATTENTION_KINDS[precision]
    S = max(Sq, Sk)
    nch = max(1, min(MAX_CHUNKS, triton.cdiv(S, 4 * block_t)))
    chq = triton.cdiv(triton.cdiv(Sq, nch), block_t) * block_t
    chk = triton.cdiv(triton.cdiv(Sk, nch), block_t) * block_t
    f32 = dict(dtype=torch.float32, device=dev)
    qa = torch.empty((B * Hq, nch, D), **f32)
    kmx = torch.empty((B * Hk, nch, D), **f32)
    kmn = torch.empty((B * Hk, nch, D), **f32)
    va = torch.empty((B * Hk, nch, D), **f32)
    is_bf16 = q.dtype == torch.bfloat16
    qk_, kk_, vk_ = as_kernel_input(q), as_kernel_input(k), as_kernel_input(v)
    strides = (*q.stride(), *k.stride(), *v.stride())
    nw = 4 if D <= 64 else 8
    _qkv_stats_kernel[(B * Hq + B * Hk, nch)](
        qk_, kk_, vk_, qa, kmx, kmn, va, B * Hq, Hq, Hk, Sq, Sk, chq, chk, nch, *strides,
        IS_BF16=is_bf16, D=D, BT=block_t, num_warps=nw)
    nqt, nkt = triton.cdiv(Sq, block_t), triton.cdiv(Sk, block_t)
    n_q = B * Hq * nqt
    c_log2 = float(sm_scale) * LOG2E.value
    _qkv_quant_kernel[(n_q + B * Hk * nkt,)](
        qk_, kk_, vk_, qa, kmx, kmn, va,
        out["qc"], out["qs"], out["qb"], out["kc"], out["ks"], out["vt"], out["vs"],
        out.get("qsb", out["qs"]), out.get("ksb", out["ks"]),
        n_q, nqt, nkt, Hq, Hk, Hq // Hk, Sq, Sk, out["sk_pad"], nch, c_log2, *strides,
        QK_KIND=kinds.qk, PV_KIND=kinds.v, SMOOTH_K=bool(smooth_k), SMOOTH_QK=bool(smooth_qk),
        ROTATE=bool(rotate), IS_BF16=is_bf16, SOFT=soft, INTERPRET=interp, D=D,
        LOG_D=int(math.log2(D)),
        RSQRT_D=float(torch.tensor(1.0 / math.sqrt(D), dtype=torch.float32)), BT=block_t,
        NCH_P=triton.next_power_of_2(nch), NATIVE=bool(native), POW2=bool(pow2_scales),
        num_warps=nw)
    return out

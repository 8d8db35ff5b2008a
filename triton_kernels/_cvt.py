"""Triton numerics of pyops in one place: every E4M3 / E2M1 / bf16 / int8 conversion, the format
constants and the attention precision-kind table. Kernel files import these and never re-derive
a codec or write a format constant as a literal (tests/test_layering.py checks the literals).

Constants are ``tl.constexpr`` globals (usable inside ``@triton.jit`` code; ``.value`` on the
host). Their spec values and sources are in ``pyops/reference/formats.py``; this package never
imports ``pyops`` (the layer rule), so tests/test_layering.py ties the two sets together.

Codecs (one per format, ``@triton.jit``):

* E4M3 (``float8_e4m3fn``): ``e4m3_bits`` (fp32 -> byte), ``e4m3_to_f32`` (byte -> fp32).
* FP8 per-group quantization: ``fp8_scale`` (group amax -> scale), ``fp8_codes`` (x, scale ->
  e4m3 bytes) and ``fp8_scaled`` (the clamped x / scale that ``fp8_codes`` rounds).
* E2M1 (NVFP4 elements): ``e2m1_codes`` (fp32 -> 4-bit code), ``e2m1_to_f32`` (code -> fp32),
  ``e2m1_round`` (fp32 -> nearest E2M1 value, their composition), ``e2m1_pack`` /
  ``e2m1_unpack`` (two codes a byte); the rounding thresholds are written once (``_e2m1_pick``).
* bf16: ``bf16_bits_to_f32`` (16 bits -> fp32), ``f32_to_bf16_bits`` (fp32 -> 16 bits, RNE).
* int8: ``f32_to_int8`` (RNE, saturating to +-127). E8M0 (test hook only): ``e8m0_nearest``.
* NVFP4 scales: ``nvfp4_global_scale``, ``nvfp4_block_scale``, ``nvfp4_block_scales``.

E4M3 conversions and the bf16 output have two paths chosen by the constexpr ``SOFT``:

* ``SOFT=False`` (GPU, sm_90+): Triton's own casts, which lower to PTX ``cvt.rn[.satfinite]``
  (IEEE round to nearest even, subnormals kept; fp32 -> e4m3 is a single
  ``cvt.rn.satfinite.e4m3x2.f32`` only from sm_90 on, so older GPUs take the soft path).
* ``SOFT=True``: integer/bit arithmetic that gives the same bits as torch's casts. The Triton
  interpreter's numpy emulation of these casts is wrong (fp32->e4m3 loses the mantissa carry into
  the exponent, e4m3 0x7F decodes to 480 instead of NaN, fp32->bf16 does not round to nearest,
  bf16 subnormals decode as 0), so the interpreter always takes this path; on a GPU it can be
  forced with ``PYOPS_TRITON_SOFT_CVT=1`` to cross-check the two paths.

bf16 inputs are always loaded as int16 bits and widened by a shift (exact, one op on GPU too).
E2M1, int8 and E8M0 conversions are integer/compare arithmetic on both paths.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# ---- format constants (spec values and sources: pyops/reference/formats.py) -------------------
E4M3_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn
E4M3_MIN_SUBNORMAL = tl.constexpr(0.001953125)  # 2**-9
E4M3_NAN = tl.constexpr(0x7F)  # the e4m3fn NaN byte (sign clear); e4m3fn has no inf
E2M1_MAX = tl.constexpr(6.0)  # largest E2M1 magnitude
NVFP4_BLOCK = tl.constexpr(16)  # elements per NVFP4 E4M3 block scale
NVFP4_GLOBAL_DIVISOR = tl.constexpr(E2M1_MAX.value * E4M3_MAX.value)  # amax -> second-level scale
FP8_BLOCK = tl.constexpr(128)  # pyops' FP8 block granularities: 1x128, 128x128
INT8_MAX = tl.constexpr(127.0)  # symmetric int8 codes in [-127, 127]
FLT_MAX = tl.constexpr(3.4028234663852886e38)
FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # 2**-126, smallest normal fp32
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
F32_NAN_BITS = tl.constexpr(0x7FC00000)  # the reference's NaN scale (torch.full_like(.., nan))
BF16_NAN_BITS_TORCH_CPU = tl.constexpr(0xFFFF)  # what torch's CPU cast writes for NaN
BF16_NAN_BITS_CANONICAL = tl.constexpr(0x7FC0)  # c10::BFloat16's quiet NaN
RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (x + M) - M rounds |x| < 2**22 to even

# ---- output dtype codes (the OUT_KIND / Y_KIND constexprs) ------------------------------------
OUT_F32 = tl.constexpr(0)
OUT_F16 = tl.constexpr(1)
OUT_BF16 = tl.constexpr(2)

# ---- precision kinds: the integer codes the attention kernels take as constexprs --------------
KIND_RAW = tl.constexpr(0)  # not quantized: the input's 16-bit dtype
KIND_FP8 = tl.constexpr(1)  # E4M3 bytes (uint8) with an fp32 scale
KIND_INT8 = tl.constexpr(2)  # int8 codes in [-127, 127] with an fp32 scale
KIND_NVFP4 = tl.constexpr(3)  # E2M1 x E4M3 per 16 x fp32 (emulated: stored decoded as fp16)
KIND_FP16 = tl.constexpr(4)  # fp16 values


class AttentionKinds(NamedTuple):
    """The code kinds of one attention precision: ``qk`` Q and K codes (pre-pass output and the
    QK^T operands), ``p`` P in the PV product, ``v`` V's codes as the pre-pass stores them,
    ``p_scale`` the fixed factor P is multiplied by before its cast (divided out at the end)."""
    qk: int
    p: int
    v: int
    p_scale: float


# One table for attention_quant.py (qk, v) and attention.py (qk, p, p_scale). The kernel loads
# V as E4M3 bytes exactly when p is FP8 or NVFP4, which is when v is FP8 (test_layering.py).
ATTENTION_KINDS = {
    "bf16": AttentionKinds(KIND_RAW.value, KIND_RAW.value, KIND_RAW.value, 1.0),
    "fp8": AttentionKinds(KIND_FP8.value, KIND_FP8.value, KIND_FP8.value, E4M3_MAX.value),
    "int8": AttentionKinds(KIND_INT8.value, KIND_FP8.value, KIND_FP8.value, E4M3_MAX.value),
    "int8_fp16pv": AttentionKinds(KIND_INT8.value, KIND_FP16.value, KIND_FP16.value, 1.0),
    "nvfp4": AttentionKinds(KIND_NVFP4.value, KIND_NVFP4.value, KIND_FP8.value, 1.0),
}


@functools.lru_cache(maxsize=None)
def _hw_cvt_exact(index: int) -> bool:
    # Triton lowers fp32 -> e4m3 to one cvt.rn.satfinite.e4m3x2.f32 on sm_90+ (checked by
    # compiling: tests/test_cvt.py::test_hw_e4m3_cast_lowering); older Tritons go
    # through fp16 with round-toward-zero first below sm_90 (double rounding: not bit-exact).
    # Triton 3.9 lowers sm_89 directly too; the soft path stays there (exact either way).
    return torch.cuda.get_device_capability(index) >= (9, 0)


def use_soft_cvt(t: torch.Tensor) -> bool:
    """Soft conversions off-GPU (the interpreter), before sm_90, or when forced by the env."""
    if t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    if os.environ.get("PYOPS_TRITON_SOFT_CVT", "0") == "1":
        return True
    return not _hw_cvt_exact(t.device.index if t.device.index is not None
                             else torch.cuda.current_device())


def as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    """bf16 goes in as its int16 bits (same strides); fp16/fp32 as they are."""
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def out_kind(dtype: torch.dtype) -> int:
    """torch dtype -> the OUT_KIND code (OUT_F32 / OUT_F16 / OUT_BF16)."""
    return {torch.float32: OUT_F32.value, torch.float16: OUT_F16.value,
            torch.bfloat16: OUT_BF16.value}[dtype]


def as_kernel_output(out: torch.Tensor, soft: bool) -> torch.Tensor:
    """bf16 outputs are written as int16 bits on the soft path."""
    return out.view(torch.int16) if (soft and out.dtype == torch.bfloat16) else out


# ---- bf16 -------------------------------------------------------------------------------------
@triton.jit
def bf16_bits_to_f32(raw):
    """bf16 bits (int16 / uint16) -> fp32, exact (subnormals and NaN payloads kept)."""
    return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_bits(v, NAN_BITS: tl.constexpr):
    """fp32 -> bf16 bits (uint16), round to nearest even (what ``cvt.rn.bf16.f32`` computes);
    every NaN becomes ``NAN_BITS`` (NaN payloads are not part of any spec here)."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(v != v, NAN_BITS, r)
    return r.to(tl.uint16)


@triton.jit
def load_f32(ptr, offs, mask, IS_BF16: tl.constexpr):
    """Load bf16 (as int16 bits) / fp16 / fp32 and widen to fp32 exactly; masked lanes read 0."""
    if IS_BF16:
        val = bf16_bits_to_f32(tl.load(ptr + offs, mask=mask, other=0))
    else:
        val = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return val


@triton.jit
def f32_to_out(v, OUT_KIND: tl.constexpr, SOFT: tl.constexpr):
    """fp32 -> the output element (OUT_F32, OUT_F16, OUT_BF16; bf16 as int16 bits when SOFT),
    RNE."""
    if OUT_KIND == OUT_F32:
        res = v
    elif OUT_KIND == OUT_F16:
        res = v.to(tl.float16)
    else:
        if SOFT:
            # NaN: torch's CPU tensor cast writes 0xFFFF (GPU cvt writes 0x7FFF); NaN payloads
            # are not part of the spec, only NaN-ness is
            res = f32_to_bf16_bits(v, BF16_NAN_BITS_TORCH_CPU).to(tl.int16, bitcast=True)
        else:
            res = v.to(tl.bfloat16)
    return res


# ---- E4M3 (float8_e4m3fn) ---------------------------------------------------------------------
@triton.jit
def e4m3_bits(v, SOFT: tl.constexpr):
    """fp32 already clamped to [-448, 448] -> e4m3fn byte (uint8), round to nearest even.

    The sign of zero is kept (-0.0 and negatives that round to 0 give 0x80), like torch's cast.
    NaN input gives an unspecified byte: callers overwrite non-finite groups.
    """
    if SOFT:
        u = v.to(tl.int32, bitcast=True)
        a = u & 0x7FFFFFFF
        sign = (u >> 24) & 0x80
        # normal range (|v| >= 2**-6): drop 20 mantissa bits with RNE, rebias 127 -> 7
        nrm = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
        # subnormal range: RNE(|v| * 2**9) to an integer in [0, 8]; the product is exact, so an
        # FMA-contracted add gives the same result
        f = tl.abs(v) * 512.0
        sub = ((f + 8388608.0) - 8388608.0).to(tl.int32)
        mag = tl.where(a < 0x3C800000, sub, nrm)
        res = (mag | sign).to(tl.uint8)
    else:
        res = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return res


@triton.jit
def e4m3_to_f32(b, SOFT: tl.constexpr):
    """e4m3fn byte -> fp32 (exact; 0x7F/0xFF -> NaN). ``b``: uint8, or (SOFT only) an integer
    tensor holding 0..255."""
    if SOFT:
        i = b.to(tl.int32)
        e = (i >> 3) & 0xF
        m = i & 7
        nrm = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * E4M3_MIN_SUBNORMAL
        mag = tl.where(e == 0, sub, nrm)
        mag = tl.where((i & 0x7F) == E4M3_NAN, float("nan"), mag)
        res = tl.where((i & 0x80) != 0, -mag, mag)
    else:
        res = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return res


# ---- FP8 E4M3 per-group quantization (spec: pyops/reference/quantize_fp8.py) ---------------
@triton.jit
def fp8_scale(amax):
    """FP8 dequantization scale of a group amax (fp32 >= 0, any shape):
    ``max(amax / 448, FLT_MIN)``, IEEE division (``pyops/reference/quantize_fp8.py``). The one
    place this step is written (tests/test_layering.py). Non-finite groups are the caller's: each
    kernel flags them its own way (an amax marked +inf, a NaN partial, rows zeroed beforehand)
    and then writes a NaN scale and zero codes."""
    return tl.maximum(tl.math.div_rn(amax, E4M3_MAX), FLT_MIN)


@triton.jit
def fp8_scaled(x, scale):
    """``clamp(x / scale, -448, 448)`` in fp32 (IEEE division; ``scale`` broadcasts against
    ``x``): the value ``fp8_codes`` rounds to E4M3 (attention's fp16 V codes cast it to fp16)."""
    v = tl.math.div_rn(x, scale)
    return tl.minimum(tl.maximum(v, -E4M3_MAX), E4M3_MAX)


@triton.jit
def fp8_codes(x, scale, SOFT: tl.constexpr):
    """fp32 ``x`` and its group's ``fp8_scale`` -> e4m3fn bytes (uint8):
    ``e4m3(clamp(x / scale, -448, 448))``, RNE (the reference's ``q``). Codes of a non-finite
    group are unspecified here: callers overwrite them with 0."""
    return e4m3_bits(fp8_scaled(x, scale), SOFT)


# ---- E2M1 (NVFP4 elements) --------------------------------------------------------------------
@triton.jit
def _e2m1_pick(m, r0, r1, r2, r3, r4, r5, r6, r7):
    """|v| -> r_i for the E2M1 magnitude index i that |v| rounds to (nearest, ties to the even
    index: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5 -> 4.0);
    NaN -> r0. The one place the E2M1 rounding thresholds are written (a select chain: fewer
    instructions than a threshold sum, the same result for every input)."""
    return tl.where(m > 5.0, r7, tl.where(m >= 3.5, r6, tl.where(m > 2.5, r5, tl.where(
        m >= 1.75, r4, tl.where(m > 1.25, r3, tl.where(m >= 0.75, r2, tl.where(
            m > 0.25, r1, r0)))))))


@triton.jit
def e2m1_codes(v):
    """fp32 (callers clamp to [-6, 6]) -> 4-bit E2M1 codes (int32): bits 0-2 the index of the
    magnitude in {0, .5, 1, 1.5, 2, 3, 4, 6}, round to nearest even, bit 3 the sign (``v < 0``:
    -0.0 -> code 0, -0.1 -> code 8). NaN -> code 0. Bit-exact to the reference's threshold sum
    (``pyops/reference/quantize_nvfp4.py`` ``e2m1_codes``)."""
    idx = _e2m1_pick(tl.abs(v), 0, 1, 2, 3, 4, 5, 6, 7)
    return idx | ((v < 0).to(tl.int32) << 3)


@triton.jit
def e2m1_to_f32(c):
    """4-bit E2M1 codes (int32) -> fp32, exact: magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 the
    sign (code 8 -> -0.0, like the reference's table)."""
    m = c & 7
    # m >= 2: exponent (m >> 1) - 1, mantissa bit m & 1 -> fp32 bits directly
    big = (((m >> 1) + 126) << 23) | ((m & 1) << 22)
    bits = tl.where(m >= 2, big, tl.where(m == 1, 0x3F000000, 0))
    bits = bits | ((c & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e2m1_round(v):
    """fp32 in [-6, 6] -> the nearest E2M1 value (ties to even), sign kept (-0.1 -> -0.0);
    NaN -> 0.0. Equal to ``e2m1_to_f32(e2m1_codes(v))`` for every input, in half the
    instructions (the emulated NVFP4 attention rounds every P element with it)."""
    r = _e2m1_pick(tl.abs(v), 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    return tl.where(v < 0, -r, r)


@triton.jit
def e2m1_pack(lo, hi):
    """Two 4-bit codes (int32) -> one byte (uint8): ``lo`` (element 2i) in the low nibble, the
    NVFP4 / ``tl.dot_scaled`` packing along the reduction dim."""
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def e2m1_unpack(b):
    """Packed bytes (int32 0..255) -> their codes joined along a new last dim of 2: [..., 0] the
    low nibble (element 2i), [..., 1] the high nibble (element 2i + 1)."""
    return tl.join(b & 0xF, b >> 4)


# ---- int8 / E8M0 ------------------------------------------------------------------------------
@triton.jit
def f32_to_int8(v):
    """fp32 (|v| < 2**22) -> int8, round to nearest even, saturated to [-127, 127]."""
    r = (v + RNE_MAGIC) - RNE_MAGIC
    return tl.minimum(tl.maximum(r, -INT8_MAX), INT8_MAX).to(tl.int8)


@triton.jit
def e8m0_nearest(v):
    """fp32 v >= 0 -> the E8M0 byte (uint8) of 2^round(log2 v); 0 -> byte 0. Only for the
    interpreter's ``dot_scaled``, which decodes scales as E8M0: exact for powers of two."""
    e = tl.math.floor(tl.math.log2(tl.maximum(v, 1e-30)) + 0.5) + 127.0
    return tl.where(v > 0, e, 0.0).to(tl.uint8)


# ---- NVFP4 scales -----------------------------------------------------------------------------
@triton.jit
def nvfp4_global_scale(amax):
    """The NVFP4 second-level fp32 scale of an amax (any shape): ``max(amax / 2688, FLT_MIN)``,
    IEEE division (README "Formats"; 2688 = E2M1_MAX * E4M3_MAX)."""
    return tl.maximum(tl.math.div_rn(amax, NVFP4_GLOBAL_DIVISOR), FLT_MIN)


@triton.jit
def nvfp4_block_scale(bamax, g, NAN_SAFE: tl.constexpr = False):
    """The unrounded NVFP4 first-level scale ``min(block_amax / 6 / g, 448)`` (fp32, IEEE
    divisions); round it with ``e4m3_bits``. NAN_SAFE: a NaN block amax stays NaN through the
    clamp (as in torch.clamp); otherwise the clamp drops NaN (GPU min)."""
    s = tl.math.div_rn(tl.math.div_rn(bamax, E2M1_MAX), g)
    if NAN_SAFE:
        s = tl.minimum(s, E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    else:
        s = tl.minimum(s, E4M3_MAX)
    return s


@triton.jit
def nvfp4_pow2_scale(sb):
    """Test hook POW2 of the NVFP4 quantizers: a block scale sb >= 0 rounded up to a power of two
    in [2^-9, 256] (0 stays 0), so the interpreter's dot_scaled, which decodes scales as E8M0
    only, reads it exactly."""
    return tl.where(sb > 0, tl.minimum(tl.math.exp2(tl.math.ceil(tl.math.log2(
        tl.maximum(sb, E4M3_MIN_SUBNORMAL)))), 256.0), 0.0)


@triton.jit
def nvfp4_block_scales(a, s, N: tl.constexpr, SOFT: tl.constexpr, POW2: tl.constexpr = False):
    """NVFP4 first-level scales, broadcast: ``a`` (R, N) fp32 magnitudes (>= 0), ``s`` (R,) fp32
    second-level scale (> 0) -> (R, N) fp32 where each element holds the decoded E4M3 scale of
    its 16-element block, ``e4m3(min(block_amax / 6 / s, 448))`` (the NVFP4 recipe, README
    "Formats"). POW2 rounds each scale up to a power of two in [2^-9, 256] first (a test hook).

    Kept 2-D on purpose: one masked row max per block instead of a rank-3 reshape of ``a``
    (which on the GPU is usually a dot result; see ``attention.py``, "NVFP4 on sm_90")."""
    grp = (tl.arange(0, N) // NVFP4_BLOCK)[None, :]
    sb = tl.zeros_like(a)
    for j in tl.static_range(N // NVFP4_BLOCK):
        in_j = grp == j
        sj = nvfp4_block_scale(tl.max(tl.where(in_j, a, 0.0), axis=1), s)
        if POW2:
            sj = nvfp4_pow2_scale(sj)
        sj = e4m3_to_f32(e4m3_bits(sj, SOFT), SOFT)
        sb = tl.where(in_j, sj[:, None], sb)
    return sb

"""Bit-exact float conversions shared by the quantizer kernels.

Each helper has two paths chosen by the constexpr ``SOFT``:

* ``SOFT=False`` (GPU, sm_90+): Triton's own casts, which lower to PTX ``cvt.rn[.satfinite]``
  (IEEE round to nearest even, subnormals kept; fp32 -> e4m3 is a single
  ``cvt.rn.satfinite.e4m3x2.f32`` only from sm_90 on, so older GPUs take the soft path).
* ``SOFT=True``: integer/bit arithmetic that gives the same bits as torch's casts. The Triton
  interpreter's numpy emulation of these casts is wrong (fp32->e4m3 loses the mantissa carry into
  the exponent, e4m3 0x7F decodes to 480 instead of NaN, fp32->bf16 does not round to nearest,
  bf16 subnormals decode as 0), so the interpreter always takes this path; on a GPU it can be
  forced with ``PYOPS_TRITON_SOFT_CVT=1`` to cross-check the two paths.

bf16 inputs are always loaded as int16 bits and widened by a shift (exact, one op on GPU too).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

FLT_MAX = tl.constexpr(3.4028234663852886e38)
FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # 2**-126


@functools.lru_cache(maxsize=None)
def _hw_cvt_exact(index: int) -> bool:
    # Triton lowers fp32 -> e4m3 to one cvt.rn.satfinite.e4m3x2.f32 on sm_90+ (checked by
    # compiling: tests/test_triton_kernels.py::test_hw_e4m3_cast_lowering); older Tritons go
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
    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]


def as_kernel_output(out: torch.Tensor, soft: bool) -> torch.Tensor:
    """bf16 outputs are written as int16 bits on the soft path."""
    return out.view(torch.int16) if (soft and out.dtype == torch.bfloat16) else out


@triton.jit
def load_f32(ptr, offs, mask, IS_BF16: tl.constexpr):
    """Load bf16 (as int16 bits) / fp16 / fp32 and widen to fp32 exactly; masked lanes read 0."""
    if IS_BF16:
        raw = tl.load(ptr + offs, mask=mask, other=0)
        val = (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        val = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return val


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
    """e4m3fn byte (uint8) -> fp32 (exact; 0x7F/0xFF -> NaN)."""
    if SOFT:
        i = b.to(tl.int32)
        e = (i >> 3) & 0xF
        m = i & 7
        nrm = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 0.001953125
        mag = tl.where(e == 0, sub, nrm)
        mag = tl.where((i & 0x7F) == 0x7F, float("nan"), mag)
        res = tl.where((i & 0x80) != 0, -mag, mag)
    else:
        res = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return res


@triton.jit
def f32_to_out(v, OUT_KIND: tl.constexpr, SOFT: tl.constexpr):
    """fp32 -> the output element (0 fp32, 1 fp16, 2 bf16; bf16 as int16 bits when SOFT), RNE."""
    if OUT_KIND == 0:
        res = v
    elif OUT_KIND == 1:
        res = v.to(tl.float16)
    else:
        if SOFT:
            u = v.to(tl.uint32, bitcast=True)
            r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            # NaN: torch's CPU tensor cast writes 0xFFFF (GPU cvt writes 0x7FFF); NaN payloads
            # are not part of the spec, only NaN-ness is
            r = tl.where(v != v, 0xFFFF, r)
            res = r.to(tl.uint16).to(tl.int16, bitcast=True)
        else:
            res = v.to(tl.bfloat16)
    return res


@triton.jit
def nvfp4_pow2_scale(sb):
    """Test hook POW2 of the NVFP4 quantizers: a block scale sb >= 0 rounded up to a power of two
    in [2^-9, 256] (0 stays 0), so the interpreter's dot_scaled, which decodes scales as E8M0
    only, reads it exactly."""
    return tl.where(sb > 0, tl.minimum(tl.math.exp2(tl.math.ceil(tl.math.log2(
        tl.maximum(sb, 0.001953125)))), 256.0), 0.0)


@triton.jit
def nvfp4_block_scales(a, s, N: tl.constexpr, SOFT: tl.constexpr, POW2: tl.constexpr = False):
    """NVFP4 first-level scales, broadcast: ``a`` (R, N) fp32 magnitudes (>= 0), ``s`` (R,) fp32
    second-level scale (> 0) -> (R, N) fp32 where each element holds the decoded E4M3 scale of
    its 16-element block, ``e4m3(min(block_amax / 6 / s, 448))`` (the NVFP4 recipe, README
    "Formats"). POW2 rounds each scale up to a power of two in [2^-9, 256] first (a test hook).

    Kept 2-D on purpose: one masked row max per block instead of a rank-3 reshape of ``a``
    (which on the GPU is usually a dot result; see ``attention.py``, "NVFP4 on sm_90")."""
    grp = (tl.arange(0, N) // 16)[None, :]
    sb = tl.zeros_like(a)
    for j in tl.static_range(N // 16):
        in_j = grp == j
        sj = tl.minimum(tl.math.div_rn(tl.math.div_rn(tl.max(tl.where(in_j, a, 0.0), axis=1),
                                                      6.0), s), 448.0)
        if POW2:
            sj = nvfp4_pow2_scale(sj)
        sj = e4m3_to_f32(e4m3_bits(sj, SOFT), SOFT)
        sb = tl.where(in_j, sj[:, None], sb)
    return sb

"""The CUDA kernels' exact shortcuts (csrc/common.cuh), mirrored on the host and checked against
exact arithmetic; the kernels themselves are checked bit for bit against the references by the
GPU tests (tests/test_quantize_fp8.py, tests/test_quantize_nvfp4.py, test_cuda_every_16bit_value).

- ScaleDiv: x / d as q0 = RN(x*r), e = RN(x - q0*d), q = RN(q0 + e*r) with r = RN(1/d) is
  RN(x / d) (Markstein's theorem) for d in [2^-90, 2^90] and quotients >= 2^-13; checked here
  with exact rational arithmetic (fractions.Fraction) on random and near-midpoint quotients.
- e2m1_code_finite: the bit-rounding E2M1 code equals the reference's threshold sum.
- chunk_amax_bits: the max of |x| over 16-bit lanes taken on the stored bits equals the max of
  the widened fp32 |x| bits when finite, and is inf/NaN (>= the inf bits) exactly when one is.
Each test also reads the constants it mirrors out of csrc/common.cuh, so an edit there that the
mirror does not follow fails here.
"""
from __future__ import annotations

import random
import re
import struct
from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
import torch

from pyops.reference import quantize_nvfp4 as ref4

COMMON = (Path(__file__).resolve().parents[1] / "csrc" / "common.cuh").read_text()


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def rn32(x: F) -> float:
    """Round an exact rational to the nearest fp32, ties to even (normal and subnormal range;
    the callers stay far from overflow)."""
    if x == 0:
        return 0.0
    sign = -1.0 if x < 0 else 1.0
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if F(2) ** e > a:
        e -= 1
    e = max(e, -126)
    ulp = F(2) ** (e - 23)
    n = a / ulp
    fl = n.numerator // n.denominator
    rem = n - fl
    if rem > F(1, 2) or (rem == F(1, 2) and fl % 2 == 1):
        fl += 1
    return sign * float(fl * ulp)


def scalediv(x: float, d: float) -> tuple[float, float]:
    """(ScaleDiv's quotient, the uncorrected q0), every operation rounded once to fp32."""
    r = rn32(F(1) / F(d))
    q0 = rn32(F(x) * F(r))
    e = rn32(-F(q0) * F(d) + F(x))
    q = rn32(F(e) * F(r) + F(q0))
    if q == 0.0 and str(x).startswith("-"):
        q = -0.0
    return q, q0


def test_scalediv_constants_match_kernel():
    assert "fast = d_ >= 0x1p-90f && d_ <= 0x1p+90f" in COMMON
    assert "const float q0 = mul_rn(x, r);" in COMMON
    assert "const float e = fma_rn(q0, nd, x);  // x - q0 * d, exact" in COMMON
    assert "nd = __uint_as_float(__float_as_uint(d_) ^ 0x80000000u);" in COMMON
    assert "const float q = fma_rn(e, r, q0);" in COMMON
    assert "abs_bits(q) < 0x39000000u && abs_bits(x) != 0u" in COMMON
    assert _f32(0x39000000) == 2.0 ** -13


def _random_divisor(rng: random.Random) -> float:
    mant = rng.choice([rng.getrandbits(23), 0x7FFFFF, 0x7FFFFE, 0, 1])
    exp = rng.randint(-90, 89)
    return _f32(((exp + 127) << 23) | mant)


def test_scalediv_equals_ieee_division_near_midpoints():
    """Dividends built next to x = midpoint * d, where a quotient one ulp off would round to the
    other neighbour: the corrected quotient is RN(x / d) every time; the uncorrected q0 is not
    (so the test can tell the two apart)."""
    rng = random.Random(torch.seed() % 2**31)
    q0_wrong = 0
    for _ in range(400):
        d = _random_divisor(rng)
        for _ in range(4):
            qe, qm = rng.randint(-13, 8), rng.getrandbits(23)
            mid = F(2) ** qe * (1 + F(2 * qm + 1, 2**24))
            x0 = np.float32(rn32(mid * F(d)))
            for x in (x0, np.nextafter(x0, np.float32(np.inf)), np.nextafter(x0, np.float32(0))):
                for xs in (float(x), -float(x)):
                    want = rn32(F(xs) / F(d))
                    got, q0 = scalediv(xs, d)
                    assert got == want, (xs, d, got, want)
                    q0_wrong += q0 != want
    assert q0_wrong > 0  # the correction step is needed


def test_scalediv_equals_ieee_division_random():
    rng = random.Random(torch.seed() % 2**31)
    for _ in range(300):
        d = _random_divisor(rng)
        for _ in range(6):
            x = float(np.float32(rng.uniform(-448.0, 448.0) * d))
            want = rn32(F(x) / F(d))
            got, _ = scalediv(x, d)
            if abs(want) >= 2.0 ** -13:
                assert got == want, (x, d, got, want)
            else:  # below the exact range: still below 2^-10, so the same e4m3 code (+-0)
                assert abs(got) < 2.0 ** -10


def test_scalediv_keeps_negative_zero():
    assert str(scalediv(-0.0, 3.0)[0]) == "-0.0"
    assert "(__float_as_uint(x) & 0x80000000u)" in COMMON


def _e2m1_bits(m: np.ndarray) -> np.ndarray:
    """Host mirror of e2m1_code_finite's magnitude for m = |v| in [0, 6] (fp32)."""
    m = m.astype(np.float32)
    magic = np.float32(4194304.0)
    small = (m + magic).astype(np.float32).view(np.uint32) - magic.view(np.uint32)
    b = m.view(np.uint32)
    big = ((b + np.uint32(0x1FFFFF) + ((b >> 22) & 1)) >> 22) - np.uint32(252)
    return np.where(m < 1.0, small, big).astype(np.uint8)


def test_e2m1_bit_rounding_matches_threshold_sum():
    for c in ("add_rn(m, 4194304.0f)) - 0x4A800000u", "(a + 0x1FFFFFu + ((a >> 22) & 1u)) >> 22) - 252u"):
        assert c in COMMON, c
    assert np.float32(4194304.0).view(np.uint32) == 0x4A800000
    six = int(np.float32(6.0).view(np.uint32))
    step = 4099 + random.Random(torch.seed()).randrange(64)
    bits = [np.arange(random.randrange(step), six + 1, step, dtype=np.uint32)]
    for t in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 2.0**-126):
        c = int(np.float32(t).view(np.uint32))
        bits.append(np.arange(max(c - 300, 0), min(c + 300, six) + 1, dtype=np.uint32))
    bits.append(np.arange(0, 300, dtype=np.uint32))  # zero and subnormals
    m = np.concatenate(bits).view(np.float32)
    v = torch.from_numpy(m.copy())
    want = ref4.e2m1_codes(v).numpy()
    got = _e2m1_bits(m)
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:10]
    # and the negative side: the sign nibble is set unless the value is +-0
    want_neg = ref4.e2m1_codes(-v).numpy()
    got_neg = got | np.where(m != 0, 8, 0).astype(np.uint8)
    assert np.array_equal(got_neg, want_neg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_amax_bits_on_stored_bits(dtype):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    raw = torch.randint(0, 65536, (4096, 8), generator=g, dtype=torch.int32)
    raw[::7, 3] = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}[dtype]  # inf
    raw[::11, 5] = {torch.bfloat16: 0xFFC1, torch.float16: 0xFE01}[dtype]  # -NaN
    x = raw.to(torch.int16).view(dtype)
    want = x.float().view(torch.int32).bitwise_and(0x7FFFFFFF).amax(dim=1)
    h = raw.bitwise_and(0x7FFF).amax(dim=1)  # the packed 16-bit max of the kernel
    got = h.to(torch.int16).view(dtype).float().view(torch.int32).bitwise_and(0x7FFFFFFF)
    # finite maxima equal bit for bit; inf/NaN anywhere in the chunk: both >= the inf bits
    # (the kernels use only that; NaN payloads widen differently)
    inf = 0x7F800000
    assert torch.equal(got.clamp(max=inf), want.clamp(max=inf))
    assert bool((want < inf).any()) and bool((want >= inf).any())
    assert "__vmaxu2(__vmaxu2(c.x & 0x7FFF7FFFu, c.y & 0x7FFF7FFFu)" in COMMON

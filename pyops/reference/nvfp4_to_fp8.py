"""NVFP4 weight -> FP8 e4m3 with one fp32 scale per row: the reference, and the spec for every
backend (the Triton kernel is bit-exact to it: q bytes and scale bits).

Input, as ``pyops.quantize_weight(w, "nvfp4")`` stores it (spec: ``quantize_nvfp4.py`` here):
``data`` uint8 (N, nb*8), nb = ceil(K/16), two E2M1 codes a byte along K, element 2i in the low
nibble; ``scales`` (N, nb) E4M3 block scales (uint8 bytes or float8_e4m3fn, not swizzled);
``global_scale`` fp32 (1,) g. The weight is ``W[n, k] = e2m1(code) * float(s_blk) * g``.

Output: ``q`` float8_e4m3fn (N, K) and ``scale`` fp32 (N,) with
``W_fp8[n, k] = float(q[n, k]) * scale[n]``. Per row n, in fp32:

    u[n, k] = e2m1(code[n, k]) * float(s_blk[n, k // 16])     # exact: <= 6 significant bits
    amax_n  = max_k |u[n, k]|  over k < K                     # the last block's padding ignored
    e_n     = the smallest integer with amax_n <= 448 * 2^e_n; 0 when amax_n == 0
    q[n, k] = e4m3_rne(u[n, k] * 2^-e_n)                      # torch's .to(float8_e4m3fn)
    scale[n] = g * 2^e_n                                      # ldexp: one fp32 multiply

e_n from frexp, exactly: amax = m * 2^E with m in [0.5, 1) and 448 = 0.875 * 2^9, so
e_n = E - 9 if m <= 0.875 else E - 8. The multiply by 2^-e_n is exact (|u| lies in
[2^-10, 2688] and e_n in [-18, 3]); |u * 2^-e_n| <= 448, so the cast never saturates. The
scale multiply is exact unless g * 2^e_n leaves fp32's normal range (a g near FLT_MIN).
A block scale byte that is NaN (0x7F / 0xFF; the quantizer writes 0x7F for a block that held
inf/NaN) makes u NaN: that row gets ``scale = NaN`` and all its codes 0 (it dequantizes to
NaN; other rows are unaffected), as in ``quantize_fp8.py``. A non-finite g propagates into
every scale. Scale bytes are decoded as they are (a sign bit flips u); E2M1 code 8 (-0) gives
q byte 0x80 (-0), as torch's cast does.

Error. The conversion is exact whenever u * 2^-e_n has at most 4 significant bits and is
>= 2^-6 (an e4m3 normal) or is a multiple of 2^-9 (an e4m3 subnormal); otherwise it is one RNE
rounding: relative error <= 2^-4 for results >= 2^-6 (the largest reachable is 1/21, from the
significand 1.5 * 1.75 = 1.3125, a tie that goes to 1.25); below 2^-6 the absolute error is
<= 2^-10 * scale[n], and |u * 2^-e_n| <= 2^-10 becomes 0. Since amax_n * 2^-e_n > 224, a
result is subnormal only where amax_n / |u| > 224 * 2^6 and becomes 0 only where
amax_n / |u| > 224 * 2^10 (within one NVFP4 block |u| spans at most 12x: only blocks whose
scales differ that much). Measured on CPU (torch 2.13) by ``python tests/test_nvfp4_to_fp8.py``:
w (1024, 4096) fp32 ~ N(0, 1), seed 0, W = ``quantize_weight(w, "nvfp4")`` dequantized in fp32,
W_fp8 = q * scale; "changed" = fraction of elements with W_fp8 != W, relative errors over
W != 0, Frobenius norms ||A - B|| / ||B||:

    weight                    changed  max rel  mean rel  W_fp8 vs W  W vs w  W_fp8 vs w
    Gaussian                  28.0 %   0.0476   0.0079    0.0213      0.0951  0.0969
    1 % input channels x 100  25.2 %   0.0476   0.0082    0.0263      0.0471  0.0539

(no element was flushed to 0 in either; tests/test_nvfp4_to_fp8.py checks the bounds on a
smaller weight.)
"""
from __future__ import annotations

import math

import torch

from .formats import E4M3_MAX, NVFP4_BLOCK
from .quantize_nvfp4 import e2m1_values, unpack_codes

MAX_MANTISSA, MAX_EXPONENT = math.frexp(E4M3_MAX)  # 448 = 0.875 * 2**9


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def decode_rows(data: torch.Tensor, scales: torch.Tensor, K: int) -> torch.Tensor:
    """u = e2m1 * float(s_blk) in fp32, (N, K) (the global scale not applied; exact)."""
    N = data.shape[0]
    nb = _cdiv(K, NVFP4_BLOCK)
    s = scales.view(torch.float8_e4m3fn).float()
    vals = e2m1_values(unpack_codes(data)).view(N, nb, NVFP4_BLOCK)
    return (vals * s.unsqueeze(2)).reshape(N, nb * NVFP4_BLOCK)[:, :K]


def row_exponent(amax: torch.Tensor) -> torch.Tensor:
    """int32 e: the smallest integer with amax <= 448 * 2^e (amax finite, >= 0); 0 for 0."""
    m, E = torch.frexp(amax)
    e = torch.where(m <= MAX_MANTISSA, E - MAX_EXPONENT, E - (MAX_EXPONENT - 1))
    return torch.where(amax == 0, torch.zeros_like(e), e).to(torch.int32)


def nvfp4_to_fp8(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, K: int):
    """(data uint8 (N, nb*8), scales (N, nb), global_scale fp32 (1,), K) ->
    (q float8_e4m3fn (N, K), scale fp32 (N,)); the spec above."""
    u = decode_rows(data, scales, K)
    bad = torch.isnan(u).any(dim=1)
    amax = torch.where(bad, torch.zeros((), device=u.device), u.abs().amax(dim=1))
    e = row_exponent(amax)
    q = torch.ldexp(u, (-e).unsqueeze(1)).to(torch.float8_e4m3fn)
    q = torch.where(bad.unsqueeze(1), torch.zeros_like(q.view(torch.uint8)),
                    q.view(torch.uint8)).view(torch.float8_e4m3fn)
    scale = torch.ldexp(global_scale.float().reshape(1).expand(u.shape[0]), e)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    return q, scale


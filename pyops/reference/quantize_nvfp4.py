"""NVFP4 quantization: the reference, and the spec for every backend.

Input: a 2-D view ``x`` (M, K), any strides, bf16/fp16/fp32. K is split into nb = ceil(K/16)
blocks of 16 along the last dim; a partial last block is padded with zeros.

Two-level scales, all arithmetic in fp32 with IEEE round-to-nearest-even:

    amax   = max |x| over the tensor's finite elements
    g      = max(amax / 2688, FLT_MIN)     if no global scale is given (2688 = 6 * 448)
    s_blk  = e4m3(min(block_amax / 6 / g, 448))          # RNE cast, saturating
    v      = clamp(x / (float(s_blk) * g), -6, 6)
    code   = e2m1_rne(v) | (8 if v < 0 else 0)           # so -0.0 -> +0 code, -0.1 -> code 8

e2m1_rne on |v|: <=0.25 -> 0, <0.75 -> 0.5, <=1.25 -> 1, <1.75 -> 1.5, <=2.5 -> 2, <3.5 -> 3,
<=5 -> 4, else 6 (ties to the even code). A block whose scale is 0 (all zero, or underflowed)
gets codes 0. A block holding inf/NaN gets scale byte 0x7F (e4m3 NaN) and codes 0, so it
dequantizes to NaN; such elements are left out of ``amax`` so they poison only their own block.

Packing: two codes a byte along K, element 2i in the low nibble; data shape (M, nb * 8).
Scales: (M, nb) e4m3, or with ``swizzle`` the Blackwell block-scaled-GEMM layout:
padded to (roundup(M,128), roundup(nb,4)) with zeros, in 128x4 tiles, tiles row-block-major with
the K-block fastest, inside a tile (r, c) at (r % 32) * 16 + (r // 32) * 4 + c.

Decode: x ~= e2m1(code) * float(s_blk) * g.
"""
from __future__ import annotations

import torch

from .formats import (E2M1_MAX, E2M1_VALUES, E4M3_MAX, E4M3_NAN, FLT_MAX, FLT_MIN,
                      NVFP4_BLOCK, NVFP4_GLOBAL_DIVISOR)
from .quantize_fp8 import div_rn

FP4_MAX = E2M1_MAX
GLOBAL_DIV = NVFP4_GLOBAL_DIVISOR
BLOCK = NVFP4_BLOCK
SCALE_NAN = E4M3_NAN


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def swizzled_shape(M: int, nb: int) -> tuple[int, int]:
    return (_cdiv(M, 128) * 128, _cdiv(nb, 4) * 4)


def swizzle_offsets(M: int, nb: int, device=None) -> torch.Tensor:
    """int64 (M, nb): flat offset of scale (row, kblock) in the swizzled layout."""
    _, Np = swizzled_shape(M, nb)
    r = torch.arange(M, device=device).view(M, 1)
    c = torch.arange(nb, device=device).view(1, nb)
    tile = (r // 128) * (Np // 4) + c // 4
    rr = r % 128
    return tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + c % 4


def swizzle_scales(s: torch.Tensor) -> torch.Tensor:
    """(M, nb) scale bytes (uint8 or e4m3) -> swizzled, padded (roundup(M,128), roundup(nb,4))."""
    M, nb = s.shape
    Mp, Np = swizzled_shape(M, nb)
    u = s.view(torch.uint8) if s.dtype != torch.uint8 else s
    flat = torch.zeros(Mp * Np, dtype=torch.uint8, device=s.device)
    flat[swizzle_offsets(M, nb, s.device).reshape(-1)] = u.reshape(-1)
    return flat.view(Mp, Np).view(s.dtype)


def unswizzle_scales(sw: torch.Tensor, M: int, nb: int) -> torch.Tensor:
    u = sw.view(torch.uint8) if sw.dtype != torch.uint8 else sw
    return u.reshape(-1)[swizzle_offsets(M, nb, sw.device)].view(sw.dtype)


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """fp32 values already in [-6, 6] -> 4-bit codes (uint8), round to nearest even."""
    m = v.abs()
    idx = ((m > 0.25).to(torch.uint8) + (m >= 0.75).to(torch.uint8) + (m > 1.25).to(torch.uint8)
           + (m >= 1.75).to(torch.uint8) + (m > 2.5).to(torch.uint8) + (m >= 3.5).to(torch.uint8)
           + (m > 5.0).to(torch.uint8))
    return idx | ((v < 0).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (any int dtype) -> fp32 values."""
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=codes.device)
    return lut[codes.long()]


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    return torch.clamp_min(div_rn(amax.float(), GLOBAL_DIV), FLT_MIN)


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None,
                   swizzle: bool = False):
    """(M, K) -> (data uint8 (M, nb*8), scales e4m3 (M, nb) or swizzled, global fp32 (1,))."""
    M, K = x.shape
    nb = _cdiv(K, BLOCK)
    xf = torch.nn.functional.pad(x.float(), (0, nb * BLOCK - K))
    a = xf.abs()
    bad = ~(a <= FLT_MAX)
    a0 = torch.where(bad, torch.zeros((), device=a.device), a)
    if global_scale is None:
        g = global_scale_from_amax(a0.amax().reshape(1))
    else:
        g = global_scale.float().reshape(1)
    bamax = a0.view(M, nb, BLOCK).amax(dim=2)
    bbad = bad.view(M, nb, BLOCK).any(dim=2)
    s = (div_rn(bamax, FP4_MAX) / g).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    sf = s.float()
    v = (xf.view(M, nb, BLOCK) / (sf * g).unsqueeze(2)).clamp(-FP4_MAX, FP4_MAX)
    codes = e2m1_codes(v)
    zero_blk = (bbad | (sf == 0)).unsqueeze(2)
    codes = torch.where(zero_blk, torch.zeros_like(codes), codes).view(M, nb * BLOCK)
    data = codes[:, 0::2] | (codes[:, 1::2] << 4)
    sbits = torch.where(bbad, torch.full_like(s.view(torch.uint8), SCALE_NAN), s.view(torch.uint8))
    scales = sbits.view(torch.float8_e4m3fn)
    if swizzle:
        scales = swizzle_scales(scales)
    return data, scales, g


def unpack_codes(data: torch.Tensor) -> torch.Tensor:
    """(M, n) packed bytes -> (M, 2n) codes, element 2i from the low nibble."""
    lo = data & 0xF
    hi = data >> 4
    return torch.stack((lo, hi), dim=-1).reshape(data.shape[0], -1)


def dequantize_nvfp4(data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                     K: int, swizzled: bool = False,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_nvfp4: e2m1 * float(s_blk) * g, in fp32, rounded once to out_dtype."""
    M = data.shape[0]
    nb = _cdiv(K, BLOCK)
    s = unswizzle_scales(scales, M, nb) if swizzled else scales
    vals = e2m1_values(unpack_codes(data)).view(M, nb, BLOCK)
    x = vals * (s.float() * global_scale.float().reshape(1)).unsqueeze(2)
    return x.reshape(M, nb * BLOCK)[:, :K].to(out_dtype)

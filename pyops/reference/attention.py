"""Attention: the fp32/fp64 reference and the quantization recipe ("simulated" path).

Layout everywhere here: q (B, Hq, Sq, D), k and v (B, Hk, Sk, D), Hq a multiple of Hk (GQA/MQA:
query head h reads key/value head h // (Hq // Hk)). Causal masking is top-left aligned, like
``F.scaled_dot_product_attention(is_causal=True)``: query i sees keys j <= i.

``attention(q, k, v)`` is plain softmax attention in fp32 (or fp64 for tests); it returns the
output and the log-sum-exp (natural log, (B, Hq, Sq), fp32).

``simulated_attention(q, k, v, precision)`` quantizes exactly as the Triton kernels do and then
computes in fp32, key block by key block, the way the kernel does. The recipe (per precision):

    c      = scale * log2(e)                           (softmax in base 2: exp2)
    K'     = K - (max_tokens K + min_tokens K) / 2  per (b, kv head, channel)   [smooth_k;
             softmax is unchanged by any per-channel shift of K; mid-range, not mean: one pass]
    t_c    = sqrt(amax|K'_c| / amax|Q_c|);  K' /= t, Q *= t               [smooth_qk]
    Q, K' @= H   (orthonormal Hadamard, shared)                           [rotate]
    Q, K'  per-token symmetric scales (group = 1 token):
             fp8   s = max(amax/448, FLT_MIN), code = e4m3(x / s)
             int8  s = max(amax/127, FLT_MIN), code = rne(x / s) in [-127, 127]
             nvfp4 two levels: fp32 per token g = amax/(6*448), E4M3 per 16 channels, E2M1 codes
                   (pyops.reference.quantize_nvfp4's rules per row)
    S      = (codes_q @ codes_k^T) * (s_q * c) * s_k          (fp32)
    online softmax per key block of ``block_n``: m = max(m, rowmax S); p = exp2(S - m)
    P      fp8: e4m3(p * 448) (fixed scale: p is in [0, 1]);  16-bit PV: fp16(p);
           nvfp4: two levels, g = rowmax_block(p) / 2688 per row, E4M3 per 16 keys, E2M1 codes;
           the block's product is multiplied by g
    V      per channel over all tokens: s_v = max(amax/448, FLT_MIN), fp8: e4m3(v / s_v),
           16-bit PV: fp16(v / s_v)
    acc    = acc * alpha + (P_q @ V_q)   -- a fresh fp32 product per key block, then added in fp32
           (the "promotion once per key block"); l = l * alpha + rowsum(p) (unquantized p)
    O      = acc / l * s_v / p_scale;   lse = (m + log2 l) * ln 2 + scale * Q . shift

Non-finite inputs (the kernels follow the same rule): a token row of Q or K holding inf/NaN is
left out of every statistic over tokens (Q's channel amax, K's channel max/min or mean), and
after the transforms gets scale NaN and codes 0 (its lse correction qb NaN too): a bad query
row is NaN in its own output row and lse only, a bad key row makes every query row attending to
it NaN (as SDPA with a NaN key). A V channel holding inf/NaN gets scale NaN and codes 0, i.e. it
is NaN in every output row of its kv head.

Defaults: all three transforms on. Options for studying the recipe: ``smooth_k``, ``rotate``
(a shared orthonormal Hadamard rotation of Q and K along D: Q K^T is unchanged, outlier
channels are spread over all channels),
``smooth_qk`` (SmoothQuant-style channel migration: K[:, c] /= t_c, Q[:, c] *= t_c with
t_c = sqrt(amax K[:, c] / amax Q[:, c])), ``group`` (tokens per Q/K scale), ``p_scale``.
"""
from __future__ import annotations

import math

import torch

from .formats import (E2M1_MAX, E4M3_MAX, FLT_MIN, INT8_MAX, LN2, LOG2E,  # noqa: F401
                      NVFP4_BLOCK, NVFP4_GLOBAL_DIVISOR)

FP8_MAX = E4M3_MAX
P_SCALE_FP8 = E4M3_MAX  # P in [0, 1] is cast as e4m3(p * 448)
PRECISIONS = ("fp8", "int8", "int8_fp16pv", "nvfp4", "bf16")
# how each precision quantizes QK and PV
QK_KIND = {"fp8": "fp8", "int8": "int8", "int8_fp16pv": "int8", "nvfp4": "nvfp4", "bf16": "none"}
PV_KIND = {"fp8": "fp8", "int8": "fp8", "int8_fp16pv": "fp16", "nvfp4": "fp8", "bf16": "none"}


def expand_kv(k: torch.Tensor, hq: int) -> torch.Tensor:
    hk = k.shape[1]
    return k if hk == hq else k.repeat_interleave(hq // hk, dim=1)


def _causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j > i


def attention(q, k, v, scale=None, causal=False, dtype=torch.float32):
    """Plain attention in ``dtype`` (fp32 or fp64): returns (out (B,Hq,Sq,D), lse (B,Hq,Sq))."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qf, kf, vf = q.to(dtype), expand_kv(k, q.shape[1]).to(dtype), expand_kv(v, q.shape[1]).to(dtype)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(_causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ vf
    return o, lse.float()


# ---- quantizers (values returned as fp32 "codes" and fp32 scales) -----------------------------
def hadamard(d: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix (d a power of two)."""
    if d & (d - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(dtype=dtype, device=device)


def _group_amax(x: torch.Tensor, group: int) -> torch.Tensor:
    """amax of |x| over ``group`` consecutive tokens and all channels -> (..., S)."""
    a = x.abs().amax(dim=-1)
    if group == 1:
        return a
    S = a.shape[-1]
    pad = (-S) % group
    ap = torch.nn.functional.pad(a, (0, pad))
    g = ap.view(*a.shape[:-1], -1, group).amax(dim=-1)
    return g.repeat_interleave(group, dim=-1)[..., :S]


def quant_fp8_tokens(x: torch.Tensor, group: int = 1):
    """x (..., S, D) fp32 -> (e4m3 values as fp32, scale (..., S))."""
    s = torch.clamp_min(_group_amax(x, group) / FP8_MAX, FLT_MIN)
    c = (x / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return c, s


def quant_int8_tokens(x: torch.Tensor, group: int = 1):
    s = torch.clamp_min(_group_amax(x, group) / INT8_MAX, FLT_MIN)
    c = torch.round(x / s[..., None]).clamp(-INT8_MAX, INT8_MAX)
    return c, s


def quant_nvfp4_tokens(x: torch.Tensor):
    """x (..., S, D) -> (e2m1 * e4m3 block scale as fp32, g (..., S)).

    Two levels: fp32 g = max(amax_token / 2688, FLT_MIN) per token, E4M3 per 16 channels. D not
    a multiple of 16 is zero-padded to whole blocks (as the kernel's padding to 64/128 does: zero
    channels change no amax and get code 0), so every head_dim is supported."""
    from .quantize_nvfp4 import e2m1_codes, e2m1_values
    D = x.shape[-1]
    x = torch.nn.functional.pad(x, (0, (-D) % NVFP4_BLOCK))
    g = torch.clamp_min(x.abs().amax(dim=-1) / NVFP4_GLOBAL_DIVISOR, FLT_MIN)
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    bamax = xb.abs().amax(dim=-1)
    sb = ((bamax / E2M1_MAX) / g[..., None]).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
    v = (xb / (sb * g[..., None])[..., None]).clamp(-E2M1_MAX, E2M1_MAX)
    vals = e2m1_values(e2m1_codes(v)).view_as(xb) * sb[..., None]
    vals = torch.where((sb == 0)[..., None], torch.zeros_like(vals), vals)
    return vals.reshape(x.shape)[..., :D], g


def quant_v_channels(v: torch.Tensor, kind: str):
    """v (B, H, S, D) fp32 -> (codes as fp32, scale (B, H, D)), per channel over all tokens.
    A channel holding inf/NaN gets scale NaN and codes 0 (the FP8 quantizers' group rule)."""
    bad = ~torch.isfinite(v).all(dim=-2)
    s = torch.clamp_min(v.abs().amax(dim=-2) / FP8_MAX, FLT_MIN)
    x = (v / s[..., None, :]).clamp(-FP8_MAX, FP8_MAX)
    if kind == "fp8":
        x = x.to(torch.float8_e4m3fn).float()
    elif kind == "fp16":
        x = x.to(torch.float16).float()
    else:
        raise ValueError(kind)
    return x.masked_fill(bad[..., None, :], 0.0), s.masked_fill(bad, float("nan"))


def quantize_qk(x: torch.Tensor, kind: str, group: int = 1):
    """Per-token codes and scales of x (..., S, D). A token row holding inf/NaN gets scale NaN and
    codes 0 and is left out of the group amax of the others (``group`` > 1)."""
    bad = ~torch.isfinite(x).all(dim=-1)
    c, s = _quantize_qk(x.masked_fill(bad[..., None], 0.0), kind, group)
    return c.masked_fill(bad[..., None], 0.0), s.masked_fill(bad, float("nan"))


def _quantize_qk(x: torch.Tensor, kind: str, group: int):
    if kind == "fp8":
        return quant_fp8_tokens(x, group)
    if kind == "int8":
        return quant_int8_tokens(x, group)
    if kind == "nvfp4":
        return quant_nvfp4_tokens(x)
    raise ValueError(kind)


def qkv_transform(q, k, *, smooth_k=True, smooth_qk=True, rotate=True):
    """The exact (softmax-preserving) transforms, in fp32: returns (Q', K', shift) with
    Q' K'^T equal to Q K^T up to a per-query-row constant (removed by softmax; the lse adds back
    scale * Q . shift) and fp32 rounding; shift (B, Hk, D) is the subtracted K vector (None
    without smooth_k).

    smooth_k: True/"mid" subtracts the per-channel mid-range (max + min) / 2 over tokens (one
    pass; measured as accurate as the mean), "mean" the mean, False nothing.
    smooth_qk: t_c = sqrt(amax_c |K'| / amax_c |Q|) (Q amax over all query heads of the group);
    K' /= t, Q *= t.   rotate: both times the orthonormal Hadamard matrix (D zero-padded to a
    power of two first: Q' and K' may then be wider than D)."""
    D = q.shape[-1]
    qf, kf = q.float(), k.float()
    # statistics over tokens leave out token rows holding inf/NaN (their own outputs are NaN)
    qok = torch.isfinite(qf).all(dim=-1, keepdim=True)
    kok = torch.isfinite(kf).all(dim=-1, keepdim=True)
    kmax = kf.masked_fill(~kok, float("-inf")).amax(dim=-2)  # (B, Hk, D)
    kmin = kf.masked_fill(~kok, float("inf")).amin(dim=-2)
    shift = None
    if smooth_k in (True, "mid"):
        shift = (kmax + kmin) * 0.5
        kf = kf - shift[..., None, :]
        ka = (kmax - kmin) * 0.5
    elif smooth_k == "mean":
        shift = kf.masked_fill(~kok, 0.0).sum(dim=-2) / kok.sum(dim=-2)
        kf = kf - shift[..., None, :]
        ka = kf.abs().masked_fill(~kok, 0.0).amax(dim=-2)
    elif not smooth_k:
        ka = torch.maximum(kmax.abs(), kmin.abs())
    else:
        raise ValueError(f"smooth_k must be True, 'mid', 'mean' or False, got {smooth_k!r}")
    if smooth_qk:
        hq, hk = q.shape[1], k.shape[1]
        qa = qf.abs().masked_fill(~qok, 0.0).amax(dim=-2)
        qa = qa.view(q.shape[0], hk, hq // hk, D).amax(dim=2)  # (B, Hk, D)
        t = torch.sqrt(torch.clamp_min(ka, FLT_MIN) / torch.clamp_min(qa, FLT_MIN))
        kf = kf / t[..., None, :]
        qf = qf * expand_kv(t[..., None, :], hq)
    if rotate:
        if D & (D - 1):  # zero channels to the next power of two (exact; the kernel pads too)
            Dp = 1 << (D - 1).bit_length()
            qf = torch.nn.functional.pad(qf, (0, Dp - D))
            kf = torch.nn.functional.pad(kf, (0, Dp - D))
            D = Dp
        h = hadamard(D, device=q.device)
        qf, kf = qf @ h, kf @ h
    return qf, kf, shift


def quantize_qkv(q, k, v, precision: str, scale=None, *, smooth_k=True, smooth_qk: bool = True,
                 rotate: bool = True, group: int = 1, pv_kind=None):
    """The pre-pass in fp32: returns (qc, qs, kc, ks, vc, vs, qb); qs already times scale*log2e,
    qb (B, Hq, Sq) = scale * Q . shift, added to the lse.

    qc/kc/vc are the code values as fp32 (e4m3 / int8 / e2m1*e4m3 / fp16 values), shapes as the
    inputs; qs (B,Hq,Sq), ks (B,Hk,Sk), vs (B,Hk,D)."""
    kind, pv = QK_KIND[precision], pv_kind or PV_KIND[precision]
    D = q.shape[-1]
    c = (1.0 / math.sqrt(D) if scale is None else float(scale)) * LOG2E
    qf, kf, shift = qkv_transform(q, k, smooth_k=smooth_k, smooth_qk=smooth_qk, rotate=rotate)
    qc, qs = quantize_qk(qf, kind, group)
    kc, ks = quantize_qk(kf, kind, group)
    vc, vs = quant_v_channels(v.float(), pv)
    if shift is None:
        qb = torch.zeros(q.shape[:-1], device=q.device)
    else:  # lse correction: the shifted-away part of the scores, natural-log units
        qb = (q.float() * expand_kv(shift[..., None, :], q.shape[1])).sum(-1) * (c * LN2)
    qb = qb.masked_fill(torch.isnan(qs), float("nan"))  # a non-finite query row: lse NaN
    return qc, qs * c, kc, ks, vc, vs, qb


def _p_nvfp4(p: torch.Tensor):
    """p (..., N) in [0, 1] -> (e2m1 * e4m3 values, per-row g): p ~= values * g."""
    from .quantize_nvfp4 import e2m1_codes, e2m1_values
    N = p.shape[-1]
    pad = (-N) % NVFP4_BLOCK
    pp = torch.nn.functional.pad(p, (0, pad))
    g = torch.clamp_min(pp.amax(dim=-1) / NVFP4_GLOBAL_DIVISOR, FLT_MIN)
    pb = pp.reshape(*pp.shape[:-1], -1, NVFP4_BLOCK)
    sb = ((pb.amax(-1) / E2M1_MAX) / g[..., None]).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    sb = sb.float()
    den = torch.where(sb > 0, sb * g[..., None], torch.ones_like(sb))
    vals = e2m1_values(e2m1_codes((pb / den[..., None]).clamp(-E2M1_MAX, E2M1_MAX))) * sb[..., None]
    return vals.reshape(pp.shape)[..., :N], g


def simulated_attention(q, k, v, precision: str = "fp8", scale=None, causal=False, *,
                        block_n: int = 64, p_scale=None, smooth_k=True,
                        rotate: bool = True, smooth_qk: bool = True, group: int = 1,
                        p_nvfp4=None):
    """The kernel's arithmetic in fp32 (bhsd). Returns (out fp32, lse fp32).

    ``p_nvfp4``: P in NVFP4 with two levels (E4M3 per 16 keys, fp32 per row and key block =
    the block's row max / 2688, applied to the block's PV product); default: on for
    ``precision="nvfp4"`` (the Blackwell recipe), off otherwise (a study option there).

    ``precision="bf16"`` computes in fp32 from the inputs (no quantization)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    if precision == "bf16":
        return attention(q, k, v, scale, causal)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    pv = PV_KIND[precision]
    if p_nvfp4 is None:
        p_nvfp4 = precision == "nvfp4"
    if p_nvfp4:
        p_scale = 1.0
    if p_scale is None:
        p_scale = P_SCALE_FP8 if pv == "fp8" else 1.0
    qc, qs, kc, ks, vc, vs, qb = quantize_qkv(q, k, v, precision, scale, smooth_k=smooth_k,
                                              rotate=rotate, smooth_qk=smooth_qk, group=group,
                                              pv_kind=pv)
    kc, ks, vc = expand_kv(kc, Hq), expand_kv(ks, Hq), expand_kv(vc, Hq)
    vs = expand_kv(vs, Hq)
    m = torch.full((B, Hq, Sq), float("-inf"), device=q.device)
    l = torch.zeros((B, Hq, Sq), device=q.device)
    acc = torch.zeros((B, Hq, Sq, D), device=q.device)
    rows = torch.arange(Sq, device=q.device)[:, None]
    for j0 in range(0, Sk, block_n):
        j1 = min(j0 + block_n, Sk)
        if causal and j0 > Sq - 1:
            break
        s = (qc @ kc[:, :, j0:j1].transpose(-1, -2)) * qs[..., None] * ks[:, :, None, j0:j1]
        if causal:
            cols = torch.arange(j0, j1, device=q.device)[None, :]
            s = s.masked_fill(cols > rows, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - m_new[..., None])
        if p_nvfp4:  # two levels: fp32 per row (this block's row max / 2688), E4M3 per 16 keys
            pq, g = _p_nvfp4(p)
            pv_blk = (pq @ vc[:, :, j0:j1]) * g[..., None]
        else:
            if pv == "fp8":
                pq = (p * p_scale).to(torch.float8_e4m3fn).float()
            else:
                pq = (p * p_scale).to(torch.float16).float()
            pv_blk = pq @ vc[:, :, j0:j1]
        l = l * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + pv_blk
        m = m_new
    out = acc / l[..., None] * (vs[:, :, None, :] / p_scale)
    lse = (m + torch.log2(l)) * LN2 + qb
    return out, lse


def error_stats(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Cosine similarity and relative L1 (sum|o - r| / sum|r|), flattened, in fp64."""
    o, r = out.double().flatten(), ref.double().flatten()
    cos = float(torch.dot(o, r) / (o.norm() * r.norm()).clamp_min(1e-300))
    rel_l1 = float((o - r).abs().sum() / r.abs().sum().clamp_min(1e-300))
    return {"cos": cos, "rel_l1": rel_l1}


def make_inputs(B, Hq, Hk, Sq, Sk, D, kind="random", dtype=torch.bfloat16, device="cpu",
                seed=0):
    """Test/bench inputs (bhsd). kind "random": N(0, 1). kind "outlier" (DiT-like): K with large
    per-channel means and a few outlier channels (x20 scale), Q with 3x the norm and its own
    outlier channels."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)  # generated where they live (big shapes)
    kw = dict(generator=g, device=dev)
    q = torch.randn(B, Hq, Sq, D, **kw)
    k = torch.randn(B, Hk, Sk, D, **kw)
    v = torch.randn(B, Hk, Sk, D, **kw)
    if kind == "outlier":
        k = k + 4.0 * torch.randn(B, Hk, 1, D, **kw)  # per-channel means
        idx = torch.randperm(D, **kw)[: max(2, D // 32)]
        k[..., idx] *= 20.0
        q = 3.0 * q
        qidx = torch.randperm(D, **kw)[: max(2, D // 32)]
        q[..., qidx] *= 5.0
    elif kind != "random":
        raise ValueError(kind)
    return q.to(dtype), k.to(dtype), v.to(dtype)

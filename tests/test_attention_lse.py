"""pyops.attention's log-sum-exp: its accuracy per precision, and the output error of merging
partial attentions by lse (ring attention over key shards), issue #16 item 2.

Ring attention runs ``attention(q, k_i, v_i, return_lse=True)`` on each key shard i and merges
    lse = logsumexp_i lse_i,   out = sum_i exp(lse_i - lse) * out_i
(diffusers' TemplatedRingAttention does the same pairwise with sigmoid / logsigmoid, in fp32).
The quantized precisions subtract a K shift (the per-channel mid-range over the keys of the call)
before quantizing: every score of a query moves by scale * q . shift, which softmax ignores but
the lse must add back. In a ring the shift is that of the shard, so each shard's lse carries its
own correction; ``test_k_shift_is_corrected_per_shard`` shows the merge without it (or with the
full-K shift) is far off.

Metric for outputs: relative L2 = ||out - ref||_F / ||ref||_F over the whole tensor, fp64; "exact"
is fp64 attention of the same bf16 inputs. Bound (issue #16): the merged output's error against
exact <= 1.5x the single call's. ``python tests/test_attention_lse.py [--quick]`` prints the
table of docs/attention.md ("lse and ring attention").
"""
import sys

import pytest
import torch

from pyops.ops.attention import attention
from pyops.reference import attention as R

PRECS = list(R.PRECISIONS)
QUANT = [p for p in PRECS if p != "bf16"]
KINDS = ("random", "outlier", "drift")
RING_BOUND = 1.5  # issue #16: merged error vs exact <= 1.5x the single-call error vs exact
# max |lse - lse_exact| allowed at the test shape (B1 Hq4 Hk2 Sq64 Sk520 D64, seed 0): about 1.5-2x
# the measured values (`python tests/test_attention_lse.py --quick`, docs/attention.md). A missing
# shift correction moves the lse by scale * q . shift: ~1 on random, tens on outlier / drift
# inputs. bf16: fp32 arithmetic on scores up to ~300 (outlier).
LSE_BOUND = {
    "random": {"fp8": 0.06, "int8": 0.01, "int8_fp16pv": 0.01, "nvfp4": 0.25, "bf16": 1e-3},
    "outlier": {"fp8": 4.0, "int8": 0.6, "int8_fp16pv": 0.6, "nvfp4": 15.0, "bf16": 1e-3},
    "drift": {"fp8": 0.2, "int8": 0.05, "int8_fp16pv": 0.05, "nvfp4": 1.0, "bf16": 1e-3},
}


# ---- helpers ------------------------------------------------------------------------------------
def make(kind, B, Hq, Hk, Sq, Sk, D, seed=0):
    """bf16 bhsd inputs. "random" / "outlier": ``R.make_inputs`` (outlier: K with per-channel
    means 4 N(0,1) and x20 channels, 3x Q with x5 channels). "drift": K = N(0,1) + a large
    per-head mean (8 N(0,1) per channel) + a mean that drifts along the keys (a ramp from -1 to 1
    times 2 N(0,1) per channel), so key shards have different mid-ranges: the case where a
    per-shard K shift matters in a merge."""
    if kind != "drift":
        return R.make_inputs(B, Hq, Hk, Sq, Sk, D, kind=kind, seed=seed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hk, Sk, D, generator=g) + 8.0 * torch.randn(B, Hk, 1, D, generator=g)
    ramp = torch.linspace(-1.0, 1.0, Sk)[None, None, :, None]
    k = k + ramp * 2.0 * torch.randn(B, Hk, 1, D, generator=g)
    v = torch.randn(B, Hk, Sk, D, generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def shard_sizes(Sk, n, uneven=False):
    """n key-shard lengths summing to Sk: equal (the last takes the rest) or uneven (weights
    1:3:5:2, none a multiple of the kernels' 64/128-key blocks at the shapes used here)."""
    w = [1, 3, 5, 2][:n] if uneven else [1] * n
    c = [Sk * x // sum(w) for x in w]
    c[-1] += Sk - sum(c)
    return c


def shards(q, k, v, sizes, precision, backend="reference"):
    """[(out_i, lse_i, k_i)]: one pyops call per key shard, as each ring step runs it."""
    parts, j = [], 0
    for c in sizes:
        ki, vi = k[:, :, j:j + c], v[:, :, j:j + c]
        o, l = attention(q, ki, vi, precision=precision, return_lse=True, backend=backend)
        parts.append((o, l, ki))
        j += c
    return parts


def merge(parts):
    """fp64 merge of [(out_i, lse_i, ...)]: lse = logsumexp_i lse_i, out = sum exp(lse_i - lse)
    out_i. Returns (out (B, H, S, D) fp64, lse (B, H, S) fp64)."""
    lses = torch.stack([p[1].double() for p in parts])
    lse = torch.logsumexp(lses, 0)
    out = sum(torch.exp(li - lse)[..., None] * p[0].double() for p, li in zip(parts, lses))
    return out, lse


def merge_ring(parts):
    """diffusers' pairwise fp32 update (TemplatedRingAttention with convert_to_fp32):
    out = prev_out - sigmoid(lse - prev_lse) * (prev_out - out);
    lse = prev_lse - logsigmoid(prev_lse - lse)."""
    po = pl = None
    for p in parts:
        o, l = p[0].float(), p[1].float()[..., None]
        if po is not None:
            o = po - torch.sigmoid(l - pl) * (po - o)
            l = pl - torch.nn.functional.logsigmoid(pl - l)
        po, pl = o, l
    return po, pl[..., 0]


def rel_l2(a, ref):
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


def k_shift(k):
    """The K shift the quantized pre-pass subtracts (spec: ``R.qkv_transform``), computed here
    independently: per (batch, kv head, channel) mid-range (max + min) / 2 over the keys."""
    kf = k.float()
    return (kf.amax(dim=-2) + kf.amin(dim=-2)) * 0.5


def shift_term(q, shift, scale):
    """scale * q . shift (B, Hq, Sq) fp64: what the shift moves every score of a query by."""
    s = R.expand_kv(shift[..., None, :].double(), q.shape[1])
    return (q.double() * s).sum(-1) * scale


def exact(q, k, v):
    return R.attention(q, k, v, dtype=torch.float64)


# ---- tests --------------------------------------------------------------------------------------
SHAPE = dict(B=1, Hq=4, Hk=2, Sq=64, Sk=520, D=64)  # GQA; 520 keys: no multiple of 64


def test_merge_of_exact_shards_is_exact():
    """The merge itself: exact per-shard attentions merge to exact attention for even and uneven
    shards, to the rounding of the fp32 lse (an absolute |lse| * 2^-24, up to ~1e-5 here at
    |lse| ~ 100: a relative error of the merge weights) in both forms."""
    q, k, v = make("outlier", **SHAPE)
    oe, le = exact(q, k, v)
    for n, uneven in ((2, False), (4, True)):
        parts, j = [], 0
        for c in shard_sizes(SHAPE["Sk"], n, uneven):
            parts.append(exact(q, k[:, :, j:j + c], v[:, :, j:j + c]))
            j += c
        om, lm = merge(parts)
        assert rel_l2(om, oe) < 1e-5 and (lm - le.double()).abs().max() < 1e-4
        orr, lr = merge_ring(parts)
        assert rel_l2(orr, oe) < 1e-5 and (lr - le).abs().max() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prec", PRECS)
def test_lse_accuracy(prec, kind):
    """|lse - lse_exact| within the measured bound, and (quantized precisions) the lse equals
    the logsumexp of the quantized scores the output was computed from, plus the shift
    correction: its error is the score quantization error, nothing added by the lse path."""
    q, k, v = make(kind, **SHAPE)
    _, le = exact(q, k, v)
    o, lse = attention(q, k, v, precision=prec, return_lse=True, backend="reference")
    err = (lse.double() - le.double()).abs()
    assert err.max() <= LSE_BOUND[kind][prec], (prec, kind, float(err.max()))
    if prec == "bf16":
        return
    qc, qs, kc, ks, _, _, qb = R.quantize_qkv(q, k, v, prec)
    kc, ks = R.expand_kv(kc, q.shape[1]).double(), R.expand_kv(ks, q.shape[1]).double()
    s = (qc.double() @ kc.transpose(-1, -2)) * qs.double()[..., None] * ks[:, :, None, :]
    lq = torch.logsumexp(s * R.LN2, -1) + qb.double()
    assert ((lse.double() - lq).abs() <= 1e-5 * (1 + lq.abs())).all(), (prec, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prec", PRECS)
def test_ring_merge_within_bound(prec, kind):
    """Merged output of 2 equal and 4 uneven key shards: error vs exact <= 1.5x the single
    call's (relative L2); diffusers' pairwise fp32 merge gives the same output."""
    q, k, v = make(kind, **SHAPE)
    oe, _ = exact(q, k, v)
    o1 = attention(q, k, v, precision=prec, backend="reference")
    e1 = rel_l2(o1, oe)
    for n, uneven in ((2, False), (4, True)):
        parts = shards(q, k, v, shard_sizes(SHAPE["Sk"], n, uneven), prec)
        om, _ = merge(parts)
        em = rel_l2(om, oe)
        assert em <= RING_BOUND * e1, (prec, kind, n, uneven, em, e1)
        assert rel_l2(merge_ring(parts)[0], om) < 1e-5


@pytest.mark.parametrize("prec", QUANT)
def test_k_shift_is_corrected_per_shard(prec):
    """K with a large mean drifting along the keys, 4 uneven shards. Each shard's lse matches
    the exact lse of its keys; without the correction (lse_i - scale q . shift_i) it is off by
    tens, and so is one corrected with the full K's shift instead of the shard's; merging either
    wrong lse breaks the bound with most of the output wrong (relative L2 > 0.5; measured 0.73-0.75
    here, against 0.01-0.23 for the single call), the corrected one stays
    within it."""
    q, k, v = make("drift", **SHAPE)
    scale = SHAPE["D"] ** -0.5
    oe, _ = exact(q, k, v)
    e1 = rel_l2(attention(q, k, v, precision=prec, backend="reference"), oe)
    parts = shards(q, k, v, shard_sizes(SHAPE["Sk"], 4, uneven=True), prec)
    full_shift = shift_term(q, k_shift(k), scale)
    bad_none, bad_full = [], []
    for o, lse, ki in parts:
        _, le_i = exact(q, ki, ki)  # the exact lse of the shard (needs no v)
        own = shift_term(q, k_shift(ki), scale)
        assert (lse.double() - le_i.double()).abs().max() <= LSE_BOUND["drift"][prec]
        assert (lse.double() - own - le_i.double()).abs().max() > 10.0
        bad_none.append((o, lse.double() - own))
        bad_full.append((o, lse.double() - own + full_shift))
    # the shards' shifts differ: the full K's shift is wrong for every shard's lse
    assert (bad_full[0][1] - parts[0][1].double()).abs().max() > 1.0
    em = rel_l2(merge(parts)[0], oe)
    assert em <= RING_BOUND * e1, (prec, em, e1)
    for bad in (bad_none, bad_full):
        eb = rel_l2(merge(bad)[0], oe)
        assert eb > RING_BOUND * e1 and eb > 0.5, (prec, eb, e1)


@pytest.fixture
def small_blocks():
    from pyops.triton_kernels import attention as tk
    old = tk.FORCE_CONFIG
    if not torch.cuda.is_available():
        tk.FORCE_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    yield
    tk.FORCE_CONFIG = old


def test_triton_int8_ring(small_blocks):
    """The Triton kernel (the GPU path; the interpreter on CPU), int8, 3 uneven shards of 200
    keys (GQA, 16x16 blocks: every shard has a tail), K with a drifting mean (the shift differs
    per shard): each shard's lse is the reference's to fp32 rounding, and the merged output is
    within the bound of the single call."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = make("drift", 1, 4, 2, 40, 200, 64, seed=1)
    oe, _ = exact(q, k, v)
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    o1 = attention(q, k, v, precision="int8", backend="triton")
    e1 = rel_l2(o1.cpu(), oe)
    parts = shards(q, k, v, [37, 100, 63], "int8", backend="triton")
    ref = shards(q.cpu(), k.cpu(), v.cpu(), [37, 100, 63], "int8")
    for (_, lse, _), (_, lr, _) in zip(parts, ref):
        # a rare pre-pass code flip (fp32 summation order) moves a score by one int8 step
        assert (lse.cpu() - lr).abs().max() <= 2e-2
    parts = [(o.cpu(), lse.cpu()) for o, lse, _ in parts]
    em = rel_l2(merge(parts)[0], oe)
    assert em <= RING_BOUND * e1, (em, e1)


# ---- the table of docs/attention.md ----------------------------------------------------------
def table(B=1, Hq=4, Hk=2, Sq=256, Sk=4096, dims=(64, 128), seed=0):
    """Prints one row per (D, kind, precision): single-call lse error (max, mean) and output
    error vs exact; merged output error vs exact for 2 equal / 4 uneven shards (and its ratio
    to the single call's), vs the single call, the merged lse's max error; and the merge of 4
    uneven shards whose lse lacks the K-shift correction."""
    print(f"# torch {torch.__version__}, backend reference (CPU), B{B} Hq{Hq} Hk{Hk} Sq{Sq} "
          f"Sk{Sk}, seed {seed}; relL2 = ||o - ref|| / ||ref||")
    print("D   kind    precision   | lse max  lse mean | out relL2 | merge2 relL2 (x) | "
          "merge4u relL2 (x) | m4u vs 1call | m4u lse max | m4u no-corr relL2")
    for D in dims:
        for kind in KINDS:
            q, k, v = make(kind, B, Hq, Hk, Sq, Sk, D, seed)
            oe, le = exact(q, k, v)
            for prec in PRECS:
                o1, l1 = attention(q, k, v, precision=prec, return_lse=True, backend="reference")
                e1, d1 = rel_l2(o1, oe), (l1.double() - le.double()).abs()
                cells = []
                for n, uneven in ((2, False), (4, True)):
                    parts = shards(q, k, v, shard_sizes(Sk, n, uneven), prec)
                    om, lm = merge(parts)
                    em = rel_l2(om, oe)
                    cells.append(f"{em:.4f} ({em / e1:.2f}x)")
                nc = "-"
                if prec != "bf16":
                    bad = [(p[0], p[1].double() - shift_term(q, k_shift(p[2]), D ** -0.5))
                           for p in parts]
                    nc = f"{rel_l2(merge(bad)[0], oe):.3f}"
                print(f"{D:<3} {kind:<7} {prec:<11} | {d1.max():7.4f} {d1.mean():8.4f} | "
                      f"{e1:9.4f} | {cells[0]:>16} | {cells[1]:>17} | {rel_l2(om, o1):12.4f} | "
                      f"{(lm - le.double()).abs().max():11.4f} | {nc:>17}", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    if "--quick" in sys.argv:
        table(Sq=64, Sk=520, dims=(64,))
    else:
        table()

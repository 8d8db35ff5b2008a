"""pyops nvfp4_to_fp8: NVFP4 weight -> FP8 e4m3 + fp32 per-row scale (spec:
pyops/reference/nvfp4_to_fp8.py).

Sections: the reference against an independent float64 computation (own E2M1/E4M3 decoders, a
brute-force nearest-even E4M3 search, the row exponent by a loop) and its error statement; every
registered backend bit-exact to the reference (q bytes, scale bits) on random bytes and on
constructed rows (zeros, -0 codes, the 448 = 0.875 * 2^9 boundary, e4m3 subnormals, NaN and
negative block scales, junk in the last block's padding), with poisoned outputs; errors; op
registration (opcheck, torch.compile fullgraph); GPU production shapes.

``python tests/test_nvfp4_to_fp8.py`` prints the error table quoted in the reference docstring.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops import _backend
from pyops.ops.nvfp4_to_fp8 import OP, nvfp4_to_fp8, nvfp4_to_fp8_op
from pyops.reference import nvfp4_to_fp8 as ref
from pyops.weights import FP8Weight, NVFP4Weight

from _quantize_util import assert_same, poisoned
from _util import (DEVICE, HAS_CUDA, NoFloat8Arithmetic, need_backend, registered_backends,
                   schema_check)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
BACKENDS = registered_backends(OP)
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
NAN_ROWS = (6, 7)  # rows of special_rows() holding a NaN block scale


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int codes (N, nb*16) -> packed bytes (N, nb*8), element 2i in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def random_weight(N, K, seed, nan=False):
    """Random bytes: every code, every non-NaN scale byte (both signs)."""
    g = torch.Generator().manual_seed(seed)
    nb = (K + 15) // 16
    data = torch.randint(0, 256, (N, nb * 8), generator=g, dtype=torch.uint8)
    s = torch.randint(0, 256, (N, nb), generator=g, dtype=torch.uint8)
    if not nan:
        s = torch.where((s & 0x7F) == 0x7F, s ^ 1, s)
    return data, s, torch.rand(1, generator=g) + 0.01


def special_rows(K, seed=0):
    """Constructed rows (see each line); the padding past K holds code 7 (6.0), never read."""
    g = torch.Generator().manual_seed(seed)
    nb = (K + 15) // 16
    codes = torch.randint(0, 3, (9, nb * 16), generator=g)  # magnitudes 0, 0.5, 1 (+ sign)
    codes |= torch.randint(0, 2, codes.shape, generator=g) << 3
    s = torch.randint(0x08, 0x3E, (9, nb), generator=g)  # normal scales below 1.75
    codes[0] = 0                                   # zero row: scale = g, q = 0
    codes[1] = 8                                   # -0 codes: q bytes 0x80
    s[2, 0], codes[2, 0] = 0x3E, 2                 # amax = 1 * 1.75 = 0.875 * 2: q max 448
    s[3, 0], codes[3, 0] = 0x3F, 2                 # amax = 1.875, just above: e one higher
    s[4], codes[4, 0] = 0x39, 3                    # amax = 1.5 * 1.125 = 0.84375 * 2 (a tie)
    s[5, 0], codes[5, 0] = 0x7E, 7                 # amax 2688 (e = 3) and scales in
    s[5, 1:] = torch.randint(0x08, 0x10, (nb - 1,), generator=g)  # [2^-6, 2^-5): subnormals
    s[6, -1] = 0x7F                                # NaN block scale -> NaN row
    s[7, 0] = 0xFF                                 # the other NaN byte
    s[8] |= 0x80                                   # negative scales flip the signs
    codes[:, K:] = 7
    return pack(codes), s.to(torch.uint8), torch.tensor([0.75])


# ---- the reference against an independent computation --------------------------------------
def _e4m3_value(b: int) -> float:
    e, m = (b >> 3) & 15, b & 7
    v = m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -v if b & 0x80 else v


E4M3_POS = torch.tensor([_e4m3_value(b) for b in range(0x7F)], dtype=torch.float64)


def independent(data, scales, g, K):
    """The spec in float64 with nothing shared with the reference."""
    N = data.shape[0]
    d = data.long()
    codes = torch.stack((d & 15, d >> 4), dim=-1).reshape(N, -1)[:, :K]
    tab = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float64)
    sv = torch.tensor([[_e4m3_value(int(b)) if (b & 0x7F) != 0x7F else float("nan")
                        for b in row] for row in scales.tolist()], dtype=torch.float64)
    u = tab[codes] * sv.repeat_interleave(16, dim=1)[:, :K]
    q = torch.zeros(N, K, dtype=torch.uint8)
    scale = torch.empty(N, dtype=torch.float64)
    for n in range(N):
        if torch.isnan(u[n]).any():
            scale[n] = float("nan")
            continue
        amax, e = float(u[n].abs().max()), 0
        while amax > 0 and amax > 448 * 2.0**e:
            e += 1
        while amax > 0 and amax <= 448 * 2.0 ** (e - 1):
            e -= 1
        v = u[n] * 2.0**-e
        dist = (v.abs()[:, None] - E4M3_POS[None, :]).abs()
        best = dist.min(dim=1, keepdim=True).values
        cand = torch.where(dist == best, torch.arange(0x7F), 1000)
        even = torch.where(cand % 2 == 0, cand, 1000).min(dim=1).values
        byte = torch.where(even < 1000, even, cand.min(dim=1).values)  # ties -> even byte
        q[n] = (byte | torch.where(torch.signbit(v), 0x80, 0)).to(torch.uint8)
        scale[n] = float(g) * 2.0**e
    return q, scale.float()


@pytest.mark.parametrize("N,K", [(9, 1), (9, 17), (9, 40)])
def test_reference_against_independent(N, K):
    for data, s, g in (special_rows(K), random_weight(N, K, seed=K)):
        q, scale = ref.nvfp4_to_fp8(data, s, g, K)
        wq, ws = independent(data, s, g, K)
        assert_same(q.view(torch.uint8), wq, "q")
        assert_same(scale, ws, "scale")


def test_constructed_rows_by_hand():
    data, s, g = special_rows(32)
    q, scale = ref.nvfp4_to_fp8(data, s, g, 32)
    f = q.float()
    assert scale[0] == 0.75 and (q.view(torch.uint8)[0] == 0).all()
    assert (q.view(torch.uint8)[1] == 0x80).all() and scale[1] == 0.75
    assert f[2].abs().max() == 448 and scale[2] == 0.75 * 2.0**-8
    assert f[3].abs().max() == 240 and scale[3] == 0.75 * 2.0**-7
    # 1.6875 * 2^8 = 432 is halfway between e4m3 416 and 448: ties to the even code (448)
    assert f[4, 0] == 448 and scale[4] == 0.75 * 2.0**-8
    assert f[5, 0] == 320 and scale[5] == 0.75 * 8  # 2688 / 8 = 336: a tie, even code 320
    sub = f[5, 1:].abs()
    assert ((sub > 0) & (sub < 2.0**-6)).any()  # e4m3 subnormal codes
    for n in NAN_ROWS:
        assert scale[n].isnan() and (q.view(torch.uint8)[n] == 0).all()


def error_stats(w: torch.Tensor) -> dict:
    """W_fp8 against the NVFP4 dequantization (fp32): fraction changed, max / mean relative
    error over W != 0, relative Frobenius error (the reference docstring's table)."""
    qw = pyops.quantize_weight(w, "nvfp4", backend="reference")
    W = qw.dequantize(torch.float32)
    q, scale = ref.nvfp4_to_fp8(qw.data, qw.scales, qw.global_scale, qw.K)
    W8 = q.float() * scale[:, None]
    nz = W != 0
    rel = ((W8 - W).abs() / W.abs())[nz]
    return {"changed": float((W8 != W).float().mean()), "max_rel": float(rel.max()),
            "mean_rel": float(rel.mean()),
            "rel_fro": float(torch.linalg.norm(W8 - W) / torch.linalg.norm(W))}


def gaussian(N, K, outlier=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    if outlier:  # 1 % of the input channels x 100
        w[:, torch.randperm(K, generator=g)[:max(1, K // 100)]] *= 100
    return w


def test_error_statement():
    """Exact where u * 2^-e fits E4M3; else one rounding, rel. error <= 2^-4 (results >= 2^-6)."""
    for outlier in (False, True):
        st = error_stats(gaussian(64, 512, outlier))
        assert st["max_rel"] <= 2.0**-4 and st["rel_fro"] < 0.04 and 0 < st["changed"] < 0.4
    data, s, g = random_weight(64, 256, seed=3)
    u = ref.decode_rows(data, s, 256).double()
    q, scale = ref.nvfp4_to_fp8(data, s, g, 256)
    v = u * (scale.double() / float(g)).reciprocal()[:, None]  # u * 2^-e
    got = q.float().double()
    fits = torch.isin(v.abs(), E4M3_POS)
    assert torch.equal(got[fits], v[fits])
    big = v.abs() >= 2.0**-6
    assert ((got - v).abs() <= 2.0**-4 * v.abs())[big].all()
    assert ((got - v).abs() <= 2.0**-10)[~big].all()  # half an e4m3 subnormal step


def test_worst_rounding_is_one_in_21():
    """Every product e2m1 * E4M3 scale, brought into e4m3's normal range by a power of two and
    rounded: the largest relative error is 1/21 (1.5 * 1.75 -> significand 1.3125, a tie that
    goes to 1.25), below the 2^-4 bound the docstring states."""
    u = torch.tensor(E2M1[1:])[:, None] * E4M3_POS[1:].float()[None, :]
    v = u / torch.exp2(torch.floor(torch.log2(u))) * 64  # significand * 2^6, exact
    err = ((v.to(torch.float8_e4m3fn).float() - v).abs() / v).max()
    assert err == torch.tensor(1 / 21, dtype=torch.float32)


# ---- backends: bit-exact to the reference ---------------------------------------------------
# random bytes at awkward shapes; constructed rows (9 of them) at awkward K; 9000 > ROW_SINGLE_MAX
CASES = ([("random", N, K) for N, K in [(1, 1), (3, 17), (130, 16), (2, 100), (5, 128),
                                        (3, 3072), (2, 9000)]]
         + [("special", 9, K) for K in (1, 17, 48, 130, 9000)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,N,K", CASES)
def test_backend_bit_exact(backend, kind, N, K):
    """The backend's destination-passing entry point, outputs poisoned first."""
    need_backend(OP, backend)
    data, s, g = random_weight(N, K, seed=N * 7 + K) if kind == "random" else special_rows(K, K)
    q, scale = poisoned((N, K), torch.float8_e4m3fn), poisoned((N,), torch.float32)
    _backend.impl(OP, backend)(data.to(DEVICE), s.to(DEVICE), g.to(DEVICE), K, q, scale)
    rq, rs = ref.nvfp4_to_fp8(data, s, g, K)
    assert_same(q.view(torch.uint8), rq.view(torch.uint8), f"q {kind} {N}x{K}")
    assert_same(scale, rs, f"scale {kind} {N}x{K}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outlier", [False, True])
def test_public_function_on_quantized_weights(backend, outlier):
    w = gaussian(67, 200, outlier, seed=5).to(torch.bfloat16)
    qw = pyops.quantize_weight(w, "nvfp4", backend="reference")
    need_backend(OP, backend)
    got = nvfp4_to_fp8(qw.to(DEVICE), backend=backend)
    want = nvfp4_to_fp8(qw, backend="reference")
    assert isinstance(got, FP8Weight) and got.dtype == torch.bfloat16
    assert got.data.shape == (67, 200) and got.scale.shape == (67, 1)
    assert got.data.dtype == torch.float8_e4m3fn and got.scale.dtype == torch.float32
    assert_same(got.data.view(torch.uint8), want.data.view(torch.uint8), "q")
    assert_same(got.scale, want.scale, "scale")
    W8 = got.dequantize(torch.float32).cpu()
    W = qw.dequantize(torch.float32)
    assert float(((W8 - W).abs() / W.abs().clamp_min(1e-30))[W != 0].max()) <= 2.0**-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_strided_input_and_uint8_scales(backend):
    data, s, g = random_weight(6, 40, seed=11)
    big = torch.zeros(6, 64, dtype=torch.uint8)
    big[:, 5:5 + data.shape[1]] = data
    strided = big[:, 5:5 + data.shape[1]]
    rq, rs = ref.nvfp4_to_fp8(data, s, g, 40)
    need_backend(OP, backend)
    q, scale = nvfp4_to_fp8_op(strided.to(DEVICE), s.to(DEVICE), g.to(DEVICE), 40, backend)
    assert_same(q.view(torch.uint8), rq.view(torch.uint8), "q")
    assert_same(scale, rs, "scale")


# ---- errors before any launch ---------------------------------------------------------------
def test_bad_inputs():
    data, s, g = random_weight(4, 40, seed=1)
    s8 = s.view(torch.float8_e4m3fn)

    def w(d=data, sc=s8, gs=g, K=40):
        return NVFP4Weight(d, sc, gs, K)

    cases = [
        (TypeError, "NVFP4Weight", FP8Weight(torch.zeros(2, 2, dtype=torch.float8_e4m3fn),
                                             torch.ones(2, 1))),
        (TypeError, "NVFP4Weight", data),
        (TypeError, "data has dtype int8", w(d=data.view(torch.int8))),
        (TypeError, "scales has dtype float32", w(sc=s8.float())),
        (TypeError, "global_scale has dtype float16", w(gs=g.half())),
        (ValueError, r"K=49 needs \(4, 32\)", w(K=49)),
        (ValueError, r"K=40 needs \(4, 3\)", w(sc=s8[:, :2])),
        (ValueError, r"K=40 needs \(4, 3\)", w(sc=s8[:3])),
        (ValueError, "K must be >= 1", w(K=0)),
        (ValueError, "2-D", w(d=data.view(2, 2, 24))),
        (ValueError, "one value", w(gs=torch.ones(2))),
        (ValueError, "empty", w(d=data[:0], sc=s8[:0])),
        (ValueError, "contiguous", w(d=data.t().contiguous().t())),
    ]
    for exc, match, arg in cases:
        with pytest.raises(exc, match=match):
            nvfp4_to_fp8(arg)
    with pytest.raises(ValueError, match="unknown backend"):
        nvfp4_to_fp8(w(), backend="cublas")
    with pytest.raises(ValueError, match="needs"):  # the op checks too
        nvfp4_to_fp8_op(data, s, g, 48 + 1, "reference")
    with pytest.raises(TypeError):
        nvfp4_to_fp8(w(), "reference")  # backend is keyword-only


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only error")
def test_explicit_backend_that_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    data, s, g = random_weight(2, 16, seed=0)
    with pytest.raises(RuntimeError, match="cannot run"):
        nvfp4_to_fp8(NVFP4Weight(data, s, g, 16), backend="triton")


# ---- op registration ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    need_backend(OP, backend)
    for N, K in [(3, 17), (2, 64)]:
        data, s, g = random_weight(N, K, seed=K)
        args = (data.to(DEVICE), s.view(torch.float8_e4m3fn).to(DEVICE), g.to(DEVICE), K,
                backend)
        op = torch.ops.pyops.nvfp4_to_fp8.default
        # test_schema compares arguments with arithmetic (none for float8 on CPU or CUDA):
        # schema_check restates it on bytes; the guard also checks the op does no fp8 math
        torch.library.opcheck(op, args, test_utils=(
            "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
        with NoFloat8Arithmetic() as guard:
            got = schema_check(op, args)
        assert guard.violations == []
        for a, b in zip(got, op(*args)):
            assert_same(a, b, "schema_check run")


def test_compile_fullgraph():
    def f(qw):
        t = nvfp4_to_fp8(qw, backend="reference")
        return t.data, t.scale

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for N, K in [(5, 40), (3, 17)]:
        qw = pyops.quantize_weight(gaussian(N, K, seed=N), "nvfp4", backend="reference")
        for a, b in zip(cf(qw), f(qw)):
            assert_same(a, b, "compiled")


# ---- GPU only -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(3072, 3072), (12288, 3072), (3072, 12288), (333, 1000)])
def test_gpu_production_shapes(N, K):
    """The compiled kernel (hardware e4m3 cast on sm_90+) against the CPU reference."""
    w = gaussian(N, K, outlier=True, seed=1)
    qw = pyops.quantize_weight(w, "nvfp4", backend="reference")
    got = nvfp4_to_fp8(qw.to("cuda"), backend="triton")
    want = nvfp4_to_fp8(qw, backend="reference")
    assert_same(got.data.view(torch.uint8), want.data.view(torch.uint8), "q")
    assert_same(got.scale, want.scale, "scale")


if __name__ == "__main__":  # pragma: no cover - the reference docstring's error table
    for name, w in [("Gaussian", gaussian(1024, 4096)),
                    ("Gaussian, 1 % channels x 100", gaussian(1024, 4096, outlier=True))]:
        st = error_stats(w)
        qw = pyops.quantize_weight(w, "nvfp4", backend="reference")
        W8 = nvfp4_to_fp8(qw, backend="reference").dequantize(torch.float32)
        for k, W in (("nvfp4_vs_w", qw.dequantize(torch.float32)), ("fp8_vs_w", W8)):
            st[k] = float(torch.linalg.norm(W - w) / torch.linalg.norm(w))
        print(f"{name:30s}", {k: f"{v:.3g}" for k, v in st.items()})

"""The Triton numerics of ``triton_kernels/_cvt.py`` (E4M3, E2M1, bf16, int8, E8M0 codecs) against
torch's casts and the references, bit for bit.

Runs in the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA);
on a GPU the same tests run on CUDA tensors, and ``test_gpu_hw_and_soft_paths`` checks both the
hardware-cast and the soft-cast path. References are always computed on the host (CPU) from a
host copy of the input: torch's CPU casts are the spec, and a reference computed by torch on the
GPU under test would share its device's code generation (a GPU test then could not tell which
side is wrong). Every output is poisoned (0xAA bytes) before the kernel runs, so unwritten
elements are caught. NaN payload bits are not part of the spec (torch's own bf16 cast writes
different NaN bits on CPU and GPU): floating outputs compare bit for bit where the reference is a
number and NaN-for-NaN elsewhere.

The quantizers built on these codecs are tested per op, on every backend, in
tests/test_quantize_fp8.py and tests/test_quantize_nvfp4.py.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
# the interpreter's numpy ops warn on x/0 and inf-inf in elements the kernels then overwrite
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

from pyops.reference import quantize_nvfp4 as ref4  # noqa: E402
from pyops.triton_kernels import _cvt  # noqa: E402
from pyops.triton_kernels import quantize_fp8 as tk8  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from _quantize_util import DEV, assert_bits, poisoned  # noqa: E402
from _quantize_util import raw_bits as _bits  # noqa: E402


# ---- conversion helpers vs torch's casts ---------------------------------------------------------
@triton.jit
def _cvt_kernel(x_ptr, e_ptr, d_ptr, b_ptr, n, SOFT: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(x_ptr + o, mask=m, other=0.0)
    v = tl.minimum(tl.maximum(x, -448.0), 448.0)
    bits = _cvt.e4m3_bits(v, SOFT)
    tl.store(e_ptr + o, bits, mask=m)
    tl.store(d_ptr + o, _cvt.e4m3_to_f32(bits, SOFT), mask=m)
    tl.store(b_ptr + o, _cvt.f32_to_out(x, 2, SOFT), mask=m)


def _cvt_inputs():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    s = codes[torch.isfinite(codes)].unique().sort().values
    grid = torch.cat([s, (s[1:] + s[:-1]) / 2])  # every e4m3 value and every midpoint (ties)
    near = torch.cat([(grid.view(torch.int32) + d).view(torch.float32) for d in range(-2, 3)])
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-140, 128, (4096,),
                                                                       generator=gen).float())
    b16 = torch.arange(0, 1 << 16, 97, dtype=torch.int32) << 16
    ties = torch.cat([b16 + 0x8000, b16 + 0x18000, b16 + 0x7FFF, b16 + 1]).view(torch.float32)
    special = torch.tensor([0.0, -0.0, 2.0**-149, -(2.0**-126), 449.0, 464.0, -1e30])
    x = torch.cat([near, wide, ties, special])
    return x[~x.isnan()]  # e4m3_bits leaves NaN unspecified (callers overwrite those groups)


def _run_cvt(x_host, soft):
    """The conversion helpers on the device under test: (e4m3 bytes, their fp32 decode, bf16 of
    the input), copied back to the host."""
    x = x_host.to(DEV)
    n = x.numel()
    e = poisoned((n,), torch.uint8)
    d = poisoned((n,), torch.float32)
    b = poisoned((n,), torch.int16 if soft else torch.bfloat16)
    _cvt_kernel[(triton.cdiv(n, 1024),)](x, e, d, b, n, SOFT=soft, BLOCK=1024)
    return e.cpu(), d.cpu(), b.view(torch.bfloat16).cpu()


def _host_cvt(x_host):
    """torch's own casts on the host (the spec): (e4m3 bytes, their fp32 decode, bf16)."""
    want_e = x_host.clamp(-448, 448).to(torch.float8_e4m3fn)
    return want_e.view(torch.uint8), want_e.float(), x_host.to(torch.bfloat16)


CVT_WHAT = ("fp32 -> e4m3", "e4m3 -> fp32", "fp32 -> bf16")


def _mismatches(x, got, want, show=4):
    """'' when got equals want bit for bit (NaN for NaN on floats), else how many elements
    differ and the first ``show`` of them as (index, input value, input bits, got, want)."""
    got, want = got.cpu(), want.cpu()
    if got.dtype.is_floating_point and got.element_size() > 1:
        bad = (got.isnan() != want.isnan()) | (~want.isnan() & (_bits(got) != _bits(want)))
    else:
        bad = _bits(got) != _bits(want)
    idx = bad.nonzero().flatten()
    if idx.numel() == 0:
        return ""

    def fmt(t, i):
        v = t[i]
        if t.element_size() == 1:
            return f"0x{int(v.view(torch.uint8)):02x}"
        return f"{float(v)!r}"
    ex = [f"[{i}] x={float(x[i])!r} (0x{int(x.view(torch.int32)[i]) & 0xFFFFFFFF:08x}): "
          f"got {fmt(got, i)} want {fmt(want, i)}" for i in idx[:show].tolist()]
    return f"{idx.numel()} of {got.numel()} elements differ; " + "; ".join(ex)


def _check_cvt(soft):
    x = _cvt_inputs()
    side = "soft (bit-level)" if soft else "hardware (Triton cast)"
    for what, g, w in zip(CVT_WHAT, _run_cvt(x, soft), _host_cvt(x)):
        msg = _mismatches(x, g, w)
        assert not msg, f"{side} path vs torch's host cast: {what}: {msg}"
    # every e4m3 byte decodes like torch, NaN (0x7F, 0xFF) included
    allb = torch.arange(256, dtype=torch.uint8, device=DEV)
    q = allb.view(torch.float8_e4m3fn).view(16, 16)
    out = poisoned((16, 16), torch.float32)
    tk8.dequantize_fp8(q, torch.ones(1, device=DEV), 0, out)
    assert_bits(out, q.cpu().float(), "all e4m3 bytes")


def test_mismatch_report_names_elements():
    """The GPU conversion test's report: counts, indices, input bits, got / want per element."""
    x = torch.tensor([1.0, -0.0, 3.0e-3, 448.0])
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert _mismatches(x, want.clone(), want) == ""
    got = want.clone()
    got[2] ^= 0x80
    msg = _mismatches(x, got, want)
    assert msg.startswith("1 of 4 elements differ; [2] x=0.003") and "got 0x82 want 0x02" in msg
    f = torch.tensor([1.0, float("nan"), 2.0])
    assert _mismatches(f, f.clone(), f) == ""
    assert _mismatches(f, torch.tensor([1.0, 0.0, 2.0]), f).startswith("1 of 3")


def test_conversions():
    _check_cvt(_cvt.use_soft_cvt(torch.empty(0, device=DEV)))


_AOT_CVT = r"""
import json, re, sys
import triton
import triton.language as tl
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as e:
    print(json.dumps({"skip": f"no AOT compile API in this Triton: {e!r}"})); sys.exit(0)
from pyops.triton_kernels import _cvt


@triton.jit
def k(x_ptr, e_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    v = tl.minimum(tl.maximum(tl.load(x_ptr + o, mask=m, other=0.0), -448.0), 448.0)
    tl.store(e_ptr + o, _cvt.e4m3_bits(v, False), mask=m)


res = {}
for cap in (89, 90):
    sig = dict(x_ptr="*fp32", e_ptr="*u8", n="i32", BLOCK="constexpr")
    ptx = triton.compile(ASTSource(fn=k, signature=sig, constexprs=dict(BLOCK=1024)),
                         target=GPUTarget("cuda", cap, 32), options=dict(num_warps=4)).asm["ptx"]
    cvt = re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32\s+(%\w+), (%\w+), (%\w+);", ptx)
    res[str(cap)] = {"direct": len(cvt), "via_f16_rz": ptx.count("cvt.rz.f16.f32")}
print(json.dumps(res))
"""


def test_hw_e4m3_cast_lowering(tmp_path):
    """What ``use_soft_cvt`` relies on, checked by compiling the hardware path ahead of time
    (Triton's bundled compiler, no GPU): on sm_90 fp32 -> e4m3 is one direct
    ``cvt.rn.satfinite.e4m3x2.f32`` per pair (round to nearest even, saturating; no
    ``cvt.rz.f16.f32`` step, which would round twice). sm_89 is only reported: older Tritons
    lower it through fp16 (hence the soft path below sm_90), Triton 3.9 directly. (Triton emits
    the pair as ``cvt ... d, b, a``: the first element lands in the low byte, so no element
    swap; the GPU test checks the numbers.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "aot_cvt.py"
    script.write_text(_AOT_CVT)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                       cwd=root, timeout=300)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        pytest.skip(f"AOT compile unavailable: rc {r.returncode}: {r.stderr[-400:]}")
    res = json.loads(lines[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    assert res["90"]["direct"] > 0 and res["90"]["via_f16_rz"] == 0, res


# ---- the other codecs of _cvt (E2M1, bf16, int8, E8M0) vs the reference / torch -----------------
@triton.jit
def _e2m1_kernel(v_ptr, c_ptr, d_ptr, r_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    v = tl.load(v_ptr + o, mask=m, other=0.0)
    c = _cvt.e2m1_codes(v)
    tl.store(c_ptr + o, c, mask=m)
    tl.store(d_ptr + o, _cvt.e2m1_to_f32(c), mask=m)
    tl.store(r_ptr + o, _cvt.e2m1_round(v), mask=m)


def _e2m1_inputs():
    """Every E2M1 value and rounding boundary with their fp32 neighbours, both signs, zeros,
    NaN, values past 6, a wide random spread."""
    pts = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0,
                        6.0, 7.0, 100.0, 2.0**-149, 1e-30])
    near = torch.cat([(pts.view(torch.int32) + d).view(torch.float32) for d in (-2, -1, 0, 1, 2)])
    near = near[near >= 0]
    gen = torch.Generator().manual_seed(13)
    wide = torch.rand(3000, generator=gen) * 7.0
    x = torch.cat([near, -near, wide, -wide, torch.tensor([-0.0, float("nan"), -float("nan")])])
    return x


def test_e2m1_codecs_match_reference():
    """``e2m1_codes`` (the one E2M1 encoder of the kernels) against the reference's threshold
    sum, ``e2m1_to_f32`` against the reference's table for every code, and ``e2m1_round`` (the
    fused value path of the emulated NVFP4 attention) against decode(encode), bit for bit,
    NaN and -0.0 included."""
    x = _e2m1_inputs()
    n = x.numel()
    v = x.to(DEV)
    c = poisoned((n,), torch.int32)
    d = poisoned((n,), torch.float32)
    r = poisoned((n,), torch.float32)
    _e2m1_kernel[(triton.cdiv(n, 1024),)](v, c, d, r, n, BLOCK=1024)
    want_c = ref4.e2m1_codes(x).to(torch.int32)
    want_v = ref4.e2m1_values(want_c)
    assert torch.equal(c.cpu(), want_c), _mismatches(x, c.cpu().float(), want_c.float())
    assert torch.equal(_bits(d).cpu(), _bits(want_v)), _mismatches(x, d.cpu(), want_v)
    assert torch.equal(_bits(r).cpu(), _bits(want_v)), _mismatches(x, r.cpu(), want_v)
    assert want_c[x.isnan()].eq(0).all() and (want_c[(x == 0) & x.signbit()] == 0).all()
    codes = torch.arange(16, dtype=torch.int32)
    x16 = ref4.e2m1_values(codes)  # every code's value encodes back to the code (but -0 -> 0)
    c16 = poisoned((16,), torch.int32)
    d16 = poisoned((16,), torch.float32)
    r16 = poisoned((16,), torch.float32)
    _e2m1_kernel[(1,)](x16.to(DEV), c16, d16, r16, 16, BLOCK=16)
    assert torch.equal(c16.cpu(), torch.where(codes == 8, 0, codes))
    assert torch.equal(_bits(r16).cpu(), _bits(x16.where(codes != 8, 0.0)))


@triton.jit
def _bf16_kernel(b_ptr, w_ptr, x_ptr, n0_ptr, n1_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(w_ptr + o, _cvt.bf16_bits_to_f32(tl.load(b_ptr + o, mask=m, other=0)), mask=m)
    x = tl.load(x_ptr + o, mask=m, other=0.0)
    tl.store(n0_ptr + o, _cvt.f32_to_bf16_bits(x, _cvt.BF16_NAN_BITS_TORCH_CPU).to(
        tl.int16, bitcast=True), mask=m)
    tl.store(n1_ptr + o, _cvt.f32_to_bf16_bits(x, _cvt.BF16_NAN_BITS_CANONICAL).to(
        tl.int16, bitcast=True), mask=m)


def test_bf16_codec():
    """Widening: all 65536 bf16 bit patterns exactly (subnormals, NaN payloads). Narrowing:
    torch's RNE cast on ties, near-ties, subnormals, overflow; NaN -> the asked-for bits."""
    n = 1 << 16
    b = torch.arange(n, dtype=torch.int32).to(torch.int16)
    ties = _cvt_inputs()
    x = torch.cat([ties, torch.tensor([float("nan"), -float("nan"), float("inf"),
                                       -float("inf"), 3.4e38, -3.39e38])])
    x = torch.cat([x, x.new_zeros(n - x.numel())]) if x.numel() < n else x[:n]
    w = poisoned((n,), torch.float32)
    n0 = poisoned((n,), torch.int16)
    n1 = poisoned((n,), torch.int16)
    _bf16_kernel[(triton.cdiv(n, 1024),)](b.to(DEV), w, x.to(DEV), n0, n1, n, BLOCK=1024)
    want_w = b.view(torch.bfloat16).float()
    assert torch.equal(_bits(w).cpu(), _bits(want_w)), "bf16 -> fp32"
    want = x.to(torch.bfloat16).view(torch.int16)
    nan = x.isnan()
    for got, nan_bits in ((n0, 0xFFFF), (n1, 0x7FC0)):
        got = got.cpu()
        assert torch.equal(got[~nan], want[~nan]), _mismatches(
            x[~nan], got[~nan].view(torch.bfloat16), want[~nan].view(torch.bfloat16))
        assert ((got[nan].to(torch.int32) & 0xFFFF) == nan_bits).all(), hex(nan_bits)


@triton.jit
def _int8_e8m0_kernel(x_ptr, q_ptr, e_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(x_ptr + o, mask=m, other=0.0)
    tl.store(q_ptr + o, _cvt.f32_to_int8(x), mask=m)
    tl.store(e_ptr + o, _cvt.e8m0_nearest(tl.abs(x)), mask=m)


def test_int8_and_e8m0_codecs():
    """int8: round half to even (torch.round) then saturate to +-127, on every tie up to 200 and
    its neighbours. E8M0 (interpreter test hook): powers of two map to exponent + 127, 0 to 0."""
    t = torch.arange(-200, 201, dtype=torch.float32) + 0.5
    near = torch.cat([(t.view(torch.int32) + d).view(torch.float32) for d in (-1, 0, 1)])
    p2 = torch.exp2(torch.arange(-9, 9, dtype=torch.float32))
    x = torch.cat([near, torch.tensor([0.0, -0.0, 1e-30, 127.49, -127.5, 1e6, -1e6]), p2])
    n = x.numel()
    q = poisoned((n,), torch.int8)
    e = poisoned((n,), torch.uint8)
    _int8_e8m0_kernel[(triton.cdiv(n, 1024),)](x.to(DEV), q, e, n, BLOCK=1024)
    assert torch.equal(q.cpu(), torch.round(x).clamp(-127, 127).to(torch.int8))
    want_e = (torch.log2(p2) + 127).to(torch.uint8)
    assert torch.equal(e.cpu()[-p2.numel():], want_e)
    assert e.cpu()[near.numel()] == 0  # |x| == 0


@triton.jit
def _e4m3_int_kernel(b_ptr, d_ptr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(d_ptr + o, _cvt.e4m3_to_f32(tl.load(b_ptr + o).to(tl.int32), True))


def test_e4m3_decode_of_int32_bytes():
    """The soft E4M3 decode on bytes widened to int32 (how the NVFP4 GEMM reads its scales):
    every byte like torch, NaN included."""
    d = poisoned((256,), torch.float32)
    _e4m3_int_kernel[(1,)](torch.arange(256, dtype=torch.uint8).to(DEV), d, BLOCK=256)
    assert_bits(d, torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float(),
                "e4m3 from int32")


# ---- GPU: hardware casts and soft casts agree ---------------------------------------------------
@pytest.mark.gpu
def test_gpu_hw_and_soft_paths(monkeypatch):
    """Both conversion paths on the GPU against torch's host cast of the same inputs; a failure
    names each side that disagrees (hardware = Triton's casts, soft = the bit-level helpers) and
    says whether torch's own GPU cast agrees with its host cast (if it does not, a reference
    computed on the GPU would be wrong, not the kernels)."""
    monkeypatch.delenv("PYOPS_TRITON_SOFT_CVT", raising=False)
    x = _cvt_inputs()
    want = _host_cvt(x)
    paths = {"soft (bit-level)": True}
    if not _cvt.use_soft_cvt(torch.empty(0, device=DEV)):  # sm_90+: the hardware casts
        paths["hardware (Triton cast)"] = False
    problems = []
    for side, soft in paths.items():
        for what, g, w in zip(CVT_WHAT, _run_cvt(x, soft), want):
            msg = _mismatches(x, g, w)
            if msg:
                problems.append(f"{side} path vs torch's host cast: {what}: {msg}")
    if problems:
        tg = x.to(DEV).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).cpu()
        msg = _mismatches(x, tg, want[0])
        problems.append("for comparison, torch's own GPU cast vs its host cast: fp32 -> e4m3: "
                        + (msg or "equal"))
    assert not problems, "\n".join(problems)


@pytest.mark.gpu
def test_gpu_torch_e4m3_cast_matches_host():
    """torch's own fp32 -> e4m3 cast on the GPU against its host cast (same inputs as the
    conversion test). Not a kernel check: if this fails, torch's GPU cast is what disagrees,
    and anything that computes the FP8 reference on a CUDA tensor (``backend="reference"``
    there) inherits the error. Known class of cause: ptxas miscompiling the software fp8
    conversion in torch's vectorized elementwise kernel (pytorch/pytorch#177870, sm_100)."""
    x = _cvt_inputs()
    got = x.to(DEV).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).cpu()
    msg = _mismatches(x, got, _host_cvt(x)[0])
    assert not msg, f"torch {torch.__version__} GPU cast vs host cast: {msg}"

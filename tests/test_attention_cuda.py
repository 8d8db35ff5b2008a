"""pyops.attention's ``cuda`` backend: the sm_90a wgmma kernel (csrc/attention.cu), int8 only.

The kernel was written and compiled without a GPU: it is UNVERIFIED on hardware. The CPU tests
here check what can be checked without one:

* the backend registry: auto keeps Triton on an sm_90 device (the policy), an explicit
  ``backend="cuda"`` runs there and is refused, with the reason, for other precisions, head dims,
  devices and builds;
* the build: the sm_90a PTX holds the wgmma instructions of the design (s8 QK^T, e4m3 PV from
  registers, the proxy fence), other architectures compile to the stub, ptxas reports no spills;
* the C entry's argument checks, from C, without a GPU;
* the index maps the design rests on: ``perm_key`` (read from the source) turns each thread's
  QK^T accumulator columns into its PV A-fragment bytes in natural key order (the layouts of the
  PTX ISA's wgmma register-fragment figures);
* the shared-memory operands: the source's own swizzle / descriptor helpers, run on the host,
  and an emulation of what wgmma reads through each descriptor (PTX ISA field table, canonical
  K-major layout, swizzle on the address bits): Q, permuted K and V^T for every k32 step, and
  one key block from S = Q K^T through the packed P fragment to P V.

The GPU tests (``gpu``; an sm_90 device with pyops._C built for sm_90a, else skipped) compare the
kernel with the Triton kernel on the same pre-pass buffers and with the simulated reference, on
fresh random and outlier inputs, odd lengths, GQA, causal with Sq != Sk, D 64 / 128, 70k and
>2^31-element cases, NaN confinement, a CUDA graph and torch.compile.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pyops import _backend
from pyops.ops import attention as op_mod
from pyops.ops.attention import attention
from pyops.reference import attention as R

from _util import HAS_CUDA

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "csrc" / "attention.cu"


# ---- the backend registry (CPU, a fake sm_90 state) ---------------------------------------------
@pytest.fixture
def fake_sm90(monkeypatch):
    """pyops._C 'loaded' for sm_90a with the attention binding, device 0 is sm_90 (the pattern of
    tests/test_backend.py); no device is ever queried."""
    monkeypatch.setattr(_backend, "_EXTENSION", _backend.ExtensionFacts(
        True, "fake pyops._C", ("90a",), frozenset({"attention"})))
    monkeypatch.setattr(_backend, "_CAPABILITY", {0: (9, 0)})

    def no_query(*a, **k):
        raise AssertionError("the device was queried; facts must be cached")
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_query)
    monkeypatch.delenv("PYOPS_BACKEND", raising=False)
    monkeypatch.delenv("PYOPS_BACKEND_ATTENTION", raising=False)
    return torch.device("cuda", 0)


def test_cuda_backend_registered_with_its_policy():
    assert "cuda" in _backend._IMPLS["attention"]
    assert _backend.policy("attention") == (
        "H200 2026-11-30: the CUDA kernel is unmeasured; Triton stays the default until "
        "bench/RESULTS.md shows the CUDA kernel faster")


@pytest.mark.parametrize("D", [64, 128])
def test_auto_resolves_to_triton_on_sm90(fake_sm90, monkeypatch, D):
    """On an sm_90 device with the kernel built, auto still picks Triton, and the reason is the
    policy: without it the fixed order would pick the (runnable) cuda backend."""
    dev = fake_sm90
    assert _backend.available("attention", "cuda", dev, precision="int8", D=D)[0]
    assert _backend.resolve("attention", dev, precision="int8", D=D) == "triton"
    assert _backend.resolve("attention", dev) == "triton"
    assert _backend.resolve("attention", dev, "cuda", precision="int8", D=D) == "cuda"
    monkeypatch.setenv("PYOPS_BACKEND_ATTENTION", "cuda")  # an explicit request via the env
    assert _backend.resolve("attention", dev, precision="int8", D=D) == "cuda"
    monkeypatch.delenv("PYOPS_BACKEND_ATTENTION")
    policies = dict(_backend._POLICY)
    policies.pop("attention")
    monkeypatch.setattr(_backend, "_POLICY", policies)
    assert _backend.resolve("attention", dev, precision="int8", D=D) == "cuda"


def test_auto_resolves_to_triton_under_compile(fake_sm90):
    dev = fake_sm90
    codes = {b: float(i) for i, b in enumerate(_backend.BACKENDS)}

    def f(x):
        return x + codes[_backend.resolve("attention", dev, precision="int8", D=128)]

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(1))
    assert got.item() == codes["triton"]


@pytest.mark.parametrize("what,kw,state,match", [
    ("fp8", dict(precision="fp8", D=128), None, r"precision 'int8' only, got 'fp8'"),
    ("int8_fp16pv", dict(precision="int8_fp16pv", D=64), None, r"precision 'int8' only"),
    ("bf16", dict(precision="bf16", D=64), None, r"precision 'int8' only"),
    ("head_dim 96", dict(precision="int8", D=96), None, r"head_dim 64 and 128, got 96"),
    ("head_dim 256", dict(precision="int8", D=256), None, r"head_dim 64 and 128, got 256"),
    ("sm_100", dict(precision="int8", D=128), dict(cap=(10, 0), archs=("90a", "100a")),
     r"needs compute capability 9.0, device is sm_100"),
    ("sm_89", dict(precision="int8", D=128), dict(cap=(8, 9), archs=("89", "90a")),
     r"needs compute capability 9.0, device is sm_89"),
    ("built for plain sm_90", dict(precision="int8", D=128), dict(cap=(9, 0), archs=("90",)),
     r"not sm_90a"),
    ("built for sm_100a only", dict(precision="int8", D=128), dict(cap=(9, 0), archs=("100a",)),
     r"built for sm_100a, device is sm_90"),
    ("no binding", dict(precision="int8", D=128), dict(cap=(9, 0), archs=("90a",), ops=()),
     r"no _attention_cuda"),
])
def test_explicit_cuda_refused_with_reason(fake_sm90, monkeypatch, what, kw, state, match):
    if state is not None:
        monkeypatch.setattr(_backend, "_CAPABILITY", {0: state["cap"]})
        monkeypatch.setattr(_backend, "_EXTENSION", dataclasses.replace(
            _backend._EXTENSION, archs=state["archs"],
            cuda_ops=frozenset(state.get("ops", ("attention",)))))
    ok, why = _backend.available("attention", "cuda", fake_sm90, **kw)
    assert not ok and re.search(match, why), why
    with pytest.raises(RuntimeError, match=match):
        _backend.resolve("attention", fake_sm90, "cuda", **kw)
    # auto never lands on it either
    assert _backend.resolve("attention", fake_sm90, **kw) == "triton"


def test_public_function_refuses_cuda_before_any_launch():
    """CPU tensors (any machine): the request fails in resolve, naming the reason."""
    q, k, v = R.make_inputs(1, 2, 1, 8, 8, 64, seed=0)
    with pytest.raises(RuntimeError, match="backend 'cuda' requested for attention cannot run"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(RuntimeError, match="precision 'int8' only"):
        attention(q, k, v, precision="fp8", backend="cuda")
    with pytest.raises(RuntimeError, match="head_dim 64 and 128, got 40"):
        attention(*(t[..., :40] for t in (q, k, v)), backend="cuda")


# ---- the build (nvcc, no GPU) --------------------------------------------------------------------
def _tools():
    from test_build import _cc, _cuda_include, _nvcc  # the build tests' tool lookup
    nvcc = _nvcc()
    return nvcc, _cc(), _cuda_include(nvcc)


def _nvcc_run(args, timeout=600):
    nvcc = _tools()[0]
    if nvcc is None:
        pytest.skip("nvcc not found")
    r = subprocess.run([nvcc, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def _inc():
    return [f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}"]


@pytest.mark.build
def test_sm90a_ptx_has_the_wgmma_design_and_other_archs_the_stub(tmp_path):
    """sm_90a: wgmma s8.s8 -> s32 for QK^T (n128, k32), e4m3 x e4m3 -> f32 for PV with A from
    registers (n128 and n64: D 128 / 64), the fences and async copies of the design. Plain
    sm_90 and sm_100a (no wgmma there): the NaN stub, no wgmma at all."""
    ptx = {}
    for arch in ("90a", "90", "100a"):
        out = tmp_path / f"attn_{arch}.ptx"
        _nvcc_run(["-ptx", "-O2", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                   *_inc(), str(SRC), "-o", str(out)])
        ptx[arch] = out.read_text()
    p = ptx["90a"]
    assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in p
    # PV: the A operand is a register vector {%r..} (4 x b32), B a descriptor
    for n in (64, 128):
        assert re.search(rf"wgmma\.mma_async\.sync\.aligned\.m64n{n}k32\.f32\.e4m3\.e4m3\s*"
                         rf"\{{[^}}]*\}},\s*\{{%r\d+, %r\d+, %r\d+, %r\d+\}}", p), n
    for needle in ("wgmma.fence.sync.aligned", "wgmma.commit_group.sync.aligned",
                   "wgmma.wait_group.sync.aligned", "fence.proxy.async.shared::cta",
                   "cp.async.cg.shared.global", "cvt.rn.satfinite.e4m3x2.f32", "ex2.approx.f32"):
        assert needle in p, needle
    for arch in ("90", "100a"):
        assert "wgmma" not in ptx[arch] and "cp.async" not in ptx[arch], arch


@pytest.mark.build
def test_sm90a_kernel_fits_without_spills(tmp_path):
    """ptxas for sm_90a: every instantiation (D 64/128 x fp16/bf16) without spills or a local
    stack, within the 255 registers that __launch_bounds__(128, 2) allows; two CTAs of shared
    memory fit an SM (228 KB, 227 KB per CTA at most)."""
    log = _nvcc_run(["-c", "-O2", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a",
                     "-Xptxas", "-v", *_inc(), str(SRC), "-o", str(tmp_path / "a.o")])
    entries = re.findall(r"Compiling entry function '(\w*attention_kernel\w*)'", log)
    assert len(entries) == 4, log
    props = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                       r"loads", log)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert len(props) == 4 and len(regs) == 4, log
    assert all(p == ("0", "0", "0") for p in props), log
    assert all(r <= 255 for r in regs), regs
    assert "wgmma" not in log.lower() or "serializ" not in log.lower(), log  # no serialized MMAs
    # Smem<D>::kAlloc (read from the source): 2 CTAs per SM
    text = SRC.read_text()
    assert "kBM = 64" in text and "kBN = 128" in text
    for D in (64, 128):
        alloc = 64 * D + 2 * 128 * D + 2 * D * 128 + 2 * 128 * 4 + 1024
        assert 2 * (alloc + 1024) <= 228 * 1024, (D, alloc)


_C_MAIN = r"""
#include <stdio.h>
#include <stdint.h>
#include "pyops/attention.h"

static unsigned char buf[1 << 16] __attribute__((aligned(64)));

static pyops_attention_params valid(void) {
  pyops_attention_params p = {0};
  p.qc = (const int8_t*)buf; p.kc = (const int8_t*)(buf + 8192); p.vt = buf + 16384;
  p.qs = (const float*)(buf + 32768); p.qb = (const float*)(buf + 33792);
  p.ks = (const float*)(buf + 34816); p.vs = (const float*)(buf + 35840);
  p.out = buf + 40960; p.lse = (float*)(buf + 36864); p.out_dtype = PYOPS_DTYPE_BF16;
  p.B = 1; p.Hq = 2; p.Hk = 1; p.Sq = 10; p.Sk = 20; p.D = 64; p.Sk_pad = 32;
  p.q_stride_b = 1280; p.q_stride_h = 640; p.q_stride_s = 64;
  p.k_stride_b = 1280; p.k_stride_h = 1280; p.k_stride_s = 64;
  p.v_stride_b = 2048; p.v_stride_h = 2048; p.v_stride_d = 32;
  p.o_stride_b = 1280; p.o_stride_h = 640; p.o_stride_s = 64; p.o_stride_d = 1;
  return p;
}

static void launch(const char* name, pyops_attention_params p) {
  printf("launch %s %d\n", name, (int)pyops_attention(&p, 0));
}

int main(void) {
  pyops_attention_params p;
  int n = 0;
  /* valid params reach the device query only where there is no device (host pointers) */
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) launch("valid", valid());
  printf("launch null %d\n", (int)pyops_attention(NULL, 0));
  p = valid(); p.D = 96; launch("d96", p);
  p = valid(); p.D = 256; launch("d256", p);
  p = valid(); p.Hk = 3; launch("hq_not_multiple", p);
  p = valid(); p.Sk = 0; launch("no_keys", p);
  p = valid(); p.B = 0; launch("b0", p);
  p = valid(); p.Sk_pad = 20; launch("sk_pad_short", p);
  p = valid(); p.out_dtype = PYOPS_DTYPE_F32; launch("out_f32", p);
  p = valid(); p.qc = (const int8_t*)(buf + 8); launch("qc_8", p);
  p = valid(); p.kc = (const int8_t*)(buf + 8200); launch("kc_8", p);
  p = valid(); p.vt = buf + 16392; launch("vt_8", p);
  p = valid(); p.q_stride_s = 72; launch("q_stride_72", p);
  p = valid(); p.k_stride_h = 1288; launch("k_stride_1288", p);
  p = valid(); p.v_stride_d = 40; launch("v_stride_40", p);
  p = valid(); p.o_stride_s = -64; launch("o_stride_negative", p);
  p = valid(); p.qs = (const float*)(buf + 32770); launch("qs_2", p);
  p = valid(); p.lse = (float*)(buf + 36865); launch("lse_1", p);
  p = valid(); p.out = buf + 40961; launch("out_1", p);
  p = valid(); p.ks = NULL; launch("ks_null", p);
  p = valid(); p.Hq = 1 << 30; p.Hk = 1; p.Sq = 192; launch("grid", p);
  p = valid(); p.Sq = 0; launch("sq0", p);
  return 0;
}
"""


@pytest.mark.build
def test_c_entry_refuses_bad_arguments(tmp_path):
    """Host-only (no GPU needed): csrc/attention.cu compiled with nvcc and called from C. Every
    bad argument is cudaErrorInvalidValue before any device query or launch; Sq == 0 with
    valid arguments is a no-op (cudaSuccess); valid arguments on a machine without a device get
    past every check (the device query fails)."""
    nvcc, cc, cuda_inc = _tools()
    if nvcc is None or cc is None or cuda_inc is None:
        pytest.skip("nvcc, a C compiler or the CUDA headers not found")
    (tmp_path / "main.c").write_text(_C_MAIN)
    exe = tmp_path / "attn_main"
    for cmd in ([nvcc, "-c", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", *_inc(),
                 str(SRC), "-o", str(tmp_path / "attn.o")],
                [cc, "-std=c99", "-c", *_inc(), "-isystem", str(cuda_inc),
                 str(tmp_path / "main.c"), "-o", str(tmp_path / "main.o")],
                [nvcc, str(tmp_path / "attn.o"), str(tmp_path / "main.o"), "-o", str(exe)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = {name: int(v) for name, v in re.findall(r"launch (\w+) (-?\d+)", r.stdout)}
    invalid = 1  # cudaErrorInvalidValue
    if "valid" in out:
        assert out["valid"] not in (0, invalid), r.stdout
    assert out["sq0"] == 0, r.stdout
    bad = [n for n in out if n not in ("valid", "sq0")]
    assert len(bad) == 20
    for name in bad:
        assert out[name] == invalid, (name, r.stdout)


# ---- the index maps of the design (PTX ISA register-fragment layouts) ---------------------------
def _perm_key():
    """perm_key as written in csrc/attention.cu (its return expression, evaluated in Python)."""
    m = re.search(r"constexpr int perm_key\(int n\) \{\s*return ([^;]+);", SRC.read_text())
    assert m, "perm_key not found in csrc/attention.cu"
    expr = m.group(1)
    return lambda n: eval(expr, {}, {"n": n})  # noqa: S307 (our own source, integer ops only)


def test_perm_key_turns_accumulator_columns_into_a_fragment_bytes():
    """wgmma m64nN accumulator (PTX ISA, the m64nNk* D-fragment figure): lane (g, t) of a warp
    holds row g + 8r, column 8c + 2t + e in register 4c + 2r + e. The 8-bit A fragment of a k32
    step: register r + 2h, byte b holds row g + 8r, k = 4t + b + 16h. The kernel packs, for k
    step ks, register r + 2h from accumulator chunks c = 4ks + 2h (bytes 0, 1) and c + 1 (bytes
    2, 3), element e = b % 2, of row r. With K row n holding key perm_key(n), every byte must be
    exactly the key the A fragment expects, for every lane, and perm_key a permutation of each
    16-key group."""
    perm = _perm_key()
    for q in range(8):
        assert sorted(perm(16 * q + i) for i in range(16)) == list(range(16 * q, 16 * q + 16))
    for t in range(4):
        for ks in range(128 // 32):
            for h in range(2):
                for r in range(2):
                    for b in range(4):
                        c = 4 * ks + 2 * h + b // 2     # accumulator chunk (8 columns)
                        col = 8 * c + 2 * t + (b % 2)   # its column held by lane t
                        want = 32 * ks + 4 * t + b + 16 * h  # the A fragment's k (key)
                        assert perm(col) == want, (t, ks, h, r, b, perm(col), want)


# ---- shared-memory layout, descriptors and fragments, emulated (PTX ISA; no GPU) -----------------
# The real helpers of csrc/attention.cu (perm_key, swizzle<W>, make_desc<W>, desc_step, Smem<D>;
# __host__ __device__) run on the host in a program that includes the source; Python then plays
# the hardware: it decodes each descriptor by the PTX ISA's field table and reads the operand the
# way wgmma does, and it maps registers by the PTX ISA's fragment figures. Only the index
# arithmetic of the cp.async loops and of the P packing is restated here (attention.cu's
# load_kv_block, Q load and "P = e4m3(p * 448)" loop), as the perm_key test above restates it.
_LAYOUT_MAIN = r"""
#include "attention.cu"
#include <cstdio>
using namespace pyops;

static void desc_list(uint64_t d, int n) {
  std::printf("[");
  for (int k = 0; k < n; ++k)
    std::printf("%s\"%llu\"", k ? ", " : "", (unsigned long long)desc_step(d, k));
  std::printf("]");
}

template <int D>
static void tile(uint32_t base) {  // the descriptors attention_kernel builds for this base
  using S = Smem<D>;
  std::printf("{\"D\": %d, \"base\": %u, \"kQ\": %d, \"kK\": %d, \"kV\": %d, \"kAlloc\": %d, "
              "\"q\": ", D, base, S::kQ, S::kK, S::kV, S::kAlloc);
  desc_list(make_desc<D>(base + S::kQ), D / 32);
  for (int st = 0; st < 2; ++st) {
    std::printf(", \"k%d\": ", st);
    desc_list(make_desc<D>(base + S::kK + st * (kBN * D)), D / 32);
    std::printf(", \"v%d\": ", st);
    desc_list(make_desc<128>(base + S::kV + st * (D * kBN)), kBN / 32);
  }
  std::printf("}");
}

int main() {
  std::printf("{\"perm\": [");
  for (int n = 0; n < kBN; ++n) std::printf("%s%d", n ? ", " : "", perm_key(n));
  std::printf("], \"swz64\": [");
  for (uint32_t i = 0; i < 128 * 64; i += 16) std::printf("%s%u", i ? ", " : "", swizzle<64>(i));
  std::printf("], \"swz128\": [");
  for (uint32_t i = 0; i < 128 * 128; i += 16)
    std::printf("%s%u", i ? ", " : "", swizzle<128>(i));
  /* a low base and one near the top of the 227 KiB a CTA may have (the 14-bit address field) */
  std::printf("], \"tiles\": [");
  tile<64>(1024u); std::printf(", "); tile<128>(1024u); std::printf(", ");
  tile<64>((232448u - Smem<64>::kAlloc) & ~1023u); std::printf(", ");
  tile<128>((232448u - Smem<128>::kAlloc) & ~1023u);
  std::printf("]}\n");
  return 0;
}
"""


@pytest.fixture(scope="module")
def layout_facts(tmp_path_factory):
    """The JSON the host program above prints (built with nvcc once per module)."""
    nvcc = _tools()[0]
    if nvcc is None:
        pytest.skip("nvcc not found")
    d = tmp_path_factory.mktemp("attn_layout")
    (d / "main.cu").write_text(_LAYOUT_MAIN)
    exe = d / "layout"
    _nvcc_run(["-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", *_inc(),
               str(d / "main.cu"), "-o", str(exe)])
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


_SWIZZLE_BYTES = {1: 128, 2: 64, 3: 32}  # PTX ISA matrix descriptor, bits 62-63 (sm_90)


def _decode_desc(d: int) -> dict:
    """PTX ISA "Matrix Descriptor Format" (wgmma): bits 0-13 start address >> 4, 16-29 leading
    dimension byte offset >> 4, 32-45 stride dimension byte offset >> 4, 49-51 base offset,
    62-63 swizzle mode (0 none, 1 128B, 2 64B, 3 32B); every other bit 0."""
    f14 = lambda s: (d >> s) & 0x3FFF  # noqa: E731
    fields = (0x3FFF | 0x3FFF << 16 | 0x3FFF << 32 | 7 << 49 | 3 << 62)
    assert d & ~fields == 0, hex(d)
    return dict(start=f14(0) << 4, lbo=f14(16) << 4, sbo=f14(32) << 4, base_off=(d >> 49) & 7,
                mode=(d >> 62) & 3)


def _wgmma_read(mem: torch.Tensor, desc: int, rows: int) -> torch.Tensor:
    """The operand one k32 (32-byte) step of wgmma reads through a K-major, swizzled descriptor:
    (rows, 32) bytes. Canonical K-major layout of the PTX ISA (8-row core-matrix groups SBO
    apart, rows of the swizzle width W inside a group, K contiguous), then the swizzle on the
    shared-memory address bits: the 16-byte chunk bits [4, 4 + log2(W/16)) XOR bits [7, ...)
    (CUTLASS Swizzle<3,4,3> / <2,4,3> / <1,4,3> for 128B / 64B / 32B). Base offset 0 is right
    only when the pattern starts at its repeat boundary: (start >> 7) & 7 == 0."""
    f = _decode_desc(desc)
    W = _SWIZZLE_BYTES[f["mode"]]
    assert f["base_off"] == 0 and (f["start"] >> 7) & 7 == 0, f
    i = torch.arange(rows)[:, None]
    j = torch.arange(32)[None, :]
    a = f["start"] + (i // 8) * f["sbo"] + (i % 8) * W + j
    a = a ^ (((a >> 7) & (W // 16 - 1)) << 4)
    return mem[a]


def _store_tiles(facts, T, Q, stage_data):
    """Shared memory after the cp.async copies of attention_kernel's Q load and load_kv_block
    (destination = tile base + swizzle<W>(row * W + chunk * 16); K row n holds key perm_key(n);
    V^T row d holds keys in natural order). -1000 marks bytes no copy wrote."""
    D, base, perm = T["D"], T["base"], facts["perm"]
    swz = {W: torch.tensor(facts[f"swz{W}"]) for W in (64, 128)}
    mem = torch.full((232448,), -1000, dtype=torch.int64)
    b16 = torch.arange(16)

    def put(off, W, rows, src):  # src (rows, W) logical bytes
        r = torch.arange(rows)[:, None, None]
        ch = torch.arange(W // 16)[None, :, None]
        dst = off + swz[W][(r * W + ch * 16) // 16] + b16
        mem[dst.flatten()] = src.reshape(rows, W // 16, 16).flatten()

    put(base + T["kQ"], D, 64, Q)
    for st, (Ks, Vs) in enumerate(stage_data):
        put(base + T["kK"] + st * 128 * D, D, 128, Ks[perm])
        put(base + T["kV"] + st * D * 128, 128, D, Vs.T.contiguous())
    return mem


@pytest.mark.build
def test_descriptors_and_swizzle_give_wgmma_the_intended_operands(layout_facts):
    """Item by item of the wgmma operands, as the hardware reads them through attention.cu's own
    descriptors (make_desc / desc_step) from the bytes its cp.async loops wrote with its own
    swizzle<W>: for D 64 (64B swizzle Q/K) and 128 (128B), both stages, every k32 step:
    Q step k = Q[:, 32k:32k+32], K step k = K[perm_key rows][:, 32k:...], V^T step k =
    V[32k:32k+32].T. Catches a wrong swizzle mode value or bit position, SBO, LBO use, start
    address field, k-step advance, tile offset or a tile base off the 1024-byte pattern."""
    g = torch.Generator().manual_seed(12)
    for T in layout_facts["tiles"]:
        D = T["D"]
        assert T["base"] % 1024 == 0 and T["base"] + T["kAlloc"] - 1024 <= 232448
        rnd = lambda *s: torch.randint(-127, 128, s, generator=g)  # noqa: E731
        Q = rnd(64, D)
        stages = [(rnd(128, D), rnd(128, D)) for _ in range(2)]
        mem = _store_tiles(layout_facts, T, Q, stages)
        perm = layout_facts["perm"]
        for k, d in enumerate(T["q"]):
            assert torch.equal(_wgmma_read(mem, int(d), 64), Q[:, 32 * k:32 * k + 32]), (D, k)
        for st, (Ks, Vs) in enumerate(stages):
            for k, d in enumerate(T[f"k{st}"]):
                assert torch.equal(_wgmma_read(mem, int(d), 128),
                                   Ks[perm][:, 32 * k:32 * k + 32]), (D, st, k)
            for k, d in enumerate(T[f"v{st}"]):
                assert torch.equal(_wgmma_read(mem, int(d), D),
                                   Vs[32 * k:32 * k + 32].T), (D, st, k)


def _acc_frag(M: torch.Tensor, w: int, g: int, t: int) -> list:
    """Registers of lane 4g + t of warp w for a 64 x N wgmma accumulator (PTX ISA m64nNk*
    D-fragment figure; CUTLASS CLayout_64xN): register 4c + 2r + e = (16w + g + 8r, 8c + 2t + e)."""
    N = M.shape[1]
    return [M[16 * w + g + 8 * ((v >> 1) & 1), 8 * (v >> 2) + 2 * t + (v & 1)].item()
            for v in range(N // 2)]


@pytest.mark.build
def test_qk_scores_to_pv_product_through_the_fragments(layout_facts):
    """One key block end to end on the layouts: S = Q K^T from the emulated operands; each lane's
    accumulator registers; the key index the kernel gives register 4c + 2r + e (perm_key(8c + 2t
    + e), used for ks, the tail and the causal mask) must be the key whose score it holds; P packed
    as the kernel packs it is read back through the 8-bit A-fragment layout (PTX ISA m64nNk32 A
    figure; CUTLASS ALayout_64x32: register r + 2h, byte b = (16w + g + 8r, 4t + b + 16h)) and
    multiplied with the emulated V^T operand: the product must be P V in natural key order."""
    g_ = torch.Generator().manual_seed(7)
    perm = layout_facts["perm"]
    for T in layout_facts["tiles"][:2]:
        D = T["D"]
        Q = torch.randint(-127, 128, (64, D), generator=g_)
        K = torch.randint(-127, 128, (128, D), generator=g_)
        V = torch.randint(-127, 128, (128, D), generator=g_)
        mem = _store_tiles(layout_facts, T, Q, [(K, V), (K, V)])
        S = sum(_wgmma_read(mem, int(T["q"][k]), 64) @ _wgmma_read(mem, int(T["k0"][k]), 128).T
                for k in range(D // 32))
        Pl = torch.randint(0, 256, (64, 128), generator=g_)  # P codes per (row, natural key)
        A = [torch.zeros(64, 32, dtype=torch.int64) for _ in range(4)]  # A operand per k step
        for w in range(4):
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                s = _acc_frag(S, w, g, t)
                f = [None] * 64
                for c in range(16):
                    for e in range(2):
                        kj = perm[8 * c + 2 * t + e]  # attention_kernel: kj = perm_key(...)
                        for r in range(2):
                            row = 16 * w + g + 8 * r
                            assert s[4 * c + 2 * r + e] == int(Q[row] @ K[kj]), (D, w, lane, c)
                            f[4 * c + 2 * r + e] = Pl[row, kj].item()
                for ks in range(4):  # the kernel's packing: pa[4ks + r + 2hh]
                    for hh in range(2):
                        for r in range(2):
                            c = 4 * ks + 2 * hh
                            by = [f[4 * c + 2 * r], f[4 * c + 2 * r + 1],
                                  f[4 * (c + 1) + 2 * r], f[4 * (c + 1) + 2 * r + 1]]
                            for b in range(4):  # register r + 2hh of this k step, byte b
                                A[ks][16 * w + g + 8 * r, 4 * t + b + 16 * hh] = by[b]
        O = sum(A[ks] @ _wgmma_read(mem, int(T["v0"][ks]), D).T for ks in range(4))
        assert torch.equal(O, Pl @ V), D

# ---- GPU ---------------------------------------------------------------------------------------
def _need_kernel():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    ok, why = _backend.available("attention", "cuda", torch.device("cuda"), precision="int8",
                                 D=128)
    if not ok:
        if tuple(torch.cuda.get_device_capability()) == (9, 0):
            pytest.fail(f"the CUDA attention kernel is unavailable on an sm_90 GPU: {why}")
        pytest.skip(why)


def _rel_l1(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().sum() / b.abs().sum()).item()


def _row_rel_l1(a, b):
    """max over query rows of the row's relative L1 (a single wrong row cannot hide)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().sum(-1) / b.abs().sum(-1).clamp_min(1e-30)).max().item()


def _both_kernels(q, k, v, causal, scale=None):
    """The Triton kernel and the CUDA kernel on the same pre-pass buffers: (out, lse) each; the
    CUDA outputs start poisoned with NaN (every element must be written)."""
    from pyops.triton_kernels import attention as tk
    from pyops.triton_kernels import attention_quant as tq
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    sc = D ** -0.5 if scale is None else scale
    bf = tq.quantize_qkv(q, k, v, "int8", sc)
    out_t = torch.empty_like(q)
    lse_t = torch.empty((B, Hq, Sq), device=q.device)
    tk.attention_fwd(bf["qc"], bf["kc"], bf["vt"].transpose(-1, -2)[:, :, :Sk], bf["qs"],
                     bf["ks"], bf["vs"], bf["qb"], out_t, lse_t, "int8", causal, sc, Hq)
    out_c = torch.full_like(q, float("nan"))
    lse_c = torch.full((B, Hq, Sq), float("nan"), device=q.device)
    torch.ops.pyops._attention_cuda(bf["qc"], bf["qs"], bf["qb"], bf["kc"], bf["ks"], bf["vt"],
                                    bf["vs"], out_c, lse_c, bool(causal))
    return (out_t, lse_t), (out_c, lse_c)


# (B, Hq, Hk, Sq, Sk, D, causal): odd lengths, Sq = 1, GQA / MQA, causal with Sq < Sk and
# Sq > Sk, one key, a partial last key block, several CTAs and key blocks
SHAPES = [
    (1, 2, 2, 1, 1, 64, False),
    (1, 2, 1, 1, 300, 128, False),
    (1, 4, 2, 77, 77, 64, False),
    (1, 4, 2, 77, 77, 128, True),
    (2, 8, 2, 77, 333, 128, True),
    (1, 3, 1, 300, 77, 64, True),
    (1, 6, 3, 129, 4097, 64, False),
    (1, 2, 1, 4097, 4097, 128, False),
    (1, 2, 2, 4097, 4097, 128, True),
    (2, 4, 4, 1000, 1024, 128, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "outlier"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_cuda_matches_triton_on_same_buffers(shape, kind):
    """Same codes, same recipe: the two kernels differ only in fp32 summation order and rare P
    codes on an e4m3 rounding boundary."""
    _need_kernel()
    B, Hq, Hk, Sq, Sk, D, causal = shape
    dtype = torch.bfloat16 if (Sq + Sk) % 2 else torch.float16
    q, k, v = R.make_inputs(B, Hq, Hk, Sq, Sk, D, kind, dtype=dtype, seed=Sq * 7 + Sk,
                            device="cuda")
    (ot, lt), (oc, lc) = _both_kernels(q, k, v, causal)
    assert torch.isfinite(oc.float()).all() and torch.isfinite(lc).all()
    assert _rel_l1(oc, ot) < 2e-3, _rel_l1(oc, ot)
    assert _row_rel_l1(oc, ot) < 2e-2, _row_rel_l1(oc, ot)
    torch.testing.assert_close(lc, lt, rtol=1e-5, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kind", ["random", "outlier"])
def test_gpu_cuda_matches_simulated_reference(kind, D, causal):
    """The whole op (pre-pass + CUDA kernel) against the simulated recipe (fp32 arithmetic of
    the same quantization) and against fp64 attention (the accuracy bounds of
    tests/test_attention.py)."""
    _need_kernel()
    q, k, v = R.make_inputs(1, 4, 2, 333, 517, D, kind, dtype=torch.float16, seed=D + causal,
                            device="cuda")
    out, lse = attention(q, k, v, precision="int8", causal=causal, return_lse=True,
                         backend="cuda")
    so, sl = R.simulated_attention(q, k, v, "int8", causal=causal, block_n=128)
    assert _rel_l1(out, so) < 1e-2
    assert (lse.double() - sl.double()).abs().max().item() < 0.05
    ref, _ = R.attention(q, k, v, causal=causal, dtype=torch.float64)
    e = R.error_stats(out, ref)
    cmin, lmax = {"random": (0.9992, 0.040), "outlier": (0.999, 0.035)}[kind]
    assert e["cos"] >= cmin and e["rel_l1"] <= lmax, e


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gpu_cuda_layouts_and_strided_inputs(layout):
    """bshd output (a transposed out view: non-unit head/seq strides) and packed-qkv views."""
    _need_kernel()
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 211, 3, 4, 128, generator=g).to(torch.bfloat16).cuda()
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # bshd views
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    oc = attention(q, k, v, layout=layout, backend="cuda")
    ot = attention(q, k, v, layout=layout, backend="triton")
    assert oc.shape == q.shape and oc.is_contiguous()
    assert _rel_l1(oc, ot) < 2e-3


@pytest.mark.gpu
def test_gpu_cuda_nan_query_row_stays_in_its_row():
    _need_kernel()
    q, k, v = R.make_inputs(1, 4, 2, 200, 240, 128, "outlier", dtype=torch.float16, seed=21,
                            device="cuda")
    h, r = 1, 70
    qb = q.clone()
    qb[0, h, r, 5] = float("nan")
    qc = q.clone()
    qc[0, h, r] = q[0, h, r - 1]
    for causal in (False, True):
        o, lse = attention(qb, k, v, causal=causal, return_lse=True, backend="cuda")
        oc, lc = attention(qc, k, v, causal=causal, return_lse=True, backend="cuda")
        want = torch.zeros_like(o, dtype=torch.bool)
        want[0, h, r] = True
        assert torch.equal(~torch.isfinite(o), want), (~torch.isfinite(o)).nonzero()
        assert not torch.isfinite(lse[0, h, r])
        keep = ~want[..., 0]
        assert torch.equal(o[keep], oc[keep]) and torch.equal(lse[keep], lc[keep])


@pytest.mark.gpu
def test_gpu_cuda_nan_key_row_reaches_the_rows_attending_to_it():
    _need_kernel()
    q, k, v = R.make_inputs(1, 4, 2, 200, 240, 64, dtype=torch.float16, seed=22, device="cuda")
    j = 150
    kb = k.clone()
    kb[0, 0, j, 30] = float("nan")
    for causal in (False, True):
        o = attention(q, kb, v, causal=causal, backend="cuda")
        rows = torch.zeros(o.shape[:3], dtype=torch.bool, device="cuda")
        rows[0, :2, j if causal else 0:] = True  # heads 0, 1 share kv head 0
        assert torch.equal(~torch.isfinite(o).all(-1), rows), causal
        assert (~torch.isfinite(o[rows])).all()


@pytest.mark.gpu
def test_gpu_cuda_long_sequence_70k():
    _need_kernel()
    q, k, v = R.make_inputs(1, 2, 2, 70001, 70001, 128, seed=4, device="cuda")
    (ot, _), (oc, lc) = _both_kernels(q, k, v, False)
    assert torch.isfinite(oc.float()).all() and torch.isfinite(lc).all()
    assert _rel_l1(oc, ot) < 2e-3
    rows = torch.tensor([0, 1, 65535, 65536, 70000], device="cuda")
    want = F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float())
    e = R.error_stats(oc[:, :, rows], want.double())
    assert e["cos"] >= 0.9992 and e["rel_l1"] <= 0.040, e


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["keys", "queries"])
def test_gpu_cuda_int64_offsets(side):
    """More than 2^31 elements on the K/V side, then on the Q/output side."""
    _need_kernel()
    H, S, D = 136, 131072, 128  # 136 * 131072 * 128 > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", generator=g, dtype=torch.bfloat16)
    big = lambda: torch.randn(1, H, S, D, **kw)  # noqa: E731
    small = lambda: torch.randn(1, H, 64, D, **kw)  # noqa: E731
    if side == "keys":
        q, k, v = small(), big(), big()
        rows = torch.arange(64, device="cuda")
    else:
        q, k, v = big(), small(), small()
        rows = torch.tensor([0, S // 2, S - 1], device="cuda")
    out = attention(q, k, v, backend="cuda")
    heads = torch.tensor([0, H - 1], device="cuda")
    qs = q[:, heads][:, :, rows].float()
    want = F.scaled_dot_product_attention(qs, k[:, heads].float(), v[:, heads].float())
    e = R.error_stats(out[:, heads][:, :, rows], want.double())
    assert e["cos"] >= 0.9992 and e["rel_l1"] <= 0.040, e


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    _need_kernel()
    mk = lambda s: R.make_inputs(2, 8, 2, 1000, 1300, 128, seed=s, device="cuda")  # noqa: E731
    q, k, v = mk(1)
    attention(q, k, v, causal=True, backend="cuda")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = attention(q, k, v, causal=True, backend="cuda")
    for s in (2, 3):
        nq, nk, nv = mk(s)
        q.copy_(nq), k.copy_(nk), v.copy_(nv)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, attention(q, k, v, causal=True, backend="cuda"))


@pytest.mark.gpu
def test_gpu_cuda_compile_fullgraph_and_opcheck():
    _need_kernel()
    q, k, v = R.make_inputs(1, 8, 2, 777, 1001, 128, "outlier", seed=1, device="cuda")
    f = torch.compile(lambda a, b, c: attention(a, b, c, causal=True, backend="cuda"),
                      fullgraph=True)
    torch.testing.assert_close(f(q, k, v), attention(q, k, v, causal=True, backend="cuda"),
                               rtol=0, atol=0)
    qs, ks, vs = (t[:, :, :100] for t in (q, k, v))
    torch.library.opcheck(torch.ops.pyops.attention.default,
                          (qs.contiguous(), ks.contiguous(), vs.contiguous(), "bhsd", "int8",
                           True, 0.125, "cuda"))


@pytest.mark.gpu
def test_gpu_cuda_deterministic():
    _need_kernel()
    q, k, v = R.make_inputs(1, 4, 4, 2000, 2000, 64, seed=5, device="cuda")
    a = attention(q, k, v, backend="cuda")
    b = attention(q, k, v, backend="cuda")
    assert torch.equal(a, b)
    assert math.isfinite(a.float().abs().sum().item())

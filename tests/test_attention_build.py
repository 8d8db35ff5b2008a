"""Ahead-of-time compile of the native NVFP4 attention kernel (``tl.dot_scaled`` e2m1 x e2m1,
E4M3 scales per 16) for Blackwell targets, with Triton's bundled ptxas; no GPU needed.

Runs in a subprocess with TRITON_INTERPRET=0 (conftest turns the interpreter on for CPU runs,
and interpreted kernels cannot be compiled). Checks the PTX holds the native block-scaled
FP4 MMA: sm_100 ``tcgen05.mma ... kind::mxf4nvf4.block_scale.block16``, sm_120 ``mma.sync ...
kind::mxf4nvf4.block_scale.scale_vec::4X ... ue4m3``. Compiling proves nothing about numerics;
the GPU test in test_attention.py compares the native path with the simulated reference.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r'''
import json, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as e:
    print(json.dumps({"skip": f"no AOT compile API in this Triton: {e!r}"})); sys.exit(0)
from pyops.triton_kernels import attention as tk
sig = {n: "i32" for n in ["Hq", "GROUP", "Sq", "Sk"]}
sig["c_raw"] = "fp32"
for n in ["q_ptr", "k_ptr", "v_ptr", "qsb_ptr", "ksb_ptr"]:
    sig[n] = "*u8"
for n in ["qs_ptr", "ks_ptr", "vs_ptr", "qb_ptr", "lse_ptr"]:
    sig[n] = "*fp32"
sig["o_ptr"] = "*i16"
for n in ["sqb", "sqh", "sqs", "sqd", "skb", "skh", "sks", "skd", "svb", "svh", "svs", "svd",
          "sob", "soh", "sos", "sod"]:
    sig[n] = "i64"
res = {}
for cap, D in [(int(c), int(d)) for c, d in (a.split(":") for a in sys.argv[1:])]:
    ce = dict(QK=3, PV=3, IS_BF16=True, OUT_KIND=1, CAUSAL=False, HAS_LSE=True, P_SCALE=1.0,
              D=D, BLOCK_M=128, BLOCK_N=64, INTERPRET=False, SOFT=False, NATIVE_FP4=True)
    s = dict(sig, **{k: "constexpr" for k in ce})
    names = tk._attn_fwd_kernel.arg_names
    s = {n: s[n] for n in names}
    try:
        src = ASTSource(fn=tk._attn_fwd_kernel, signature=s, constexprs=ce)
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                           options=dict(num_warps=8 if D == 128 else 4, num_stages=2))
        ptx = k.asm["ptx"]
        res[f"{cap}:{D}"] = {"ok": True, "mxf4nvf4": [t for l in ptx.splitlines()
                                          for t in l.split() if "mxf4nvf4" in t][:1],
                             "cubin": len(k.asm.get("cubin", b""))}
    except Exception as e:
        res[f"{cap}:{D}"] = {"ok": False, "err": f"{type(e).__name__}: {str(e)[:400]}"}
print(json.dumps(res))
'''


def _compile(targets):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _SCRIPT, *targets], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        pytest.skip(f"AOT compile unavailable: rc {r.returncode}: {r.stderr[-400:]}")
    out = json.loads(lines[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    return out


def test_native_nvfp4_kernel_compiles_for_blackwell():
    res = _compile(["100:128", "100:64", "120:128"])
    for key, want in (("100:128", "tcgen05.mma"), ("100:64", "tcgen05.mma"),
                      ("120:128", "mma.sync")):
        r = res[key]
        assert r["ok"], (key, r)
        assert r["mxf4nvf4"] and r["mxf4nvf4"][0].startswith(want), (key, r)
        assert r["cubin"] > 0, (key, r)

"""Ahead-of-time compile of the W4A4 path's Triton epilogue (``triton_kernels/nvfp4_w4a4.py``)
for Blackwell targets (sm_100, sm_120) with Triton's bundled ptxas; no GPU needed, nothing runs.

Runs in a subprocess with TRITON_INTERPRET=0 (conftest turns the interpreter on for CPU runs, and
interpreted kernels cannot be compiled); skipped with the reason if the AOT compile is
unavailable. Compiling proves nothing about numerics (the CPU tests run the kernel in the
interpreter; the GPU tests in test_nvfp4_linear.py run it for real on sm_100+).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.build
ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r'''
import json, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as e:
    print(json.dumps({"skip": f"no AOT compile API in this Triton: {e!r}"})); sys.exit(0)
from pyops.triton_kernels import nvfp4_w4a4 as tk4
res = {}
for cap in (100, 120):
    for out in ("bf16", "fp16"):
        for has_bias in (True, False):
            bf = out == "bf16"  # bf16 tensors go in as int16 bits (_cvt); fp16 out: fp32 acc
            sig = {"acc_ptr": "*i16" if bf else "*fp32", "alpha_ptr": "*fp32",
                   "bias_ptr": "*i16" if bf else "*fp16", "out_ptr": f"*{out}"}
            sig.update({n: "i32" for n in ["M", "N", "s_am", "s_an", "s_om", "s_on"]})
            ce = {"HAS_BIAS": has_bias, "ACC_BF16": bf, "BIAS_BF16": bf,
                  "OUT_KIND": 2 if bf else 1, "SOFT": False, "BLOCK_M": 32, "BLOCK_N": 128}
            sig.update({k: "constexpr" for k in ce})
            key = f"{cap}:{out}:{has_bias}"
            try:
                k = triton.compile(ASTSource(fn=tk4._epilogue_kernel, signature=sig,
                                             constexprs=ce),
                                   target=GPUTarget("cuda", cap, 32), options=dict(num_warps=4))
                res[key] = {"ok": True, "target": f"sm_{cap}" in k.asm["ptx"],
                            "cubin": len(k.asm.get("cubin", b""))}
            except Exception as e:
                res[key] = {"ok": False, "err": f"{type(e).__name__}: {str(e)[:400]}"}
print(json.dumps(res))
'''


def test_w4a4_epilogue_compiles_for_blackwell():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        pytest.skip(f"AOT compile unavailable: rc {r.returncode}: {r.stderr[-400:]}")
    res = json.loads(lines[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    assert len(res) == 8
    for key, v in res.items():
        assert v["ok"] and v["target"] and v["cubin"] > 0, (key, v)

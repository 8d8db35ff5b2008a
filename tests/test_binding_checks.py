"""Every torch binding of pyops._C (csrc/bindings/*.cpp) refuses bad arguments before it launches.

Each binding's bad-argument cases run in a child interpreter (``_util.run_cases_isolated``): a
binding that launched anyway could crash the process (the H200 run of 2026-11-30 lost the rest of
its test run to a crash on bad input, bench/RESULTS.md, section 1, "Run length at
8d8b3ea": a SIGSEGV in ``_quantize_fp8_cuda``), and that must fail one test, not end the run. A case passes when the call raises RuntimeError with
the expected message and leaves every tensor of the setup untouched (nothing ran before the
error). The GPU tests need pyops._C built; on CPU the same cases are dry-run against a stub (every
statement must build its arguments and reach the call), and the child-process helper itself is
tested with children that crash.
"""
from __future__ import annotations

import pytest
import torch

from _util import Case, assert_cases_isolated, run_cases_isolated

GIB = 1 << 30


# ---- the cases, one list per binding ------------------------------------------------------------
FP8_SETUP = """
F = op("_quantize_fp8_cuda")
x = torch.randn(4, 256, device=DEV, dtype=torch.bfloat16)
x32 = torch.randn(4, 256, device=DEV)
q = torch.full((4, 256), 0xA5, dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
s_row = torch.full((4,), -7.0, device=DEV)
s_blk = torch.full((4, 2), -7.0, device=DEV)
fp8 = torch.float8_e4m3fn
"""
FP8_CASES = [
    Case("scale too small (row)", "F(x, q, torch.empty(3, device=DEV), 1)",
         r"scale \(granularity 1, row\) must have shape \[4\], got \[3\]"),
    Case("scale too large (row)", "F(x, q, torch.empty(5, device=DEV), 1)",
         r"scale .*must have shape \[4\], got \[5\]"),
    Case("scale of 4 floats for granularity tensor", "F(x, q, s_row, 0)",
         r"scale \(granularity 0, tensor\) must have shape \[1\]"),
    Case("scale right count, wrong shape (block1x128)",
         "F(x, q, torch.empty(2, 4, device=DEV), 2)", r"must have shape \[4, 2\], got \[2, 4\]"),
    Case("scale of block1x128 for block128x128", "F(x, q, s_blk, 3)",
         r"granularity 3, block128x128\) must have shape \[1, 2\]"),
    Case("scale of row for block1x128", "F(x, q, s_row, 2)", r"must have shape \[4, 2\]"),
    Case("scale float16", "F(x, q, s_row.half(), 1)", r"scale must be Float, got Half"),
    Case("scale non-contiguous", "F(x, q, torch.empty(8, device=DEV)[::2], 1)",
         r"scale must be contiguous"),
    Case("scale on the CPU", "F(x, q, s_row.cpu(), 1)", r"scale must be a CUDA tensor"),
    Case("granularity 4", "F(x, q, s_row, 4)", r"granularity must be 0 \(tensor\)"),
    Case("granularity -1", "F(x, q, s_row, -1)", r"granularity must be"),
    Case("x float64", "F(x.double(), q, s_row, 1)", r"x has dtype Double; supported"),
    Case("x int32", "F(x.int(), q, s_row, 1)", r"x has dtype Int; supported"),
    Case("x 3-D", "F(x.view(2, 2, 256), q, s_row, 1)", r"x must be 2-D"),
    Case("x 1-D", "F(x.view(-1), q, s_row, 1)", r"x must be 2-D"),
    Case("x on the CPU", "F(x.cpu(), q, s_row, 1)", r"x must be a CUDA tensor"),
    Case("q on the CPU", "F(x, q.cpu(), s_row, 1)", r"q must be a CUDA tensor"),
    Case("q uint8", "F(x, q.view(torch.uint8), s_row, 1)", r"q must be Float8_e4m3fn, got Byte"),
    Case("q too narrow", "F(x, torch.empty(4, 255, dtype=fp8, device=DEV), s_row, 1)",
         r"q must have shape \[4, 256\], got \[4, 255\]"),
    Case("q too few rows", "F(x, q[:3], torch.empty(3, device=DEV), 1)",
         r"q must have shape \[4, 256\], got \[3, 256\]"),
    Case("q non-contiguous", "F(x, torch.empty(256, 4, dtype=fp8, device=DEV).t(), s_row, 1)",
         r"q must be contiguous"),
    Case("q overlaps x", "F(x, x.view(-1).view(fp8)[:1024].view(4, 256), s_row, 1)",
         r"q and x overlap"),
    Case("scale overlaps x", "F(x32, q, x32.view(-1)[:4], 1)", r"scale and x overlap"),
    Case("scale overlaps q", "F(x, q, q.view(-1)[:16].view(torch.float32), 1)",
         r"q and scale overlap"),
]

NVFP4_SETUP = """
G = op("_quantize_nvfp4_cuda")
x = torch.randn(4, 40, device=DEV, dtype=torch.bfloat16)
x32 = torch.randn(4, 40, device=DEV)
data = torch.full((4, 24), 0xA5, dtype=torch.uint8, device=DEV)
sc = torch.full((4, 3), 0xA5, dtype=torch.uint8, device=DEV)
scw = torch.zeros((128, 4), dtype=torch.uint8, device=DEV)
g = torch.full((1,), 0.5, device=DEV)
u8 = torch.uint8
"""
NVFP4_CASES = [
    Case("data too narrow", "G(x, torch.empty(4, 23, dtype=u8, device=DEV), sc, g, True, False)",
         r"data must have shape \[4, 24\], got \[4, 23\]"),
    Case("data too few rows", "G(x, data[:3], sc, g, True, False)",
         r"data must have shape \[4, 24\], got \[3, 24\]"),
    Case("data int8", "G(x, data.view(torch.int8), sc, g, True, False)",
         r"data must be Byte, got Char"),
    Case("data non-contiguous", "G(x, torch.empty(24, 4, dtype=u8, device=DEV).t(), sc, g, True, "
         "False)", r"data must be contiguous"),
    Case("data not 4-byte aligned",
         "G(x, torch.empty(97, dtype=u8, device=DEV)[1:].view(4, 24), sc, g, True, False)",
         r"data must be 4-byte aligned"),
    Case("data on the CPU", "G(x, data.cpu(), sc, g, True, False)", r"data must be a CUDA tensor"),
    Case("scales too narrow", "G(x, data, torch.empty(4, 2, dtype=u8, device=DEV), g, True, "
         "False)", r"scales must have shape \[4, 3\], got \[4, 2\]"),
    Case("linear scales with swizzle", "G(x, data, sc, g, True, True)",
         r"scales \(swizzled\) must have shape \[128, 4\], got \[4, 3\]"),
    Case("swizzled scales without swizzle", "G(x, data, scw, g, True, False)",
         r"scales must have shape \[4, 3\], got \[128, 4\]"),
    Case("scales float8", "G(x, data, sc.view(torch.float8_e4m3fn), g, True, False)",
         r"scales must be Byte, got Float8_e4m3fn"),
    Case("scales non-contiguous", "G(x, data, torch.empty(3, 4, dtype=u8, device=DEV).t(), g, "
         "True, False)", r"scales must be contiguous"),
    Case("scales on the CPU", "G(x, data, sc.cpu(), g, True, False)",
         r"scales must be a CUDA tensor"),
    Case("global_scale of two floats", "G(x, data, sc, torch.ones(2, device=DEV), True, False)",
         r"global_scale must hold one float"),
    Case("global_scale float64", "G(x, data, sc, g.double(), False, False)",
         r"global_scale must be Float, got Double"),
    Case("global_scale on the CPU (static)", "G(x, data, sc, g.cpu(), False, False)",
         r"global_scale must be a CUDA tensor"),
    Case("x on the CPU", "G(x.cpu(), data, sc, g, True, False)", r"x must be a CUDA tensor"),
    Case("x float64", "G(x.double(), data, sc, g, True, False)", r"x has dtype Double"),
    Case("x 3-D", "G(x.view(2, 2, 40), data, sc, g, True, False)", r"x must be 2-D"),
    Case("data overlaps x", "G(x, x.view(-1).view(u8)[:96].view(4, 24), sc, g, True, False)",
         r"data and x overlap"),
    Case("scales overlap data", "G(x, data, data.view(-1)[:12].view(4, 3), g, True, False)",
         r"data and scales overlap"),
    Case("global_scale overlaps data",
         "G(x, data, sc, data.view(-1)[:4].view(torch.float32), True, False)",
         r"data and global_scale overlap"),
    Case("global_scale overlaps x", "G(x32, data, sc, x32.view(-1)[:1], True, False)",
         r"global_scale and x overlap"),
]

NMQ_SETUP = """
H = op("_norm_modulate_quant_cuda")
bf = torch.bfloat16
x = torch.randn(6, 64, device=DEV, dtype=bf)
w = torch.randn(64, device=DEV, dtype=bf)
b = torch.randn(64, device=DEV, dtype=bf)
sh = torch.randn(2, 64, device=DEV, dtype=bf)
sc = torch.randn(2, 64, device=DEV, dtype=bf)
w32 = torch.randn(64, device=DEV)
q = torch.full((6, 64), 0xA5, dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
qs = torch.full((6,), -7.0, device=DEV)
y = torch.full((6, 64), -7.0, device=DEV)
fp8 = torch.float8_e4m3fn
def call(**kw):
    a = dict(x=x, weight=w, bias=b, shift=sh, scale=sc, norm=0, eps=1e-6, q=q, q_scale=qs, y=y)
    a.update(kw)
    H(*a.values())
"""
NMQ_CASES = [
    Case("x on the CPU", "call(x=x.cpu())", r"x must be a CUDA tensor"),
    Case("x 3-D", "call(x=x.view(2, 3, 64))", r"x must be a 2-D \(M, D\) view"),
    Case("x float64", "call(x=x.double())", r"x has dtype Double; supported"),
    Case("norm code 2", "call(norm=2)", r"norm code 2 is not 0"),
    Case("norm code -1", "call(norm=-1)", r"norm code -1 is not 0"),
    Case("eps < 0", "call(eps=-1.0)", r"eps must be finite and >= 0"),
    Case("eps NaN", "call(eps=float('nan'))", r"eps must be finite and >= 0"),
    Case("eps inf", "call(eps=float('inf'))", r"eps must be finite and >= 0"),
    Case("weight too short", "call(weight=w[:63])", r"weight must have shape \[64\], got \[63\]"),
    Case("weight 2-D", "call(weight=w.view(1, 64))", r"weight must have shape \[64\]"),
    Case("weight non-contiguous", "call(weight=torch.empty(128, device=DEV, dtype=bf)[::2])",
         r"weight must be contiguous"),
    Case("weight on the CPU", "call(weight=w.cpu())", r"weight must be a CUDA tensor"),
    Case("weight int32", "call(weight=w.int())", r"weight has dtype Int"),
    Case("bias of another dtype", "call(bias=b.float())", r"must share one dtype"),
    Case("shift of the wrong width", "call(shift=torch.randn(2, 63, device=DEV, dtype=bf))",
         r"shift must be \(Bm, 64\)"),
    Case("shift with a stride along D", "call(shift=torch.randn(64, 2, device=DEV, dtype=bf).t())",
         r"shift must be \(Bm, 64\) with unit stride"),
    Case("shift rows do not divide M", "call(shift=torch.randn(4, 64, device=DEV, dtype=bf))",
         r"shift has 4 rows, which do not divide the 6 rows"),
    Case("shift and scale rows differ", "call(scale=torch.randn(3, 64, device=DEV, dtype=bf))",
         r"same number of rows"),
    Case("shift 1-D", "call(shift=w)", r"shift must be \(Bm, 64\)"),
    Case("scale on the CPU", "call(scale=sc.cpu())", r"scale must be a CUDA tensor"),
    Case("q uint8", "call(q=q.view(torch.uint8))", r"q must be Float8_e4m3fn, got Byte"),
    Case("q too narrow", "call(q=torch.empty(6, 63, dtype=fp8, device=DEV))",
         r"q must have shape \[6, 64\], got \[6, 63\]"),
    Case("q non-contiguous", "call(q=torch.empty(64, 6, dtype=fp8, device=DEV).t())",
         r"q must be contiguous"),
    Case("q on the CPU", "call(q=q.cpu())", r"q must be a CUDA tensor"),
    Case("q_scale too short", "call(q_scale=qs[:5])", r"q_scale must have shape \[6\], got \[5\]"),
    Case("q_scale (M, 1)", "call(q_scale=qs.view(6, 1))", r"q_scale must have shape \[6\]"),
    Case("q_scale float16", "call(q_scale=qs.half())", r"q_scale must be Float, got Half"),
    Case("q_scale non-contiguous", "call(q_scale=torch.empty(12, device=DEV)[::2])",
         r"q_scale must be contiguous"),
    Case("y too wide", "call(y=torch.empty(6, 65, device=DEV))",
         r"y must have shape \[6, 64\], got \[6, 65\]"),
    Case("y int32", "call(y=y.int())", r"y has dtype Int"),
    Case("y non-contiguous", "call(y=torch.empty(64, 6, device=DEV).t())",
         r"y must be contiguous"),
    Case("y on the CPU", "call(y=y.cpu())", r"y must be a CUDA tensor"),
    Case("q overlaps x", "call(q=x.view(-1).view(fp8)[:384].view(6, 64))", r"q and x overlap"),
    Case("y is x", "xf = x.float(); call(x=xf, y=xf)", r"y and x overlap"),
    Case("q_scale overlaps y", "call(q_scale=y.view(-1)[:6])", r"q_scale and y overlap"),
    Case("q_scale overlaps weight",
         "call(weight=w32, bias=None, shift=None, scale=None, q_scale=w32[:6])",
         r"q_scale and weight overlap"),
]

GQ_SETUP = """
G = op("_gelu_quant_cuda")
x = torch.randn(6, 64, device=DEV, dtype=torch.bfloat16)
q = torch.full((6, 64), 0xA5, dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
qs = torch.full((6,), -7.0, device=DEV)
y = torch.full((6, 64), -7.0, device=DEV)
fp8 = torch.float8_e4m3fn
def call(**kw):
    a = dict(x=x, approximate=0, q=q, q_scale=qs, y=y)
    a.update(kw)
    G(*a.values())
"""
GQ_CASES = [
    Case("x on the CPU", "call(x=x.cpu())", r"x must be a CUDA tensor"),
    Case("x 3-D", "call(x=x.view(2, 3, 64))", r"x must be a 2-D \(M, K\) view"),
    Case("x 1-D", "call(x=x.view(-1))", r"x must be a 2-D \(M, K\) view"),
    Case("x float64", "call(x=x.double())", r"x has dtype Double; supported"),
    Case("x int32", "call(x=x.int())", r"x has dtype Int; supported"),
    Case("approximate code 2", "call(approximate=2)", r"approximate code 2 is not 0"),
    Case("approximate code -1", "call(approximate=-1)", r"approximate code -1 is not 0"),
    Case("q uint8", "call(q=q.view(torch.uint8))", r"q must be Float8_e4m3fn, got Byte"),
    Case("q too narrow", "call(q=torch.empty(6, 63, dtype=fp8, device=DEV))",
         r"q must have shape \[6, 64\], got \[6, 63\]"),
    Case("q too few rows", "call(q=q[:5])", r"q must have shape \[6, 64\], got \[5, 64\]"),
    Case("q non-contiguous", "call(q=torch.empty(64, 6, dtype=fp8, device=DEV).t())",
         r"q must be contiguous"),
    Case("q on the CPU", "call(q=q.cpu())", r"q must be a CUDA tensor"),
    Case("q_scale too short", "call(q_scale=qs[:5])", r"q_scale must have shape \[6\], got \[5\]"),
    Case("q_scale (M, 1)", "call(q_scale=qs.view(6, 1))", r"q_scale must have shape \[6\]"),
    Case("q_scale float16", "call(q_scale=qs.half())", r"q_scale must be Float, got Half"),
    Case("q_scale non-contiguous", "call(q_scale=torch.empty(12, device=DEV)[::2])",
         r"q_scale must be contiguous"),
    Case("q_scale on the CPU", "call(q_scale=qs.cpu())", r"q_scale must be a CUDA tensor"),
    Case("y too wide", "call(y=torch.empty(6, 65, device=DEV))",
         r"y must have shape \[6, 64\], got \[6, 65\]"),
    Case("y int32", "call(y=y.int())", r"y has dtype Int"),
    Case("y non-contiguous", "call(y=torch.empty(64, 6, device=DEV).t())",
         r"y must be contiguous"),
    Case("y on the CPU", "call(y=y.cpu())", r"y must be a CUDA tensor"),
    Case("q overlaps x", "call(q=x.view(-1).view(fp8)[:384].view(6, 64))", r"q and x overlap"),
    Case("y is x", "xf = x.float(); call(x=xf, y=xf)", r"y and x overlap"),
    Case("q_scale overlaps y", "call(q_scale=y.view(-1)[:6])", r"q_scale and y overlap"),
    Case("q_scale overlaps q", "call(q_scale=q.view(-1)[:24].view(torch.float32))",
         r"q and q_scale overlap"),
]

BS_SETUP = """
B = op("_block_similarity_cuda")
a = torch.randn(2, 8, 16, device=DEV)
ref = torch.randn(2, 8, 16, device=DEV)
st = torch.zeros(2, 4, device=DEV)
me = torch.full((2,), -7.0, device=DEV)
ru = torch.full((2,), -7, dtype=torch.int32, device=DEV)
def call(**kw):
    k = dict(a=a, ref=ref, state=st, metric=me, reuse=ru, threshold=0.1, eps=1e-12, rule=0,
             warmup=1, max_reuse=-1, num_steps=0, last_steps=0, chunks=2, groups=1,
             all_groups=False, write_ref=1)
    k.update(kw)
    B(*k.values())
"""
BS_CASES = [
    Case("a on the CPU", "call(a=a.cpu())", r"a must be a CUDA tensor"),
    Case("a non-contiguous", "call(a=torch.randn(16, 8, 2, device=DEV).permute(2, 1, 0))",
         r"a must be contiguous"),
    Case("a float64", "call(a=a.double(), ref=ref.double())", r"a has dtype Double"),
    Case("a empty", "call(a=torch.empty(0, 8, 16, device=DEV), ref=torch.empty(0, 8, 16, "
         "device=DEV))", r"a is empty"),
    Case("ref of another shape", "call(ref=torch.randn(2, 8, 15, device=DEV))",
         r"ref must match a in shape and dtype"),
    Case("ref of another dtype", "call(ref=ref.half())", r"ref must match a in shape and dtype"),
    Case("ref on the CPU", "call(ref=ref.cpu())", r"ref must be a CUDA tensor"),
    Case("ref non-contiguous", "call(ref=torch.randn(16, 8, 2, device=DEV).permute(2, 1, 0))",
         r"ref must be contiguous"),
    Case("ref is a", "call(ref=a)", r"a and ref overlap"),
    Case("groups 0", "call(groups=0)", r"groups must be in \[1, 2147483647\], got 0"),
    Case("groups 2**31", "call(groups=2**31)", r"groups must be in \[1, 2147483647\]"),
    Case("groups do not divide the batch", "call(groups=3)", r"batch 2 is not divisible by "
         r"groups=3"),
    Case("chunks 0", "call(chunks=0)", r"chunks must be in \[1, 2147483647\], got 0"),
    Case("chunks do not divide the row", "call(chunks=3)",
         r"row length 128 is not divisible by chunks=3"),
    Case("state of 3 cells", "call(state=torch.zeros(3, 4, device=DEV))",
         r"state must have shape \[2, 4\], got \[3, 4\]"),
    Case("state flat", "call(state=torch.zeros(8, device=DEV))",
         r"state must have shape \[2, 4\], got \[8\]"),
    Case("state float64", "call(state=st.double())", r"state must be Float, got Double"),
    Case("state on the CPU", "call(state=st.cpu())", r"state must be a CUDA tensor"),
    Case("metric of 3 cells", "call(metric=torch.empty(3, device=DEV))",
         r"metric must have shape \[2\], got \[3\]"),
    Case("metric int32", "call(metric=ru.clone())", r"metric must be Float, got Int"),
    Case("reuse int64", "call(reuse=ru.long())", r"reuse must be Int, got Long"),
    Case("reuse of 1 cell", "call(reuse=ru[:1])", r"reuse must have shape \[2\], got \[1\]"),
    Case("reuse non-contiguous", "call(reuse=torch.zeros(4, dtype=torch.int32, device=DEV)[::2])",
         r"reuse must be contiguous"),
    Case("rule 2", "call(rule=2)", r"rule must be in \[0, 1\], got 2"),
    Case("write_ref 3", "call(write_ref=3)", r"write_ref must be in \[0, 2\], got 3"),
    Case("write_ref -1", "call(write_ref=-1)", r"write_ref must be in \[0, 2\], got -1"),
    Case("warmup 2**31", "call(warmup=2**31)", r"warmup must be in \[-2147483648, 2147483647\]"),
    Case("max_reuse below int32", "call(max_reuse=-2**31 - 1)", r"max_reuse must be in"),
    Case("num_steps 2**40", "call(num_steps=2**40)", r"num_steps must be in"),
    Case("last_steps 2**31", "call(last_steps=2**31)", r"last_steps must be in"),
    Case("threshold < 0", "call(threshold=-1.0)", r"threshold must be >= 0"),
    Case("threshold NaN", "call(threshold=float('nan'))", r"threshold must be >= 0"),
    Case("eps 0", "call(eps=0.0)", r"eps must be > 0"),
    Case("eps 0 as a float32", "call(eps=1e-50)", r"eps must be > 0 \(as a float32\)"),
    Case("metric overlaps state", "call(metric=st.view(-1)[:2])", r"state and metric overlap"),
    Case("reuse overlaps metric", "call(reuse=me.view(torch.int32))", r"metric and reuse overlap"),
    Case("state overlaps ref", "call(state=ref.view(-1)[:8].view(2, 4))",
         r"ref and state overlap"),
    # limits of the launch (gigabytes on the device: GPU runs with enough free memory only)
    # a chunk of 65535 * 16384 + 1 elements: refused by the old kernel (a grid of at most 65535
    # splits), one streaming pass now (int64 indices)
    Case("a chunk of 65535 * 16384 + 1 elements is accepted",
         "big = torch.zeros(1, 65535 * 16384 + 1, device=DEV, dtype=torch.bfloat16); "
         "call(a=big, ref=torch.zeros_like(big), chunks=1, state=st[:1], metric=me[:1], "
         "reuse=ru[:1])", big=True),
    Case("more than 2**31 - 1 blocks of rows x chunks",
         "big = torch.empty(2**16 + 1, 2**15, device=DEV, dtype=torch.bfloat16); "
         "call(a=big, ref=torch.empty_like(big), chunks=2**15)",
         r"rows\*chunks = 2147516416 exceeds the grid limit", big=True),
    Case("more cells than the int indexing allows",
         "big = torch.empty(1, 2**29, device=DEV, dtype=torch.bfloat16); "
         "call(a=big, ref=torch.empty_like(big), chunks=2**29)",
         r"groups\*chunks = 536870912 cells is too many", big=True),
]

APPLY_SETUP = """
A = op("_cache_apply_cuda")
out = torch.full((4, 8, 16), -7.0, device=DEV)
x = torch.randn(4, 8, 16, device=DEV)
r = torch.randn(4, 8, 16, device=DEV)
ru = torch.ones(2, dtype=torch.int32, device=DEV)
i32 = torch.int32
"""
APPLY_CASES = [
    Case("groups 0 (was a division by zero)", "A(out, x, r, torch.empty(0, dtype=i32, "
         "device=DEV), 0)", r"groups must be in \[1, 2147483647\], got 0"),
    Case("groups -1", "A(out, x, r, ru, -1)", r"groups must be in \[1, 2147483647\], got -1"),
    Case("groups 2**31", "A(out, x, r, ru, 2**31)", r"groups must be in"),
    Case("groups do not divide the batch", "A(out, x, r, torch.ones(3, dtype=i32, device=DEV), 3)",
         r"batch 4 is not divisible by groups=3"),
    Case("reuse of 3 groups for 2", "A(out, x, r, torch.ones(3, dtype=i32, device=DEV), 2)",
         r"reuse must have shape \[2\], got \[3\]"),
    Case("reuse int64", "A(out, x, r, ru.long(), 2)", r"reuse must be Int, got Long"),
    Case("reuse on the CPU", "A(out, x, r, ru.cpu(), 2)", r"reuse must be a CUDA tensor"),
    Case("reuse non-contiguous", "A(out, x, r, torch.ones(4, dtype=i32, device=DEV)[::2], 2)",
         r"reuse must be contiguous"),
    Case("x of another shape", "A(out, torch.randn(4, 8, 15, device=DEV), r, ru, 2)",
         r"x and residual must have out's shape"),
    Case("residual int32", "A(out, x, r.int(), ru, 2)", r"residual has dtype Int"),
    Case("x on the CPU", "A(out, x.cpu(), r, ru, 2)", r"x must be a CUDA tensor"),
    Case("out non-contiguous", "A(torch.randn(16, 8, 4, device=DEV).permute(2, 1, 0), x, r, ru, "
         "2)", r"out must be contiguous"),
    Case("out float64", "A(out.double(), x, r, ru, 2)", r"out has dtype Double"),
    Case("out empty", "A(torch.empty(0, 8, device=DEV), torch.empty(0, 8, device=DEV), "
         "torch.empty(0, 8, device=DEV), ru, 2)", r"out is empty"),
    Case("x is a shifted view of out",
         "buf = torch.randn(5 * 128, device=DEV); A(buf[:512].view(4, 8, 16), "
         "buf[16:528].view(4, 8, 16), r, ru, 2)", r"out and x partially overlap"),
    Case("reuse overlaps out",
         "o = torch.randn(4, 8, 16, device=DEV); A(o, x, r, o.view(-1)[:2].view(i32), 2)",
         r"out and reuse overlap"),
    Case("out is x (accepted: element-wise)",
         "o = torch.randn(4, 8, 16, device=DEV); A(o, o, r, ru, 2)"),
]

STEP_SETUP = """
S = op("_sample_step_cuda")
bf = torch.bfloat16
st = torch.randn(1000, device=DEV)
xo = torch.full((1000,), -7.0, device=DEV, dtype=bf)
c = torch.randn(1000, device=DEV, dtype=bf)
u = torch.randn(1000, device=DEV, dtype=bf)
z = torch.randn(1000, device=DEV, dtype=bf)
def call(**kw):
    k = dict(state=st, x_out=xo, cond=c, uncond=u, noise=z, alpha=0.5, beta=0.25, zeta=0.1,
             guidance=2.0)
    k.update(kw)
    S(*k.values())
"""
STEP_CASES = [
    Case("state on the CPU", "call(state=st.cpu())", r"state must be a CUDA tensor"),
    Case("state non-contiguous", "call(state=torch.randn(2000, device=DEV)[::2])",
         r"state must be contiguous"),
    Case("state int32", "call(state=st.int())", r"state has dtype Int"),
    Case("cond of 999 elements", "call(cond=c[:999])", r"cond has shape \[999\], state has \[1000\]"),
    Case("cond of another shape", "call(cond=c.view(10, 100))",
         r"cond has shape \[10, 100\], state has \[1000\]"),
    Case("cond on the CPU", "call(cond=c.cpu())", r"cond must be a CUDA tensor"),
    Case("cond non-contiguous", "call(cond=torch.randn(2000, device=DEV, dtype=bf)[::2])",
         r"cond must be contiguous"),
    Case("cond float64", "call(cond=c.double())", r"cond has dtype Double"),
    Case("x_out is state", "call(x_out=st)", r"x_out and state overlap"),
    Case("x_out overlaps state",
         "buf = torch.randn(1500, device=DEV); call(state=buf[:1000], x_out=buf[500:])",
         r"x_out and state overlap"),
    Case("x_out int32", "call(x_out=xo.int())", r"x_out has dtype Int"),
    Case("x_out of another shape", "call(x_out=xo.view(10, 100))", r"x_out has shape"),
    Case("uncond of 999 elements", "call(uncond=u[:999])", r"uncond has shape \[999\]"),
    Case("noise on the CPU", "call(noise=z.cpu())", r"noise must be a CUDA tensor"),
    Case("cond is a shifted view of state",
         "buf = torch.randn(1500, device=DEV); call(state=buf[:1000], cond=buf[1:1001])",
         r"cond and state partially overlap"),
    Case("noise is a shifted view of x_out",
         "buf = torch.randn(1500, device=DEV, dtype=bf); call(x_out=buf[:1000], noise=buf[2:1002])",
         r"noise and x_out partially overlap"),
    Case("alpha NaN", "call(alpha=float('nan'))", r"alpha must be finite"),
    Case("guidance inf", "call(guidance=float('inf'))", r"guidance must be finite"),
    Case("beta overflows float32", "call(beta=1e39)", r"beta must be finite \(as a float32\)"),
    Case("cond is state (accepted: element-wise)",
         "s2 = torch.randn(1000, device=DEV); call(state=s2, cond=s2)"),
    Case("empty buffers (accepted: nothing to do)",
         "e = torch.empty(0, device=DEV); S(e, None, e.clone(), None, None, 1.0, 0.0, 0.0, 1.0)"),
]

GRAPH_SETUP = """
C = op("_graph_set_conditional")
flag = torch.zeros(4, dtype=torch.int32, device=DEV)
"""
GRAPH_CASES = [
    # the only tensor on the CPU: the dispatcher finds no CPU kernel and refuses before the binding
    Case("flag on the CPU", "C(flag.cpu(), 0, 1, False)",
         r"must be a CUDA tensor|from the 'CPU' backend"),
    Case("flag int64", "C(flag.long(), 0, 1, False)", r"flag must be Int, got Long"),
    Case("flag non-contiguous", "C(torch.zeros(8, dtype=torch.int32, device=DEV)[::2], 0, 1, "
         "False)", r"flag must be contiguous"),
    Case("index -1", "C(flag, -1, 1, False)", r"flag index -1 out of range for 4 elements"),
    Case("index past the end", "C(flag, 4, 1, False)", r"flag index 4 out of range for 4"),
    Case("empty flag", "C(flag[:0], 0, 1, False)", r"flag index 0 out of range for 0"),
    Case("not capturing a graph", "C(flag, 0, 1, False)",
         r"must be called while the current stream is being captured"),
]

ATTN_SETUP = """
A = op("_attention_cuda")
i8, u8, bf = torch.int8, torch.uint8, torch.bfloat16
qc = torch.zeros(1, 4, 70, 64, dtype=i8, device=DEV)
kc = torch.zeros(1, 2, 77, 64, dtype=i8, device=DEV)
vt = torch.zeros(1, 2, 64, 80, dtype=u8, device=DEV)
qs = torch.ones(1, 4, 70, device=DEV)
qb = torch.zeros(1, 4, 70, device=DEV)
ks = torch.ones(1, 2, 77, device=DEV)
vs = torch.ones(1, 2, 64, device=DEV)
out = torch.full((1, 4, 70, 64), -7.0, dtype=bf, device=DEV)
lse = torch.full((1, 4, 70), -7.0, device=DEV)
buf = torch.zeros(20000, device=DEV)
def call(**kw):
    a = dict(qc=qc, qs=qs, qb=qb, kc=kc, ks=ks, vt=vt, vs=vs, out=out, lse=lse, causal=False)
    a.update(kw)
    A(*a.values())
"""
ATTN_CASES = [
    Case("qc on the CPU", "call(qc=qc.cpu())", r"qc must be a CUDA tensor"),
    Case("qc uint8", "call(qc=qc.view(u8))", r"qc must be Char, got Byte"),
    Case("qc 3-D", "call(qc=qc[0])", r"qc must be 4-D"),
    Case("head_dim 32", "call(qc=torch.zeros(1, 4, 70, 32, dtype=i8, device=DEV))",
         r"supports head_dim 64 and 128, got 32"),
    Case("qc with a stride along D", "call(qc=torch.zeros(1, 4, 70, 128, dtype=i8, "
         "device=DEV)[..., ::2])", r"qc must have unit stride along its last dimension"),
    Case("qc rows 72 bytes apart", "call(qc=torch.zeros(1, 4, 70, 72, dtype=i8, "
         "device=DEV)[..., :64])", r"qc strides 0..2 must be multiples of 16 bytes"),
    Case("qc not 16-byte aligned", "call(qc=torch.zeros(17936, dtype=i8, device=DEV)[8:17928]"
         ".view(1, 4, 70, 64))", r"qc must be 16-byte aligned"),
    Case("grid past INT_MAX", "call(qc=torch.zeros(64, dtype=i8, device=DEV).as_strided("
         "(1, 2**30, 192, 64), (0, 0, 0, 1)))", r"exceeds the grid limit 2147483647"),
    Case("kc int32", "call(kc=kc.int())", r"kc must be Char, got Int"),
    Case("kc of another head_dim", "call(kc=torch.zeros(1, 2, 77, 128, dtype=i8, device=DEV))",
         r"kc must be \(1, Hk, Sk, 64\)"),
    Case("Hq not a multiple of Hk", "call(kc=torch.zeros(1, 3, 77, 64, dtype=i8, device=DEV))",
         r"query heads \(4\) must be a multiple of kv heads \(3\)"),
    Case("no keys", "call(kc=torch.zeros(1, 2, 0, 64, dtype=i8, device=DEV))",
         r"kc holds no keys"),
    Case("kc on the CPU", "call(kc=kc.cpu())", r"kc must be a CUDA tensor"),
    Case("vt float32", "call(vt=vt.float())", r"vt must be Byte or Float8_e4m3fn"),
    Case("vt narrower than Sk rounded to 16",
         "call(vt=torch.zeros(1, 2, 64, 80, dtype=u8, device=DEV)[..., :78])",
         r"vt must be \(1, 2, 64, Sk_pad >= 80\)"),
    Case("vt not transposed", "call(vt=torch.zeros(1, 2, 80, 64, dtype=u8, device=DEV))",
         r"vt must be \(1, 2, 64, Sk_pad >= 80\)"),
    Case("vt not 16-byte aligned", "call(vt=torch.zeros(10256, dtype=u8, device=DEV)[4:10244]"
         ".view(1, 2, 64, 80))", r"vt must be 16-byte aligned"),
    Case("qs too short", "call(qs=qs[..., :69])", r"qs must have shape \[1, 4, 70\], got "
         r"\[1, 4, 69\]"),
    Case("qb float16", "call(qb=qb.half())", r"qb must be Float, got Half"),
    Case("ks non-contiguous", "call(ks=torch.ones(1, 2, 154, device=DEV)[..., ::2])",
         r"ks must be contiguous"),
    Case("vs of the wrong head_dim", "call(vs=torch.ones(1, 2, 128, device=DEV))",
         r"vs must have shape \[1, 2, 64\]"),
    Case("vs on the CPU", "call(vs=vs.cpu())", r"vs must be a CUDA tensor"),
    Case("out float32", "call(out=out.float())", r"out must be BFloat16 or Half, got Float"),
    Case("out of the wrong shape", "call(out=out[:, :, :69])",
         r"out must have shape \[1, 4, 70, 64\]"),
    Case("out on the CPU", "call(out=out.cpu())", r"out must be a CUDA tensor"),
    Case("lse float16", "call(lse=lse.half())", r"lse must be Float, got Half"),
    Case("lse of the wrong shape", "call(lse=lse[:, :2])", r"lse must have shape \[1, 4, 70\]"),
    Case("out overlaps qs", "call(out=buf.view(bf)[:17920].view(1, 4, 70, 64), "
         "qs=buf[:280].view(1, 4, 70))", r"out and qs overlap"),
    Case("lse overlaps out", "call(lse=out.view(-1).view(torch.float32)[:280].view(1, 4, 70))",
         r"out and lse overlap"),
]

WOL_SETUP = """
W = op("_weight_only_linear_cuda")
bf, u8, fp8 = torch.bfloat16, torch.uint8, torch.float8_e4m3fn
x = torch.randn(4, 256, device=DEV, dtype=bf)
w8 = torch.zeros(32, 256, dtype=u8, device=DEV).view(fp8)
s8 = torch.ones(32, device=DEV)
w4 = torch.zeros(32, 128, dtype=u8, device=DEV)
s4 = torch.full((32, 16), 0x38, dtype=u8, device=DEV)
g = torch.ones(1, device=DEV)
out = torch.full((4, 32), -7.0, device=DEV, dtype=bf)
ws = torch.full((2, 4, 32), -7.0, device=DEV)
def call(**kw):  # fp8 by default; nvfp4=True switches the weight
    a = dict(x=x, w=w8, w_scale=s8, global_scale=None, format=0, bias=None, split_k=1, out=out,
             workspace=None)
    if kw.pop("nvfp4", False):
        a.update(w=w4, w_scale=s4, global_scale=g, format=1)
    a.update(kw)
    W(*a.values())
"""
WOL_CASES = [
    Case("x on the CPU", "call(x=x.cpu())", r"x must be a CUDA tensor"),
    Case("x float32", "call(x=x.float())", r"x has dtype Float; supported: bfloat16, float16"),
    Case("x 3-D", "call(x=x.view(2, 2, 256))", r"x must be a 2-D \(M, K\) view"),
    Case("x strided along K", "call(x=torch.randn(4, 512, device=DEV, dtype=bf)[:, ::2])",
         r"x must have unit stride along K"),
    Case("format 2", "call(format=2)", r"format code 2 is not 0 \(fp8\) or 1 \(nvfp4\)"),
    Case("fp8 w of another K", "call(w=torch.zeros(32, 255, dtype=fp8, device=DEV))",
         r"w \(fp8\) must have shape \[32, 256\], got \[32, 255\]"),
    Case("fp8 w float16", "call(w=torch.zeros(32, 256, dtype=torch.half, device=DEV))",
         r"w \(fp8\) must be Byte or Float8_e4m3fn, got Half"),
    Case("fp8 w non-contiguous", "call(w=torch.zeros(256, 32, dtype=u8, device=DEV).t())",
         r"w \(fp8\) must be contiguous"),
    Case("fp8 w_scale too short", "call(w_scale=s8[:31])", r"w_scale must have shape \[32\]"),
    Case("fp8 w_scale float16", "call(w_scale=s8.half())", r"w_scale must be Float, got Half"),
    Case("fp8 with a global scale", "call(global_scale=g)", r"global_scale must be None"),
    Case("nvfp4 without a global scale", "call(nvfp4=True, global_scale=None)",
         r"global_scale is required for format 1"),
    Case("nvfp4 w as float8", "call(nvfp4=True, w=w4.view(fp8))",
         r"w \(nvfp4\) must be Byte, got Float8_e4m3fn"),
    Case("nvfp4 w_scale one block short", "call(nvfp4=True, w_scale=s4[:, :15].contiguous())",
         r"w_scale \(nvfp4\) must have shape \[32, 16\], got \[32, 15\]"),
    Case("nvfp4 global_scale of 2", "call(nvfp4=True, global_scale=torch.ones(2, device=DEV))",
         r"global_scale must hold one float"),
    Case("bias too short", "call(bias=s8[:31])", r"bias must have shape \[32\], got \[31\]"),
    Case("bias int32", "call(bias=s8.int())", r"bias has dtype Int; supported"),
    Case("out float32", "call(out=out.float())", r"out must be BFloat16, got Float"),
    Case("out too few rows", "call(out=out[:3])", r"out must have shape \[4, 32\], got \[3, 32\]"),
    Case("split_k 0", "call(split_k=0)", r"split_k must be in \[1, 4\], got 0"),
    Case("split_k above the chunk count", "call(split_k=5)", r"split_k must be in \[1, 4\]"),
    Case("split_k 2 without workspace", "call(split_k=2)", r"workspace is required"),
    Case("workspace of another shape", "call(split_k=2, workspace=ws[:1])",
         r"workspace must have shape \[2, 4, 32\]"),
    Case("out overlaps x", "call(out=x.view(-1)[:128].view(4, 32))", r"out and x overlap"),
    Case("workspace overlaps out", "buf = torch.zeros(400, device=DEV); call(split_k=2, "
         "workspace=buf[:256].view(2, 4, 32), out=buf[128:192].view(bf).view(4, 32))",
         r"workspace and out overlap"),
    Case("M == 0 (accepted: nothing to do)",
         "call(x=x[:0], out=torch.empty(0, 32, device=DEV, dtype=bf))"),
]

BINDINGS = {
    "_quantize_fp8_cuda": (FP8_SETUP, FP8_CASES),
    "_quantize_nvfp4_cuda": (NVFP4_SETUP, NVFP4_CASES),
    "_norm_modulate_quant_cuda": (NMQ_SETUP, NMQ_CASES),
    "_gelu_quant_cuda": (GQ_SETUP, GQ_CASES),
    "_block_similarity_cuda": (BS_SETUP, BS_CASES),
    "_cache_apply_cuda": (APPLY_SETUP, APPLY_CASES),
    "_sample_step_cuda": (STEP_SETUP, STEP_CASES),
    "_graph_set_conditional": (GRAPH_SETUP, GRAPH_CASES),
    "_attention_cuda": (ATTN_SETUP, ATTN_CASES),
    "_weight_only_linear_cuda": (WOL_SETUP, WOL_CASES),
}

# One case per binding with a buffer on a second GPU (only where there is one).
OTHER_GPU = {
    "_quantize_fp8_cuda": "F(x, q, s_row.to('cuda:1'), 1)",
    "_quantize_nvfp4_cuda": "G(x, data.to('cuda:1'), sc, g, True, False)",
    "_norm_modulate_quant_cuda": "call(q_scale=qs.to('cuda:1'))",
    "_gelu_quant_cuda": "call(q_scale=qs.to('cuda:1'))",
    "_block_similarity_cuda": "call(metric=me.to('cuda:1'))",
    "_cache_apply_cuda": "A(out, x, r.to('cuda:1'), ru, 2)",
    "_sample_step_cuda": "call(noise=z.to('cuda:1'))",
    "_graph_set_conditional": None,  # one tensor only
    "_attention_cuda": "call(ks=ks.to('cuda:1'))",
    "_weight_only_linear_cuda": "call(w_scale=s8.to('cuda:1'))",
}


def _cases_for_this_gpu(name: str) -> list:
    setup, cases = BINDINGS[name]
    free, _ = torch.cuda.mem_get_info()
    cases = [c for c in cases if not c.big or free > 24 * GIB]
    if torch.cuda.device_count() > 1 and OTHER_GPU[name]:
        cases.append(Case("a buffer on another GPU", OTHER_GPU[name], r"is on cuda:1 but the "
                          r"input is on cuda:0"))
    return cases


# ---- GPU: the real bindings -------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(BINDINGS))
def test_binding_rejects_bad_arguments(name):
    from pyops import _backend
    ok, why = _backend.extension_status()
    if not ok:
        pytest.fail(f"pyops._C unavailable on a GPU machine: {why}")
    if not hasattr(torch.ops.pyops, name):
        pytest.fail(f"pyops._C has no {name} (built from older sources?)")
    setup, _ = BINDINGS[name]
    assert_cases_isolated(setup, _cases_for_this_gpu(name), device="cuda")


# ---- CPU: every case is well-formed (dry run against a stub) -----------------------------------
@pytest.mark.parametrize("name", sorted(BINDINGS))
def test_cases_reach_the_call(name):
    setup, cases = BINDINGS[name]
    assert_cases_isolated(setup, cases, device="cpu", dry_run=True, timeout=300)


def test_every_binding_has_cases():
    """Every op the bindings define (m.def in csrc/bindings/*.cpp) has a case list here."""
    import re
    from _util import ROOT
    defined = set()
    for src in (ROOT / "csrc" / "bindings").glob("*.cpp"):
        defined |= set(re.findall(r'm\.def\(\s*"(\w+)\(', src.read_text()))
    defined.discard("_cuda_archs")  # no arguments
    assert defined == set(BINDINGS), f"bindings without bad-argument cases: {defined - set(BINDINGS)}"


# ---- CPU: the child-process helper -------------------------------------------------------------
HELPER_SETUP = """
a = torch.ones(3)
out = torch.zeros(3)
"""


def test_helper_accepts_the_expected_error():
    assert run_cases_isolated(HELPER_SETUP, [
        Case("shape mismatch", "torch.add(a, torch.ones(4), out=out)", r"size of tensor a"),
        Case("fine", "b = a + 1"),
    ], device="cpu") == []


def test_helper_reports_a_segfault_as_a_problem():
    """A child killed by SIGSEGV is one reported problem naming the case, not a crash here."""
    problems = run_cases_isolated(HELPER_SETUP, [
        Case("before", "torch.add(a, torch.ones(4), out=out)", r"size of tensor a"),
        Case("segfault", "import ctypes; ctypes.string_at(0)", r"never"),
        Case("after", "torch.add(a, torch.ones(4), out=out)", r"size of tensor a"),
    ], device="cpu")
    assert len(problems) == 2, problems
    assert problems[0].startswith("[segfault] the child did not come back")
    assert "SIGSEGV" in problems[0]
    assert "Fatal Python error" in problems[0]  # faulthandler's traceback came back
    assert problems[1].startswith("[after] not run")


def test_helper_reports_wrong_or_missing_errors():
    problems = run_cases_isolated(HELPER_SETUP, [
        Case("no error", "b = a + 1", r"anything"),
        Case("wrong message", "torch.add(a, torch.ones(4), out=out)", r"not this message"),
        Case("wrong type", "raise ValueError('size of tensor a')", r"size of tensor a"),
        Case("unexpected error", "raise RuntimeError('boom')"),
        Case("mutates, then raises", "out.add_(1); raise RuntimeError('late check')",
             r"late check"),
    ], device="cpu")
    assert [p.split("]")[0][1:] for p in problems] == [
        "no error", "wrong message", "wrong type", "unexpected error", "mutates, then raises"]
    assert "changed ['out']" in problems[-1]


def test_helper_reports_a_broken_setup_and_a_timeout():
    assert run_cases_isolated("raise SystemExit(3)", [Case("x", "pass")], device="cpu")[0] \
        .startswith("setup did not complete (exit code 3)")
    problems = run_cases_isolated("", [Case("hangs", "import time; time.sleep(60)")],
                                  device="cpu", timeout=20)
    assert len(problems) == 1 and "[hangs] the child did not come back" in problems[0] \
        and "timed out" in problems[0], problems


def test_dry_run_requires_reaching_the_call():
    problems = run_cases_isolated("F = op('_quantize_fp8_cuda')", [
        Case("reaches", "F(torch.ones(2))", r"ignored in a dry run"),
        Case("fails before the call", "F(torch.ones(2).view(3))", r"ignored in a dry run"),
    ], device="cpu", dry_run=True)
    assert len(problems) == 1 and problems[0].startswith("[fails before the call]"), problems

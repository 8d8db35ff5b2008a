"""Layer and single-home rules of the Triton numerics (issue #10, step 6). CPU only, no kernels run.

* ``triton_kernels/`` never imports ``pyops`` (no absolute import of it, no relative import
  above the package): the kernels sit below the op layer.
* ``triton_kernels/_cvt.py`` is the one home of the format constants and codecs: no other kernel
  file writes 2688 / 448 / 6.0 as a number or defines its own E4M3 / E2M1 / bf16 codec; the
  FP8 per-group scale / codes step (``fp8_scale``, ``fp8_codes``) is written there only.
* Because of the first rule the kernels cannot import ``pyops/reference/formats.py``; the two
  sets of constants are tied here instead.
* One attention precision-kind table (``_cvt.ATTENTION_KINDS``) for the pre-pass and the kernel.
"""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from pyops.reference import attention as ref_attn  # noqa: E402
from pyops.reference import formats  # noqa: E402
from pyops.triton_kernels import _cvt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted((ROOT / "triton_kernels").glob("*.py"))
KIDS = [p.name for p in KERNEL_FILES]


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


def _import_violations(tree: ast.AST) -> list[str]:
    """Imports of pyops (absolute, or importlib/__import__ with a constant name) and relative
    imports that climb above the package (level > 1)."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [f"line {node.lineno}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] == "pyops"]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0 and mod.split(".")[0] == "pyops":
                bad.append(f"line {node.lineno}: from {mod} import ...")
            if node.level > 1:
                bad.append(f"line {node.lineno}: from {'.' * node.level}{mod} import ... "
                           f"(above the package)")
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            a0 = node.args[0]
            if (name in ("import_module", "__import__") and isinstance(a0, ast.Constant)
                    and isinstance(a0.value, str)
                    and (a0.value.split(".")[0] == "pyops" or a0.value.startswith(".."))):
                bad.append(f"line {node.lineno}: {name}({a0.value!r})")
    return bad


def _number_literals(tree: ast.AST) -> list[str]:
    """Numeric constants (not strings or docstrings) that are a format constant: 2688 (the
    NVFP4 global divisor) or 448 (E4M3 max) as int or float, 6.0 (E2M1 max) as a float (the
    int 6 is left alone)."""
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            v = node.value
            if v in (2688, 448) or (type(v) is float and v == 6.0):
                hits.append(f"line {node.lineno}: {v!r}")
    return hits


# ---- the layer rule ---------------------------------------------------------------------------
def test_import_checker_catches_the_forms():
    """The checker itself: every form of an upward import is reported, package-local ones not."""
    src = ("import pyops\nimport pyops._backend as b\nfrom pyops import _backend\n"
           "from pyops._backend import native_fp4\nfrom .. import _backend\n"
           "from ..pyops import x\nimport importlib\nimportlib.import_module('pyops._backend')\n"
           "__import__('pyops')\nfrom ._cvt import e4m3_bits\nfrom . import _amax\n"
           "import triton.language as tl\n")
    assert len(_import_violations(ast.parse(src))) == 8


@pytest.mark.parametrize("path", KERNEL_FILES, ids=KIDS)
def test_kernels_never_import_pyops(path):
    bad = _import_violations(_tree(path))
    assert not bad, f"triton_kernels/{path.name} imports up into pyops: {bad}"


# ---- one home for the format constants and codecs ---------------------------------------------
def test_literal_checker_catches_the_forms():
    src = "a = 2688.0\nb = 2688\nc = x / 448.0\nd = min(v, 6.0)\ne = 6\nf = '2688'\n"
    assert len(_number_literals(ast.parse(src))) == 4


@pytest.mark.parametrize("path", [p for p in KERNEL_FILES if p.name != "_cvt.py"],
                         ids=[n for n in KIDS if n != "_cvt.py"])
def test_no_format_literals_outside_cvt(path):
    """2688 (NVFP4 global divisor), 448 (E4M3 max) and 6.0 (E2M1 max) come from _cvt.py."""
    hits = _number_literals(_tree(path))
    assert not hits, (f"triton_kernels/{path.name} writes a format constant as a number (use "
                      f"the _cvt constant): {hits}")


CODEC_WORDS = ("e4m3", "e2m1", "bf16", "e8m0")


@pytest.mark.parametrize("path", [p for p in KERNEL_FILES if p.name != "_cvt.py"],
                         ids=[n for n in KIDS if n != "_cvt.py"])
def test_no_codec_outside_cvt(path):
    """No kernel file defines its own format conversion: a @triton.jit helper named after a
    format that takes one argument (a codec's signature) belongs in _cvt.py."""
    bad = []
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.FunctionDef):
            continue
        jit = any("jit" in ast.unparse(d) for d in node.decorator_list)
        name = node.name.lower()
        if jit and len(node.args.args) <= 2 and any(w in name for w in CODEC_WORDS) and (
                "kernel" not in name):
            bad.append(f"line {node.lineno}: {node.name}")
    assert not bad, f"triton_kernels/{path.name} defines codecs (move them to _cvt.py): {bad}"


def _fp8_step_hits(tree: ast.AST) -> list[str]:
    """The FP8 per-group step written out: a division by E4M3_MAX (``div_rn(amax, E4M3_MAX)``
    or ``/ E4M3_MAX``; with the FLT_MIN clamp around it, the scale step) or the symmetric clamp
    ``maximum(v, -E4M3_MAX)`` (the codes step). E4M3_MAX under any import alias or as
    ``_cvt.E4M3_MAX``."""
    names = {"E4M3_MAX"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names |= {a.asname for a in node.names if a.name == "E4M3_MAX" and a.asname}

    def is_max(n):
        return ((isinstance(n, ast.Name) and n.id in names)
                or (isinstance(n, ast.Attribute) and n.attr == "E4M3_MAX"))

    def fname(f):
        return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")

    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and fname(node.func) == "div_rn" and len(node.args) > 1 \
                and is_max(node.args[1]):
            hits.append(f"line {node.lineno}: div_rn(.., E4M3_MAX)")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and is_max(node.right):
            hits.append(f"line {node.lineno}: / E4M3_MAX")
        elif isinstance(node, ast.Call) and fname(node.func) in ("maximum", "clamp") and any(
                isinstance(a, ast.UnaryOp) and isinstance(a.op, ast.USub) and is_max(a.operand)
                for a in node.args):
            hits.append(f"line {node.lineno}: {fname(node.func)}(.., -E4M3_MAX)")
    return hits


def test_fp8_step_checker_catches_the_forms():
    src = ("s = tl.maximum(tl.math.div_rn(amax, E4M3_MAX), FLT_MIN)\n"
           "s = div_rn(a, _cvt.E4M3_MAX)\nfrom ._cvt import E4M3_MAX as M8\ns = a / M8\n"
           "v = tl.minimum(tl.maximum(v, -E4M3_MAX), E4M3_MAX)\n"
           "s = tl.maximum(tl.math.div_rn(amax, INT8_MAX), FLT_MIN)\n"
           "s = nvfp4_block_scale(b, g)\nv = tl.minimum(s, E4M3_MAX)\n")
    assert len(_fp8_step_hits(ast.parse(src))) == 4


@pytest.mark.parametrize("path", [p for p in KERNEL_FILES if p.name != "_cvt.py"],
                         ids=[n for n in KIDS if n != "_cvt.py"])
def test_fp8_step_only_in_cvt(path):
    """The FP8 E4M3 per-group step (scale = max(amax / 448, FLT_MIN), codes =
    e4m3(clamp(x / scale, +-448))) is written once: ``_cvt.fp8_scale`` / ``fp8_scaled`` /
    ``fp8_codes``. quantize_fp8.py and attention_quant.py each had their own copy."""
    hits = _fp8_step_hits(_tree(path))
    assert not hits, (f"triton_kernels/{path.name} writes the FP8 scale/codes step out (call "
                      f"_cvt.fp8_scale / fp8_codes / fp8_scaled): {hits}")


def test_fp8_step_is_in_cvt():
    """The checker looks at the right thing: _cvt.py itself holds both steps."""
    hits = _fp8_step_hits(_tree(ROOT / "triton_kernels" / "_cvt.py"))
    assert any("div_rn" in h for h in hits) and any("-E4M3_MAX" in h for h in hits), hits


PAIRS = ["E4M3_MAX", "E4M3_MIN_SUBNORMAL", "E4M3_NAN", "E2M1_MAX", "NVFP4_BLOCK",
         "NVFP4_GLOBAL_DIVISOR", "FP8_BLOCK", "INT8_MAX", "FLT_MIN", "FLT_MAX", "LOG2E", "LN2"]


@pytest.mark.parametrize("name", PAIRS)
def test_cvt_constants_equal_the_spec(name):
    """Each _cvt constant (tl.constexpr) equals pyops/reference/formats.py's, bit for bit."""
    k, r = getattr(_cvt, name), getattr(formats, name)
    assert type(k.value) is type(r) and k.value == r, (name, k.value, r)
    assert not isinstance(r, float) or math.copysign(1.0, r) == math.copysign(1.0, k.value)


def test_spec_constants_against_torch():
    """formats.py against torch's own format definitions (independent of both copies)."""
    f8 = torch.float8_e4m3fn
    assert formats.E4M3_MAX == torch.finfo(f8).max
    assert formats.E4M3_MIN_NORMAL == torch.finfo(f8).smallest_normal
    allb = torch.arange(256, dtype=torch.uint8).view(f8).float()
    pos = allb[:128]
    assert pos[1].item() == formats.E4M3_MIN_SUBNORMAL  # byte 0x01
    assert torch.isnan(allb[formats.E4M3_NAN]) and torch.isnan(allb).sum() == 2
    assert pos[torch.isfinite(pos)].max().item() == formats.E4M3_MAX
    assert formats.E2M1_VALUES[-1] == formats.E2M1_MAX
    assert formats.NVFP4_GLOBAL_DIVISOR == formats.E2M1_MAX * formats.E4M3_MAX == 2688.0
    assert formats.FLT_MIN == torch.finfo(torch.float32).tiny
    assert formats.FLT_MAX == torch.finfo(torch.float32).max
    assert formats.LOG2E == math.log2(math.e) and formats.LN2 == math.log(2.0)


def test_references_use_the_spec_constants():
    """The reference modules' old names are the formats.py values (one source of numbers)."""
    from pyops.reference import quantize_fp8 as r8
    from pyops.reference import quantize_nvfp4 as r4
    assert r8.FP8_MAX is formats.E4M3_MAX and r8.BLOCK is formats.FP8_BLOCK
    assert r8.FLT_MIN is formats.FLT_MIN and r8.FLT_MAX is formats.FLT_MAX
    assert r4.GLOBAL_DIV is formats.NVFP4_GLOBAL_DIVISOR and r4.BLOCK is formats.NVFP4_BLOCK
    assert r4.FP4_MAX is formats.E2M1_MAX and r4.E2M1_VALUES is formats.E2M1_VALUES
    assert ref_attn.FP8_MAX is formats.E4M3_MAX and ref_attn.INT8_MAX is formats.INT8_MAX
    for path in sorted((ROOT / "pyops" / "reference").glob("*.py")):
        if path.name == "formats.py":
            continue
        hits = _number_literals(_tree(path))
        assert not hits, f"pyops/reference/{path.name}: {hits} (use pyops.reference.formats)"


# ---- one precision-kind table -----------------------------------------------------------------
def test_attention_kinds_table():
    """One table for the pre-pass and the kernel; its rows are consistent with the kernel's
    fixed rules (V loaded as E4M3 bytes exactly when P is FP8 or NVFP4; P scaled by 448 only
    when P is FP8) and with the reference's precisions."""
    from pyops.triton_kernels import attention as tk
    from pyops.triton_kernels import attention_quant as tq
    K = _cvt.ATTENTION_KINDS
    assert set(K) == set(ref_attn.PRECISIONS)
    codes = {c.value for c in (_cvt.KIND_RAW, _cvt.KIND_FP8, _cvt.KIND_INT8, _cvt.KIND_NVFP4,
                               _cvt.KIND_FP16)}
    assert len(codes) == 5
    fp8, nv, raw = _cvt.KIND_FP8.value, _cvt.KIND_NVFP4.value, _cvt.KIND_RAW.value
    for prec, k in K.items():
        assert {k.qk, k.p, k.v} <= codes, prec
        assert (k.v == fp8) == (k.p in (fp8, nv)), prec
        assert k.p_scale == (formats.E4M3_MAX if k.p == fp8 else 1.0), prec
        assert (k.qk == raw) == (prec == "bf16") == (k.p == raw) == (k.v == raw), prec
        want_qk = {"fp8": "fp8", "int8": "int8", "nvfp4": "nvfp4"}.get(ref_attn.QK_KIND[prec])
        if want_qk:
            assert k.qk == getattr(_cvt, f"KIND_{want_qk.upper()}").value, prec
        want_v = ref_attn.PV_KIND[prec]
        if want_v != "none":
            assert k.v == getattr(_cvt, f"KIND_{want_v.upper()}").value, prec
    for mod in (tk, tq):  # no second table
        for name in ("KINDS", "P_SCALE", "QK_KIND", "PV_KIND"):
            assert not hasattr(mod, name), (mod.__name__, name)


def test_prepass_buffers_follow_the_table():
    from pyops.triton_kernels import attention_quant as tq
    want = {"fp8": (torch.uint8, torch.uint8), "int8": (torch.int8, torch.uint8),
            "int8_fp16pv": (torch.int8, torch.float16), "nvfp4": (torch.float16, torch.uint8)}
    for prec, (qdt, vdt) in want.items():
        b = tq.prepass_buffers(1, 2, 1, 5, 7, 64, prec, "cpu")
        assert b["qc"].dtype == qdt and b["kc"].dtype == qdt and b["vt"].dtype == vdt, prec
    b = tq.prepass_buffers(1, 2, 1, 5, 7, 64, "nvfp4", "cpu", native=True)
    assert b["qc"].shape[-1] == 32 and b["qsb"].shape[-1] == 64 // formats.NVFP4_BLOCK
    with pytest.raises(ValueError):
        tq.prepass_buffers(1, 2, 1, 5, 7, 64, "fp8", "cpu", native=True)
    with pytest.raises(ValueError):
        tq.prepass_buffers(1, 2, 1, 5, 7, 64, "bf16", "cpu")


def test_native_fp4_is_asked_of_the_backend():
    """``native_fp4_supported`` left triton_kernels/attention.py (it imported pyops); the one
    definition is pyops._backend.native_fp4, which the attention op asks directly."""
    from pyops import _backend
    from pyops.triton_kernels import attention as tk
    assert not hasattr(tk, "native_fp4_supported")
    assert _backend.native_fp4("cpu") is False
    src = (ROOT / "pyops" / "ops" / "attention.py").read_text()
    assert "native_fp4_supported" not in src

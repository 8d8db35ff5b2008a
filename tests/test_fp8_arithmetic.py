"""No arithmetic on float8 tensors, anywhere: CUDA has no float8 kernels for it.

The GPU test run on an H200 on 2026-11-30 (not in bench/RESULTS.md) failed an opcheck with
'"mul_cuda" not implemented for Float8_e4m3fn': torch's own test_schema (SchemaCheckMode) compares
every argument of an op with torch.allclose, which multiplies float8 arguments. The CPU has a few
float8 kernels (abs, the product of two float8 tensors) and the GPU none, so such code can pass on
CPU and fail on the GPU. These tests run pyops' CPU paths under ``_util.NoFloat8Arithmetic``, a
dispatch mode that raises as soon as an arithmetic aten op sees a float8 tensor (pyops' custom ops
are entered, so their Python bodies are checked too), and check ``_util.schema_check``, the
byte-wise replacement of test_schema used for ops with float8 arguments.
"""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops import _backend

from _util import (Float8ArithmeticError, NoFloat8Arithmetic, assert_bits_equal,
                   make_input, schema_check)

FP8 = torch.float8_e4m3fn
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Test-only ops in their own namespace: one that mutates an argument its schema calls read-only,
# one that returns a view of its input, one whose body multiplies float8 tensors.
_LIB = torch.library.Library("pyops_tests", "FRAGMENT")  # noqa: TOR901 - test fixture
_LIB.define("mutates_input(Tensor q) -> Tensor")
_LIB.define("returns_alias(Tensor q) -> Tensor")
_LIB.impl("mutates_input", lambda q: q.view(torch.uint8).add_(1).float(),
          "CompositeExplicitAutograd")
_LIB.impl("returns_alias", lambda q: q.view(torch.uint8), "CompositeExplicitAutograd")


@torch.library.custom_op("pyops_tests::fp8_square", mutates_args=())
def _fp8_square(q: torch.Tensor) -> torch.Tensor:
    return (q * q).float()


@_fp8_square.register_fake
def _(q):
    return q.new_empty(q.shape, dtype=torch.float32)


def _fp8(shape=(4, 32)):
    return make_input(shape, torch.float32, device="cpu").to(FP8)


# ---- the guard itself ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["q * q", "q.abs()", "q * 2", "q + q", "torch.equal(q, q)",
                                 "q.float() * q", "torch.ops.pyops_tests.fp8_square(q)"])
def test_guard_flags_float8_arithmetic(bad):
    """Including inside a custom op's body (fp8_square: the CPU would compute q * q without
    complaint, so only the guard entering the op catches it)."""
    q = _fp8()
    guard = NoFloat8Arithmetic()
    with pytest.raises(Float8ArithmeticError), guard:
        eval(bad)
    assert guard.violations, bad


def test_guard_allows_casts_views_and_copies():
    q = _fp8()
    with NoFloat8Arithmetic() as guard:
        q.float() * 2
        q.to(torch.bfloat16)
        q.view(torch.uint8)
        q[1:3].clone().contiguous()
        q.t().reshape(-1)
        torch.empty_like(q).copy_(q)
        torch.cat([q, q])
        assert_bits_equal(q, q.clone())
    assert guard.violations == []


def test_torch_test_schema_does_float8_arithmetic():
    """The GPU failure, reproduced on the CPU: opcheck's test_schema on an op with a float8
    argument runs arithmetic on it (so it fails on CUDA, and on CPU as well)."""
    t = pyops.quantize_fp8(make_input((3, 130), device="cpu"), "row", backend="reference")
    guard = NoFloat8Arithmetic()
    with guard, pytest.raises(Exception):
        torch.library.opcheck(torch.ops.pyops.dequantize_fp8.default,
                              (t.data, t.scale, "row", torch.bfloat16, "reference"),
                              test_utils=("test_schema",))
    assert guard.violations


# ---- schema_check: test_schema without arithmetic ----------------------------------------------
def test_schema_check_catches_a_mutated_input():
    with pytest.raises(AssertionError, match="argument q is not mutable in the schema but was "
                                             "mutated"):
        schema_check(torch.ops.pyops_tests.mutates_input.default, (_fp8(),))


def test_schema_check_catches_an_undeclared_alias():
    with pytest.raises(AssertionError, match="output 0 aliases argument q"):
        schema_check(torch.ops.pyops_tests.returns_alias.default, (_fp8(),))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_schema_check_of_ops_with_float8_arguments(backend):
    """The ops whose CPU opchecks leave test_schema out (float8 arguments) pass schema_check,
    with no float8 arithmetic on the way, and return what the plain call returns."""
    x = make_input((5, 48), torch.bfloat16, "outlier", device="cpu")
    w = make_input((32, 48), torch.float32, device="cpu")
    calls = []
    for gran in ("tensor", "row", "block1x128", "block128x128"):
        q, s = torch.ops.pyops.quantize_fp8(x, gran, "reference")
        calls.append((torch.ops.pyops.dequantize_fp8.default,
                      (q, s, gran, torch.bfloat16, backend)))
    t4 = pyops.quantize_nvfp4(x, backend="reference")
    calls.append((torch.ops.pyops.dequantize_nvfp4.default,
                  (t4.data, t4.scales, t4.global_scale, 48, False, torch.float32, backend)))
    xq = pyops.quantize_fp8(x, "row", backend="reference")
    qw = pyops.quantize_weight(w, "fp8")
    calls.append((torch.ops.pyops.fp8_linear.default,
                  (xq.data, xq.scale.reshape(-1), qw.data, qw.scale.reshape(-1), None,
                   torch.bfloat16, backend)))
    for op, args in calls:
        with NoFloat8Arithmetic() as guard:
            got = schema_check(op, args)
        assert guard.violations == [], (op, guard.violations)
        assert_bits_equal(got, op(*args), str(op))


# ---- pyops' own code paths ----------------------------------------------------------------------
def _exercise(device, backend):
    """Every public path that makes or consumes float8 tensors, on ``device``."""
    def b(op):  # the requested backend where the op has it, else automatic
        return backend if backend is None or _backend.available(op, backend, device)[0] else None

    x = make_input((6, 80), torch.bfloat16, "outlier", device=device)
    w = make_input((48, 80), torch.float32, device=device)
    for gran in ("tensor", "row", "block1x128", "block128x128"):
        t = pyops.quantize_fp8(x, gran, backend=b("quantize_fp8"))
        for dt in DTYPES:
            t.dequantize(dt, backend=b("dequantize_fp8"))
    for swizzle in (False, True):
        for gs in (None, 0.01):
            t4 = pyops.quantize_nvfp4(x, gs, swizzle=swizzle, backend=b("quantize_nvfp4"))
            t4.dequantize(torch.float32, backend=b("dequantize_nvfp4"))
    for fmt in ("fp8", "nvfp4"):
        qw = pyops.quantize_weight(w, fmt)
        bias = torch.randn(48, device=device)
        lb = b("fp8_linear" if fmt == "fp8" else "nvfp4_linear")
        pyops.linear(x, qw, bias, backend=lb)
        if fmt == "fp8":
            pyops.linear(pyops.quantize_fp8(x, "row"), qw, backend=lb)
    xs = make_input((2, 3, 80), torch.bfloat16, device=device)
    sh = torch.randn(2, 80, device=device, dtype=torch.bfloat16)
    sc = torch.randn(2, 80, device=device, dtype=torch.bfloat16)
    pyops.norm_modulate_quant(xs, sh, sc, y_dtype=torch.float32, backend=b("norm_modulate_quant"))
    q = make_input((1, 2, 33, 64), torch.bfloat16, device=device)
    for precision in ("fp8", "nvfp4", "int8"):
        pyops.attention(q, q, q, precision=precision, backend=b("attention"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_float8_arithmetic_on_the_cpu(backend):
    with NoFloat8Arithmetic() as guard:
        _exercise(torch.device("cpu"), backend)
    assert guard.violations == []


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
def test_no_float8_arithmetic_on_the_gpu(backend):
    with NoFloat8Arithmetic() as guard:
        _exercise(torch.device("cuda"), backend)
    assert guard.violations == []

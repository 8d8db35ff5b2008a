"""Shared test helpers: backends to parametrize over, input makers, bit comparisons, bad-argument
cases run in a child interpreter, a float8-arithmetic guard and a byte-wise schema check."""
from __future__ import annotations

import dataclasses as _dc
import json as _json
import os as _os
import re as _re
import signal as _signal
import subprocess as _subprocess
import sys as _sys
from pathlib import Path as _Path
from typing import Optional as _Optional, Sequence as _Sequence

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# "triton" runs the real kernels on a GPU and the interpreter on CPU (conftest sets
# TRITON_INTERPRET=1); "cuda" needs the compiled extension and a GPU.
BACKENDS = [
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def registered_backends(op: str, exclude=("reference",)) -> list:
    """pytest params for the backends ``op`` registers in pyops' backend registry (besides
    ``exclude``), "cuda" marked gpu: a backend registered later is tested without editing the
    test, and none that does not exist is asked for."""
    import pyops  # noqa: F401  (registers every op's backends)
    from pyops import _backend
    have = _backend._IMPLS.get(op, {})
    assert have, f"no backends registered for {op!r}"
    return [pytest.param(b, id=b, marks=[pytest.mark.gpu] if b == "cuda" else [])
            for b in _backend.BACKENDS if b in have and b not in exclude]


def need_backend(op: str, backend: str, device=DEVICE) -> None:
    from pyops import _backend
    ok, why = _backend.available(op, backend, device)
    if not ok:
        if backend == "cuda" and HAS_CUDA:
            pytest.fail(f"CUDA backend unavailable on a GPU machine: {why}")
        pytest.skip(why)


def make_input(shape, dtype=torch.bfloat16, kind="randn", seed=None, device=DEVICE):
    """Fresh random inputs; 'outlier' puts a few channels ~1000x larger (DiT activations)."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if kind == "outlier":
        k = shape[-1]
        idx = torch.randperm(k, generator=g)[: max(1, k // 64)]
        x[..., idx] *= 1000.0
    elif kind == "zeros":
        x.zero_()
    elif kind == "wide":
        x = x * torch.exp2(torch.randint(-20, 20, shape, generator=g).float())
    return x.to(dtype).to(device)


def non_contiguous(x: torch.Tensor, how: str) -> torch.Tensor:
    """Same values as x, different strides."""
    if how == "transposed":
        return x.t().contiguous().t()
    if how == "col_slice":
        pad = torch.zeros(*x.shape[:-1], x.shape[-1] + 7, dtype=x.dtype, device=x.device)
        pad[..., 3:3 + x.shape[-1]] = x
        return pad[..., 3:3 + x.shape[-1]]
    if how == "row_step":
        big = torch.zeros(x.shape[0] * 2, *x.shape[1:], dtype=x.dtype, device=x.device)
        big[::2] = x
        return big[::2]
    raise ValueError(how)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits for exact comparison (NaNs compare by pattern)."""
    t = t.contiguous()
    if t.dtype in (torch.float8_e4m3fn, torch.uint8):
        return t.view(torch.uint8).cpu()
    if t.dtype == torch.float32:
        return t.view(torch.int32).cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).cpu()
    raise TypeError(t.dtype)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    ba, bb = bits(a), bits(b)
    if not torch.equal(ba, bb):
        n = int((ba != bb).sum())
        idx = (ba != bb).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {n} of {ba.numel()} elements differ, first at {idx}")


def capture_graph(fn, *static_inputs):
    """Warm ``fn`` up on a side stream (JIT, cuBLAS handles, allocator), then capture it into a
    CUDA graph reading ``static_inputs``. Returns (graph, static outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*static_inputs)
    return g, out


# ---- bad-argument checks in a child interpreter -------------------------------------------------
# A binding that launches on bad input can crash the process (SIGSEGV, SIGFPE, a sticky CUDA
# fault). Running the cases of one binding in a fresh interpreter turns such a crash into one
# failed test with the case that was running and the faulthandler traceback, instead of the end of
# the test run.
ROOT = _Path(__file__).resolve().parent.parent


@_dc.dataclass(frozen=True)
class Case:
    """One call to check in a child interpreter.

    ``stmt`` runs in the namespace built by the setup code. With ``match`` (a regex searched in
    the message) the statement must raise ``exc`` (or a subclass) and must leave every tensor the
    setup defined bit-identical (an error raised after a launch is not good enough); with
    ``match=None`` it must not raise. ``big``: allocates gigabytes on the device; never part of a
    dry run.
    """
    name: str
    stmt: str
    match: _Optional[str] = None
    exc: str = "RuntimeError"
    big: bool = False


_CHILD = r'''
import faulthandler, json, sys, traceback
faulthandler.enable()
payload = json.loads(sys.stdin.read())
import torch

def _say(kind, obj):
    sys.stdout.write("@@" + kind + " " + json.dumps(obj) + "\n")
    sys.stdout.flush()

def op(name):
    """torch.ops.pyops.<name>, or in a dry run a stub that raises once the arguments are built."""
    if payload["dry_run"]:
        def stub(*args, **kwargs):
            raise RuntimeError("dry-run stub reached: " + name)
        return stub
    import pyops  # noqa: F401  (loads pyops._C, which registers the ops)
    return getattr(torch.ops.pyops, name)

def _bytes(t):
    t = t.detach().reshape(-1).contiguous()
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(
        {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()

ns = {"op": op, "torch": torch, "DEV": payload["device"]}
exec(payload["setup"], ns)
_sync()
snap = {k: (v, v.detach().clone()) for k, v in ns.items()
        if isinstance(v, torch.Tensor) and not k.startswith("_")}
_say("ready", None)
for case in payload["cases"]:
    _say("start", case["name"])
    res = {"name": case["name"], "raised": None, "mro": [], "msg": "", "mutated": [],
           "sync_error": None}
    try:
        exec(case["stmt"], ns)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        res["raised"] = type(e).__name__
        res["mro"] = [c.__name__ for c in type(e).__mro__]
        res["msg"] = str(e)[:4000]
        if not isinstance(e, Exception):
            res["msg"] += "\n" + traceback.format_exc()[-2000:]
    try:
        _sync()
    except BaseException as e:  # noqa: BLE001
        res["sync_error"] = str(e)[:2000]
    if case["match"] is not None and res["sync_error"] is None:
        for k, (t, before) in snap.items():
            if t.shape != before.shape or not torch.equal(_bytes(t), _bytes(before)):
                res["mutated"].append(k)
    _say("case", res)
    if res["sync_error"] is not None:
        break  # the CUDA context is gone: later cases cannot run
_say("done", None)
'''


def _signal_name(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {_signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def run_cases_isolated(setup: str, cases: _Sequence[Case], *, device: str = "cuda",
                       dry_run: bool = False, timeout: float = 600.0) -> list:
    """Run ``setup`` then every case in one child interpreter; return the problems found
    (empty list: every case behaved). The namespace has ``torch``, ``DEV`` (= ``device``) and
    ``op(name)`` (``torch.ops.pyops.<name>``; with ``dry_run`` a stub that raises
    ``RuntimeError("dry-run stub reached")``, so a CPU run checks that every case builds its
    arguments and reaches the call)."""
    cases = [c for c in cases if not (dry_run and c.big)]
    payload = {"setup": setup, "device": device, "dry_run": dry_run,
               "cases": [{"name": c.name, "stmt": c.stmt, "match": c.match} for c in cases]}
    env = dict(_os.environ)
    env["PYTHONFAULTHANDLER"] = "1"
    try:
        p = _subprocess.run([_sys.executable, "-c", _CHILD], input=_json.dumps(payload),
                            capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                            env=env)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except _subprocess.TimeoutExpired as e:
        def _text(s):
            return s.decode(errors="replace") if isinstance(s, bytes) else (s or "")
        out, err, rc = _text(e.stdout), _text(e.stderr), None
    results, started, ready, done = {}, None, False, False
    for line in out.splitlines():
        if not line.startswith("@@"):
            continue
        kind, _, rest = line[2:].partition(" ")
        obj = _json.loads(rest)
        if kind == "ready":
            ready = True
        elif kind == "start":
            started = obj
        elif kind == "case":
            results[obj["name"]] = obj
        elif kind == "done":
            done = True
    how = "timed out" if rc is None else _signal_name(rc)
    tail = f"\n--- child stderr (tail) ---\n{err[-3000:]}" if err.strip() else ""
    problems = []
    if not ready:
        return [f"setup did not complete ({how}){tail}"]
    for c in cases:
        r = results.get(c.name)
        if r is None:
            if c.name == started:
                problems.append(f"[{c.name}] the child did not come back from `{c.stmt}` "
                                f"({how}){tail}")
            else:
                problems.append(f"[{c.name}] not run (an earlier case broke the child)")
            continue
        if r["sync_error"] is not None:
            problems.append(f"[{c.name}] device error after `{c.stmt}`: {r['sync_error']}")
            continue
        if c.match is None and not dry_run:
            if r["raised"] is not None:
                problems.append(f"[{c.name}] `{c.stmt}` should be accepted, raised "
                                f"{r['raised']}: {r['msg']}")
            continue
        expect = "dry-run stub reached" if dry_run else c.match
        if r["raised"] is None:
            problems.append(f"[{c.name}] `{c.stmt}` raised nothing, expected {c.exc} "
                            f"matching {expect!r}")
        elif (not dry_run and c.exc not in r["mro"]) or not _re.search(expect, r["msg"]):
            problems.append(f"[{c.name}] `{c.stmt}` raised {r['raised']}: {r['msg'][:600]!r}; "
                            f"expected {c.exc} matching {expect!r}")
        if r["mutated"]:
            problems.append(f"[{c.name}] `{c.stmt}` changed {r['mutated']} although it raised "
                            f"(something ran before the error)")
    if not done and rc is not None and not any("did not come back" in p for p in problems):
        problems.append(f"the child did not finish ({how}){tail}")
    elif done and rc not in (0, None):
        problems.append(f"the child ended with {how} after the last case{tail}")
    return problems


def assert_cases_isolated(setup: str, cases: _Sequence[Case], **kwargs) -> None:
    problems = run_cases_isolated(setup, cases, **kwargs)
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)


# ---- float8 tensors and arithmetic --------------------------------------------------------------
FLOAT8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2",
                                                  "float8_e4m3fnuz", "float8_e5m2fnuz",
                                                  "float8_e8m0fnu") if hasattr(torch, n))

# aten ops (overload packets, in-place '_' stripped) that compute with their inputs' values.
# CUDA has no float8 kernels for arithmetic ("mul_cuda" not implemented for 'Float8_e4m3fn' in the
# GPU test run on an H200 on 2026-11-30, not in bench/RESULTS.md) and the CPU only a few (torch
# 2.13: abs and the product of two float8 tensors, but not a product with a scalar, add, div or
# torch.equal): code must upcast (``x.float()``) or compare bytes (``x.view(torch.uint8)``).
# Moves, views, casts, copies, fills, indexing and eq/ne (what torch.testing.assert_close uses on
# float8 tensors) are not listed.
FLOAT8_ARITHMETIC_OPS = frozenset("""
    abs absolute neg negative sign sgn add sub rsub subtract mul multiply div divide true_divide
    floor_divide fmod remainder reciprocal pow float_power sqrt rsqrt exp exp2 expm1 log log2 log10
    log1p sin cos tan tanh sigmoid erf relu gelu silu hardtanh softmax _softmax log_softmax
    _log_softmax addcmul addcdiv lerp mm bmm matmul addmm addmv addbmm baddbmm dot mv linear
    _scaled_dot_product_attention_math sum nansum mean nanmean prod cumsum cumprod amax amin max min
    aminmax maximum minimum fmax fmin clamp clamp_min clamp_max clip round floor ceil trunc frac
    nan_to_num isclose allclose equal lt le gt ge logical_and logical_or sort argsort topk
    argmax argmin std var var_mean std_mean norm linalg_vector_norm dist cdist
""".split())


class Float8ArithmeticError(AssertionError):
    pass


def _op_base_name(func) -> str:
    name = func._schema.name.split("::", 1)[-1]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


class NoFloat8Arithmetic:
    """Context manager: raise (and record in ``.violations``) when an aten op of
    ``FLOAT8_ARITHMETIC_OPS`` gets a float8 tensor. Ops defined with ``torch.library.custom_op``
    (pyops' own) are entered, so their Python implementations are checked too."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        outer = self
        self.violations = []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = _op_base_name(func)
                fp8 = [t.dtype for t in tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor) and t.dtype in FLOAT8_DTYPES]
                if fp8 and func.namespace == "aten" and name in FLOAT8_ARITHMETIC_OPS:
                    msg = (f"aten.{func._schema.name.split('::')[-1]} ({func.__name__}) on "
                           f"{[str(d) for d in fp8]}: no CUDA kernel for float8 arithmetic; "
                           f"upcast first")
                    outer.violations.append(msg)
                    raise Float8ArithmeticError(msg)
                if func.namespace not in ("aten", "prim", "prims"):
                    impl = _custom_op_python_impl(func)
                    if impl is not None:
                        with self:
                            return impl(*args, **kwargs)
                return func(*args, **kwargs)

        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _custom_op_python_impl(func):
    """The Python function behind a torch.library.custom_op, or None (C++ ops, other torch)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - depends on the torch version
        return None
    opdef = OPDEFS.get(func._schema.name)
    return getattr(opdef, "_init_fn", None) if opdef is not None else None


def _tensor_leaves(v) -> list:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensor_leaves(x)]
    return []


def _raw(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().reshape(-1).contiguous()
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(
        {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _span_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False

    def span(t):
        lo = t.data_ptr()
        return lo, lo + t.element_size() * (1 + sum((n - 1) * s for n, s in
                                                    zip(t.shape, t.stride())))
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def schema_check(op, args: tuple, kwargs: _Optional[dict] = None):
    """``torch.library.opcheck``'s ``test_schema``, comparing tensors by their bytes.

    torch's SchemaCheckMode compares every argument before/after with ``torch.allclose``, which
    does arithmetic on float8 arguments: unsupported on CUDA (the H200 run failed with
    '"mul_cuda" not implemented for Float8_e4m3fn') and on the CPU. This restates the same
    checks without arithmetic: an argument the schema does not mark as written (``Tensor(a!)``)
    keeps its bytes, sizes and strides; no output is an input object or overlaps an input unless
    the schema declares that alias. Returns the op's result.
    """
    kwargs = kwargs or {}
    schema = op._schema
    bound = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args):
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
    before = {n: [(t.shape, t.stride(), _raw(t).clone()) for t in _tensor_leaves(v)]
              for n, v in bound.items()}
    out = op(*args, **kwargs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    ret_sets = [set(r.alias_info.before_set) if r.alias_info is not None else set()
                for r in schema.returns]
    for a in schema.arguments:
        if a.name not in bound:
            continue
        writes = a.alias_info is not None and a.alias_info.is_write
        arg_set = set(a.alias_info.before_set) if a.alias_info is not None else set()
        for t, (shape, stride, raw) in zip(_tensor_leaves(bound[a.name]), before[a.name]):
            if not writes:
                assert t.shape == shape and t.stride() == stride and torch.equal(_raw(t), raw), (
                    f"{schema.name}: argument {a.name} is not mutable in the schema but was "
                    f"mutated")
            for j, o in enumerate(_tensor_leaves(list(outs))):
                declared = j < len(ret_sets) and bool(ret_sets[j] & arg_set)
                if o is t:
                    assert declared and writes, (f"{schema.name}: output {j} is the input "
                                                 f"{a.name} itself")
                if _span_overlap(o, t):
                    assert declared, (f"{schema.name}: output {j} aliases argument {a.name}, "
                                      f"which the schema does not declare")
    return out

"""The backend registry: who runs each op, and the one place that decides it.

Backend names say who runs the code:

* ``cuda``: pyops' own CUDA kernel (``csrc/``, through the extension ``pyops._C``);
* ``triton``: pyops' own Triton kernel (``pyops/triton_kernels/``);
* ``torch``: a vendor kernel reached through torch (cuBLAS/cuBLASLt via ``torch._scaled_mm`` or
  ``torch.mm``);
* ``reference``: the PyTorch reference in ``pyops/reference/`` (the spec; any device).

Every op module (``pyops/ops/<op>.py``) registers one implementation per backend it has, an
optional availability rule (shape-aware where a vendor kernel has shape limits) and an optional
per-shape policy (the measured preference; ``register_policy``). ``resolve`` is the only function
that picks a backend: the public function calls it once on the host, before the op runs, from
static facts only (device, what is installed, the request, shapes), never from data, so the
choice is fixed under torch.compile and CUDA-graph capture; the op receives the resolved name.

Override order: the ``backend=`` argument, then ``PYOPS_BACKEND_<OP>`` (e.g.
``PYOPS_BACKEND_QUANTIZE_FP8=triton``), then ``PYOPS_BACKEND``, then automatic. A backend that was
asked for explicitly but cannot run raises; automatic selection never picks one that cannot run.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import warnings
from typing import Callable, Optional

import torch

BACKENDS = ("cuda", "triton", "torch", "reference")
_IMPLS: dict[str, dict[str, Callable]] = {}
_MIN_CAPABILITY: dict[tuple[str, str], tuple[int, int]] = {}
_AVAILABILITY: dict[tuple[str, str], Callable] = {}
_POLICY: dict[str, tuple[Callable, str]] = {}
_ALIASES: dict[tuple[str, str], tuple[str, str]] = {}
_WARNED_ALIASES: set = set()
# NVFP4 block-scaled MMA: sm_100/103 (tcgen05 kind::mxf4nvf4) and sm_120/121 (mma.sync mxf4nvf4)
NATIVE_FP4_CAPABILITIES = ((10, 0), (10, 3), (12, 0), (12, 1))


def register(op: str, backend: str, fn: Callable,
             min_capability: Optional[tuple[int, int]] = None, *,
             available: Optional[Callable] = None,
             on_tensor_device: Optional[bool] = None) -> None:
    """Register ``fn`` as ``op``'s ``backend`` implementation.

    min_capability: the lowest CUDA compute capability it runs on (e.g. (8, 9) for kernels with
    fp8 operands). available: for a ``torch`` backend (a vendor kernel, not pyops' own), the
    rule ``available(device, **shape) -> (ok, why)`` that replaces the generic check; ``shape``
    holds the keywords the op's public function passes to ``resolve`` (empty for
    ``pyops.info()``, which then asks about the backend in general). on_tensor_device: run ``fn``
    with the first tensor argument's device current (what Triton launches need); default: for
    ``triton`` backends only (a ``torch`` backend that launches Triton kernels too passes True)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    if on_tensor_device if on_tensor_device is not None else backend == "triton":
        fn = _on_tensor_device(fn)
    _IMPLS.setdefault(op, {})[backend] = fn
    if backend == "cuda":
        _note_cuda_op(op)
    if min_capability is not None:
        _MIN_CAPABILITY[(op, backend)] = tuple(min_capability)
    if available is not None:
        _AVAILABILITY[(op, backend)] = available


def register_policy(op: str, rule: Callable, source: str) -> None:
    """The op's automatic preference on a CUDA device: ``rule(capability, **shape) -> backend``
    (``capability`` = (major, minor)). ``source`` names the measurement behind it (or says that
    none exists); ``pyops.info()`` prints it. ``resolve`` takes the preference when it can run,
    else the first backend that can in the order cuda, triton, torch, reference."""
    _POLICY[op] = (rule, source)


def register_alias(op: str, old: str, new: str, why: str) -> None:
    """A deprecated backend name: a request for ``old`` (argument or environment) runs ``new``,
    with a one-time FutureWarning that says ``why``. For a backend that was renamed when the
    names became honest (fp8_linear's ``torch._scaled_mm`` path was called ``cuda``)."""
    _ALIASES[(op, old)] = (new, why)


def _caller_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first frame outside the pyops package (the
    user's call), counted from the function that calls ``warnings.warn``."""
    import sys
    pkg = os.path.dirname(os.path.abspath(__file__))
    f, level = sys._getframe(2), 2
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg + os.sep):
        f, level = f.f_back, level + 1
    return level


def policy(op: str) -> Optional[str]:
    """The source line of ``op``'s registered policy, or None (fixed order)."""
    p = _POLICY.get(op)
    return p[1] if p else None


def _on_tensor_device(fn: Callable) -> Callable:
    """Triton launches on the *current* device; make that the first tensor argument's device (the
    C++ bindings do the same with a CUDAGuard)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.device.type == "cuda" and a.device.index != torch.cuda.current_device():
                    with torch.cuda.device(a.device):
                        return fn(*args, **kwargs)
                break
        return fn(*args, **kwargs)
    return run


def impl(op: str, backend: str) -> Callable:
    return _IMPLS[op][backend]


def ops() -> list[str]:
    return sorted(_IMPLS)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---- static facts: computed once, outside torch.compile tracing ------------------------------
# Backend resolution runs inside traced user code (``torch.compile(fullgraph=True)``), so it must
# be plain Python over values that already exist: no import, no custom-op call, no CUDA query, no
# ``functools.lru_cache`` (Dynamo traces through the cache into the wrapped function). The
# extension facts are loaded at ``import pyops``; a device's compute capability is read once per
# device index, eagerly when possible and through ``assume_constant_result`` when the first query
# happens under tracing.


@dataclasses.dataclass(frozen=True)
class ExtensionFacts:
    """What the compiled extension ``pyops._C`` provides (fixed for the life of the process)."""
    loaded: bool
    why: str
    archs: tuple[str, ...] = ()          # e.g. ("90a",): what pyops._C was compiled for
    cuda_ops: frozenset = frozenset()    # op names with a "_<op>_cuda" binding


_EXTENSION: Optional[ExtensionFacts] = None
_CAPABILITY: dict[int, tuple[int, int]] = {}


def _load_extension() -> ExtensionFacts:
    if os.environ.get("PYOPS_DISABLE_CUDA_EXT", "0") not in ("", "0"):
        return ExtensionFacts(False, "disabled by PYOPS_DISABLE_CUDA_EXT")
    try:
        importlib.import_module("pyops._C")
    except ImportError as e:
        return ExtensionFacts(False, f"pyops._C not built ({e})")
    except Exception as e:  # a broken build must not break `import pyops`
        return ExtensionFacts(False, f"pyops._C failed to load ({type(e).__name__}: {e})")
    try:
        archs = tuple(torch.ops.pyops._cuda_archs())
    except Exception:
        archs = ()
    cuda_ops = frozenset(op for op in _IMPLS if hasattr(torch.ops.pyops, f"_{op}_cuda"))
    return ExtensionFacts(True, "pyops._C loaded", archs, cuda_ops)


def extension_facts() -> ExtensionFacts:
    """The extension facts, loaded on the first call (``import pyops`` makes that call)."""
    global _EXTENSION
    if _EXTENSION is None:
        _EXTENSION = _load_extension()
    return _EXTENSION


def _note_cuda_op(op: str) -> None:
    """An op registered a "cuda" backend after the facts were loaded: record its binding."""
    global _EXTENSION
    if _EXTENSION is not None and _EXTENSION.loaded and op not in _EXTENSION.cuda_ops \
            and hasattr(torch.ops.pyops, f"_{op}_cuda"):
        _EXTENSION = dataclasses.replace(_EXTENSION, cuda_ops=_EXTENSION.cuda_ops | {op})


def extension_status() -> tuple[bool, str]:
    """(loaded, why) for the compiled CUDA extension ``pyops._C``."""
    f = extension_facts()
    return f.loaded, f.why


def extension_archs() -> list[str]:
    return list(extension_facts().archs)


@torch.compiler.assume_constant_result
def _query_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def device_capability(device) -> tuple[int, int]:
    """``(major, minor)`` of a CUDA device, read once per device index and cached; safe to call
    while torch.compile traces (the first query then becomes a trace-time constant)."""
    device = torch.device(device)
    index = device.index
    if index is None:
        index = torch.cuda.current_device()
    cap = _CAPABILITY.get(index)
    if cap is None:
        cap = _query_capability(index)
        if not torch.compiler.is_compiling():
            _CAPABILITY[index] = cap
    return cap


def native_fp4_status(device) -> tuple[bool, str]:
    """(ok, why): whether ``device`` has native NVFP4 MMA (E2M1 x E2M1 with E4M3 scales per 16:
    sm_100/103/120/121) and this torch the ``float4_e2m1fn_x2`` dtype. Never in the Triton
    interpreter; ``PYOPS_NVFP4_NATIVE=0`` turns every native NVFP4 path off. The one definition
    every NVFP4 path (attention, linear, weight packing) asks."""
    device = torch.device(device)
    if os.environ.get("PYOPS_NVFP4_NATIVE", "1") == "0":
        return False, "native NVFP4 turned off by PYOPS_NVFP4_NATIVE=0"
    if device.type != "cuda":
        return False, f"native NVFP4 needs a CUDA device (sm_100/103/120/121), got {device.type}"
    if triton_interpret():
        return False, "the Triton interpreter has no native NVFP4"
    if not hasattr(torch, "float4_e2m1fn_x2"):
        return False, f"torch {torch.__version__} has no float4_e2m1fn_x2"
    cap = device_capability(device)
    if tuple(cap) not in NATIVE_FP4_CAPABILITIES:
        return False, f"sm_{cap[0]}{cap[1]} has no native NVFP4 MMA (needs sm_100/103/120/121)"
    return True, f"sm_{cap[0]}{cap[1]}"


def native_fp4(device) -> bool:
    """``native_fp4_status(device)[0]``."""
    return native_fp4_status(device)[0]


def capabilities(device) -> dict:
    """The capability table of ``device`` (what ``pyops.info()`` prints): compute capability,
    native NVFP4, FP8 MMA (sm_89+), and whether ``pyops._C`` has code for it. Built from cached
    facts only."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"device": str(device), "native_fp4": False, "fp8_mma": False,
                "cuda_extension": False}
    cap = device_capability(device)
    return {"device": str(device), "capability": f"sm_{cap[0]}{cap[1]}",
            "native_fp4": native_fp4(device), "fp8_mma": tuple(cap) >= (8, 9),
            "cuda_extension": _built_for(extension_facts(), cap)}


_TRITON: Optional[tuple[bool, str]] = None


def triton_status() -> tuple[bool, str]:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON = (True, f"triton {triton.__version__}")
        except Exception as e:  # pragma: no cover - depends on the machine
            _TRITON = (False, f"triton not importable ({type(e).__name__}: {e})")
    return _TRITON


def _cuda_backend_ok(op: str, device: torch.device) -> tuple[bool, str]:
    facts = extension_facts()
    if not facts.loaded:
        return False, facts.why
    if device.type != "cuda":
        return False, "the CUDA backend needs CUDA tensors"
    if op not in facts.cuda_ops:
        return False, f"pyops._C has no _{op}_cuda (built from older sources?)"
    major, minor = device_capability(device)
    if not facts.archs:
        return False, "pyops._C does not report the archs it was built for"
    if not _built_for(facts, (major, minor)):
        return False, f"pyops._C built for sm_{','.join(facts.archs)}, device is sm_{major}{minor}"
    need = _MIN_CAPABILITY.get((op, "cuda"))
    if need is not None and (major, minor) < need:
        return False, (f"the CUDA {op} kernel needs sm_{need[0]}{need[1]}+, device is "
                       f"sm_{major}{minor}")
    return True, facts.why


def _built_for(facts: ExtensionFacts, cap: tuple[int, int]) -> bool:
    """Whether ``pyops._C`` holds code for compute capability ``cap``: sm_XYa code runs only on
    exactly sm_XY (and the build lists each arch it targets)."""
    return facts.loaded and f"{cap[0]}{cap[1]}" in {a.rstrip("af") for a in facts.archs}


def triton_runs(device: torch.device) -> tuple[bool, str]:
    """(ok, why): whether pyops' Triton kernels run on ``device`` at all (a CUDA device, or the
    CPU under TRITON_INTERPRET=1); per-op capability limits come on top (``available``)."""
    ok, why = triton_status()
    if not ok:
        return ok, why
    if device.type == "cpu" and triton_interpret():
        return True, why + " (interpreter)"
    if device.type != "cuda":
        return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)"
    return True, why


def available(op: str, backend: str, device: torch.device, **shape) -> tuple[bool, str]:
    """(ok, why): whether ``op``'s ``backend`` can run on ``device`` (and, for a backend with a
    shape-aware rule, on ``shape``)."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if op not in _IMPLS or backend not in _IMPLS[op]:
        has = ", ".join(repr(b) for b in BACKENDS if b in _IMPLS.get(op, {}))
        return False, f"no {backend} implementation of {op} (it has: {has})"
    if backend == "reference":
        return True, "PyTorch reference"
    if (op, backend) in _AVAILABILITY:
        return _AVAILABILITY[(op, backend)](device, **shape)
    if backend == "triton":
        ok, why = triton_runs(device)
        if not ok or device.type != "cuda":
            return ok, why
        need = _MIN_CAPABILITY.get((op, "triton"))
        if need is not None:
            cap = device_capability(device)
            if cap < need:
                return False, (f"the Triton {op} kernel needs sm_{need[0]}{need[1]}+ (fp8 "
                               f"operands), device is sm_{cap[0]}{cap[1]}")
        return True, why
    if backend == "torch":
        return (device.type == "cuda",
                "vendor kernel through torch" if device.type == "cuda" else
                "the torch backend needs CUDA tensors")
    return _cuda_backend_ok(op, device)


def requested(op: str, backend: Optional[str]) -> Optional[str]:
    if backend in (None, "", "auto"):
        backend = (os.environ.get(f"PYOPS_BACKEND_{op.upper()}")
                   or os.environ.get("PYOPS_BACKEND") or None)
        if backend in ("", "auto"):
            backend = None
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"pyops: unknown backend {backend!r} for {op}; expected one of "
                         f"{BACKENDS} or 'auto'")
    alias = _ALIASES.get((op, backend)) if backend is not None else None
    if alias is not None:
        if (op, backend) not in _WARNED_ALIASES and not torch.compiler.is_compiling():
            _WARNED_ALIASES.add((op, backend))
            warnings.warn(f"pyops: backend {backend!r} for {op} is deprecated and now named "
                          f"{alias[0]!r} ({alias[1]}); running {alias[0]!r}", FutureWarning,
                          stacklevel=_caller_stacklevel())
        backend = alias[0]
    return backend


def resolve(op: str, device: torch.device, backend: Optional[str] = None, **shape) -> str:
    """Pick the backend for ``op`` on ``device`` (``shape``: the keywords the op's policy and
    availability rules read, e.g. ``M=, N=, K=``). Raises RuntimeError if an explicit request
    (argument, ``PYOPS_BACKEND_<OP>``, ``PYOPS_BACKEND``) cannot run. Automatic: the reference
    off CUDA; on CUDA the op's policy preference if it can run, else the first backend that can
    in the order cuda, triton, torch, reference."""
    want = requested(op, backend)
    if want is not None:
        ok, why = available(op, want, device, **shape)
        if not ok:
            raise RuntimeError(f"pyops: backend {want!r} requested for {op} cannot run: {why}")
        return want
    if device.type != "cuda":
        return "reference"
    order = BACKENDS
    pol = _POLICY.get(op)
    if pol is not None:
        pref = pol[0](device_capability(device), **shape)
        order = (pref,) + tuple(b for b in BACKENDS if b != pref)
    for b in order:
        if available(op, b, device, **shape)[0]:
            return b
    raise RuntimeError(f"pyops: no backend can run {op} on {device}")  # pragma: no cover

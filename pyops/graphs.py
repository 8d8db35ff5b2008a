"""Device-decided regions inside torch CUDA graphs: CUDA IF conditional nodes.

    flag = ...                                   # int32 CUDA tensor written by a kernel
    with pyops.graphs.conditional(flag, run_when="zero") as run:
        if run:                                  # always True while capturing
            y = body(x)                          # captured into the IF node's body graph

* **While a torch CUDA graph is being captured** on the current stream, the body is captured
  into the body graph of a CUDA IF conditional node; a one-thread kernel
  (``pyops::_graph_set_conditional``, op module :mod:`pyops.ops.graph_conditional`, kernel
  csrc/graph_conditional.cu) reads ``flag[index]`` on the device at replay and sets the node's
  condition, so the body runs or is skipped with no host involvement. ``run`` is True.
* **Otherwise (eager)** ``run`` is the host value of the condition: reading it is a device sync
  (``.item()``), the only one a cached forward makes per decision. The body then runs on the
  same side stream the capture would use, which also warms that stream up (cuBLAS creates its
  handle and workspace per stream; creating them during capture would invalidate it).

Steps while capturing (the recipe verified on an H100, see ../shared/reference.md):
``cudaStreamGetCaptureInfo`` on the capturing stream → ``cudaGraphConditionalHandleCreate``
(default 0, reset at every launch) → setter kernel on the capturing stream → ``cudaGraphAddNode``
(IF, size 1) on the current dependencies → ``cudaStreamBeginCaptureToGraph`` of a side stream
into the body graph → body → ``cudaStreamEndCapture`` → ``cudaStreamUpdateCaptureDependencies``
(set) of the main stream to the new node. Body allocations go to a ``torch.cuda.MemPool`` (the
graph's own pool is being recorded to), one per enclosing capture and nesting depth, kept alive
by this module: tensors made in a body keep their addresses across replays; after a skipped body
their contents are unspecified (sibling bodies share the pool), so callers overwrite them
(``pyops.cache`` does, with ``cache_apply``).
Regions nest: each depth has its own side stream.

Needs the compiled extension (``pyops._C``) for the setter and cuda-python (``cuda.bindings``) for
the graph API. Without them, :func:`conditional` under capture raises; callers that want a graph
anyway use :func:`supported` and fall back to computing with a device-side select.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch

from .ops import graph_conditional as _setter

__all__ = ["conditional", "begin", "end", "capturing", "supported", "side_stream", "pools"]

_SIDE: dict[tuple[int, int], torch.cuda.Stream] = {}
_POOLS: list = []          # body pools, kept alive for the graphs that use them
_POOL_BY_KEY: dict = {}
_DEPTH = [0]


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph."""
    return (torch.cuda.is_available() and torch.cuda.is_initialized()
            and torch.cuda.is_current_stream_capturing())


@functools.lru_cache(None)
def _cudart():
    try:
        from cuda.bindings import runtime as rt  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart as rt  # older cuda-python
    return rt


def supported() -> tuple[bool, str]:
    """Whether IF nodes can be captured here (extension with the setter + cuda-python)."""
    ok, why = _setter.status()
    if not ok:
        return False, why
    try:
        _cudart()
    except Exception as e:  # pragma: no cover - depends on the machine
        return False, f"cuda-python not importable ({type(e).__name__}: {e})"
    return True, "ok"


def side_stream(depth: int, device: Optional[torch.device] = None) -> torch.cuda.Stream:
    """The side stream a region body at nesting ``depth`` runs (and is captured) on."""
    dev = torch.device(device) if device is not None else torch.device(
        "cuda", torch.cuda.current_device())
    key = (dev.index if dev.index is not None else torch.cuda.current_device(), depth)
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device=key[0])
    return _SIDE[key]


def pools() -> list:
    return _POOLS


def _ok(res):
    """cuda-python calls return (err, *values): raise on error, return the values."""
    rt = _cudart()
    err, vals = (res[0], res[1:]) if isinstance(res, tuple) else (res, ())
    if err != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(f"pyops.graphs: CUDA runtime error {err}")
    return vals[0] if len(vals) == 1 else vals


def _capture_info(stream_ptr: int):
    """(capture id, graph, dependencies list) of a capturing stream, across cuda-python
    versions."""
    rt = _cudart()
    vals = _ok(rt.cudaStreamGetCaptureInfo(stream_ptr))
    # 12.x: (status, id, graph, deps, n); 13.x: (status, id, graph, deps, edge_data, n)
    status, cap_id, graph, deps = vals[0], vals[1], vals[2], vals[3]
    if status != rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusActive:
        raise RuntimeError("pyops.graphs: the current stream is not capturing")
    n = int(vals[-1])
    return int(cap_id), graph, (list(deps)[:n] if deps is not None else [])


def _body_pool(cap_id: int, depth: int):
    """One MemPool per (enclosing capture, depth), shared by the sibling regions of that capture:
    their bodies are ordered one after another on the capturing stream, so reusing freed blocks
    between them is stream-ordered; outputs of a skipped body are always overwritten by the
    caller (the cache apply), never read stale. Kept alive for the graphs that use them."""
    key = (cap_id, depth)
    if key not in _POOL_BY_KEY:
        _POOL_BY_KEY[key] = torch.cuda.MemPool()
        _POOLS.append(_POOL_BY_KEY[key])
    return _POOL_BY_KEY[key]


def _add_if_node(graph, deps, handle):
    rt = _cudart()
    p = rt.cudaGraphNodeParams()
    p.type = rt.cudaGraphNodeType.cudaGraphNodeTypeConditional
    p.conditional.handle = handle
    p.conditional.type = rt.cudaGraphConditionalNodeType.cudaGraphCondTypeIf
    p.conditional.size = 1
    try:  # CUDA 13 signature: (graph, deps, edge_data, n, params)
        node = _ok(rt.cudaGraphAddNode(graph, deps, None, len(deps), p))
    except TypeError:  # CUDA 12 signature: (graph, deps, n, params)
        node = _ok(rt.cudaGraphAddNode(graph, deps, len(deps), p))
    body = p.conditional.phGraph_out[0]
    return node, body


def _set_deps(stream_ptr: int, node) -> None:
    rt = _cudart()
    flag = int(rt.cudaStreamUpdateCaptureDependenciesFlags.cudaStreamSetCaptureDependencies)
    try:  # CUDA 13: (stream, deps, edge_data, n, flags)
        _ok(rt.cudaStreamUpdateCaptureDependencies(stream_ptr, [node], None, 1, flag))
    except TypeError:  # CUDA 12: (stream, deps, n, flags)
        _ok(rt.cudaStreamUpdateCaptureDependencies(stream_ptr, [node], 1, flag))


class _Region:
    __slots__ = ("main", "side", "node", "pool_ctx", "stream_ctx", "eager")


def begin(flag: torch.Tensor, index: int = 0, *, run_when: str = "zero"):
    """Open a region whose body runs when ``flag[index]`` is zero (``run_when="zero"``) or non-zero.

    Returns ``(run, token)``; pass the token to :func:`end`. Eager: ``run`` is read on the host
    (one sync) and the body, if run, goes to the side stream. Capturing: ``run`` is True and the
    body is captured into an IF node decided on the device.
    """
    if run_when not in ("zero", "nonzero"):
        raise ValueError(f"pyops.graphs: run_when must be 'zero' or 'nonzero', got {run_when!r}")
    if flag.dtype != torch.int32 or not flag.is_contiguous():
        raise ValueError("pyops.graphs: flag must be a contiguous int32 tensor")
    r = _Region()
    r.main = torch.cuda.current_stream(flag.device) if flag.is_cuda else None
    depth = _DEPTH[0]
    if not flag.is_cuda:  # CPU (tests, reference): plain host branch
        r.eager, r.side, r.node = True, None, None
        r.pool_ctx = r.stream_ctx = None
        v = int(flag.reshape(-1)[index]) != 0
        _DEPTH[0] += 1
        return (not v) if run_when == "zero" else v, r
    if not capturing():
        v = int(flag.reshape(-1)[index].item()) != 0  # the one host sync per decision
        run = (not v) if run_when == "zero" else v
        r.eager, r.node, r.pool_ctx = True, None, None
        r.side = side_stream(depth, flag.device)
        r.side.wait_stream(r.main)
        r.stream_ctx = torch.cuda.stream(r.side)
        r.stream_ctx.__enter__()
        _DEPTH[0] += 1
        return run, r
    ok, why = supported()
    if not ok:
        raise RuntimeError(f"pyops.graphs: cannot capture a conditional region: {why}")
    rt = _cudart()
    r.eager = False
    main_ptr = r.main.cuda_stream
    cap_id, graph, _ = _capture_info(main_ptr)
    handle = _ok(rt.cudaGraphConditionalHandleCreate(
        graph, 0, int(rt.cudaGraphConditionalHandleFlags.cudaGraphCondAssignDefault)))
    _setter.graph_set_conditional(flag, int(index), int(handle), run_when=run_when)
    _, graph, deps = _capture_info(main_ptr)  # now: the setter kernel
    r.node, body = _add_if_node(graph, deps, handle)
    r.side = side_stream(depth, flag.device)
    _ok(rt.cudaStreamBeginCaptureToGraph(r.side.cuda_stream, body, None, None, 0,
                                         rt.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed))
    pool = _body_pool(cap_id, depth)
    r.pool_ctx = torch.cuda.use_mem_pool(pool, device=flag.device)
    r.pool_ctx.__enter__()
    r.stream_ctx = torch.cuda.stream(r.side)
    r.stream_ctx.__enter__()
    _DEPTH[0] += 1
    return True, r


def end(token) -> None:
    """Close the region opened by :func:`begin` (same thread, regions closed in LIFO order)."""
    r = token
    _DEPTH[0] -= 1
    if r.stream_ctx is not None:
        r.stream_ctx.__exit__(None, None, None)
    if r.eager:
        if r.side is not None:
            r.main.wait_stream(r.side)
        return
    r.pool_ctx.__exit__(None, None, None)
    _ok(_cudart().cudaStreamEndCapture(r.side.cuda_stream))
    _set_deps(r.main.cuda_stream, r.node)


@contextlib.contextmanager
def conditional(flag: torch.Tensor, index: int = 0, *, run_when: str = "zero") -> Iterator[bool]:
    """Context manager form of :func:`begin` / :func:`end`; yields ``run``."""
    run, tok = begin(flag, index, run_when=run_when)
    try:
        yield run
    finally:
        end(tok)

"""Shared test helpers: backends to parametrize over, input makers, bit comparisons."""
from __future__ import annotations

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

"""Helpers shared by tests/test_quantize_fp8.py and tests/test_quantize_nvfp4.py: poisoned
outputs for the destination-passing backend entry points, bit comparisons (NaN-aware and exact),
inputs with outlier channels and inf/NaN, fresh seeds.

References are always computed on the host (CPU) from a host copy of the input: torch's CPU
casts and IEEE division are the spec, and a reference computed by torch on the GPU under test
would share its device's code generation (on CUDA, torch computes ``tensor / python_scalar`` as
``tensor * (1/scalar)``, aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu, which is not
bit-identical for amax / 448, amax / 2688 or block_amax / 6).
"""
from __future__ import annotations

import random

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def poisoned(shape, dtype, device=DEV):
    """A tensor of ``dtype`` whose every byte is 0xAA (an unwritten element is caught)."""
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.full((n,), 0xAA, dtype=torch.uint8, device=device).view(dtype).view(shape)


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bits(got, want, what=""):
    """Bit for bit; floating outputs wider than a byte compare NaN-for-NaN where the reference is
    NaN (NaN payload bits are not part of the spec: torch's own bf16 cast writes different NaN
    bits on CPU and GPU)."""
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, what
    if got.dtype.is_floating_point and got.element_size() > 1:
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), f"{what}: NaN positions differ"
        g, w = raw_bits(got)[~nan], raw_bits(want)[~nan]
    else:
        g, w = raw_bits(got), raw_bits(want)
    bad = (g != w).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} elements differ, first at {bad[:4].tolist()}"


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str, seed=None):
    """Exactly the same bits, NaN payloads included (fp32 as int32, anything else as bytes); the
    report names the seed and the first differing element in hex."""
    got = got.detach().cpu().contiguous()
    want = want.detach().cpu().contiguous()
    if got.dtype == torch.float32:
        got, want = got.view(torch.int32), want.view(torch.int32)
    elif got.dtype != torch.uint8:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {bad.shape[0]} of {got.numel()} differ (seed {seed}); "
                             f"first at {i}: got {int(got[i]):#x}, want {int(want[i]):#x}")


def make_x(M, K, dtype, seed=0, outliers=True, nonfinite=False, device=DEV):
    """(M, K) ``randn * 2`` with three outlier channels (x1000) and, with ``nonfinite``, an inf,
    a NaN and a -inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * 2.0
    if outliers and K >= 8:
        cols = torch.randperm(K, generator=gen)[:3]
        x[:, cols] *= 1000.0  # outlier channels
    if nonfinite and M >= 3 and K >= 3:
        x[0, K // 2] = float("inf")
        x[2, 1] = float("nan")
        x[M - 1, K - 1] = float("-inf")
    return x.to(dtype).to(device)


def new_seed() -> int:
    """Seed torch's global generator with a fresh seed and return it (for failure reports)."""
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


def randn_cuda(shape, dtype, scale=1.0):
    return (torch.randn(shape, device="cuda", dtype=torch.float32) * scale).to(dtype)


def quantizer_backends(op: str, deq_op: str):
    """pytest params for a quantizer's tests: (quantize backends, dequantize backends, the
    dequantize backend names, the backends both hold for opcheck), "reference" left out of the
    first two (it is the spec every test compares with), "cuda" marked gpu. A backend registered
    later (say a CUDA dequantizer) is tested without editing the test files."""
    from _util import registered_backends
    deq = registered_backends(deq_op)
    names = [p.values[0] for p in registered_backends(op, exclude=())]
    both = [p for p in registered_backends(deq_op, exclude=()) if p.values[0] in names]
    return registered_backends(op), deq, [p.values[0] for p in deq], both


def huge_row_stride_input() -> torch.Tensor:
    """A (2, 32) bf16 view with row stride 2**31 elements (offsets must be int64), rows of scale
    3 and 300; the untouched pages of its 4 GiB buffer cost no RAM. Skips on a GPU with less
    than 6 GiB free."""
    import pytest
    if DEV == "cuda" and torch.cuda.mem_get_info()[0] < 6 * 2**30:
        pytest.skip("needs 4 GiB of free GPU memory")
    buf = torch.empty(2**31 + 64, dtype=torch.bfloat16, device=DEV)
    x = buf.as_strided((2, 32), (2**31, 1))
    gen = torch.Generator().manual_seed(12)
    x[0] = (torch.randn(32, generator=gen) * 3).to(DEV)
    x[1] = (torch.randn(32, generator=gen) * 300).to(DEV)
    return x


def capture(fn):
    """Warm ``fn()`` up twice on a side stream, then capture one call into a CUDA graph:
    returns (graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def more_than_2pow31_input(K: int = 4096) -> torch.Tensor:
    """(2^31 // K + 3, K) bf16 on the GPU, just past 2^31 elements (~4.3 GB), outliers in the
    last row; skips when the GPU lacks room for it plus codes and scratch."""
    import pytest
    M = 2**31 // K + 3
    need = M * K * (2 + 1) + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.1f} GiB free on the GPU, {free / 2**30:.1f} available")
    x = torch.randn((M, K), device="cuda", dtype=torch.bfloat16)
    x[-1, -5:] *= 100.0
    return x

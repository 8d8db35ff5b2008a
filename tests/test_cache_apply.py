"""pyops.cache_apply (op module pyops/ops/cache_apply.py): where a group reuses, out = x + residual
(one rounding from the fp32 sum), elsewhere out untouched bit for bit; every backend vs the
reference on awkward shapes; errors before launch; opcheck; torch.compile; CUDA-graph replay with
changing decisions."""
import pytest
import torch

from pyops.ops.cache_apply import cache_apply
from pyops.reference import block_similarity as R

from _util import BACKENDS, DEVICE, capture_graph, need_backend

ALL = [pytest.param("reference", id="reference")] + BACKENDS


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_apply(backend, dtype):
    need_backend("cache_apply", backend)
    g = torch.Generator().manual_seed(3)
    out = torch.randn(4, 5, 33, generator=g).to(dtype).to(DEVICE)
    x = torch.randn(4, 5, 33, generator=g).to(dtype).to(DEVICE)
    r = torch.randn(4, 5, 33, generator=g).to(dtype).to(DEVICE)
    reuse = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    want = out.clone()
    want[2:] = (x[2:].float() + r[2:].float()).to(dtype)
    cache_apply(out, x, r, reuse, groups=2, backend=backend)
    assert torch.equal(out.cpu(), want.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups,flags", [
    ((3, 7, 129), 3, [1, 0, 5]),      # odd sizes, a non-1 "reuse" value
    ((6, 70001), 2, [0, 1]),           # 2-D, rows past one block
    ((2, 1, 1), 1, [1]),
])
def test_backend_matches_reference(backend, dtype, shape, groups, flags):
    need_backend("cache_apply", backend)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g).to(dtype)
    r = (torch.randn(shape, generator=g) * 0.1).to(dtype)
    r.view(-1)[:: 97] = 3e4 if dtype != torch.float16 else 6e4  # outliers, fp16 overflows to inf
    poison = torch.full(shape, float("nan")).to(dtype)  # untouched rows must stay NaN
    reuse = torch.tensor(flags, dtype=torch.int32)
    want = poison.clone()
    R.cache_apply(want, x, r, reuse, groups)
    out = poison.clone().to(DEVICE)
    cache_apply(out, x.to(DEVICE), r.to(DEVICE), reuse.to(DEVICE), groups=groups,
                backend=backend)
    assert torch.equal(out.cpu().isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(out.cpu()), torch.nan_to_num(want))


def test_errors_before_launch():
    a = torch.randn(2, 8, 4)
    ru = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="reuse must be"):
        cache_apply(a.clone(), a, a.clone(), ru, groups=0)
    with pytest.raises(ValueError, match="reuse must be"):
        cache_apply(a.clone(), a, a.clone(), torch.zeros(2, dtype=torch.int32), groups=1)
    with pytest.raises(ValueError, match="reuse must be"):
        cache_apply(torch.randn(3, 8, 4), torch.randn(3, 8, 4), torch.randn(3, 8, 4),
                    torch.zeros(2, dtype=torch.int32), groups=2)
    with pytest.raises(ValueError, match="residual must be contiguous with out's shape"):
        cache_apply(a.clone(), a, torch.randn(2, 8, 5), ru)
    with pytest.raises(ValueError, match="x must be contiguous"):
        cache_apply(a.clone(), torch.randn(2, 4, 8).transpose(1, 2), a.clone(), ru)
    with pytest.raises(TypeError, match="dtype"):
        cache_apply(a.clone(), a, a.clone(), ru.long())
    with pytest.raises(TypeError, match="dtype"):
        cache_apply(a.long(), a, a.clone(), ru)
    out = a.clone()
    with pytest.raises(ValueError):
        cache_apply(out, a, a.clone(), torch.ones(1, dtype=torch.int32), groups=3)
    assert torch.equal(out, a)  # nothing ran


@pytest.mark.parametrize("backend", ALL)
def test_opcheck(backend):
    need_backend("cache_apply", backend)
    a = torch.randn(2, 8, 16, device=DEVICE)
    r = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.pyops.cache_apply.default,
                          (a.clone(), a, a, r, 1, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_aot_eager():
    def f(out, x, res, reuse):
        cache_apply(out, x, res, reuse, groups=2, backend="reference")
        return out * 2
    x, res = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    reuse = torch.tensor([1, 0], dtype=torch.int32)
    o1 = torch.randn(4, 6, 8)
    o2 = o1.clone()
    y1 = torch.compile(f, backend="aot_eager", fullgraph=True)(o1, x, res, reuse)
    y2 = f(o2, x, res, reuse)
    assert torch.equal(y1, y2) and torch.equal(o1, o2)
    assert not torch.equal(o1[:2], x[:2])  # the reused half was written


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_replay(backend):
    need_backend("cache_apply", backend)
    x = torch.randn(4, 256, 64, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x)
    out = torch.zeros_like(x)
    reuse = torch.zeros(2, dtype=torch.int32, device="cuda")
    g, _ = capture_graph(lambda: cache_apply(out, x, res, reuse, groups=2, backend=backend))
    for flags in ([1, 0], [0, 0], [0, 1], [1, 1]):
        x.normal_()
        reuse.copy_(torch.tensor(flags, dtype=torch.int32))
        out.fill_(float("nan"))
        want = out.clone()
        R.cache_apply(want, x, res, reuse, 2)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.isnan(), want.isnan())
        assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(want))


# ---- GPU: every path of the CUDA kernels (csrc/cache_apply.cu), bit for bit -------------------
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (out, x, residual): one dtype has the vectorized kernel, mixed dtypes the generic one.
APPLY_DTYPES = {"f32": (F32, F32, F32), "bf16": (BF16, BF16, BF16), "f16": (F16, F16, F16),
                "mixed": (BF16, F32, BF16)}
APPLY_CASES = [  # shape, groups, flags
    ((3, 7, 129), 3, [1, 0, 5]),        # odd; groups of 903 elements: units across boundaries
    ((4, 5, 3), 4, [0, 1, 1, 0]),       # groups of 15 elements
    ((8, 3), 4, [1, 0, 0, 1]),          # groups of 6 < 8 elements: the generic kernel
    ((2, 1, 13), 1, [1]),               # head and tail only
    ((6, 1000), 3, [0, 0, 0]),          # nothing reused: out untouched
    ((4, 3 * 2**20 + 3), 2, [0, 1]),    # 12.6M elements: more than one grid-stride step
    ((4, 3 * 2**20 + 3), 4, [1, 0, 1, 1]),
]
# The shift of (out, x, residual) inside their flat allocations: fresh; tensor[1:] views
# (vectorized after a scalar head of 7); head 5; out alone shifted (no common alignment: generic).
APPLY_LAYOUTS = {"aligned": (0, 0, 0), "shift1": (1, 1, 1), "shift3": (3, 3, 3),
                 "unaligned": (1, 0, 0)}


def _shifted(values: torch.Tensor, shift: int):
    """(buffer, view): ``values`` copied into a fresh flat buffer at element ``shift``, the
    elements before it NaN (they must stay so); the view has values' shape."""
    buf = torch.full((values.numel() + shift,), float("nan"), dtype=values.dtype,
                     device=values.device)
    view = buf[shift:].view(values.shape)
    view.copy_(values)
    return buf, view


def _apply_inputs(shape, dtypes, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    od, xd, rd = dtypes
    out = torch.randn(shape, generator=g, device="cuda").to(od)  # kept bit for bit where not reused
    x = torch.randn(shape, generator=g, device="cuda").to(xd)
    r = (torch.randn(shape, generator=g, device="cuda") * 0.1).to(rd)
    r.view(-1)[:: 97] = 3e4 if F16 not in dtypes else 6e4  # outliers, fp16 overflows to inf
    return out, x, r


def _check_cuda_apply(out, x, r, reuse, groups, what):
    from _util import assert_bits_equal
    want = out.clone()
    R.cache_apply(want, x.clone(), r.clone(), reuse, groups)
    cache_apply(out, x, r, reuse, groups=groups, backend="cuda")
    torch.cuda.synchronize()
    assert_bits_equal(out, want, what)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(APPLY_LAYOUTS))
@pytest.mark.parametrize("shape,groups,flags", APPLY_CASES)
@pytest.mark.parametrize("dtypes", list(APPLY_DTYPES))
def test_cuda_paths_bit_exact(dtypes, shape, groups, flags, layout):
    """The CUDA kernel equals the reference bit for bit on each path: the vectorized kernel per
    dtype (scalar head and tail, units across group boundaries), the generic kernel (mixed
    dtypes, no common alignment, groups of < 8 elements); rows of groups that do not reuse keep
    their bits, and nothing outside the views is written."""
    need_backend("cache_apply", "cuda")
    if shape[-1] > 2**20 and layout in ("shift3", "unaligned"):
        pytest.skip("the large shape runs with the aligned and shift1 layouts only")
    shifts = APPLY_LAYOUTS[layout]
    vals = _apply_inputs(shape, APPLY_DTYPES[dtypes], seed=len(flags) * 1000 + shape[-1])
    bufs, (out, x, r) = zip(*(_shifted(v, s) for v, s in zip(vals, shifts)))
    reuse = torch.tensor(flags, dtype=torch.int32, device="cuda")
    _check_cuda_apply(out, x, r, reuse, groups, f"{dtypes} {shape} {flags} {layout}")
    for b, s in zip(bufs, shifts):
        assert torch.isnan(b[:s].float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("alias", ["x", "residual"])
@pytest.mark.parametrize("layout", ["aligned", "shift1"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cuda_out_aliasing_bit_exact(dtype, layout, alias):
    """out may be x or residual themselves (groups > 1, mixed flags, units across group
    boundaries): each element is read before the same thread writes it."""
    need_backend("cache_apply", "cuda")
    shift = APPLY_LAYOUTS[layout][0]
    shape, groups, flags = (6, 5, 40001), 3, [1, 0, 1]
    _, x, r = _apply_inputs(shape, (dtype,) * 3, seed=11)
    _, x = _shifted(x, shift)
    _, r = _shifted(r, shift)
    out = x if alias == "x" else r
    reuse = torch.tensor(flags, dtype=torch.int32, device="cuda")
    _check_cuda_apply(out, x, r, reuse, groups, f"out is {alias}, {dtype}, {layout}")


@pytest.mark.gpu
def test_cuda_more_than_2pow31_elements():
    """2 rows of 2^30 + 5 bf16 elements (2^31 + 10 in all; int64 indexing), out = x, the second
    group reused: the ends and the elements around 2^31 equal the reference, the first row keeps
    its bits."""
    from _util import assert_bits_equal
    need_backend("cache_apply", "cuda")
    L = 2**30 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * (2 * L * 2) + (2 << 30):
        pytest.skip(f"needs ~10 GiB free on the GPU, {free / 2**30:.1f} GiB available")
    x = torch.randn(2, L, device="cuda", dtype=BF16)
    r = torch.randn(2, L, device="cuda", dtype=BF16)
    flat_x, flat_r = x.view(-1), r.view(-1)
    spans = [slice(0, 2**20), slice(L - 2**19, L + 2**19), slice(2**31 - 2**19, 2**31 + 10)]
    want = []
    for s in spans:
        w = flat_x[s].clone()
        keep = torch.arange(s.start, s.stop, device="cuda") < L  # row 0: group 0, not reused
        want.append(torch.where(keep, w, (w.float() + flat_r[s].float()).to(BF16)))
    reuse = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    cache_apply(x, x, r, reuse, groups=2, backend="cuda")
    torch.cuda.synchronize()
    for s, w in zip(spans, want):
        assert_bits_equal(flat_x[s], w, f"out[{s.start}:{s.stop}]")

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

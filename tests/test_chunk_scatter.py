"""pyops.cache's chunk_scatter (op module pyops/ops/chunk_scatter.py, spec
pyops/reference/chunk_scatter.py): the fused output and cache update of the chunk level equals the
unfused torch update bit for bit (reference and Triton, fp32/bf16/fp16, awkward shapes, outliers,
poisoned outputs); out-of-range tokens are ignored; errors before launch; opcheck;
torch.compile; GPU: CUDA-graph replay with changing tokens."""
import pytest
import torch

from pyops.ops.chunk_scatter import chunk_scatter
from pyops.reference import chunk_scatter as R

from _util import DEVICE, assert_bits_equal, capture_graph, registered_backends

ALL = registered_backends("chunk_scatter", exclude=())
KERNELS = registered_backends("chunk_scatter")  # besides the reference
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(B, N, D, T, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g)
    x[..., :: max(1, D // 3)] *= 300.0  # outlier channels
    res = torch.randn(B, N, D, generator=g) * 0.1
    res.view(-1)[:: 97] = 3e4 if dtype != torch.float16 else 6.5e4
    x.view(-1)[:: 97] = 1000.0  # fp16: x + res = 66504 rounds to inf
    rows = torch.randn(B, T, D, generator=g)
    ref = torch.randn(B, N, D, generator=g)
    return [t.to(dtype).to(device) for t in (x, res, rows, ref)]


def _unfused(x, res, rows, tokens, ref):
    """What the chunk level ran before the fused op: a full add and three index copies."""
    out = x + res
    out.index_copy_(1, tokens, rows)
    res, ref = res.clone(), ref.clone()
    res.index_copy_(1, tokens, rows - x.index_select(1, tokens))
    ref.index_copy_(1, tokens, x.index_select(1, tokens))
    return out, res, ref


CASES = [  # B, N, D, tokens
    (2, 16, 64, [10, 11]),                    # one chunk, as the chunk level picks it
    (3, 13, 37, [7, 0, 12, 3]),               # odd sizes, unsorted, first and last token
    (1, 1, 1, [0]),                           # one element
    (2, 9, 1030, list(range(9))),             # every token; rows longer than one block
    (2, 40, 24, list(range(8, 16)) + list(range(32, 40))),  # two chunks of eight
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,tokens", CASES)
def test_equals_unfused_update_bit_for_bit(backend, dtype, B, N, D, tokens):
    x, res, rows, ref = _inputs(B, N, D, len(tokens), dtype, seed=N * D)
    tok = torch.tensor(tokens, device=DEVICE)
    want_out, want_res, want_ref = _unfused(x.cpu(), res.cpu(), rows.cpu(), tok.cpu(), ref.cpu())
    out = torch.full_like(x, float("nan"))  # every element must be written
    chunk_scatter(out, x, res, rows, tok, ref, backend=backend)
    assert_bits_equal(out, want_out.to(DEVICE), f"out {backend}")
    assert_bits_equal(res, want_res.to(DEVICE), f"residual {backend}")
    assert_bits_equal(ref, want_ref.to(DEVICE), f"ref {backend}")
    if dtype == torch.float16 and len(tokens) < N:
        assert torch.isinf(out.float()).any()  # the overflow case was exercised


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_equals_reference_with_ignored_tokens(backend, dtype):
    """Entries outside [0, N) are ignored by every backend (nothing outside the tensors is
    touched); fresh random inputs."""
    x, res, rows, ref = _inputs(2, 11, 50, 5, dtype, seed=int(torch.seed() % 2**31))
    tok = torch.tensor([4, -1, 10, 11, 2], device=DEVICE)
    outs = []
    for b in ("reference", backend):
        o, r, f = torch.full_like(x, float("nan")), res.clone(), ref.clone()
        chunk_scatter(o, x, r, rows, tok, f, backend=b)
        outs.append((o, r, f))
    for a, b, what in zip(outs[0], outs[1], ("out", "residual", "ref")):
        assert_bits_equal(b, a, what)
    o, r, f = outs[0]
    keep = torch.tensor([n not in (4, 10, 2) for n in range(11)], device=DEVICE)
    assert torch.equal(r[:, keep], res[:, keep]) and torch.equal(f[:, keep], ref[:, keep])
    assert torch.equal(o[:, 4], rows[:, 0]) and torch.equal(o[:, 10], rows[:, 2])


def test_positions_spec():
    pos = R.positions(torch.tensor([5, 0, 9, -3, 2]), 8)
    assert pos.tolist() == [1, -1, 4, -1, -1, 0, -1, -1]


def test_errors_before_launch():
    x, res, rows, ref = _inputs(2, 8, 4, 2, torch.float32, seed=0, device="cpu")
    tok = torch.tensor([1, 5])
    out = torch.empty_like(x)
    before = [t.clone() for t in (res, ref)]

    def call(**kw):
        a = dict(out=out, x=x, residual=res, rows=rows, tokens=tok, ref=ref)
        a.update(kw)
        chunk_scatter(**a)
    with pytest.raises(TypeError, match="tokens has dtype int32"):
        call(tokens=tok.int())
    with pytest.raises(TypeError, match="one dtype"):
        call(rows=rows.bfloat16())
    with pytest.raises(TypeError, match="dtype"):
        call(out=out.long())
    with pytest.raises(ValueError, match="rows"):
        call(rows=rows[:, :1].contiguous())
    with pytest.raises(ValueError, match="tokens must be"):
        call(tokens=tok.view(2, 1))
    with pytest.raises(ValueError, match="residual .* must have x's shape"):
        call(residual=torch.zeros(2, 8, 5))
    with pytest.raises(ValueError, match="x must be a contiguous"):
        call(x=torch.randn(2, 4, 8).transpose(1, 2))
    with pytest.raises(ValueError, match="B, N, D"):
        call(x=x[0], out=out[0], residual=res[0], ref=ref[0])
    with pytest.raises(ValueError, match="out must not overlap x"):
        call(out=x)
    with pytest.raises(ValueError, match="residual must not overlap ref"):
        call(ref=res)
    with pytest.raises(ValueError, match="empty"):
        call(tokens=torch.zeros(0, dtype=torch.int64), rows=torch.zeros(2, 0, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, (res, ref)))  # nothing ran


@pytest.mark.parametrize("backend", ALL)
def test_opcheck(backend):
    x, res, rows, ref = _inputs(2, 8, 16, 3, torch.float32, seed=1)
    tok = torch.tensor([6, 1, 2], device=DEVICE)
    torch.library.opcheck(torch.ops.pyops.chunk_scatter.default,
                          (torch.empty_like(x), x, res, rows, tok, ref, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_aot_eager():
    def f(out, x, res, rows, tok, ref):
        chunk_scatter(out, x, res, rows, tok, ref, backend="reference")
        return out * 2
    args = _inputs(2, 8, 16, 2, torch.float32, seed=2, device="cpu")
    tok = torch.tensor([3, 4])
    a1 = [torch.empty_like(args[0])] + [t.clone() for t in args]
    a2 = [torch.empty_like(args[0])] + [t.clone() for t in args]
    y1 = torch.compile(f, backend="aot_eager", fullgraph=True)(*a1[:4], tok, a1[4])
    y2 = f(*a2[:4], tok, a2[4])
    assert torch.equal(y1, y2)
    assert all(torch.equal(p, q) for p, q in zip(a1, a2))  # the mutations are seen too
    assert not torch.equal(a1[2], args[1])  # residual updated at the recomputed tokens


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cuda_graph_capture_replay(backend):
    """Captured once; replays with new tokens (written on the device) equal eager calls."""
    B, N, D, T = 2, 64, 384, 16
    x, res, rows, ref = _inputs(B, N, D, T, torch.bfloat16, seed=3, device="cuda")
    tok = torch.arange(T, device="cuda")
    out = torch.empty_like(x)
    g, _ = capture_graph(lambda: chunk_scatter(out, x, res, rows, tok, ref, backend=backend))
    for k in range(4):
        x.normal_()
        rows.normal_()
        tok.copy_(torch.randperm(N, device="cuda")[:T])
        want = [torch.empty_like(x), res.clone(), ref.clone()]
        R.chunk_scatter(want[0], x, want[1], rows, tok, want[2])
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        for a, b, what in zip((out, res, ref), want, ("out", "residual", "ref")):
            assert_bits_equal(a, b, f"replay {k} {what}")


@pytest.mark.gpu
def test_triton_offsets_past_two_to_the_31():
    """B·N·D > 2^31 elements (17 GB in bf16): the element offsets of the last token rows pass
    int32; the kernel's 64-bit index math writes them right (the tail rows, a recomputed token
    past 2^31 and one before), and no element is left unwritten."""
    B, N, D = 1, 2**21 + 8, 1024
    assert B * N * D > 2**31
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(5)
    x = torch.randn(B, N, D, device=dev, dtype=torch.bfloat16, generator=g)
    res = torch.randn(B, N, D, device=dev, dtype=torch.bfloat16, generator=g)
    ref = torch.zeros(B, N, D, device=dev, dtype=torch.bfloat16)
    tok = torch.tensor([N - 1, 5, N - 3], device=dev)
    rows = torch.randn(B, 3, D, device=dev, dtype=torch.bfloat16, generator=g)
    res_tail, x_tail = res[:, -64:].clone(), x[:, -64:]
    out = torch.full_like(x, float("nan"))
    chunk_scatter(out, x, res, rows, tok, ref, backend="triton")
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    want = (x_tail.float() + res_tail.float()).bfloat16()
    want[:, -1], want[:, -3] = rows[:, 0], rows[:, 2]
    assert_bits_equal(out[:, -64:], want, "out tail")
    for t, r in ((N - 1, 0), (5, 1), (N - 3, 2)):
        assert_bits_equal(res[:, t], (rows[:, r].float() - x[:, t].float()).bfloat16(),
                          f"residual {t}")
        assert_bits_equal(ref[:, t], x[:, t], f"ref {t}")
    assert_bits_equal(res[:, -2], res_tail[:, -2], "residual kept")
    assert not ref[:, -2].any()

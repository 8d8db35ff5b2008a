"""pyops.block_similarity (op module pyops/ops/block_similarity.py): reference rules vs a
host-side replay, Triton (and CUDA on a GPU) vs the reference, 0/0, errors, opcheck,
torch.compile, CUDA-graph capture; the CUDA kernel (csrc/block_similarity.cu) against the
reference at awkward geometries and alignments, over repeated steps, graph replays and through its
C ABI with a kept workspace (GPU), and the C entry's argument checks and workspace size (CPU,
compiled with nvcc). The companion op cache_apply: tests/test_cache_apply.py."""
import ctypes
import importlib

import pytest
import torch

from pyops.ops import block_similarity as C
from pyops.ops.cache_apply import cache_apply
from pyops.reference import block_similarity as R

from _util import BACKENDS, DEVICE, HAS_CUDA, assert_bits_equal, capture_graph, need_backend

ALL = [pytest.param("reference", id="reference")] + BACKENDS


def _seq_metrics(a0, deltas, dtype):
    """Features a_k = a0 + deltas[k] * noise_k; returns list of tensors."""
    g = torch.Generator().manual_seed(1)
    return [(a0 + d * torch.randn(a0.shape, generator=g)).to(dtype).to(DEVICE) for d in deltas]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("rule", ["last_computed", "accumulate"])
def test_decisions_follow_host_rule(backend, rule):
    need_backend("block_similarity", backend)
    torch.manual_seed(0)
    a0 = torch.randn(2, 16, 32)
    deltas = [0.0, 0.02, 0.01, 0.3, 0.02, 0.01, 0.015, 0.0, 0.02, 0.5, 0.01, 0.02]
    feats = _seq_metrics(a0, deltas, torch.float32)
    kw = dict(threshold=0.1, warmup=2, max_reuse=3, num_steps=len(feats), last_steps=2)
    ref = torch.zeros_like(feats[0])
    state = C.new_state(1, DEVICE)
    got, ms = [], []
    for f in feats:
        # the metric the rule sees, from the reference sums on the current ref
        d, n = R.partial_sums(f.cpu(), ref.cpu(), 1, 1)
        ms.append(float(d / torch.clamp(n, min=1e-12)))
        reuse, metric = C.block_similarity(f, ref, state, rule=rule, backend=backend, **kw)
        assert abs(float(metric) - ms[-1]) <= 1e-5 * max(1.0, ms[-1])
        got.append(bool(reuse.item()))
    want = R.host_rule(ms, rule=R.RULES[rule], **kw)
    assert got == want
    assert any(got) and not all(got)
    assert not got[0] and not got[-1] and not got[-2]  # first and last steps computed
    assert float(state[0, 0]) == 0.0  # step counter wrapped after num_steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups,chunks,all_groups,write_ref", [
    ((2, 40, 24), 1, 1, False, "on_compute"),
    ((4, 40, 24), 2, 4, True, "on_compute"),
    ((4, 40, 24), 2, 2, False, "always"),
    ((3, 70001), 1, 1, False, "on_compute"),
])
def test_backend_matches_reference(backend, dtype, shape, groups, chunks, all_groups, write_ref):
    need_backend("block_similarity", backend)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(shape, generator=g)
    scale = torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 0.3
    b = (a + scale * torch.randn(shape, generator=g)).to(dtype)
    a = a.to(dtype)
    outs = {}
    for be in ("reference", backend):
        st = C.new_state(groups * chunks)
        st[:, 0] = 5.0
        st[:, 2] = 0.01
        aa, bb, st = a.to(DEVICE), b.clone().to(DEVICE), st.to(DEVICE)
        reuse, m = C.block_similarity(aa, bb, st, threshold=0.1, groups=groups, chunks=chunks,
                                      all_groups=all_groups, write_ref=write_ref, backend=be)
        outs[be] = (reuse.cpu(), m.cpu(), st.cpu(), bb.cpu())
    r0, m0, s0, b0 = outs["reference"]
    r1, m1, s1, b1 = outs[backend]
    torch.testing.assert_close(m1, m0, rtol=1e-5, atol=1e-7)
    far = (m0 - 0.1).abs() > 1e-3
    assert torch.equal(r0[far], r1[far])
    if bool(far.all()):
        assert torch.equal(s0[:, :3], s1[:, :3])
        assert torch.equal(b0, b1)  # ref written in exactly the recomputed cells


@pytest.mark.parametrize("backend", ALL)
def test_zero_over_zero_and_nonfinite(backend):
    need_backend("block_similarity", backend)
    z = torch.zeros(2, 8, 16, device=DEVICE)
    ref = torch.zeros_like(z)
    st = C.new_state(2, DEVICE)
    st[:, 0] = 3
    reuse, m = C.block_similarity(z, ref, st, threshold=0.1, groups=2, backend=backend)
    assert torch.equal(m.cpu(), torch.zeros(2)) and reuse.tolist() == [1, 1]
    x = torch.ones_like(z)
    x[1, 0, 0] = float("nan")
    ref = torch.ones_like(z)
    st = C.new_state(2, DEVICE)
    st[:, 0] = 3
    reuse, m = C.block_similarity(x, ref, st, threshold=0.1, groups=2, backend=backend)
    assert reuse.tolist() == [1, 0]  # NaN metric never reuses
    assert float(m[0]) == 0.0 and torch.isnan(m[1])


@pytest.mark.parametrize("backend", ALL)
def test_threshold_zero_never_reuses(backend):
    need_backend("block_similarity", backend)
    x = torch.randn(1, 8, 16, device=DEVICE)
    ref = x.clone()
    st = C.new_state(1, DEVICE)
    for _ in range(4):
        reuse, m = C.block_similarity(x, ref, st, threshold=0.0, backend=backend)
        assert int(reuse) == 0 and float(m) == 0.0


def test_errors_before_launch():
    a = torch.randn(2, 8, 4)
    st = C.new_state(1)
    with pytest.raises(ValueError, match="must match"):
        C.block_similarity(a, torch.zeros(2, 8, 5), st, threshold=0.1)
    with pytest.raises(ValueError, match="groups"):
        C.block_similarity(a, torch.zeros_like(a), C.new_state(3), threshold=0.1, groups=3)
    with pytest.raises(ValueError, match="chunks"):
        C.block_similarity(a, torch.zeros_like(a), C.new_state(3), threshold=0.1, chunks=3)
    with pytest.raises(ValueError, match="state"):
        C.block_similarity(a, torch.zeros_like(a), C.new_state(2), threshold=0.1)
    buf = torch.randn(3, 8, 4)  # ref overlaps a without sharing its start
    with pytest.raises(ValueError, match="overlap"):
        C.block_similarity(buf[:2], buf[1:], st, threshold=0.1)
    with pytest.raises(ValueError, match="overlap"):
        C.block_similarity(a, a, st, threshold=0.1)
    with pytest.raises(ValueError, match="rule"):
        C.block_similarity(a, torch.zeros_like(a), st, threshold=0.1, rule="nope")
    with pytest.raises(ValueError, match="threshold"):
        C.block_similarity(a, torch.zeros_like(a), st, threshold=-1.0)
    with pytest.raises(TypeError, match="dtype"):
        C.block_similarity(a.long(), torch.zeros_like(a).long(), st, threshold=0.1)


@pytest.mark.parametrize("backend", ALL)
def test_opcheck(backend):
    need_backend("block_similarity", backend)
    a = torch.randn(2, 8, 16, device=DEVICE)
    args = (a, a + 0.01, C.new_state(2, DEVICE), torch.empty(2, device=DEVICE),
            torch.empty(2, dtype=torch.int32, device=DEVICE), 0.1, 1e-12, 0, 1, -1, 0, 0, 2, 1,
            False, 1, backend)
    torch.library.opcheck(torch.ops.pyops.block_similarity.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_aot_eager():
    def f(a, ref, st):
        reuse, m = C.block_similarity(a, ref, st, threshold=0.5, backend="reference")
        out = torch.zeros_like(a)
        cache_apply(out, a, a, reuse, backend="reference")
        return out, m
    a = torch.randn(1, 8, 16)
    ref1, st1 = a + 0.01, C.new_state(1)
    st1[:, 0] = 2
    ref2, st2 = ref1.clone(), st1.clone()
    out1, m1 = torch.compile(f, backend="aot_eager", fullgraph=True)(a, ref1, st1)
    out2, m2 = f(a, ref2, st2)
    assert torch.equal(out1, out2) and torch.equal(m1, m2) and torch.equal(st1, st2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_replay(backend):
    need_backend("block_similarity", backend)
    a = torch.randn(2, 256, 64, device="cuda")
    ref = a.clone()
    st = C.new_state(1, "cuda")
    metric = torch.empty(1, device="cuda")
    reuse = torch.empty(1, dtype=torch.int32, device="cuda")
    kw = dict(threshold=0.05, warmup=1, metric=metric, reuse=reuse, backend=backend)
    g, _ = capture_graph(lambda: C.block_similarity(a, ref, st, **kw))
    seq = []
    for d in (0.01, 0.5, 0.01):
        a.copy_(ref + d * torch.randn_like(ref))
        g.replay()
        seq.append(int(reuse.item()))
    assert seq == [1, 0, 1]


# ---- the CUDA kernel (csrc/block_similarity.cu) ------------------------------------------------
# One streaming launch: slices of each cell summed by CTAs that grid-stride over them, the chunk's
# last slice (a ticket counter in the workspace) makes the decision and resets the counter; a
# second launch copies ref for write_ref="on_compute". These tests compare it with the reference
# (pyops/reference/block_similarity.py) on inputs whose every decision is far from the threshold
# (so the few-ulp difference of m cannot flip one): then reuse, the step and reuse counters of the
# state and ref must be identical, m and the accumulated distance within 1e-5.
THR = 0.1
SMALL, LARGE = 0.02, 0.5  # relative change of a cell: m ~ 0.8 * scale, far below / above THR


def _pattern(groups: int, chunks: int, step: int = 0) -> list:
    """Per-cell change: cell (g, c) small unless (g + c + step) % 3 == 2. With groups = 2 the
    first chunk is small in both groups, the others small in one group only, so all_groups
    changes decisions."""
    return [SMALL if (g + c + step) % 3 != 2 else LARGE
            for g in range(groups) for c in range(chunks)]


def _cell_inputs(shape, dtype, groups, chunks, scales, seed, base=None):
    """(a, b) on the CPU in ``dtype``: b random with outlier channels (x100), or ``base``;
    a = b * (1 + scale_cell * z), so the relative L1 of cell (g, c) is about 0.8 * scale."""
    gen = torch.Generator().manual_seed(seed)
    if base is None:
        b = torch.randn(shape, generator=gen)
        k = shape[-1]
        b[..., torch.randperm(k, generator=gen)[: max(1, k // 64)]] *= 100.0
    else:
        b = base.float()
    z = torch.randn(shape, generator=gen)
    s = torch.tensor(scales, dtype=torch.float32).view(groups, 1, chunks, 1)
    a = R.cell_view(b, groups, chunks) * (1.0 + s * R.cell_view(z, groups, chunks))
    return a.reshape(shape).to(dtype), b.to(dtype)


def _check(backend, a, ref, state, **kw):
    """One check; (reuse, metric, state, ref) copied to the CPU afterwards."""
    reuse, m = C.block_similarity(a, ref, state, backend=backend, **kw)
    return reuse.cpu(), m.cpu(), state.cpu(), ref.cpu()


def _assert_same_step(got, want, state_before, rule: int, what: str) -> None:
    r1, m1, s1, b1 = got
    r0, m0, s0, b0 = want
    key = m0 if rule == 0 else state_before[:, 2].cpu() + m0
    near = (key - THR).abs() <= 1e-3
    assert not bool(near.any()), \
        f"{what}: the test's inputs put decisions near the threshold: {key[near].tolist()[:8]}"
    torch.testing.assert_close(m1, m0, rtol=1e-5, atol=1e-7, msg=lambda s: f"{what}: m: {s}")
    assert torch.equal(r1, r0), f"{what}: reuse {r1.tolist()} != reference {r0.tolist()}"
    # step and consecutive reuses exactly; the accumulated distance (rule 1) and the last metric
    # are sums of m, which may differ by its few ulps
    assert torch.equal(s1[:, :2], s0[:, :2]), f"{what}: state {s1[:, :2]} != {s0[:, :2]}"
    torch.testing.assert_close(s1[:, 2:], s0[:, 2:], rtol=1e-5, atol=1e-7,
                               msg=lambda s: f"{what}: state[:, 2:]: {s}")
    assert_bits_equal(b1, b0, f"{what}: ref")


GEOMETRY = [
    # shape, groups, chunks, all_groups, write_ref
    pytest.param((1, 512, 3072), 1, 1, False, "on_compute", id="one-cell-many-slices"),
    pytest.param((2, 512, 3072), 1, 1, False, "always", id="two-rows-one-cell-always"),
    pytest.param((4, 999, 37), 2, 3, True, "on_compute", id="odd-chunks-all-groups"),
    pytest.param((4, 999, 37), 2, 3, False, "always", id="odd-chunks-always"),
    pytest.param((3, 70001), 3, 1, False, "never", id="odd-row-len"),
    # 1024 segments of 512 elements: more than the CTAs of an H200 (4 per SM), grid-stride
    pytest.param((2, 4096, 64), 2, 512, True, "on_compute", id="more-segments-than-ctas"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups,chunks,all_groups,write_ref", GEOMETRY)
def test_cuda_kernel_matches_reference(shape, groups, chunks, all_groups, write_ref, dtype):
    """Several CTAs per cell, chunks > 1, groups > 1 with all_groups, odd segment lengths (rows
    and chunks starting off a 16-byte boundary), more segments than CTAs (grid-stride), every
    write_ref mode, all three dtypes."""
    need_backend("block_similarity", "cuda")
    cells = groups * chunks
    a, b = _cell_inputs(shape, dtype, groups, chunks, _pattern(groups, chunks), seed=cells)
    st = C.new_state(cells)
    st[:, 0] = 5.0
    st[:, 2] = 0.01
    kw = dict(threshold=THR, groups=groups, chunks=chunks, all_groups=all_groups,
              write_ref=write_ref)
    want = _check("reference", a.clone(), b.clone(), st.clone(), **kw)
    got = _check("cuda", a.cuda(), b.cuda(), st.cuda(), **kw)
    _assert_same_step(got, want, st, 0, f"{shape} g={groups} c={chunks} {dtype}")
    if cells > 1:
        assert 0 < int(want[0].sum()) < cells  # both decisions (and both ref paths) exercised


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("off_a,off_ref", [(1, 0), (3, 3), (0, 5), (8, 8)])
@pytest.mark.parametrize("write_ref", ["on_compute", "always"])
def test_cuda_kernel_misaligned_buffers(dtype, off_a, off_ref, write_ref):
    """a and ref views starting off_a / off_ref elements into larger buffers: no common 16-byte
    alignment (element path), a common one after a scalar head, or both aligned; ref is written
    in its window only."""
    need_backend("block_similarity", "cuda")
    shape, groups = (2, 3001, 17), 2
    a0, b0 = _cell_inputs(shape, dtype, groups, 1, [SMALL, LARGE], seed=off_a + 10 * off_ref)
    n = a0.numel()
    abuf = torch.full((n + 16,), 7.0, dtype=dtype, device="cuda")
    rbuf = torch.full((n + 16,), -3.0, dtype=dtype, device="cuda")
    abuf[off_a:off_a + n] = a0.view(-1).cuda()
    rbuf[off_ref:off_ref + n] = b0.view(-1).cuda()
    a, ref = abuf[off_a:off_a + n].view(shape), rbuf[off_ref:off_ref + n].view(shape)
    st = C.new_state(groups)
    st[:, 0] = 5.0
    kw = dict(threshold=THR, groups=groups, write_ref=write_ref)
    want = _check("reference", a0.clone(), b0.clone(), st.clone(), **kw)
    got = _check("cuda", a, ref, st.cuda(), **kw)
    _assert_same_step(got, want, st, 0, f"offsets {off_a}/{off_ref} {dtype}")
    outside = torch.cat([rbuf[:off_ref], rbuf[off_ref + n:]]).cpu()
    assert bool((outside == -3.0).all()), "ref written outside its window"
    assert torch.equal(want[0], torch.tensor([1, 0], dtype=torch.int32))


def _step_features(shape, groups, chunks, steps, dtype):
    """A feature sequence: each step changes every cell by a small or a large amount
    (_pattern shifted by the step)."""
    a, _ = _cell_inputs(shape, dtype, groups, chunks, _pattern(groups, chunks), seed=100)
    out = [a]
    for k in range(1, steps):
        a, _ = _cell_inputs(shape, dtype, groups, chunks, _pattern(groups, chunks, k),
                            seed=100 + k, base=out[-1])
        out.append(a)
    return out


STEP_KW = dict(threshold=THR, warmup=2, max_reuse=2, num_steps=9, last_steps=1)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["last_computed", "accumulate"])
@pytest.mark.parametrize("shape,groups,chunks,all_groups", [
    ((2, 1024, 768), 2, 2, True),
    ((1, 4096, 3072), 1, 1, False),
])
def test_cuda_kernel_steps_match_reference(rule, shape, groups, chunks, all_groups):
    """12 checks in a row on the same buffers (state wraps after num_steps = 9), each compared
    with the reference: the per-chunk ticket counters come back right for every launch."""
    need_backend("block_similarity", "cuda")
    feats = _step_features(shape, groups, chunks, 12, torch.bfloat16)
    kw = dict(STEP_KW, rule=rule, groups=groups, chunks=chunks, all_groups=all_groups)
    cells = groups * chunks
    ref0, st0 = torch.zeros_like(feats[0]), C.new_state(cells)
    ref1, st1 = ref0.cuda(), st0.cuda()
    seen = set()
    for k, f in enumerate(feats):
        before = st0.clone()
        want = _check("reference", f, ref0, st0, **kw)
        got = _check("cuda", f.cuda(), ref1, st1, **kw)
        _assert_same_step(got, want, before, R.RULES[rule], f"step {k}")
        seen |= set(want[0].tolist())
    assert seen == {0, 1}


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["last_computed", "accumulate"])
def test_cuda_kernel_graph_replays_match_reference(rule):
    """One captured check (memset of the counters + the kernel(s)) replayed for 12 steps with new
    features each time, compared with the reference step by step."""
    need_backend("block_similarity", "cuda")
    shape, groups, chunks = (2, 1024, 768), 2, 2
    feats = _step_features(shape, groups, chunks, 12, torch.bfloat16)
    kw = dict(STEP_KW, rule=rule, groups=groups, chunks=chunks, all_groups=True)
    cells = groups * chunks
    a = feats[0].cuda()
    ref, st = torch.zeros_like(a), C.new_state(cells, "cuda")
    metric = torch.empty(cells, device="cuda")
    reuse = torch.empty(cells, dtype=torch.int32, device="cuda")
    g, _ = capture_graph(lambda: C.block_similarity(a, ref, st, metric=metric, reuse=reuse,
                                                    backend="cuda", **kw))
    ref.zero_()
    st.zero_()  # the warm-up call of capture_graph ran once: start over
    ref0, st0 = torch.zeros_like(feats[0]), C.new_state(cells)
    seen = set()
    for k, f in enumerate(feats):
        a.copy_(f)
        g.replay()
        before = st0.clone()
        want = _check("reference", f, ref0, st0, **kw)
        _assert_same_step((reuse.cpu(), metric.cpu(), st.cpu(), ref.cpu()), want, before,
                          R.RULES[rule], f"replay {k}")
        seen |= set(want[0].tolist())
    assert seen == {0, 1}


class _Params(ctypes.Structure):
    """pyops_block_similarity_params (csrc/include/pyops/block_similarity.h), field for field."""
    _fields_ = [("a", ctypes.c_void_p), ("ref", ctypes.c_void_p), ("state", ctypes.c_void_p),
                ("metric", ctypes.c_void_p), ("reuse", ctypes.c_void_p),
                ("workspace", ctypes.c_void_p), ("dtype", ctypes.c_int), ("rows", ctypes.c_int64),
                ("row_len", ctypes.c_int64), ("chunks", ctypes.c_int), ("groups", ctypes.c_int),
                ("threshold", ctypes.c_float), ("eps", ctypes.c_float), ("rule", ctypes.c_int),
                ("warmup", ctypes.c_int), ("max_reuse", ctypes.c_int),
                ("num_steps", ctypes.c_int), ("last_steps", ctypes.c_int),
                ("all_groups", ctypes.c_int), ("write_ref", ctypes.c_int)]


@pytest.mark.gpu
def test_c_abi_workspace_kept_without_memset():
    """The C ABI's contract: a workspace zeroed once serves launch after launch and CUDA-graph
    replay after replay with no memset (the last CTA of each chunk puts its counter back to 0).
    Calls pyops_block_similarity in pyops._C through ctypes, as a C caller would."""
    need_backend("block_similarity", "cuda")
    lib = ctypes.CDLL(importlib.import_module("pyops._C").__file__)
    launch = lib.pyops_block_similarity
    launch.argtypes, launch.restype = [ctypes.POINTER(_Params), ctypes.c_void_p], ctypes.c_int
    size = lib.pyops_block_similarity_workspace_size
    size.argtypes, size.restype = [ctypes.POINTER(_Params)], ctypes.c_int64

    shape, groups, chunks, rule = (2, 1024, 768), 2, 2, "last_computed"
    feats = _step_features(shape, groups, chunks, 10, torch.bfloat16)
    kw = dict(STEP_KW, rule=rule, groups=groups, chunks=chunks, all_groups=True)
    cells = groups * chunks
    a = feats[0].cuda()
    ref, st = torch.zeros_like(a), C.new_state(cells, "cuda")
    metric = torch.empty(cells, device="cuda")
    reuse = torch.empty(cells, dtype=torch.int32, device="cuda")
    p = _Params(a=a.data_ptr(), ref=ref.data_ptr(), state=st.data_ptr(),
                metric=metric.data_ptr(), reuse=reuse.data_ptr(), dtype=2,  # PYOPS_DTYPE_BF16
                rows=shape[0], row_len=a.numel() // shape[0], chunks=chunks, groups=groups,
                threshold=THR, eps=1e-12, rule=0, warmup=STEP_KW["warmup"],
                max_reuse=STEP_KW["max_reuse"], num_steps=STEP_KW["num_steps"],
                last_steps=STEP_KW["last_steps"], all_groups=1, write_ref=1)
    ws = torch.zeros(size(ctypes.byref(p)), device="cuda")  # zeroed once, never again
    assert ws.numel() >= chunks + 2 * shape[0] * chunks
    p.workspace = ws.data_ptr()

    def call():
        assert launch(ctypes.byref(p), torch.cuda.current_stream().cuda_stream) == 0

    ref0, st0 = torch.zeros_like(feats[0]), C.new_state(cells)

    def compare(k):
        torch.cuda.synchronize()
        assert torch.equal(ws[:chunks].view(torch.int32).cpu(), torch.zeros(chunks,
                                                                            dtype=torch.int32))
        before = st0.clone()
        want = _check("reference", feats[k], ref0, st0, **kw)
        _assert_same_step((reuse.cpu(), metric.cpu(), st.cpu(), ref.cpu()), want, before, 0,
                          f"C ABI step {k}")

    for k in range(4):  # eager launches
        a.copy_(feats[k])
        call()
        compare(k)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for k in range(4, len(feats)):  # replays: the graph holds no memset
        a.copy_(feats[k])
        graph.replay()
        compare(k)


@pytest.mark.gpu
def test_cuda_kernel_is_deterministic():
    """Same inputs, same state: bit-identical metric (the partials are summed in a fixed order,
    not in the order the CTAs finish)."""
    need_backend("block_similarity", "cuda")
    a, b = _cell_inputs((1, 4096, 3072), torch.bfloat16, 1, 1, [SMALL], seed=7)
    a, b = a.cuda(), b.cuda()
    ms = []
    for _ in range(3):
        st = C.new_state(1, "cuda")
        st[:, 0] = 5.0
        ms.append(C.block_similarity(a, b.clone(), st, threshold=THR, backend="cuda")[1])
    assert_bits_equal(ms[1], ms[0], "run 2")
    assert_bits_equal(ms[2], ms[0], "run 3")


@pytest.mark.gpu
@pytest.mark.parametrize("write_ref,kernels", [("never", 1), ("always", 1), ("on_compute", 2)])
def test_cuda_kernel_launch_count(write_ref, kernels):
    """The check is one kernel (the decision is made by the last CTA, not a finalize launch); only
    write_ref="on_compute" adds the ref copy. (The workspace counters' memset is not a kernel.)"""
    from torch.profiler import ProfilerActivity, profile
    need_backend("block_similarity", "cuda")
    a = torch.randn(1, 1024, 3072, device="cuda", dtype=torch.bfloat16)
    ref, st = a + 1, C.new_state(1, "cuda")
    C.block_similarity(a, ref.clone(), st.clone(), threshold=THR, write_ref=write_ref,
                       backend="cuda")  # load the module outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        C.block_similarity(a, ref, st, threshold=THR, write_ref=write_ref, backend="cuda")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA" and "pyops" in e.name]
    assert len(names) == kernels, names


# ---- the C entry's checks, without a GPU ---------------------------------------------------------
_C_MAIN = r"""
#include <stdio.h>
#include <stdint.h>
#include "pyops/block_similarity.h"

static float buf[4096] __attribute__((aligned(16)));

static pyops_block_similarity_params valid(void) {
  pyops_block_similarity_params p = {0};
  p.a = (const char*)buf; p.ref = (char*)buf + 4096; p.state = buf + 2048;
  p.metric = buf + 2064; p.reuse = (int32_t*)(buf + 2080); p.workspace = buf + 2096;
  p.dtype = PYOPS_DTYPE_BF16; p.rows = 2; p.row_len = 1000; p.chunks = 2; p.groups = 2;
  p.threshold = 0.1f; p.eps = 1e-12f; p.warmup = 1; p.max_reuse = -1; p.write_ref = 1;
  return p;
}

static void launch(const char* name, pyops_block_similarity_params p) {
  printf("launch %s %d\n", name, (int)pyops_block_similarity(&p, 0));
}

static void size(const char* name, pyops_block_similarity_params p) {
  printf("size %s %lld\n", name, (long long)pyops_block_similarity_workspace_size(&p));
}

int main(void) {
  pyops_block_similarity_params p;
  int n = 0;
  /* the valid params reach the device only where there is none (the pointers are host memory) */
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) launch("valid", valid());
  printf("launch null %d\n", (int)pyops_block_similarity(NULL, 0));
  p = valid(); p.a = (const char*)buf + 1; launch("a_odd_bf16", p);
  p = valid(); p.dtype = PYOPS_DTYPE_F32; p.ref = (char*)buf + 4098; launch("ref_2_f32", p);
  p = valid(); p.state = (float*)((char*)p.state + 2); launch("state_2", p);
  p = valid(); p.metric = (float*)((char*)p.metric + 1); launch("metric_1", p);
  p = valid(); p.reuse = (int32_t*)((char*)p.reuse + 2); launch("reuse_2", p);
  p = valid(); p.workspace = (float*)((char*)p.workspace + 2); launch("workspace_2", p);
  p = valid(); p.rows = 65536; p.chunks = 32768; p.groups = 1; launch("rows_x_chunks", p);
  printf("size null %lld\n", (long long)pyops_block_similarity_workspace_size(NULL));
  p = valid(); p.rows = 65536; p.chunks = 32768; p.groups = 1; size("rows_x_chunks", p);
  p = valid(); p.rows = 1; p.row_len = 4096LL * 3072; p.chunks = 1; size("flux", p);
  p = valid(); p.rows = 1; p.row_len = 32760LL * 5120; p.chunks = 1; size("wan", p);
  p = valid(); p.rows = 1; p.row_len = 4 * 32760LL * 5120; p.chunks = 1; size("wan_x4", p);
  p = valid(); p.rows = 2; p.row_len = 32760LL * 5120; p.chunks = 8; size("wan_2x8", p);
  p = valid(); p.rows = 100000; p.row_len = 64; p.chunks = 4; size("many_rows", p);
  p = valid(); p.rows = 3; p.row_len = 70001; p.chunks = 1; size("odd", p);
  return 0;
}
"""


@pytest.mark.build
def test_c_entry_refuses_misaligned_buffers_and_sizes_its_workspace(tmp_path):
    """Host-only (no GPU needed): csrc/block_similarity.cu compiled with nvcc and called from C.
    Every bad argument is cudaErrorInvalidValue before any launch: a or ref off their element
    alignment (the loads would fault) and word buffers off 4 bytes are new; the workspace size
    (a host-only function of p) holds one partial per slice, is bounded by the CTA cap rather than
    the length, and is 0 where the launch refuses the sizes."""
    import re
    import subprocess
    from pathlib import Path

    from test_build import _cc, _cuda_include, _nvcc  # the build tests' tool lookup
    nvcc, cc = _nvcc(), _cc()
    cuda_inc = _cuda_include(nvcc)
    if nvcc is None or cc is None or cuda_inc is None:
        pytest.skip("nvcc, a C compiler or the CUDA headers not found")
    root = Path(__file__).resolve().parent.parent
    inc = [f"-I{root / 'csrc' / 'include'}", f"-I{root / 'csrc'}"]
    (tmp_path / "main.c").write_text(_C_MAIN)
    exe = tmp_path / "bs_main"
    for cmd in ([nvcc, "-c", "-std=c++17", "-gencode=arch=compute_90a,code=compute_90a", *inc,
                 str(root / "csrc" / "block_similarity.cu"), "-o", str(tmp_path / "bs.o")],
                [cc, "-std=c99", "-c", *inc, "-isystem", str(cuda_inc), str(tmp_path / "main.c"),
                 "-o", str(tmp_path / "main.o")],
                [nvcc, str(tmp_path / "bs.o"), str(tmp_path / "main.o"), "-o", str(exe)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = {(k, name): int(v) for k, name, v in re.findall(r"(\w+) (\w+) (-?\d+)", r.stdout)}
    invalid = 1  # cudaErrorInvalidValue
    if ("launch", "valid") in out:  # no GPU here: the valid params pass every check
        assert out["launch", "valid"] not in (0, invalid), r.stdout
    for name in ("null", "a_odd_bf16", "ref_2_f32", "state_2", "metric_1", "reuse_2",
                 "workspace_2", "rows_x_chunks"):
        assert out["launch", name] == invalid, (name, r.stdout)
    size = {name: v for (k, name), v in out.items() if k == "size"}
    assert size["null"] == 0 and size["rows_x_chunks"] == 0
    # one (d, n) pair per slice and at least one slice per (row, chunk), after the counters
    assert size["many_rows"] == 4 + 2 * 100000 * 4
    assert size["odd"] >= 1 + 2 * 3
    # the slices of one long row are capped by the CTAs a GPU can hold, not by its length
    assert size["flux"] <= size["wan"] == size["wan_x4"] <= 1 + 2 * 8192
    assert size["wan_2x8"] <= 8 + 2 * 8192

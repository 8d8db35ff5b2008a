"""pyops.block_similarity (op module pyops/ops/block_similarity.py): reference rules vs a
host-side replay, Triton (and CUDA on a GPU) vs the reference, 0/0, errors, opcheck,
torch.compile, CUDA-graph capture. The companion op cache_apply: tests/test_cache_apply.py."""
import pytest
import torch

from pyops.ops import block_similarity as C
from pyops.ops.cache_apply import cache_apply
from pyops.reference import block_similarity as R

from _util import BACKENDS, DEVICE, HAS_CUDA, capture_graph, need_backend

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

"""The chunk level of pyops.cache (pyops/cache/chunk.py) with its decisions on the device:
eager outputs equal the host-side algorithm it replaced bit for bit (host step counter, unfused
update); the device step machine (warm-up, last steps, wrap, refill after a new shape / an error /
an unchunkable N, reset); a capture emulated on the CPU (the IF nodes' bodies run as the flag
says, no host read of a tensor outside them) equals eager; refusals of a capture that cannot be
made. GPU: a captured chunk-level forward replays bit for bit like eager, with no host sync."""
import pytest
import torch

from pyops import cache as C
from pyops import graphs as G
from pyops.cache.chunk import ChunkLevel
from pyops.cache.regions import ChunkRegion
from pyops.models.dit import DiT, DiTConfig
from pyops.reference import block_similarity as R

STEPS = 8
DRIFT = [0.02, 0.002, 0.004, 0.3, 0.002, 0.002, 0.05, 0.002]


def _dit(device="cpu", dtype=torch.float32):
    m = DiT.random(DiTConfig(hidden=64, depth=5, heads=4, in_channels=8), seed=0).eval()
    return m.to(device=device, dtype=dtype)


def _inputs(drift=DRIFT, seed=0, tokens=16, device="cpu", dtype=torch.float32, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, 8, generator=g)
    x[..., 3] *= 10.0  # an outlier channel
    out = []
    for k, d in enumerate(drift):
        x = x + d * torch.randn(x.shape, generator=g)
        out.append((x.to(device=device, dtype=dtype),
                    torch.full((batch,), 0.5 - 1e-3 * k, device=device)))
    return out


def _run(m, inputs):
    with torch.no_grad():
        return [m(x, t) for x, t in inputs]


# ---- the host-side algorithm the device version replaces (the chunk level before) ------------
class _HostChunk:
    """Per block: host step counter; full at warm-up / last steps / empty or other-shape cache /
    N not divisible by chunks; partial: per-chunk relative L1 (the spec's sums), top-budget
    chunks, forward_rows, then out = x + res; out[tok] = rows; res[tok] = rows - x; ref[tok] = x."""

    def __init__(self, cfg):
        self.cfg, self.state = cfg, {}

    def install(self, m, gated):
        for i in gated:
            blk = m.blocks[i]
            blk.forward = lambda x, c, _b=blk, _i=i: self.forward(_i, _b, x, c)

    def forward(self, i, blk, x, c):
        cfg = self.cfg
        s = self.state.setdefault(i, {"step": 0, "ref": None, "res": None})
        B, N, D = x.shape
        step = s["step"]
        full = (step < cfg.warmup or (cfg.num_steps > 0 and step >= cfg.num_steps - cfg.last_steps)
                or s["ref"] is None or s["ref"].shape != x.shape or N % cfg.chunks != 0)
        s["step"] = 0 if cfg.num_steps > 0 and step + 1 >= cfg.num_steps else step + 1
        if full:
            y = type(blk).forward(blk, x, c)
            s["ref"], s["res"] = x.clone(), y - x
            return y
        g = cfg.groups()
        d, n = R.partial_sums(x, s["ref"], g, cfg.chunks)
        met = torch.nan_to_num((d / n.clamp_min(cfg.eps)).view(g, cfg.chunks), nan=float("inf"))
        idx = torch.topk(met.amax(dim=0), cfg.budget, sorted=False).indices.sort().values
        lc = N // cfg.chunks
        tok = (idx[:, None] * lc + torch.arange(lc)).reshape(-1)
        rows = blk.forward_rows(x, c, tok)
        out = x + s["res"]
        out.index_copy_(1, tok, rows)
        s["res"].index_copy_(1, tok, rows - x.index_select(1, tok))
        s["ref"].index_copy_(1, tok, x.index_select(1, tok))
        return out


def _host_outputs(m, cfg, inputs, gated=(1, 2, 3)):
    hc = _HostChunk(cfg)
    hc.install(m, gated)
    try:
        return _run(m, inputs)
    finally:
        for i in gated:
            del m.blocks[i].forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg_kw", [
    dict(chunks=8, budget=2, warmup=2, last_steps=1, num_steps=STEPS),
    dict(chunks=4, budget=1, warmup=1, last_steps=0, num_steps=0),  # no wrap, no last steps
    dict(chunks=8, budget=3, warmup=1, last_steps=2, num_steps=STEPS, cfg_batched=True),
], ids=["warmup2-last1", "no-num-steps", "cfg-batched"])
def test_eager_equals_the_host_side_algorithm(cfg_kw, dtype):
    """Two generations (the device counter wraps), then a new token count (refill), then an N
    the chunks do not divide (full, then a refill when the divisible N comes back)."""
    m = _dit(dtype=dtype)
    inputs = (_inputs(dtype=dtype) + _inputs(seed=1, dtype=dtype)
              + _inputs(DRIFT[:3], seed=2, tokens=24, dtype=dtype)
              + _inputs(DRIFT[:2], seed=3, tokens=13, dtype=dtype)
              + _inputs(DRIFT[:3], seed=4, tokens=24, dtype=dtype))
    cfg = C.CacheConfig(level="chunk", fn=1, bn=1, **cfg_kw)
    want = _host_outputs(m, cfg, inputs)
    h = C.apply(m, cfg)
    got = _run(m, inputs)
    stats = h.stats
    h.remove()
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"forward {k}"
    partial = stats["regions"][2]["partial"]
    assert 0 < partial < len(inputs) and stats["regions"][2]["checks"] == len(inputs)


# ---- the device step machine --------------------------------------------------------------------
def _host_rule(n, *, warmup, num_steps, last_steps, fresh_at=(), unchunkable_at=()):
    """Expected partial flags of n forwards (one region, chunkable unless listed)."""
    out, step, fresh = [], 0, True
    for k in range(n):
        fresh = fresh or k in fresh_at
        forced = step < warmup or (num_steps > 0 and step >= num_steps - last_steps)
        chunkable = k not in unchunkable_at
        out.append(int(not forced and not fresh and chunkable))
        fresh = not chunkable
        step = 0 if num_steps > 0 and step + 1 >= num_steps else step + 1
    return out


@pytest.mark.parametrize("warmup,num_steps,last_steps", [(1, 0, 0), (2, 6, 1), (3, 7, 2)])
def test_device_step_machine(warmup, num_steps, last_steps):
    cfg = C.CacheConfig(level="chunk", warmup=warmup, num_steps=num_steps, last_steps=last_steps,
                        chunks=4, budget=1)
    lvl, r = ChunkLevel(cfg), ChunkRegion()
    x = torch.zeros(2, 8, 4)
    n, fresh_at, unchunkable_at = 14, (7,), (10,)
    got = []
    for k in range(n):
        if k in fresh_at:  # what a new shape / an error does
            r.fresh.fill_(1.0)
        xk = x[:, :7] if k in unchunkable_at else x
        lvl._prepare(r, xk, k not in unchunkable_at, False)
        lvl._decide(r, k not in unchunkable_at)
        got.append(int(r.partial[0]))
        assert int(r.flags[0]) == 1 and float(r.fresh[0, 0]) == (k in unchunkable_at)
    want = _host_rule(n, warmup=warmup, num_steps=num_steps, last_steps=last_steps,
                      fresh_at=fresh_at, unchunkable_at=unchunkable_at)
    assert got == want and 0 < sum(got) < n
    assert r.tally.tolist() == [n, sum(got)]
    r.reset()  # a new generation: step 0 (full), the cache kept
    lvl._decide(r, True)
    assert int(r.partial[0]) == 0 and float(r.step_state[0, 0]) == 1.0
    assert r.tally.tolist() == [n + 1, sum(got)]


def test_error_in_the_partial_path_refills_the_next_forward(monkeypatch):
    m = _dit()
    inputs = _inputs()
    h = C.apply(m, C.CacheConfig(level="chunk", chunks=4, budget=1, fn=1, bn=1))
    with torch.no_grad():
        m(*inputs[0])
        m(*inputs[1])  # partial
        assert int(h.regions()[2].partial[0]) == 1
        blk = m.blocks[2]

        def boom(*a, **k):
            raise ValueError("rows failed")
        blk.forward_rows = boom
        with pytest.raises(ValueError, match="rows failed"):
            m(*inputs[2])
        del blk.forward_rows
        assert G._DEPTH[0] == 0  # the region was closed
        m(*inputs[3])
    flags = {k: int(r.partial[0]) for k, r in h.regions().items()}
    h.remove()
    assert flags == {1: 1, 2: 0, 3: 1}  # block 2 refilled its cache (full), the others not


# ---- a capture emulated on the CPU ---------------------------------------------------------------
class _EmulatedCapture:
    """pyops.graphs as a capture with IF nodes, replayed at once: each ``begin`` is an IF node
    whose body runs when the flag (read as the device would at replay) says so. Reading any
    tensor on the host outside ``begin`` raises (a real capture would fail there)."""
    HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.mp, self.nodes = monkeypatch, []
        self.orig = {n: getattr(torch.Tensor, n) for n in self.HOST_READS}
        self.inside = False

    def _guard(self, name):
        orig = self.orig[name]

        def read(t, *a, **k):
            if not self.inside:
                raise AssertionError(f"host read Tensor.{name} during the emulated capture")
            return orig(t, *a, **k)
        return read

    def begin(self, flag, index=0, *, run_when="zero"):
        self.inside = True
        try:
            v = self.orig["item"](flag.reshape(-1)[index]) != 0
        finally:
            self.inside = False
        self.nodes.append(run_when)
        return (not v) if run_when == "zero" else v, None

    def __enter__(self):
        self.mp.setattr(G, "capturing", lambda: True)
        self.mp.setattr(G, "supported", lambda: (True, "emulated"))
        self.mp.setattr(G, "begin", self.begin)
        self.mp.setattr(G, "end", lambda tok: None)
        for n in self.HOST_READS:
            self.mp.setattr(torch.Tensor, n, self._guard(n))
        return self

    def __exit__(self, *exc):
        self.mp.undo()


@pytest.mark.parametrize("cfg_kw", [
    dict(chunks=8, budget=2, warmup=2, last_steps=1, num_steps=STEPS),
    dict(chunks=4, budget=1, warmup=1, last_steps=0, num_steps=STEPS, cfg_batched=True),
])
def test_emulated_capture_equals_eager(cfg_kw, monkeypatch):
    m = _dit()
    inputs = _inputs() + _inputs(seed=1)
    cfg = C.CacheConfig(level="chunk", fn=1, bn=1, **cfg_kw)
    h = C.apply(m, cfg)
    eager = _run(m, inputs)
    want_stats = h.stats
    h.remove()
    h = C.apply(m, cfg)
    got = _run(m, inputs[:1])  # eager warm-up: allocates the buffers
    with _EmulatedCapture(monkeypatch) as cap:
        got += _run(m, inputs[1:])
    stats = h.stats
    h.remove()
    for k, (a, b) in enumerate(zip(got, eager)):
        assert torch.equal(a, b), f"forward {k}"
    assert stats == want_stats and stats["hits"] > 0
    # per gated block and forward: the full block's IF node, then the chunk path's
    assert cap.nodes == ["zero", "nonzero"] * 3 * (len(inputs) - 1)


def test_capture_refusals(monkeypatch):
    m = _dit()
    x, t = _inputs()[0]
    h = C.apply(m, C.CacheConfig(level="chunk", chunks=4, budget=1))
    monkeypatch.setattr(G, "capturing", lambda: True)
    monkeypatch.setattr(G, "supported", lambda: (True, "emulated"))
    with torch.no_grad(), pytest.raises(RuntimeError, match="Run one eager forward"):
        m(x, t)  # no eager forward before: the capture would allocate the cache
    monkeypatch.setattr(G, "supported", lambda: (False, "no cuda-python"))
    with torch.no_grad(), pytest.raises(RuntimeError, match="no CUDA IF nodes.*cuda-python"):
        m(x, t)
    h.remove()
    h = C.apply(m, C.CacheConfig(level="chunk", chunks=4, budget=1, graph=False))
    with torch.no_grad(), pytest.raises(RuntimeError, match="graph=False"):
        m(x, t)
    h.remove()


# ---- GPU: a real capture ----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("cfg_kw", [
    dict(chunks=8, budget=2, warmup=2, last_steps=1),
    dict(chunks=4, budget=1, warmup=1, last_steps=1, cfg_batched=True),
])
def test_graphed_chunk_forward_equals_eager_without_sync(cfg_kw):
    """One eager warm-up forward, reset, capture one cached forward (two IF nodes per gated block),
    then replay two generations (the device step counter wraps) with no host sync: every output
    and the stats equal the eager run's bit for bit."""
    ok, why = G.supported()
    if not ok:
        pytest.fail(f"IF nodes unsupported on a GPU machine: {why}")
    m = _dit("cuda", torch.bfloat16)
    inputs = (_inputs(device="cuda", dtype=torch.bfloat16, tokens=64)
              + _inputs(seed=1, device="cuda", dtype=torch.bfloat16, tokens=64))
    cfg = C.CacheConfig(level="chunk", num_steps=STEPS, fn=1, bn=1, **cfg_kw)
    h = C.apply(m, cfg)
    eager = [o.clone() for o in _run(m, inputs)]
    want_stats = h.stats
    sx, st = torch.empty_like(inputs[0][0]), torch.empty_like(inputs[0][1])
    with torch.no_grad():
        sx.copy_(inputs[0][0])
        st.copy_(inputs[0][1])
        m(sx, st)  # warm-up (eager: side streams, kernels of both paths)
        h.reset()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            so = m(sx, st)
    h.reset()
    h.reset_stats()
    got = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, t in inputs:
            sx.copy_(x)
            st.copy_(t)
            g.replay()
            got.append(so.clone())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = h.stats
    h.remove()
    assert want_stats["regions"][2]["partial"] > 0
    for k, (a, b) in enumerate(zip(got, eager)):
        assert torch.equal(a, b), f"replay {k}"
    assert stats == want_stats

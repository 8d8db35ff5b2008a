"""CachedModel.stats (pyops/cache/stats.py): hits, misses and the skipped fraction per region and
in total, checked against the reuse flags read step by step (eager) on the embedded DiT and a tiny
diffusers Flux; threshold 0 counts no hit; the chunk level's counts against the calls of the full
and the partial block forward; contexts; reset() keeps the stats, reset_stats() zeroes them.
GPU: CUDA-graph replays are counted (device counters captured with the check)."""
import importlib.util

import pytest
import torch

from pyops import cache as C
from pyops import graphs as G
from pyops.models.dit import DiT, DiTConfig

STEPS = 10
SLOW = [0.02] + [0.002] * (STEPS - 1)
MIXED = [0.02, 0.002, 0.002, 0.3, 0.002, 0.002, 0.002, 0.002, 0.1, 0.01]
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers not installed")


def _dit(device="cpu", dtype=torch.float32, depth=5):
    m = DiT.random(DiTConfig(hidden=64, depth=depth, heads=4, in_channels=8), seed=0).eval()
    return m.to(device=device, dtype=dtype)


def _inputs(drift, seed=0, device="cpu", dtype=torch.float32, tokens=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, 8, generator=g)
    out = []
    for k, d in enumerate(drift):
        x = x + d * torch.randn(x.shape, generator=g)
        out.append((x.to(device=device, dtype=dtype), torch.full((2,), 0.5 - 1e-4 * k,
                                                                 device=device)))
    return out


def _flags_by_step(m, h, inputs, context=None):
    """Run eagerly; after each forward read every region's reuse flag: [{key: 0/1}]."""
    rec = []
    with torch.no_grad():
        for x, t in inputs:
            m(x, t)
            rec.append({k: int(r.reuse[0]) for k, r in h.regions(context).items()})
    return rec


def _expected(rec):
    """{key: (checks, hits)} from the per-step flags."""
    out = {}
    for step in rec:
        for k, f in step.items():
            c, n = out.get(k, (0, 0))
            out[k] = (c + 1, n + f)
    return out


def _check_counts(stats, rec, blocks):
    want = _expected(rec)
    assert set(stats["regions"]) == set(want)
    for k, (checks, hits) in want.items():
        e = stats["regions"][k]
        assert (e["checks"], e["hits"], e["misses"]) == (checks, hits, checks - hits), k
        assert e["skipped"] == (hits / checks if checks else 0.0)
        assert e["blocks"] == blocks
    checks = sum(c for c, _ in want.values())
    hits = sum(n for _, n in want.values())
    assert (stats["checks"], stats["hits"], stats["misses"]) == (checks, hits, checks - hits)
    assert stats["skipped"] == pytest.approx(hits / checks, rel=1e-12)
    return hits


# ---- step and block levels on the embedded DiT ------------------------------------------------
@pytest.mark.parametrize("rule", ["last_computed", "accumulate"])
@pytest.mark.parametrize("level", ["step", "block"])
def test_counts_equal_the_flags_read_step_by_step(level, rule):
    m = _dit()
    inputs = _inputs(MIXED)
    h = C.apply(m, C.CacheConfig(level=level, rule=rule, threshold=0.05, warmup=2, max_reuse=2,
                                 num_steps=STEPS, last_steps=1, fn=1, bn=1))
    rec = _flags_by_step(m, h, inputs)
    stats = h.stats
    h.remove()
    hits = _check_counts(stats, rec, blocks=3 if level == "step" else 1)
    assert hits > 0
    assert set(stats["regions"]) == ({-1} if level == "step" else {1, 2, 3})
    assert stats["contexts"]["default"]["regions"] == stats["regions"]


@pytest.mark.parametrize("level", ["step", "block", "chunk"])
def test_threshold_zero_counts_no_hit(level):
    m = _dit()
    h = C.apply(m, C.CacheConfig(level=level, threshold=0.0, num_steps=STEPS, fn=1, bn=1,
                                 chunks=4, budget=4))
    rec = _flags_by_step(m, h, _inputs(SLOW)) if level != "chunk" else None
    with torch.no_grad():
        if level == "chunk":
            for x, t in _inputs(SLOW):
                m(x, t)
    stats = h.stats
    h.remove()
    assert stats["hits"] == 0 and stats["skipped"] == 0.0
    n_regions = 1 if level == "step" else 3
    assert stats["checks"] == STEPS * n_regions
    if rec is not None:
        _check_counts(stats, rec, blocks=3 if level == "step" else 1)
    else:  # budget = chunks: every chunk recomputed at every step
        assert stats["misses"] == STEPS * 3 * 4


def test_step_level_skipped_is_gated_block_computes():
    """skipped = hits x gated blocks / (checks x gated blocks); the gated blocks are those between
    the first fn and the last bn (depth 6, fn=2, bn=1: 3 blocks)."""
    m = _dit(depth=6)
    h = C.apply(m, C.CacheConfig(threshold=0.05, num_steps=STEPS, fn=2, bn=1))
    rec = _flags_by_step(m, h, _inputs(SLOW))
    stats = h.stats
    h.remove()
    hits = _check_counts(stats, rec, blocks=3)
    assert 0 < hits < STEPS and stats["skipped"] == hits / STEPS


def test_fresh_handle_has_zero_stats_no_division_by_zero():
    h = C.apply(_dit(), C.CacheConfig())
    s = h.stats
    h.remove()
    assert s == {"checks": 0, "hits": 0, "misses": 0, "skipped": 0.0, "regions": {},
                 "contexts": {}}


def test_reset_keeps_stats_reset_stats_zeroes_them():
    m = _dit()
    inputs = _inputs(SLOW)
    h = C.apply(m, C.CacheConfig(level="block", threshold=0.05, num_steps=STEPS, fn=1, bn=1))
    rec = _flags_by_step(m, h, inputs)
    first = h.stats
    h.reset()
    assert h.stats == first  # a new generation keeps the counters
    rec2 = _flags_by_step(m, h, inputs)
    _check_counts(h.stats, rec + rec2, blocks=1)
    h.reset_stats()
    zero = h.stats
    assert zero["checks"] == zero["hits"] == 0 and set(zero["regions"]) == {1, 2, 3}
    rec3 = _flags_by_step(m, h, inputs[:4])
    _check_counts(h.stats, rec3, blocks=1)
    last = h.stats
    h.remove()
    assert h.stats == last  # the counts at removal
    h.reset_stats()
    assert h.stats["checks"] == 0


def test_contexts_keyed_by_name_and_summed():
    m = _dit()
    cond, uncond = _inputs(SLOW, seed=1), _inputs([0.5] * STEPS, seed=2)
    h = C.apply(m, C.CacheConfig(threshold=0.05, num_steps=STEPS, fn=1, bn=1,
                                 alternate_contexts=("cond", "uncond")))
    rec = {"cond": [], "uncond": []}
    with torch.no_grad():
        for (xc, tc), (xu, tu) in zip(cond, uncond):
            m(xc, tc)
            rec["cond"].append({-1: int(h.regions("cond")[-1].reuse[0])})
            m(xu, tu)
            rec["uncond"].append({-1: int(h.regions("uncond")[-1].reuse[0])})
    stats = h.stats
    h.remove()
    hits = {}
    for name in ("cond", "uncond"):
        s = stats["contexts"][name]
        hits[name] = _check_counts(s, rec[name], blocks=3)
    assert hits["cond"] > 0 and hits["uncond"] == 0
    _check_counts(stats, rec["cond"] + rec["uncond"], blocks=3)


def test_cfg_batched_counts_one_decision_per_forward():
    m = _dit()
    inputs = _inputs(SLOW)
    h = C.apply(m, C.CacheConfig(threshold=0.05, num_steps=STEPS, fn=1, bn=1, cfg_batched=True))
    rec = _flags_by_step(m, h, inputs)
    stats = h.stats
    h.remove()
    assert _check_counts(stats, rec, blocks=3) > 0 and stats["checks"] == STEPS


@pytest.mark.parametrize("level", ["step", "block"])
def test_device_select_path_counts_like_eager(level, monkeypatch):
    """A capture without IF nodes (compute, select on the device) counts the same decisions."""
    m = _dit()
    inputs = _inputs(MIXED)
    cfg = C.CacheConfig(level=level, threshold=0.05, num_steps=STEPS, fn=1, bn=1)
    h = C.apply(m, cfg)
    rec = _flags_by_step(m, h, inputs)
    eager = h.stats
    h.remove()
    monkeypatch.setattr(G, "capturing", lambda: True)
    monkeypatch.setattr(G, "supported", lambda: (False, "test"))
    h = C.apply(m, cfg)
    _flags_by_step(m, h, inputs)
    monkeypatch.setattr(G, "capturing", lambda: False)
    sel = h.stats
    h.remove()
    assert sel == eager and _check_counts(sel, rec, blocks=3 if level == "step" else 1) > 0


def test_stats_refused_inside_a_capture(monkeypatch):
    m = _dit()
    h = C.apply(m, C.CacheConfig())
    with torch.no_grad():
        m(*_inputs(SLOW)[0])
    monkeypatch.setattr(G, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="outside the CUDA-graph capture"):
        h.stats
    monkeypatch.setattr(G, "capturing", lambda: False)
    assert h.stats["checks"] == 1
    h.remove()


# ---- chunk level ------------------------------------------------------------------------------
def test_chunk_level_counts_full_and_partial_steps():
    """forwards / full steps / reused chunks against the calls of the block's full forward and of
    forward_rows; a shape change runs (and counts) a full step."""
    m = _dit()
    gated = [m.blocks[i] for i in (1, 2, 3)]
    calls = {id(b): {"full": 0, "rows": 0} for b in gated}
    for b in gated:
        fwd, rows = b.forward, b.forward_rows

        def counted_fwd(*a, _f=fwd, _c=calls[id(b)], **k):
            _c["full"] += 1
            return _f(*a, **k)

        def counted_rows(*a, _f=rows, _c=calls[id(b)], **k):
            _c["rows"] += 1
            return _f(*a, **k)
        b.forward, b.forward_rows = counted_fwd, counted_rows
    chunks, budget = 4, 1
    h = C.apply(m, C.CacheConfig(level="chunk", chunks=chunks, budget=budget, warmup=2,
                                 num_steps=STEPS, last_steps=1, fn=1, bn=1))
    inputs = _inputs(SLOW) + _inputs(SLOW[:3], tokens=8)  # 10 steps, then a new shape
    with torch.no_grad():
        for x, t in inputs:
            m(x, t)
    stats = h.stats
    h.remove()
    for b in gated:
        del b.forward, b.forward_rows
    for i, b in zip((1, 2, 3), gated):
        e = stats["regions"][i]
        full, part = calls[id(b)]["full"], calls[id(b)]["rows"]
        # 10 steps: 2 warm-up + 1 last step full; the wrap restarts warm-up for the new shape
        assert (full, part) == (3 + 2, 7 + 1)
        assert (e["checks"], e["full"], e["partial"]) == (full + part, full, part)
        assert e["hits"] == part * (chunks - budget)
        assert e["misses"] == full * chunks + part * budget
        assert e["skipped"] == e["hits"] / ((full + part) * chunks)
        assert e["chunks"] == chunks and e["blocks"] == 1
    assert stats["checks"] == 3 * 13
    assert stats["skipped"] == pytest.approx(3 * 8 * 3 / (3 * 13 * 4), rel=1e-12)


def test_chunk_level_reset_stats():
    m = _dit()
    h = C.apply(m, C.CacheConfig(level="chunk", chunks=4, budget=2, num_steps=STEPS, fn=1, bn=1))
    with torch.no_grad():
        for x, t in _inputs(SLOW)[:5]:
            m(x, t)
    assert h.stats["checks"] == 15 and h.stats["hits"] == 3 * 4 * 2
    h.reset()
    assert h.stats["checks"] == 15
    h.reset_stats()
    assert h.stats["checks"] == 0 and h.stats["regions"][1]["full"] == 0
    with torch.no_grad():
        m(*_inputs(SLOW)[0])
    s = h.stats
    h.remove()
    assert s["checks"] == 3 and s["regions"][2]["full"] == 1 and s["hits"] == 0


# ---- a tiny diffusers Flux --------------------------------------------------------------------
def _flux():
    """test_cache's tiny Flux (the same seed and draws), without its latent shape."""
    from test_cache import _flux as flux
    m, _, cond = flux()
    return m, cond


@needs_diffusers
@pytest.mark.parametrize("threshold", [0.0, 0.5])
@pytest.mark.parametrize("level", ["step", "block"])
def test_flux_counts_equal_the_flags(level, threshold):
    m, cond = _flux()
    h = C.apply(m, C.CacheConfig(level=level, threshold=threshold, num_steps=6))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, generator=g)
    rec = []
    with torch.no_grad():
        for k in range(6):
            x = x + 0.002 * torch.randn(x.shape, generator=g)
            m(hidden_states=x, timestep=torch.tensor([1000.0 - 5 * k]), return_dict=False, **cond)
            rec.append({k: int(r.reuse[0]) for k, r in h.regions().items()})
    stats = h.stats
    h.remove()
    hits = _check_counts(stats, rec, blocks=3 if level == "step" else 1)  # 4 blocks, fn=1
    assert (hits > 0) == (threshold > 0)


# ---- GPU: graph replays are counted ----------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("level", ["step", "block"])
def test_graph_replays_are_counted(level):
    """Capture one cached forward (IF nodes), replay it over a sequence: the stats equal the
    eager run's over the same sequence (the device counters are captured with the check), and the
    replays make no host sync."""
    m = _dit("cuda", torch.bfloat16)
    inputs = _inputs(MIXED, device="cuda", dtype=torch.bfloat16)
    cfg = C.CacheConfig(level=level, threshold=0.05, num_steps=STEPS, fn=1, bn=1)
    h = C.apply(m, cfg)
    rec = _flags_by_step(m, h, inputs)
    eager = h.stats
    sx, st = torch.empty_like(inputs[0][0]), torch.empty_like(inputs[0][1])
    with torch.no_grad():
        sx.copy_(inputs[0][0])
        st.copy_(inputs[0][1])
        m(sx, st)  # warm-up (eager; warms the side streams)
        h.reset()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            m(sx, st)
    h.reset()
    h.reset_stats()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, t in inputs:
            sx.copy_(x)
            st.copy_(t)
            g.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graphed = h.stats
    h.remove()
    assert graphed == eager and _check_counts(graphed, rec, 3 if level == "step" else 1) > 0

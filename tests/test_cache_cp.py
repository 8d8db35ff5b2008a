"""Rank-consistent caching under context parallelism (pyops/cache/parallel.py, issue #16).

Each rank holds a token shard; the check all-reduces its sums so every rank takes the same
decision. On 2 and 4 gloo CPU processes (tests/_dist.py), reference backend:

* check level: on shards built so that the ranks' *local* decisions differ (asserted, so the
  test can fail), the all-reduced decisions are identical on every rank and equal the
  single-process decision on the unsharded tensor (both rules, CFG groups, uneven shards, a
  rank whose cache restarts alone); the sums all-reduce traces under torch.compile(fullgraph);
* model level: blocks that contain an all-reduce (a rank that skipped them while another
  computed would hang; run_ranks' timeout turns a hang into a failure), rank 0's tokens change a
  lot and rank 1's do not: every rank finishes with the same decisions, at step and block
  level, with an explicit group and with diffusers' context-parallel mesh picked up from
  ``model._parallel_config``; the same inputs without a group make the ranks disagree;
  a group of one rank is the single-process path bit for bit; level="chunk" is refused;
* in process: no group means the fused op alone, unchanged (no all-reduce, no CP buffers).
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

import pyops
from pyops.cache import parallel as P
from pyops.ops.block_similarity import block_similarity, new_state

from _dist import run_ranks

THR = 0.1
STEPS = 12
RESTART = 6  # step at which rank 0 alone reallocates its cache in the check-level run


def _feature_walk(seed: int, shape, mags):
    """Features x_t = x_{t-1} + mags[t] (per token) * noise: (steps, *shape)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) + 2.0
    out = []
    for m in mags:
        x = x + m.view(1, -1, 1) * torch.randn(shape, generator=g)
        out.append(x.clone())
    return out


def _check_fn(rank: int, ws: int):
    """Per config: local, all-reduced and single-process decisions (lists of int lists)."""
    world = dist.group.WORLD
    n_tok = 8 * ws + 3  # uneven shards (tensor_split): the sums still add up to the whole
    res = {}
    for rule, groups in (("last_computed", 1), ("accumulate", 1), ("last_computed", 2)):
        g = torch.Generator().manual_seed(7)
        # per step, per token: a big change on one random rank's tokens, small elsewhere
        owner = torch.randint(0, ws, (STEPS,), generator=g)
        bounds = torch.tensor_split(torch.arange(n_tok), ws)
        mags = []
        for t in range(STEPS):
            m = torch.full((n_tok,), 0.003)
            m[bounds[int(owner[t])]] = 0.4 if t % 3 else 0.05
            mags.append(m)
        xs = _feature_walk(11, (2 * groups, n_tok, 16), mags)
        kw = dict(threshold=THR, rule=rule, warmup=1, max_reuse=3, groups=groups,
                  all_groups=groups > 1, backend="reference")
        mine = bounds[rank]
        ref_l, st_l = torch.zeros_like(xs[0][:, mine]), new_state(groups)
        ref_g, st_g = torch.zeros_like(ref_l), new_state(groups)
        ref_s, st_s = torch.zeros_like(xs[0]), new_state(groups)
        sums, pair = P.new_buffers(groups, "cpu")
        loc, glob, sing, gm, sm = [], [], [], [], []
        for t, x in enumerate(xs):
            xl = x[:, mine].contiguous()
            fresh = t == RESTART and rank == 0
            if fresh:  # what CachedModel does on a new shape: fresh buffers on this rank only
                ref_g.zero_()
                st_g.zero_()
            if t == RESTART:  # the single-process twin restarts too (step 0: computed)
                st_s.zero_()
            r, _ = block_similarity(xl, ref_l, st_l, **kw)
            loc.append(r.tolist())
            r, m = P.block_similarity_cp(xl, ref_g, st_g, group=world, fresh=fresh, sums=sums,
                                         pair=pair, **kw)
            glob.append(r.tolist())
            gm.append(m.clone())
            r, m = block_similarity(x, ref_s, st_s, **kw)
            sing.append(r.tolist())
            sm.append(m.clone())
        res[(rule, groups)] = dict(local=loc, glob=glob, single=sing, gm=torch.stack(gm),
                                   sm=torch.stack(sm), state=st_g.clone())
    if ws != 2:
        return res
    # the sums' all-reduce traces into one graph (functional collective), and adds up
    f = torch.compile(lambda t: P.all_reduce_sum_(t * 1.0, world), fullgraph=True,
                      backend="aot_eager")
    res["compiled"] = f(torch.full((2, 3), float(rank + 1)))
    return res


def _both_fn(rank: int, ws: int):
    return {"check": _check_fn(rank, ws), "model": _model_fn(rank, ws)}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def ranks(request):
    """(world size, per-rank results of both parts): one set of processes per world size; a
    hang (ranks disagreeing around a collective) fails here, after run_ranks' timeout."""
    ws = request.param
    return ws, run_ranks(_both_fn, ws, timeout_s=180)


def test_decisions_identical_and_equal_to_single_process(ranks):
    ws, out = ranks
    out = [o["check"] for o in out]
    for key in out[0]:
        if key == "compiled":
            assert torch.equal(out[0][key], torch.full((2, 3), ws * (ws + 1) / 2))
            assert all(torch.equal(o[key], out[0][key]) for o in out)
            continue
        per = [o[key] for o in out]
        # the scenario has teeth: the ranks' local decisions differ at some step
        assert any(len({str(p["local"][t]) for p in per}) > 1 for t in range(STEPS)), key
        for p in per[1:]:  # all-reduced: identical on every rank, state included
            assert p["glob"] == per[0]["glob"], key
            assert torch.equal(p["gm"], per[0]["gm"]) and torch.equal(p["state"], per[0]["state"])
        assert per[0]["glob"] == per[0]["single"], key  # = the unsharded single-process check
        keep = [t for t in range(STEPS) if t != RESTART]  # rank 0's ref restarted from zeros
        torch.testing.assert_close(per[0]["gm"][keep], per[0]["sm"][keep], rtol=1e-5, atol=0)
        flat = [v for step in per[0]["glob"] for v in step]
        assert 0 < sum(flat) < len(flat), key  # some reuses, some computes
        assert not any(per[0]["glob"][RESTART]), key  # a restart on one rank: all compute


# ---- model level: blocks with a collective inside --------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int, seed: int, sync: bool):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g) / dim ** 0.5)
        self.sync, self.calls = sync, 0

    def forward(self, x):
        self.calls += 1
        y = torch.tanh(x @ self.w) * 0.3
        if self.sync:  # stands in for attention's all-to-all: every rank must join
            s = y.mean(dim=1, keepdim=True)
            dist.all_reduce(s)
            y = y + 1e-3 * s
        return x + y


class Net(nn.Module):
    def __init__(self, sync: bool, depth: int = 4, dim: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, 100 + i, sync) for i in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _inputs(rank: int, ws: int):
    """Rank 0's tokens change a lot for 4 steps, then barely; the other ranks' barely ever."""
    g = torch.Generator().manual_seed(3 + rank)
    x = torch.randn(1, 6, 16, generator=g)
    out = []
    for t in range(STEPS):
        d = 0.5 if (rank == 0 and 1 <= t <= 4) else 0.002
        x = x + d * torch.randn(x.shape, generator=g)
        out.append(x.clone())
    return out


def _drive(net, cfg, xs):
    h = pyops.cache_model(net, cfg, blocks=list(net.blocks),
                          specs=[pyops.cache.BlockSpec(("x",))] * len(net.blocks))
    flags, ys = [], []
    for x in xs:
        ys.append(h(x))
        flags.append({k: int(v.sum()) for k, v in h.reuse_flags().items()})
    stats, regions = h.stats, h.regions()
    sums_used = any(r.sums is not None for r in regions.values())
    h.remove()
    return dict(flags=flags, y=torch.stack(ys), calls=[b.calls for b in net.blocks],
                hits=stats["hits"], sums_used=sums_used)


def _model_fn(rank: int, ws: int):
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh
    xs = _inputs(rank, ws)
    singles = [dist.new_group([r]) for r in range(ws)]  # every rank creates every group
    mesh = init_device_mesh("cpu", (ws, 1), mesh_dim_names=("ring", "ulysses"))
    res = {}
    for level in ("step", "block"):
        cfg = dict(level=level, threshold=THR, num_steps=STEPS, backend="reference")
        res[level, "group"] = _drive(Net(True), pyops.CacheConfig(
            process_group=dist.group.WORLD, **cfg), xs)
        auto = Net(True)  # diffusers' context-parallel mesh, picked up with process_group=None
        pc = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=ws))
        pc.setup(rank, ws, torch.device("cpu"), mesh=mesh)
        auto._parallel_config = pc
        res[level, "auto"] = _drive(auto, pyops.CacheConfig(**cfg), xs)
        res[level, "local"] = _drive(Net(False), pyops.CacheConfig(**cfg), xs)  # no group
        res[level, "single"] = _drive(Net(False), pyops.CacheConfig(
            process_group=singles[rank], **cfg), xs)
    net = Net(True)
    try:
        pyops.cache_model(net, pyops.CacheConfig(level="chunk", process_group=mesh["ring"]),
                          blocks=list(net.blocks))
        res["chunk"] = None
    except ValueError as e:
        res["chunk"] = str(e)
    return res


def test_no_deadlock_when_one_rank_changes(ranks):
    ws, out = ranks
    out = [o["model"] for o in out]
    for level in ("step", "block"):
        for mode in ("group", "auto"):
            per = [o[level, mode] for o in out]
            assert per[0]["sums_used"]
            for p in per[1:]:
                assert p["flags"] == per[0]["flags"] and p["calls"] == per[0]["calls"], (level,
                                                                                          mode)
            assert per[0]["hits"] > 0, (level, mode)  # it did skip, together
            assert torch.equal(per[0]["y"], out[0][level, "group"]["y"])
        local = [o[level, "local"] for o in out]
        # without a group the ranks disagree: with collectives in the blocks this would hang
        assert any(p["calls"] != local[0]["calls"] for p in local[1:]), level
        for o in out:  # a group of one rank is the single-process path, bit for bit
            assert not o[level, "single"]["sums_used"]
            assert torch.equal(o[level, "single"]["y"], o[level, "local"]["y"])
            assert o[level, "single"]["flags"] == o[level, "local"]["flags"]
    assert all("level='chunk'" in o["chunk"] for o in out)


# ---- in process: no group ------------------------------------------------------------------
def test_no_group_is_the_fused_op_unchanged(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("all_reduce called without a process group")
    monkeypatch.setattr(dist, "all_reduce", boom)
    xs = _inputs(0, 2)
    got = _drive(Net(False), pyops.CacheConfig(threshold=THR, num_steps=STEPS,
                                               backend="reference"), xs)
    assert not got["sums_used"] and got["hits"] > 0
    g = torch.Generator().manual_seed(0)
    a, ref = torch.randn(4, 8, 16, generator=g), torch.randn(4, 8, 16, generator=g)
    outs = []
    for fn in (block_similarity, lambda *x, **k: P.block_similarity_cp(*x, group=None, **k)):
        r, s = ref.clone(), new_state(2)
        rr, m = fn(a, r, s, threshold=0.5, groups=2, backend="reference")
        outs.append((rr, m, r, s))
    for u, v in zip(*outs):
        assert torch.equal(u, v)


def test_bad_process_group_is_refused():
    net = Net(False)
    with pytest.raises(TypeError, match="process_group"):
        pyops.cache_model(net, pyops.CacheConfig(process_group="world"), blocks=list(net.blocks))

"""pyops.cache policies on the embedded DiT and tiny diffusers Flux / Wan transformers:
threshold 0 is bit-identical to the uncached model, decisions follow the host-side rule, reused
steps equal the cached-residual formula, CFG contexts are independent, the device-select path
(what a capture without IF nodes runs) equals the eager path; GPU: IF-node graphs equal eager,
no host sync inside a captured cached forward."""
import importlib.util

import pytest
import torch

from pyops import cache as C
from pyops import graphs as G
from pyops.models.dit import DiT, DiTConfig
from pyops.reference import block_similarity as R

from _util import HAS_CUDA

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers not installed")
STEPS = 10


def _dit(device="cpu", dtype=torch.float32):
    m = DiT.random(DiTConfig(hidden=64, depth=5, heads=4, in_channels=8), seed=0).eval()
    return m.to(device=device, dtype=dtype)


def _dit_inputs(steps=STEPS, device="cpu", dtype=torch.float32, drift=None, seed=0):
    """A slowly changing input sequence (what adjacent denoising steps look like)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 16, 8, generator=g)
    drift = drift or [0.02] * steps
    xs, x = [], x0
    for k in range(steps):
        x = x + drift[k] * torch.randn(x0.shape, generator=g)
        xs.append(x.to(device=device, dtype=dtype))
    ts = torch.linspace(0.5, 0.4995, steps)
    return [(x, t.expand(2).to(device)) for x, t in zip(xs, ts)]


def _run(model, inputs, handle=None, record=None):
    outs = []
    with torch.no_grad():
        for x, t in inputs:
            outs.append(model(x, t))
            if handle is not None and record is not None:
                record.append({k: (float(r.metric[0]), int(r.reuse[0]))
                               for k, r in handle.regions().items()})
    return outs


# ---- threshold 0: bit-identical --------------------------------------------------------------
@pytest.mark.parametrize("level", ["step", "block"])
def test_threshold_zero_bit_exact_dit(level):
    m = _dit()
    inputs = _dit_inputs()
    base = _run(m, inputs)
    h = C.apply(m, C.CacheConfig(level=level, threshold=0.0, num_steps=STEPS, fn=1, bn=1))
    got = _run(m, inputs)
    h.remove()
    for a, b in zip(got, base):
        assert torch.equal(a, b)
    assert torch.equal(_run(m, inputs)[-1], base[-1])  # removed cleanly


# ---- decisions rule for rule -----------------------------------------------------------------
@pytest.mark.parametrize("rule", ["last_computed", "accumulate"])
@pytest.mark.parametrize("level", ["step", "block"])
def test_decisions_follow_host_rule(rule, level):
    m = _dit()
    drift = [0.02, 0.002, 0.003, 0.002, 0.3, 0.002, 0.001, 0.002, 0.002, 0.002]
    inputs = _dit_inputs(drift=drift)
    kw = dict(threshold=0.05 if rule == "last_computed" else 0.08, warmup=2, max_reuse=2,
              num_steps=STEPS, last_steps=2)
    h = C.apply(m, C.CacheConfig(level=level, rule=rule, fn=1, bn=1, **kw))
    rec = []
    _run(m, inputs, h, rec)
    h.remove()
    keys = sorted(rec[0])
    n_reuse = 0
    for k in keys:
        ms = [r[k][0] for r in rec if k in r]
        got = [bool(r[k][1]) for r in rec if k in r]
        if level == "step":
            assert len(ms) == STEPS
        assert got == R.host_rule(ms, rule=R.RULES[rule], **kw), k
        n_reuse += sum(got)
    assert n_reuse > 0


def test_reused_step_equals_cached_residual_formula():
    m = _dit()
    inputs = _dit_inputs(steps=3)
    h = C.apply(m, C.CacheConfig(threshold=1e9, warmup=1, fn=1, bn=1))
    got = _run(m, inputs[:2])
    h.remove()
    # by hand: step 0 computed, step 1 reuses the residual of blocks 1..3 from step 0
    with torch.no_grad():
        def parts(x, t):
            from pyops.models.dit import timestep_embedding
            c = m.t_embedder(timestep_embedding(t, m.cfg.freq_dim).to(x.dtype))
            hs = [m.x_embedder(x)]
            for blk in m.blocks:
                hs.append(blk(hs[-1], c))
            return c, hs
        _, hs0 = parts(*inputs[0])
        c1, hs1 = parts(*inputs[1])
        res = hs0[4] - hs0[1]
        h4 = hs1[1] + res
        h5 = m.blocks[4](h4, c1)
        from pyops.models.dit import modulate
        shift, scale = m.adaLN_out(torch.nn.functional.silu(c1)).chunk(2, dim=-1)
        want = m.proj_out(modulate(m.norm_out(h5), shift, scale))
    assert torch.equal(got[1], want)


def test_cfg_contexts_independent():
    m = _dit()
    cond = _dit_inputs(seed=1, drift=[0.002] * STEPS)
    uncond = _dit_inputs(seed=2, drift=[0.5] * STEPS)
    cfg = dict(threshold=0.05, num_steps=STEPS, fn=1, bn=1)
    h = C.apply(m, C.CacheConfig(alternate_contexts=("cond", "uncond"), **cfg))
    with torch.no_grad():
        flags = {"cond": [], "uncond": []}
        for (xc, tc), (xu, tu) in zip(cond, uncond):
            m(xc, tc)
            flags["cond"].append(int(h.regions("cond")[-1].reuse[0]))
            m(xu, tu)
            flags["uncond"].append(int(h.regions("uncond")[-1].reuse[0]))
    h.remove()
    h = C.apply(m, C.CacheConfig(**cfg))
    alone = []
    with torch.no_grad():
        for x, t in cond:
            m(x, t)
            alone.append(int(h.regions()[-1].reuse[0]))
    h.remove()
    assert flags["cond"] == alone and sum(alone) > 0
    assert sum(flags["uncond"]) == 0


def test_cfg_batched_groups_and():
    m = _dit()
    inputs = _dit_inputs(drift=[0.002] * STEPS)
    # second half of the batch changes a lot: the AND keeps every step computed
    noisy = [(torch.cat([x[:1], x[1:] + 0.5 * torch.randn_like(x[1:])]), t) for x, t in inputs]
    h = C.apply(m, C.CacheConfig(threshold=0.05, num_steps=STEPS, cfg_batched=True))
    rec = []
    _run(m, noisy, h, rec)
    ms = [r for r in h.regions()[-1].metric.tolist()]
    h.remove()
    assert sum(r[-1][1] for r in rec) == 0 and len(ms) == 2


@pytest.mark.parametrize("level", ["step", "block"])
def test_device_select_path_equals_eager(level, monkeypatch):
    """The data flow a capture runs (compute always, select on the device) equals eager."""
    m = _dit()
    inputs = _dit_inputs(drift=[0.02, 0.002, 0.002, 0.3, 0.002, 0.002, 0.002, 0.002, 0.1, 0.01])
    cfg = C.CacheConfig(level=level, threshold=0.05, num_steps=STEPS, fn=1, bn=1)
    h = C.apply(m, cfg)
    rec_e = []
    eager = _run(m, inputs, h, rec_e)
    h.remove()
    monkeypatch.setattr(G, "capturing", lambda: True)
    monkeypatch.setattr(G, "supported", lambda: (False, "test"))
    h = C.apply(m, cfg)
    rec_s = []
    sel = _run(m, inputs, h, rec_s)
    h.remove()
    assert rec_e == rec_s and any(v[1] for r in rec_e for v in r.values())
    for a, b in zip(eager, sel):
        assert torch.equal(a, b)


def test_config_errors():
    m = _dit()
    with pytest.raises(ValueError, match="level"):
        C.apply(m, C.CacheConfig(level="nope"))
    with pytest.raises(ValueError, match="fn"):
        C.apply(m, C.CacheConfig(fn=0))
    with pytest.raises(ValueError, match="blocks"):
        C.apply(m, C.CacheConfig(fn=4, bn=4))
    with pytest.raises(TypeError, match="blocks"):
        C.apply(torch.nn.Linear(2, 2))


# ---- diffusers models ------------------------------------------------------------------------
def _flux():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                               attention_head_dim=16, num_attention_heads=2,
                               joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 4, 8)).eval()
    T, L = 6, 16
    cond = dict(encoder_hidden_states=torch.randn(1, T, 32), pooled_projections=torch.randn(1, 32),
                txt_ids=torch.zeros(T, 3), img_ids=torch.stack(
                    torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                   indexing="ij"), -1).reshape(L, 3))
    return m, (1, L, 8), cond


def _wan():
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                              in_channels=4, out_channels=4, text_dim=16, freq_dim=32,
                              ffn_dim=32, num_layers=4, rope_max_seq_len=32).eval()
    return m, (1, 4, 2, 8, 8), dict(encoder_hidden_states=torch.randn(1, 5, 16))


def _run_diffusers(m, shape, cond, steps=6, drift=0.002, handle=None, reused=None):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    outs = []
    with torch.no_grad():
        for k in range(steps):
            x = x + drift * torch.randn(shape, generator=g)
            t = torch.tensor([1000.0 - 5 * k])
            outs.append(m(hidden_states=x, timestep=t, return_dict=False, **cond)[0])
            if handle is not None:
                reused.append(sum(int(r.reuse[0]) for r in handle.regions().values()))
    return outs


@needs_diffusers
@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("level", ["step", "block"])
def test_diffusers_models(family, level):
    m, shape, cond = (_flux if family == "flux" else _wan)()
    base = _run_diffusers(m, shape, cond)
    h = C.apply(m, C.CacheConfig(level=level, threshold=0.0, num_steps=6))
    exact = _run_diffusers(m, shape, cond)
    h.remove()
    for a, b in zip(exact, base):
        assert torch.equal(a, b)
    h = C.apply(m, C.CacheConfig(level=level, threshold=0.5, num_steps=6))
    reused = []
    cached = _run_diffusers(m, shape, cond, handle=h, reused=reused)
    h.remove()
    assert sum(reused) > 0 and reused[0] == 0 and reused[-1] == 0
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(cached, base))
    assert err < 0.5
    assert torch.equal(cached[0], base[0]) and torch.equal(cached[-1], base[-1])


# ---- GPU: IF nodes -------------------------------------------------------------------------------
@pytest.mark.gpu
def test_graph_conditional_region_equals_eager():
    ok, why = G.supported()
    if not ok:
        pytest.fail(f"IF nodes unsupported on a GPU machine: {why}")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    x = torch.randn(256, 256, device="cuda")
    w = torch.randn(256, 256, device="cuda")
    out = torch.zeros(256, 256, device="cuda")

    def body():
        with G.conditional(flag, run_when="zero") as run:
            if run:
                out.copy_(torch.nn.functional.gelu(x @ w))
    body()  # eager warm-up: runs on the side stream too
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    for f in (0, 1, 0, 1, 1, 0):
        x.normal_()
        flag.fill_(f)
        before = out.clone()
        g.replay()
        torch.cuda.synchronize()
        want = before if f else torch.nn.functional.gelu(x @ w)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["step", "block"])
def test_graphed_cached_forward_equals_eager_without_sync(level):
    torch.manual_seed(0)
    m = _dit("cuda", torch.bfloat16)
    inputs = _dit_inputs(device="cuda", dtype=torch.bfloat16,
                         drift=[0.02, 0.002, 0.002, 0.3, 0.002, 0.002, 0.002, 0.002, 0.1, 0.01])
    cfg = C.CacheConfig(level=level, threshold=0.05, num_steps=STEPS, fn=1, bn=1)
    h = C.apply(m, cfg)
    eager = _run(m, inputs)
    h.reset()
    sx = torch.empty_like(inputs[0][0])
    st = torch.empty_like(inputs[0][1])
    with torch.no_grad():
        sx.copy_(inputs[0][0])
        st.copy_(inputs[0][1])
        m(sx, st)  # warm-up (eager; warms the side streams)
        h.reset()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            so = m(sx, st)
    h.reset()
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
    h.remove()
    for a, b in zip(got, eager):
        assert torch.equal(a, b)


# ---- benchmarks: CPU smoke runs ----------------------------------------------------------------
@needs_diffusers
def test_bench_quick_smoke(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    # bench_cache.py (the caching study) has its own smoke test: tests/test_bench_cache.py
    for script, extra in (("bench_block_similarity.py", ["--warmup-ms", "2", "--rep-ms", "10"]),):
        r = subprocess.run([sys.executable, str(root / "bench" / script), "--quick", "--device",
                            "cpu", "--out", str(tmp_path), *extra], cwd=root, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    bs = json.loads((tmp_path / "block_similarity.json").read_text())["records"]
    assert any(r["provider"] == "pyops reference" and r.get("ms") for r in bs)


# ---- chunk level (pyops DiT) -----------------------------------------------------------------
def test_chunk_level_full_budget_equals_uncached_and_picks_changed_chunks():
    m = _dit()
    inputs = _dit_inputs()
    base = _run(m, inputs)
    h = C.apply(m, C.CacheConfig(level="chunk", chunks=8, budget=8, num_steps=STEPS, fn=1, bn=1))
    got = _run(m, inputs)
    h.remove()
    for a, b in zip(got, base):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # only the tokens of chunk 5 (of 8, 2 tokens each) change: budget 1 recomputes chunk 5
    x, t = inputs[0]
    x2 = x.clone()
    x2[:, 10:12] += 1.0
    h = C.apply(m, C.CacheConfig(level="chunk", chunks=8, budget=1, num_steps=0, fn=1, bn=1))
    with torch.no_grad():
        m(x, t)
        out = m(x2, t)
    picked = {k: r.last_chunks.tolist() for k, r in h.regions().items()}
    h.remove()
    assert all(v == [5] for v in picked.values()) and len(picked) == 3
    with torch.no_grad():
        want = m(x2, t)
    err = float((out - want).abs().max() / want.abs().max())
    assert err < 0.5


@pytest.mark.parametrize("N,tokens", [
    (16, [10, 11]),                 # one chunk, as the chunk level picks it
    (13, [0, 5, 6, 12]),            # odd N, first and last rows
    (13, [7, 2, 2]),                # unsorted, a repeated row
    (9, list(range(9))),            # every row
])
def test_dit_block_forward_rows_equals_full_forward_rows(N, tokens):
    """DiTBlock.forward_rows (the chunk level's partial forward) == the full block forward on the
    selected rows, fp32; queries of the rows attend to every token's keys/values."""
    torch.manual_seed(N)
    m = DiT.random(DiTConfig(hidden=48, depth=1, heads=3, in_channels=8), seed=N).eval()
    blk = m.blocks[0]
    x = torch.randn(2, N, 48)
    x[:, :, 5] *= 20.0  # an outlier channel
    c = torch.randn(2, 48)
    tok = torch.tensor(tokens)
    with torch.no_grad():
        want = blk(x, c)[:, tok]
        got = blk.forward_rows(x, c, tok)
        # keys/values from all N tokens, not only the selected rows (what a subset forward does)
        if len(set(tokens)) < N:
            subset = blk(x[:, tok], c)
            assert float((got - subset).abs().max()) > 1e-2 * float(want.abs().max())
    assert got.shape == (2, len(tokens), 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        blk.forward_rows(x, c, tok.int())
    with pytest.raises(ValueError, match="x must be"):
        blk.forward_rows(x[0], c, tok)


def test_old_import_paths_are_the_op_modules():
    """pyops.cache keeps every name it had; the ops are the op modules' functions."""
    import pyops
    from pyops.ops import block_similarity as BS
    from pyops.ops import cache_apply as CA
    assert C.block_similarity is BS.block_similarity is pyops.block_similarity
    assert C.cache_apply is CA.cache_apply is pyops.cache_apply
    assert C.new_state is BS.new_state
    assert (C.RULES, C.WRITE_REF, C.STATE_SIZE) == (R.RULES, R.WRITE_REF, R.STATE_SIZE)
    assert C.apply is pyops.cache_model
    assert (C.CacheConfig, C.BlockSpec, C.CachedModel) == (
        pyops.CacheConfig, pyops.BlockSpec, pyops.CachedModel)
    assert C.LEVELS == ("step", "block", "chunk") and callable(C.find_blocks)


def test_chunk_level_regions_are_declared_dataclasses():
    """No attribute outside the dataclass fields: regions are slots-free dataclasses whose
    instance dict holds exactly the declared fields after cached forwards."""
    import dataclasses
    m = _dit()
    inputs = _dit_inputs(steps=4)
    for level in ("step", "block", "chunk"):
        h = C.apply(m, C.CacheConfig(level=level, threshold=0.05, chunks=8, budget=2,
                                     num_steps=4, fn=1, bn=1))
        _run(m, inputs)
        regions = list(h.regions().values())
        h.remove()
        assert regions
        for r in regions:
            assert set(vars(r)) == {f.name for f in dataclasses.fields(r)}


def test_chunk_level_errors():
    with pytest.raises(ValueError, match="budget"):
        C.apply(_dit(), C.CacheConfig(level="chunk", chunks=4, budget=5))
    m, _, _ = _wan() if importlib.util.find_spec("diffusers") else (None, None, None)
    if m is not None:
        with pytest.raises(TypeError, match="chunk"):
            C.apply(m, C.CacheConfig(level="chunk"))


def test_graphs_conditional_cpu_host_branch():
    for v, want in ((0, True), (3, False)):
        flag = torch.tensor([v], dtype=torch.int32)
        with G.conditional(flag, run_when="zero") as run:
            assert run is want
        with G.conditional(flag, run_when="nonzero") as run:
            assert run is (not want)
    assert not G.capturing()
    with pytest.raises(ValueError, match="int32"):
        G.begin(torch.zeros(1))
    with pytest.raises(ValueError, match="run_when"):
        G.begin(torch.zeros(1, dtype=torch.int32), run_when="maybe")


# ---- the handle, autograd, applying twice ------------------------------------------------------
_REUSING = dict(threshold=0.05, num_steps=STEPS, last_steps=1, fn=1, bn=1)
_SLOW_DRIFT = [0.02] + [0.002] * (STEPS - 1)


def _reused(h):
    return sum(int(r.reuse[0]) for r in h.regions().values() if r.reuse is not None)


class _Pipe:
    """A stand-in for a diffusers pipeline: ``pipe(prompt, num_inference_steps=n)`` runs n flow
    Euler steps through whatever module ``pipe.transformer`` holds and returns ``.images``."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __call__(self, prompt, num_inference_steps):
        import types
        x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(len(prompt)))
        ts = torch.linspace(1.0, 0.0, num_inference_steps + 1)
        with torch.no_grad():
            for t0, t1 in zip(ts[:-1], ts[1:]):
                x = x + (t1 - t0) * self.transformer(x, t0.expand(2))
        return types.SimpleNamespace(images=[x])


def test_readme_caching_snippet_runs_as_written(capsys):
    """The README's caching snippet, executed as written on a stand-in pipeline over a small DiT:
    the pipeline's calls go through the cache (one check per step), the printed share is
    ``stats["skipped"]``, the comment names the defaults, and ``remove()`` restores the model."""
    import re
    from pathlib import Path
    import pyops
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippet = next(b for b in blocks if "pyops.cache_model(" in b)
    defaults = C.CacheConfig()
    assert f"{defaults.level} level, threshold {defaults.threshold}" in snippet
    pipe = _Pipe(_dit())
    want = pipe("a cat", num_inference_steps=28).images[0]  # uncached
    capsys.readouterr()
    ns = {"pyops": pyops, "pipe": pipe, "prompt": "a cat"}
    exec(compile(snippet, "README.md", "exec"), ns)
    printed = float(capsys.readouterr().out)
    stats = ns["cached"].stats  # after remove(): the counts at removal
    assert stats["checks"] == 28 and printed == stats["skipped"]
    assert ns["image"].shape == want.shape
    assert torch.equal(pipe("a cat", num_inference_steps=28).images[0], want)  # uncached again


@pytest.mark.parametrize("level", ["step", "block", "chunk"])
def test_handle_is_callable_like_the_model_and_shares_its_cache(level):
    m = _dit()
    inputs = _dit_inputs(drift=_SLOW_DRIFT)
    cfg = dict(_REUSING, level=level, chunks=4, budget=1)
    h = C.apply(m, C.CacheConfig(**cfg))
    via_model, n_reuse = [], 0
    with torch.no_grad():
        for x, t in inputs:
            via_model.append(m(x, t))
            n_reuse += _reused(h) if level != "chunk" else 0
    h.remove()
    assert n_reuse > 0 or level == "chunk"
    h = C.apply(m, C.CacheConfig(**cfg))
    got = []
    for k, (x, t) in enumerate(inputs):  # grad enabled, params require grad: the handle copes
        got.append(h(x, t) if k % 3 else h(x=x, t=t))  # positional and keyword
    h.remove()
    for a, b in zip(got, via_model):
        assert not a.requires_grad and torch.equal(a, b)
    # handle and model calls interleaved share one cache state
    h = C.apply(m, C.CacheConfig(**cfg))
    mixed = []
    for k, (x, t) in enumerate(inputs):
        if k % 2:
            with torch.no_grad():
                mixed.append(m(x, t))
        else:
            mixed.append(h(x, t))
    h.remove()
    for a, b in zip(mixed, via_model):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="removed"):
        h(*inputs[0])


@needs_diffusers
@pytest.mark.parametrize("level", ["step", "block"])
def test_handle_is_callable_like_the_model_flux(level):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    m, shape, cond = _flux()
    cfg = C.CacheConfig(level=level, threshold=0.5, num_steps=6)
    h = C.apply(m, cfg)
    reused = []
    want = _run_diffusers(m, shape, cond, handle=h, reused=reused)  # model calls, no_grad
    h.remove()
    assert sum(reused) > 0
    h = C.apply(m, cfg)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    for k in range(6):  # same sequence as _run_diffusers, through the handle, grad enabled
        x = x + 0.002 * torch.randn(shape, generator=g)
        t = torch.tensor([1000.0 - 5 * k])
        if k % 2:
            out = h(hidden_states=x, timestep=t, return_dict=False, **cond)
            assert isinstance(out, tuple)
            out = out[0]
        else:
            res = h(x, timestep=t, **cond)
            assert isinstance(res, Transformer2DModelOutput)
            out = res.sample
        assert not out.requires_grad and torch.equal(out, want[k])
    h.remove()


@pytest.mark.parametrize("level", ["step", "block", "chunk"])
def test_grad_enabled_model_call_raises_clear_error(level):
    m = _dit()  # parameters require grad, as a freshly loaded model's do
    inputs = _dit_inputs(drift=_SLOW_DRIFT)
    cfg = C.CacheConfig(level=level, **_REUSING, alternate_contexts=("cond", "uncond"))
    h = C.apply(m, cfg)
    with pytest.raises(RuntimeError, match=r"torch\.no_grad\(\).*torch\.inference_mode\(\)"):
        m(*inputs[0])
    assert h._calls == 0 and not h._contexts  # refused before any state changed
    # the input requires grad, the parameters do not: refused too (model and handle)
    m.requires_grad_(False)
    xg = inputs[0][0].clone().requires_grad_(True)
    for call in (m, h):
        with pytest.raises(RuntimeError, match=r"positional argument 0 requires grad"):
            call(xg, inputs[0][1])
    with pytest.raises(RuntimeError, match=r"argument 'x' requires grad"):
        h(x=xg, t=inputs[0][1])
    # a block that touches the cache, called directly with grad: refused as well
    m.requires_grad_(True)
    c = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"torch\.no_grad\(\)"):
        m.blocks[1](torch.randn(2, 16, 64), c)
    assert not h._contexts
    # nothing requires grad: grad mode does not matter, the forward runs cached
    m.requires_grad_(False)
    got = [m(x, t) for x, t in inputs]
    m.requires_grad_(True)
    h.remove()
    h = C.apply(m, cfg)
    want = _run(m, inputs)
    h.remove()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("level", ["step", "block", "chunk"])
def test_inference_mode_and_no_grad_calls_mix(level):
    """Cache buffers made under inference_mode must accept in-place updates under no_grad (and
    the other way round), and reset() must work outside inference mode."""
    m = _dit()
    inputs = _dit_inputs(drift=_SLOW_DRIFT)
    cfg = C.CacheConfig(level=level, chunks=4, budget=1, **_REUSING)
    h = C.apply(m, cfg)
    want = _run(m, inputs)
    h.remove()
    h = C.apply(m, cfg)
    got = []
    for k, (x, t) in enumerate(inputs):
        with (torch.inference_mode() if k % 2 == 0 else torch.no_grad()):
            got.append(m(x, t).clone())
    h.reset()
    with torch.inference_mode():
        again = m(*inputs[0])
    h.remove()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(again, want[0])


def test_cache_model_twice_refused_then_remove_restores_exactly():
    m = _dit()
    inputs = _dit_inputs(drift=_SLOW_DRIFT)
    base = _run(m, inputs)  # uncached
    before = ([sorted(vars(b)) for b in m.modules()], len(m._forward_pre_hooks),
              len(m._forward_hooks), {k: v.clone() for k, v in m.state_dict().items()})
    h = C.apply(m, C.CacheConfig(**_REUSING))
    with pytest.raises(ValueError, match=r"already cached.*\.remove\(\)"):
        C.apply(m, C.CacheConfig(level="block"))
    with pytest.raises(ValueError, match=r"already cached"):  # a subset of its blocks too
        C.apply(m, C.CacheConfig(fn=1), blocks=list(m.blocks)[1:])
    first, n_reuse = [], 0
    with torch.no_grad():
        for x, t in inputs:
            first.append(m(x, t))
            n_reuse += _reused(h)
    assert n_reuse > 0 and not all(torch.equal(a, b) for a, b in zip(first, base))
    h.remove()
    h.remove()  # idempotent
    after = ([sorted(vars(b)) for b in m.modules()], len(m._forward_pre_hooks),
             len(m._forward_hooks), m.state_dict())
    assert after[:3] == before[:3]
    assert all(torch.equal(after[3][k], v) for k, v in before[3].items())
    for a, b in zip(_run(m, inputs), base):  # exactly the uncached model
        assert torch.equal(a, b)
    h2 = C.apply(m, C.CacheConfig(**_REUSING))  # applying again after remove() works
    for a, b in zip(_run(m, inputs), first):  # fresh state: the same cached outputs
        assert torch.equal(a, b)
    h2.remove()
    for a, b in zip(_run(m, inputs), base):
        assert torch.equal(a, b)


def test_remove_keeps_a_forward_patched_before_caching():
    m = _dit()
    x, t = _dit_inputs(steps=1)[0]
    calls = []
    orig = m.blocks[2].forward

    def patched(*a, **k):
        calls.append(1)
        return orig(*a, **k)
    m.blocks[2].forward = patched
    h = C.apply(m, C.CacheConfig(threshold=0.0))
    _run(m, [(x, t)])
    h.remove()
    assert m.blocks[2].forward is patched and len(calls) == 1
    _run(m, [(x, t)])
    assert len(calls) == 2


class _Flaky(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.fail = False

    def forward(self, x):
        if self.fail:
            raise ValueError("flaky block")
        return x + 0.1 * torch.tanh(self.lin(x))


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(_Flaky() for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("level", ["step", "block"])
def test_exception_inside_a_region_closes_it(level):
    """A block body that raises inside an open region closes it (nesting depth, side stream) and
    the next forward recomputes instead of reusing a residual it never stored."""
    m = _Stack().eval()
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        want = m(x + 2.0)
    # warm-up 2: the second forward computes (and raises in block 2); later ones would reuse
    h = C.apply(m, C.CacheConfig(level=level, threshold=1e9, warmup=2, fn=1, bn=1),
                blocks=list(m.blocks))
    with torch.no_grad():
        m(x)  # fills the cache
        m.blocks[2].fail = True
        with pytest.raises(ValueError, match="flaky"):
            m(x + 1.0)
        m.blocks[2].fail = False
        assert G._DEPTH[0] == 0
        got = m(x + 2.0)
    flags = {k: int(v[0]) for k, v in h.reuse_flags().items()}
    h.remove()
    if level == "step":  # the whole middle recomputes
        assert flags == {-1: 0} and torch.equal(got, want)
    else:  # block 2 recomputes; block 1 stored its residual at the failed step and reuses it
        assert flags == {1: 1, 2: 0}


def test_state_follows_the_model_to_another_device():
    """A region whose saved state lives on another device than the features (the model was
    moved after caching) starts afresh on the features' device instead of failing; simulated on
    CPU by moving the saved state to the meta device."""
    m = _dit()
    inputs = _dit_inputs(drift=[0.002] * STEPS)
    h = C.apply(m, C.CacheConfig(threshold=0.05, num_steps=STEPS, fn=1, bn=1))
    with torch.no_grad():
        m(*inputs[0])
        for r in h.regions().values():
            r.ref, r.state = r.ref.to("meta"), r.state.to("meta")
        y = m(*inputs[1])  # fresh state on the CPU: computed (warm-up), not reused
    assert all(r.ref.device.type == "cpu" and r.state.device.type == "cpu"
               for r in h.regions().values())
    h.remove()
    with torch.no_grad():
        assert torch.equal(y, m(*inputs[1]))

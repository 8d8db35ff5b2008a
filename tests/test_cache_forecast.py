"""pyops.cache's first-order forecast (``CacheConfig.forecast=1``, TaylorSeer's idea, arXiv
2503.06923): a reused region adds ``r1 + (k − k1)/(k1 − k0)·(r1 − r0)`` instead of ``r1``.

Checked against a hand computation from the regions' inputs and outputs recorded with hooks
(fp64 expectation, fp32 model): step and block levels, cfg_batched, the embedded DiT and the
digits-trained diffusers Flux (two hidden streams); the fallback to order 0 while one residual
is stored; the history restarting at a new generation (reset, wrap at num_steps, new shape);
forecast=0 equal to the default config; the data flow of a capture (device select without IF
nodes; IF nodes emulated on the CPU with every host read refused) equal to eager; validation.
On the trained model: same decisions as order 0 and the rel L1 against uncached at the
defaults. GPU: a captured forward replays like eager, bit for bit, without a host sync."""
import importlib.util

import pytest
import torch

from pyops import cache as C
from pyops import graphs as G
from pyops.models.dit import DiT, DiTConfig

STEPS = 10
# every check passes (threshold 1e9): decisions come from warm-up, max_reuse and last_steps
FORCED = [dict(threshold=1e9, warmup=1, max_reuse=2),   # C R R C R R C R R C
          dict(threshold=1e9, warmup=2, max_reuse=3)]   # C C R R R C R R R C
DRIFT = [0.02, 0.002, 0.003, 0.002, 0.3, 0.002, 0.001, 0.002, 0.002, 0.002]


def _dit(device="cpu", dtype=torch.float32):
    m = DiT.random(DiTConfig(hidden=64, depth=5, heads=4, in_channels=8), seed=0).eval()
    return m.to(device=device, dtype=dtype)


def _inputs(steps=STEPS, drift=None, seed=0, tokens=16, batch=2, device="cpu",
            dtype=torch.float32):
    """A slowly changing input sequence with an outlier channel (adjacent denoising steps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, 8, generator=g)
    x[..., 3] *= 10.0
    drift = drift or [0.01] * steps
    out = []
    for k in range(steps):
        x = x + drift[k] * torch.randn(x.shape, generator=g)
        out.append((x.to(device=device, dtype=dtype),
                    torch.full((batch,), 0.5 - 5e-5 * k, device=device)))
    return out


def _run(m, inputs):
    with torch.no_grad():
        return [m(x, t) for x, t in inputs]


def _run_coefs(m, h, inputs):
    """Outputs and, per forward, every region's coefficient (a host read after each forward)."""
    outs, coefs = [], []
    with torch.no_grad():
        for x, t in inputs:
            outs.append(m(x, t))
            coefs += [float(c) for r in h.regions().values() for c in r.coef.tolist()]
    return outs, coefs


class _Recorder:
    """Hooks on the first and last block of a gated region: the region's input streams and
    output streams per forward (clones), and the region's reuse flag after the forward."""

    def __init__(self, first, last, spec, handle, key):
        self.ins, self.outs, self.reuse = [], [], []
        self.spec, self.handle, self.key = spec, handle, key
        self.hooks = [
            first.register_forward_pre_hook(self._pre, with_kwargs=True),
            last.register_forward_hook(self._post)]

    def _pre(self, mod, args, kwargs):
        self.ins.append([s.clone() for s in self.spec.streams_in(args, kwargs)])

    def _post(self, mod, args, out):
        self.outs.append([s.clone() for s in self.spec.streams_out(out)])

    def step(self):
        self.reuse.append(int(self.handle.regions()[self.key].reuse[0]))

    def remove(self):
        for h in self.hooks:
            h.remove()


def _check_formula(rec, steps_per_gen=None):
    """Replay the forecast rule by hand over the recorded forwards: computed steps store
    ``r = out − in``; a reused step must output ``in + r1 + (k − k1)/(k1 − k0)·(r1 − r0)``
    (fp64 here) once two residuals of the generation exist, else ``in + r1`` exactly. Returns
    the coefficients used (0 for the fallback)."""
    hist, coefs = [], []
    for n, (ins, outs, reuse) in enumerate(zip(rec.ins, rec.outs, rec.reuse)):
        k = n % steps_per_gen if steps_per_gen else n
        if k == 0:
            hist = []
        if not reuse:
            hist = (hist + [(k, [o - i for o, i in zip(outs, ins)])])[-2:]
            continue
        assert hist, "a reuse before any computed step"
        k1, r1 = hist[-1]
        if len(hist) == 1:
            for o, i, a in zip(outs, ins, r1):
                assert torch.equal(o, i + a), f"step {k}: order-0 fallback"
            coefs.append(0.0)
            continue
        k0, r0 = hist[0]
        c = (k - k1) / (k1 - k0)
        for o, i, a, b in zip(outs, ins, r1, r0):
            want = i.double() + a.double() + c * (a.double() - b.double())
            torch.testing.assert_close(o.double(), want, rtol=1e-6, atol=1e-5,
                                       msg=f"step {k}: forecast with coef {c}")
            # the forecast must be told apart from plain reuse (the test cannot pass at order 0)
            gap = float((o.double() - (i + a).double()).abs().max())
            assert gap > 1e-3 * c * float((a - b).abs().max()) and gap > 1e-4, (k, c, gap)
        coefs.append(c)
    return coefs


def _step_recorder(m, h):
    spec = C.BlockSpec(("x",))
    start, stop = h.mid
    return _Recorder(m.blocks[start], m.blocks[stop - 1], spec, h, -1)


# ---- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [2, -1, True, 1.0, "1", None])
def test_forecast_validation(bad):
    with pytest.raises(ValueError, match="forecast"):
        C.apply(_dit(), C.CacheConfig(forecast=bad))


def test_forecast_chunk_level_refused():
    with pytest.raises(ValueError, match=r"forecast=1.*chunk"):
        C.apply(_dit(), C.CacheConfig(level="chunk", forecast=1))
    h = C.apply(_dit(), C.CacheConfig(level="chunk", forecast=0))  # order 0 is fine
    h.remove()
    assert C.CacheConfig().forecast == 0


# ---- order 0: unchanged ------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["step", "block"])
def test_forecast_zero_equals_default_config(level):
    """forecast=0 is the default and today's data flow: the same outputs bit for bit as a config
    that does not name it, and no forecast state allocated."""
    m = _dit()
    inputs = _inputs(drift=DRIFT)
    cfg = dict(level=level, threshold=0.05, num_steps=STEPS, fn=1, bn=1)
    h = C.apply(m, C.CacheConfig(**cfg))
    want = _run(m, inputs)
    reused = h.stats["hits"]
    h.remove()
    h = C.apply(m, C.CacheConfig(forecast=0, **cfg))
    got = _run(m, inputs)
    regions = list(h.regions().values())
    h.remove()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert all(not r.residual_prev and r.history is None and r.clock is None and r.coef is None
               for r in regions)
    assert reused > 0 and regions


# ---- order 1 against the hand computation ----------------------------------------------------
@pytest.mark.parametrize("kw", FORCED + [dict(threshold=0.05, warmup=1, max_reuse=-1)])
def test_step_level_forecast_formula(kw):
    m = _dit()
    inputs = _inputs(drift=DRIFT if kw["threshold"] < 1 else None)
    h = C.apply(m, C.CacheConfig(forecast=1, num_steps=STEPS, last_steps=1, fn=1, bn=1, **kw))
    rec = _step_recorder(m, h)
    with torch.no_grad():
        for x, t in inputs:
            m(x, t)
            rec.step()
    rec.remove()
    coef = h.regions()[-1].coef
    h.remove()
    coefs = _check_formula(rec)
    assert len(rec.ins) == len(rec.outs) == STEPS
    assert any(c != 0 for c in coefs), rec.reuse  # a real forecast happened
    if kw["threshold"] > 1:  # forced patterns: the coefficients are known in advance
        want = {1: [0.0, 0.0, 1 / 3, 2 / 3, 1 / 3, 2 / 3],
                2: [1.0, 2.0, 3.0, 1 / 4, 2 / 4, 3 / 4]}[kw["warmup"]]
        assert coefs == pytest.approx(want)
    assert coef.shape == (1,) and coef.dtype == torch.float32


def test_fallback_to_order_zero_with_one_residual():
    """Only step 0 computed (no warm-up beyond it, no cap): every reuse has one residual, so
    forecast=1 equals forecast=0 bit for bit; the coefficient stays 0."""
    m = _dit()
    inputs = _inputs()
    outs, coefs = {}, []
    for fc in (0, 1):
        h = C.apply(m, C.CacheConfig(forecast=fc, threshold=1e9, warmup=1, fn=1, bn=1))
        with torch.no_grad():
            outs[fc] = []
            for x, t in inputs:
                outs[fc].append(m(x, t))
                if fc:
                    coefs.append(float(h.regions()[-1].coef[0]))
        assert sum(int(r.reuse[0]) for r in h.regions().values()) == 1
        h.remove()
    for a, b in zip(outs[1], outs[0]):
        assert torch.equal(a, b)
    assert coefs == [0.0] * STEPS
    assert not torch.equal(outs[0][1], outs[0][2])  # the inputs move; reuses add the residual


@pytest.mark.parametrize("kw", FORCED + [dict(threshold=0.05, warmup=1, max_reuse=-1)])
def test_block_level_forecast_formula(kw):
    m = _dit()
    inputs = _inputs(drift=DRIFT if kw["threshold"] < 1 else None)
    h = C.apply(m, C.CacheConfig(level="block", forecast=1, num_steps=STEPS, last_steps=1,
                                 fn=1, bn=1, **kw))
    spec = C.BlockSpec(("x",))
    recs = {i: _Recorder(m.blocks[i], m.blocks[i], spec, h, i) for i in (1, 2, 3)}
    with torch.no_grad():
        for x, t in inputs:
            m(x, t)
            for r in recs.values():
                r.step()
    for r in recs.values():
        r.remove()
    nonzero = 0
    for i, r in recs.items():
        coefs = _check_formula(r)
        nonzero += sum(c != 0 for c in coefs)
        assert len(h.regions()[i].residual_prev) == 1
    h.remove()
    assert nonzero > 0


def test_cfg_batched_forecast_formula():
    """Two CFG halves in one batch: one decision (AND), one coefficient per group, the same
    formula for every row; the second half drifts a little more than the first."""
    m = _dit()
    g = torch.Generator().manual_seed(5)
    inputs = [(torch.cat([x[:1], x[1:] + 0.001 * k * torch.randn(x[1:].shape, generator=g)]), t)
              for k, (x, t) in enumerate(_inputs())]
    h = C.apply(m, C.CacheConfig(forecast=1, cfg_batched=True, num_steps=STEPS, fn=1, bn=1,
                                 **FORCED[1]))
    rec = _step_recorder(m, h)
    with torch.no_grad():
        for x, t in inputs:
            m(x, t)
            rec.step()
    rec.remove()
    r = h.regions()[-1]
    assert r.coef.shape == (2,) and r.history.shape == (2, 3)
    h.remove()
    assert sum(c != 0 for c in _check_formula(rec)) > 0


# ---- a new generation restarts the history -----------------------------------------------------
@pytest.mark.parametrize("level", ["step", "block"])
def test_reset_and_wrap_restart_the_history(level):
    """After reset() mid-generation, and after the wrap at num_steps, the outputs equal a fresh
    handle's: the first computed step of a generation drops the previous generation's
    residuals (else a reuse at step 1 or 2 would extrapolate from them)."""
    m = _dit()
    inputs = _inputs()
    cfg = C.CacheConfig(level=level, forecast=1, num_steps=STEPS, fn=1, bn=1, last_steps=1,
                        **FORCED[0])
    h = C.apply(m, cfg)
    fresh = _run(m, inputs)
    wrapped = _run(m, inputs)  # second generation: the counter wrapped at num_steps
    _run(m, inputs[:5])
    h.reset()
    again = _run(m, inputs)
    h.remove()
    for a, b, c in zip(fresh, wrapped, again):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("level", ["step", "block"])
def test_new_shape_refills_and_restarts(level):
    """A forward at a new shape refills the cache (step 0 again): the outputs at that shape equal
    a fresh handle's on the same sequence."""
    m = _dit()
    a = _inputs(tokens=16)
    b = _inputs(tokens=12, seed=3)
    cfg = C.CacheConfig(level=level, forecast=1, fn=1, bn=1, **FORCED[0])
    h = C.apply(m, cfg)
    _run(m, a[:7])
    got = _run(m, b)
    h.remove()
    h = C.apply(m, cfg)
    want = _run(m, b)
    h.remove()
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.parametrize("level", ["step", "block"])
def test_inference_mode_and_no_grad_mix(level):
    """The forecast state (second residual, history, clock, coefficient) is made outside
    inference mode: forwards alternating torch.inference_mode() and torch.no_grad() update it in
    place and give the outputs of no_grad forwards."""
    m = _dit()
    inputs = _inputs()
    cfg = C.CacheConfig(level=level, forecast=1, num_steps=STEPS, fn=1, bn=1, **FORCED[0])
    h = C.apply(m, cfg)
    want = _run(m, inputs)
    h.remove()
    h = C.apply(m, cfg)
    got = []
    for k, (x, t) in enumerate(inputs):
        with (torch.inference_mode() if k % 2 == 0 else torch.no_grad()):
            got.append(m(x, t).clone())
    h.remove()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("level", ["step", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_equals_reference(level, dtype):
    """The check and the apply through the Triton kernels (the interpreter on a CPU): the same
    outputs as the reference backend, bit for bit, in fp32 and bf16 (a bf16 stream plus the
    fp32 forecast residual: cache_apply's mixed-dtype path, one rounding)."""
    pytest.importorskip("triton")
    m = _dit(dtype=dtype)
    inputs = _inputs(dtype=dtype)
    outs = {}
    for backend in ("reference", "triton"):
        h = C.apply(m, C.CacheConfig(level=level, forecast=1, num_steps=STEPS, fn=1, bn=1,
                                     backend=backend, **FORCED[1]))
        outs[backend], coefs = _run_coefs(m, h, inputs)
        h.remove()
        assert any(c != 0 for c in coefs)
    for a, b in zip(outs["triton"], outs["reference"]):
        assert torch.equal(a, b)


# ---- the data flow of a capture ----------------------------------------------------------------
class _IfNodes:
    """pyops.graphs as a capture with IF nodes, each replayed at once. At capture time a body
    always runs (``run`` is True); at replay it runs only when its flag says so. Emulated: the
    body runs, and when the flag (read as the device would at replay) says "skip", every cache
    buffer it may write (each region's residuals and history) is restored afterwards. A host
    read of any tensor outside that flag read raises, as it would break a real capture."""
    READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, handle):
        self.mp, self.handle = pytest.MonkeyPatch(), handle
        self.orig = {n: getattr(torch.Tensor, n) for n in self.READS}
        self.open = False

    def _guard(self, name):
        orig = self.orig[name]

        def read(t, *a, **k):
            if not self.open:
                raise AssertionError(f"host read Tensor.{name} inside the emulated capture")
            return orig(t, *a, **k)
        return read

    def _begin(self, flag, index=0, *, run_when="zero"):
        self.open = True
        try:
            v = self.orig["item"](flag.reshape(-1)[index]) != 0
        finally:
            self.open = False
        run = (not v) if run_when == "zero" else v
        saved = None
        if not run:  # replay would skip the body: undo what it writes
            saved = [(t, t.clone()) for regs in self.handle._contexts.values()
                     for r in regs.values()
                     for t in r.residual + r.residual_prev + [r.history] if t is not None]
        return True, saved

    def _end(self, saved):
        for t, c in saved or ():
            t.copy_(c)

    def __enter__(self):
        self.mp.setattr(G, "capturing", lambda: True)
        self.mp.setattr(G, "supported", lambda: (True, "emulated"))
        self.mp.setattr(G, "begin", self._begin)
        self.mp.setattr(G, "end", self._end)
        for n in self.READS:
            self.mp.setattr(torch.Tensor, n, self._guard(n))
        return self

    def __exit__(self, *exc):
        self.mp.undo()


@pytest.mark.parametrize("level", ["step", "block"])
@pytest.mark.parametrize("how", ["select", "if"])
def test_capture_data_flow_equals_eager(level, how, monkeypatch):
    """What a capture runs equals eager, bit for bit: "select" (no IF nodes: every body runs,
    the cache and the history are updated by a device select) and "if" (IF nodes emulated:
    bodies by the flag, no host read). Half the sequence runs eagerly first (the eager path
    swaps the two residual buffers), the rest 'captured' (it copies from then on)."""
    m = _dit()
    inputs = _inputs(drift=DRIFT)
    kw = dict(threshold=0.05, warmup=1, max_reuse=3)
    cfg = C.CacheConfig(level=level, forecast=1, num_steps=STEPS, fn=1, bn=1, **kw)
    h = C.apply(m, cfg)
    eager, coefs = _run_coefs(m, h, inputs)
    h.remove()
    h = C.apply(m, cfg)
    got = _run(m, inputs[:4])
    assert not any(r.fixed for r in h.regions().values())
    if how == "select":
        monkeypatch.setattr(G, "capturing", lambda: True)
        monkeypatch.setattr(G, "supported", lambda: (False, "test"))
        got += _run(m, inputs[4:])
        monkeypatch.undo()
    else:
        with _IfNodes(h):
            got += _run(m, inputs[4:])
    assert all(r.fixed for r in h.regions().values())

    def addresses():  # a graph holds these: once captured, a region never swaps its buffers
        return [t.data_ptr() for r in h.regions().values() for t in r.residual + r.residual_prev]
    captured = addresses()
    got += _run(m, inputs[:3])  # eager again after the 'capture': copies, same state
    assert addresses() == captured
    h.remove()
    h = C.apply(m, cfg)
    want_tail = _run(m, inputs + inputs[:3])[STEPS:]
    h.remove()
    for a, b in zip(got, eager + want_tail):
        assert torch.equal(a, b)
    assert any(c != 0 for c in coefs), coefs  # a real forecast is part of the comparison


# ---- the trained model -----------------------------------------------------------------------
needs_trained = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("sklearn") is None,
    reason="needs diffusers and scikit-learn")
T_STEPS, T_N = 28, 100


@pytest.fixture(scope="module")
def trained():
    from pyops.models import digits as D
    m = D.trained_flux("quick")
    noise, labels = m.noise(T_N, seed=11), torch.arange(T_N) % 10
    return m, noise, labels, m.sample(noise, labels, T_STEPS)


def _sample_cached(m, noise, labels, cfg):
    import pyops
    h = pyops.cache_model(m.transformer, cfg)
    reused = []
    try:
        out = m.sample(noise, labels, T_STEPS, callback=lambda i, *a: reused.append(
            int(h.regions()[-1].reuse[0])))
    finally:
        h.remove()
    return out, reused


@needs_trained
def test_trained_flux_two_streams_forecast_formula(trained):
    """The digits-trained diffusers Flux, step level: both hidden streams (image and text) get
    the forecast of their own residuals."""
    import pyops
    from pyops.cache.model import find_blocks
    m, noise, labels, _ = trained
    h = pyops.cache_model(m.transformer, pyops.CacheConfig(forecast=1, num_steps=T_STEPS,
                                                           **FORCED[1]))
    blocks, specs = find_blocks(m.transformer)
    start, stop = h.mid
    rec = _Recorder(blocks[start], blocks[stop - 1], specs[start], h, -1)
    try:
        m.sample(noise[:8], labels[:8], T_STEPS, callback=lambda *a: rec.step())
    finally:
        rec.remove()
        h.remove()
    assert len(rec.ins[0]) == 2
    assert sum(c != 0 for c in _check_formula(rec)) > 5


@needs_trained
def test_trained_flux_forecast_lowers_the_error_at_the_defaults(trained):
    """The README's configuration (CacheConfig defaults, num_steps=28) with forecast=1: the
    same steps skipped as with forecast=0 (the decisions do not change on this model) and a
    lower rel L1 of the final latents against uncached."""
    import pyops
    from pyops.models import digits as D
    m, noise, labels, ref = trained
    out0, reused0 = _sample_cached(m, noise, labels, pyops.CacheConfig(num_steps=T_STEPS))
    out1, reused1 = _sample_cached(m, noise, labels, pyops.CacheConfig(num_steps=T_STEPS,
                                                                       forecast=1))
    assert reused1 == reused0 and sum(reused0) > 0.3 * T_STEPS, (reused0, reused1)
    e0, e1 = D.rel_l1(out0, ref), D.rel_l1(out1, ref)
    assert e1 < e0, (e1, e0)


# ---- GPU: CUDA graph with IF nodes -------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("level", ["step", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_forecast_forward_equals_eager_without_sync(level, dtype):
    """One forward with forecast=1 captured (IF nodes) and replayed over a sequence equals the
    eager forwards bit for bit, without a host sync; eager forwards after the capture (the
    buffers then update by copies) still equal them."""
    ok, why = G.supported()
    if not ok:
        pytest.fail(f"IF nodes unsupported on a GPU machine: {why}")
    torch.manual_seed(0)
    m = _dit("cuda", dtype)
    inputs = _inputs(device="cuda", dtype=dtype, drift=DRIFT)
    cfg = C.CacheConfig(level=level, forecast=1, threshold=0.05, max_reuse=3, num_steps=STEPS,
                        fn=1, bn=1)
    h = C.apply(m, cfg)
    eager, coefs = _run_coefs(m, h, inputs)
    h.reset()
    sx = torch.empty_like(inputs[0][0])
    st = torch.empty_like(inputs[0][1])
    with torch.no_grad():
        sx.copy_(inputs[0][0])
        st.copy_(inputs[0][1])
        m(sx, st)  # warm-up (eager; the side streams, kernels)
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
    torch.cuda.synchronize()
    h.reset()
    after = _run(m, inputs)
    h.remove()
    assert any(c != 0 for c in coefs), coefs  # the sequence exercises a real forecast
    assert all(torch.equal(a, b) for a, b in zip(got, eager))
    assert all(torch.equal(a, b) for a, b in zip(after, eager))

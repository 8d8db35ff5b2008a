"""pyops::sample_step (pyops/ops/sample_step.py): the coefficient table, reference vs Triton/CUDA
(bit-exact), the public function's checks, op checks. Sampler-level tests (schedules, presets,
loops) are in tests/test_sampler.py."""
import math

import pytest
import torch

import pyops  # noqa: F401  (registers the ops)
from pyops.ops.sample_step import sample_step
from pyops.reference import sample_step as ref
from pyops.reference.sample_step import StepCoefficients

HAS_CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- the formula table -----------------------------------------------------------------------------
def _paths():
    vp = pyops.sampler.vp_schedule([999, 500, 20])
    return {
        "flow": ((1 - 0.8, 0.8), (1 - 0.55, 0.55), lambda g: (1 - (1 - g) * 0.55, (1 - g) * 0.55)),
        "vp": (vp.path_values(500), vp.path_values(20),
               lambda g: vp.path_values(vp.intermediate(20, g))),
        "trigflow": ((math.cos(1.2), math.sin(1.2)), (math.cos(0.7), math.sin(0.7)),
                     lambda g: (math.cos((1 - g) * 0.7), math.sin((1 - g) * 0.7))),
    }


@pytest.mark.parametrize("path", ["flow", "vp", "trigflow"])
@pytest.mark.parametrize("prediction", ref.PREDICTIONS)
@pytest.mark.parametrize("gamma", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("boundary", [(0.0, 1.0), (0.01, 0.97)])
def test_coefficients_fold_the_table(path, prediction, gamma, last, boundary):
    (a, s), (an, sn), mid = _paths()[path]
    if last:
        an, sn = 1.0, 0.0
    am, sm = mid(gamma) if 0 < gamma < 1 and not last else (None, None)
    g = torch.Generator().manual_seed(0)
    x, c, u, z = (torch.randn(4096, generator=g, dtype=torch.float64) for _ in range(4))
    cs, co = boundary
    coef = ref.step_coefficients(prediction, a, s, an, sn, gamma=gamma, a_mid=am, s_mid=sm,
                                 c_skip=cs, c_out=co)
    if last or gamma == 0.0:
        assert coef.zeta == 0.0
    got = ref.sample_step(x.float(), c.float(), u.float(), z.float(), coef.alpha, coef.beta,
                          coef.zeta, 3.5).double()
    want = ref.sample_step_unfused(x, c, prediction, a, s, an, sn, uncond=u, guidance=3.5,
                                   noise=z, gamma=gamma, a_mid=am, s_mid=sm, c_skip=cs, c_out=co)
    scale = (abs(coef.alpha) * x.abs() + abs(coef.beta) * 3.5 * (c.abs() + u.abs())
             + abs(coef.zeta) * z.abs()).max()
    assert (got - want).abs().max() <= 1e-6 * scale


def test_flow_euler_is_exact_euler():
    sig = torch.tensor([1.0, 0.7, 0.3], dtype=torch.float32).tolist()
    for s, sn in zip(sig, sig[1:]):
        c = ref.step_coefficients("velocity", 1 - s, s, 1 - sn, sn, flow_euler=True)
        assert c.alpha == 1.0 and c.zeta == 0.0
        assert c.beta == float(torch.tensor(sn) - torch.tensor(s))
        # and the general fold agrees to fp32 rounding
        g = ref.step_coefficients("velocity", 1 - s, s, 1 - sn, sn)
        assert abs(g.alpha - 1.0) < 1e-7 and abs(g.beta - c.beta) < 1e-7


# ---- backends bit-exact ------------------------------------------------------------------------------
def _inputs(n, device, sd, cd, od, cfg, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda d: (torch.randn(n, generator=g) * 3).to(device=device, dtype=d)  # noqa: E731
    state = r(sd)
    state[: min(n, 7)] *= 1000  # outliers
    x_out = torch.full((n,), float("nan"), dtype=od, device=device)  # poisoned
    return state, x_out, r(cd), (r(cd) if cfg else None), (r(torch.float32) if noise else None)


def _run(backend, state, x_out, cond, uncond, noise, coef, guidance):
    st, xo = state.clone(), (x_out.clone() if x_out is not None else None)
    torch.ops.pyops.sample_step(st, xo, cond, uncond, noise, coef.alpha, coef.beta, coef.zeta,
                                guidance, backend)
    return st, xo


def _assert_same(a, b):
    assert a.dtype == b.dtype
    assert torch.equal(a.view(-1).float().nan_to_num(7.0), b.view(-1).float().nan_to_num(7.0))


COEFS = {
    "euler": StepCoefficients(1.0, ref.f32(0.5 - 0.75), 0.0),
    "renoise": ref.step_coefficients("x0", 0.4, 0.6, 0.75, 0.25, gamma=1.0),
    "tcd": ref.step_coefficients("epsilon", 0.3, 0.95, 0.8, 0.6, gamma=0.3, a_mid=0.9,
                                 s_mid=0.43),
    "last": ref.step_coefficients("velocity", 0.5, 0.5, 1.0, 0.0),
}


@pytest.mark.parametrize("rule", list(COEFS))
@pytest.mark.parametrize("sd,cd,od", [(torch.float32, torch.bfloat16, torch.bfloat16),
                                      (torch.float32, torch.float32, torch.float32),
                                      (torch.bfloat16, torch.float16, torch.float16),
                                      (torch.float16, torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("cfg", [False, True])
def test_triton_matches_reference(rule, sd, cd, od, cfg):
    coef = COEFS[rule]
    n = 3001  # odd, more than one program
    args = _inputs(n, "cpu", sd, cd, od, cfg, coef.needs_noise)
    guidance = 4.5 if cfg else 1.0
    r = _run("reference", *args, coef, guidance)
    t = _run("triton", *args, coef, guidance)
    _assert_same(r[0], t[0])
    _assert_same(r[1], t[1])
    assert not torch.isnan(t[1]).any()


def test_triton_without_x_out():
    coef = COEFS["renoise"]
    state, _, c, _, z = _inputs(513, "cpu", torch.float32, torch.float32, torch.float32, False,
                                True)
    r = _run("reference", state, None, c, None, z, coef, 1.0)
    t = _run("triton", state, None, c, None, z, coef, 1.0)
    _assert_same(r[0], t[0])


def test_reference_is_the_documented_formula():
    x = torch.tensor([1.0, -2.0]); c = torch.tensor([0.5, 0.25]); u = torch.tensor([0.0, 1.0])
    z = torch.tensor([2.0, -1.0])
    y = ref.sample_step(x, c, u, z, 0.5, 2.0, 0.25, 3.0)
    p = u + 3.0 * (c - u)
    assert torch.equal(y, 0.5 * x + 2.0 * p + 0.25 * z)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_public_step_and_special_values(backend):
    st = torch.tensor([float("nan"), float("inf"), 1.0, 0.0])
    c = torch.zeros(4)
    out = sample_step(st, c, StepCoefficients(1.0, 0.5, 0.0), backend=backend)
    assert out is st
    assert torch.isnan(st[0]) and st[1] == float("inf") and st[2] == 1.0


# ---- op plumbing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    st, xo, c, u, z = _inputs(257, "cpu", torch.float32, torch.bfloat16, torch.bfloat16, True, True)
    coef = COEFS["renoise"]
    torch.library.opcheck(torch.ops.pyops.sample_step.default,
                          (st, xo, c, u, z, coef.alpha, coef.beta, coef.zeta, 2.0, backend))
    torch.library.opcheck(torch.ops.pyops.sample_step.default,
                          (st, None, c, None, None, 1.0, -0.25, 0.0, 1.0, backend))


def test_compile_fullgraph():
    coef = COEFS["tcd"]

    def f(st, xo, c, u, z):
        sample_step(st, c, coef, uncond=u, guidance=3.0, noise=z, x_out=xo, backend="reference")
        return st * 1

    args = _inputs(300, "cpu", torch.float32, torch.bfloat16, torch.bfloat16, True, True)
    want = f(*[a.clone() for a in args])
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*[a.clone() for a in args])
    assert torch.equal(want, got)


def test_bad_inputs_raise_before_launch():
    x = torch.zeros(8)
    co = StepCoefficients(1.0, -0.1, 0.0)
    with pytest.raises(ValueError, match="shape"):
        sample_step(x, torch.zeros(9), co)
    with pytest.raises(TypeError, match="dtype"):
        sample_step(x, torch.zeros(8, dtype=torch.int32), co)
    with pytest.raises(ValueError, match="needs fresh noise"):
        sample_step(x, torch.zeros(8), StepCoefficients(0.5, 0.5, 0.7))
    with pytest.raises(ValueError, match="without uncond"):
        sample_step(x, torch.zeros(8), co, guidance=3.0)
    with pytest.raises(ValueError, match="contiguous"):
        sample_step(torch.zeros(8, 2).t(), torch.zeros(2, 8), co)
    with pytest.raises(ValueError, match="overlap"):
        sample_step(x, torch.zeros(8), co, x_out=x)
    with pytest.raises(ValueError, match="non-finite"):
        sample_step(x, torch.zeros(8), StepCoefficients(float("nan"), 0.0, 0.0))
    with pytest.raises(TypeError, match="StepCoefficients"):
        sample_step(x, torch.zeros(8), (1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="unknown backend"):
        sample_step(x, torch.zeros(8), co, backend="nope")
    with pytest.raises(RuntimeError, match="cannot run"):
        sample_step(x, torch.zeros(8), co, backend="cuda")
    with pytest.raises(ValueError, match="empty"):
        sample_step(torch.zeros(0), torch.zeros(0), co)
    with pytest.raises(ValueError, match="epsilon prediction is undefined"):
        ref.step_coefficients("epsilon", 0.0, 1.0, 0.5, 0.5)


# ---- GPU ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("rule", list(COEFS))
@pytest.mark.parametrize("cfg", [False, True])
def test_gpu_backends_bit_exact(backend, rule, cfg):
    if backend == "cuda" and not pyops._backend.extension_status()[0]:
        pytest.skip("pyops._C not built")
    coef = COEFS[rule]
    for sd, cd, od in [(torch.float32, torch.bfloat16, torch.bfloat16),
                       (torch.float32, torch.float32, torch.float16),
                       (torch.bfloat16, torch.float16, torch.float32)]:
        args = _inputs(1 << 20 | 3, "cuda", sd, cd, od, cfg, coef.needs_noise)
        r = _run("reference", *args, coef, 4.5 if cfg else 1.0)
        t = _run(backend, *args, coef, 4.5 if cfg else 1.0)
        _assert_same(r[0], t[0])
        _assert_same(r[1], t[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_opcheck_and_graph(backend):
    if backend == "cuda" and not pyops._backend.extension_status()[0]:
        pytest.skip("pyops._C not built")
    coef = COEFS["renoise"]
    st, xo, c, u, z = _inputs(4099, "cuda", torch.float32, torch.bfloat16, torch.bfloat16, True,
                              True)
    torch.library.opcheck(torch.ops.pyops.sample_step.default,
                          (st, xo, c, u, z, coef.alpha, coef.beta, coef.zeta, 2.0, backend))
    if backend == "cuda":
        torch.library.opcheck(torch.ops.pyops._sample_step_cuda.default,
                              (st, xo, c, u, z, coef.alpha, coef.beta, coef.zeta, 2.0))
    # capture, replay with changed inputs, compare
    st0 = st.clone()
    sample_step(st, c, coef, uncond=u, guidance=2.0, noise=z, x_out=xo, backend=backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    st.copy_(st0)
    with torch.cuda.graph(graph):
        sample_step(st, c, coef, uncond=u, guidance=2.0, noise=z, x_out=xo, backend=backend)
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        new = torch.randn(st.shape, device="cuda", generator=g)
        c.copy_(torch.randn(c.shape, device="cuda", generator=g))
        st.copy_(new)
        graph.replay()
        want = ref.sample_step(new, c, u, z, coef.alpha, coef.beta, coef.zeta, 2.0)
        assert torch.equal(st, want)


# ---- GPU: every path of the CUDA kernels (csrc/sample_step.cu), bit for bit ------------------
OP_NAME = "sample_step"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (state, cond and uncond, noise, x_out): the first five have the vectorized kernel, the last takes
# the generic one.
STEP_DTYPES = {"f32": (F32, F32, F32, F32), "bf16": (BF16, BF16, BF16, BF16),
               "f16": (F16, F16, F16, F16), "f32_bf16": (F32, BF16, F32, BF16),
               "f32_f16": (F32, F16, F32, F16), "generic": (BF16, F16, F32, F32)}
# Elements: 1, < one unit of 8, a head + tail around one unit, odd, and 12.6M: more than one
# grid-stride step of the whole grid (132 SMs x 4 CTAs x 256 threads x 8-16 elements <= 2.2M).
STEP_SIZES = (1, 7, 13, 4099, 3 * 2**22 + 5)
# The shift of each buffer inside its flat allocation: 0 = fresh (16/32-byte aligned); (1,)*5 =
# tensor[1:] views (vectorized after a scalar head of 7); (3,)*5 (head 5); state shifted alone = no
# common alignment (the generic kernel).
STEP_LAYOUTS = {"aligned": (0, 0, 0, 0, 0), "shift1": (1, 1, 1, 1, 1), "shift3": (3, 3, 3, 3, 3),
                "unaligned": (1, 0, 0, 0, 0)}
STEP_FLAGS = [(cfg, noise, out) for cfg in (False, True) for noise in (False, True)
              for out in (False, True)]


def _in_buffer(values: torch.Tensor, shift: int):
    """(buffer, view): ``values`` copied to buffer[shift:] of a fresh flat buffer whose first
    ``shift`` elements are NaN (they must stay so)."""
    buf = torch.full((values.numel() + shift,), float("nan"), dtype=values.dtype,
                     device=values.device)
    buf[shift:].copy_(values)
    return buf, buf[shift:]


def _gpu_step_inputs(n, dtypes, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    sd, cd, zd, od = dtypes
    r = lambda d, s=3.0: (torch.randn(n, generator=g, device="cuda") * s).to(d)  # noqa: E731
    state = r(sd)
    state[:: 1009] *= 1000  # outliers
    return state, r(cd), r(cd), r(zd), torch.full((n,), float("nan"), dtype=od, device="cuda")


def _check_cuda_step(state, x_out, cond, uncond, noise, coef, guidance, what):
    """Run the CUDA backend in place on these tensors (views allowed) and compare with the
    reference computed beforehand, bit for bit."""
    from _util import assert_bits_equal
    y = ref.sample_step(state.clone(), cond.clone(), None if uncond is None else uncond.clone(),
                        None if noise is None else noise.clone(), coef.alpha, coef.beta,
                        coef.zeta, guidance)
    want_state = y.to(state.dtype)
    want_out = None if x_out is None else y.to(x_out.dtype)
    torch.ops.pyops.sample_step(state, x_out, cond, uncond, noise, coef.alpha, coef.beta,
                                coef.zeta, guidance, "cuda")
    torch.cuda.synchronize()
    assert_bits_equal(state, want_state, f"{what}: state")
    if x_out is not None:
        assert_bits_equal(x_out, want_out, f"{what}: x_out")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(STEP_LAYOUTS))
@pytest.mark.parametrize("n", STEP_SIZES)
@pytest.mark.parametrize("dtypes", list(STEP_DTYPES))
def test_gpu_cuda_paths_bit_exact(dtypes, n, layout):
    """The CUDA kernel equals the reference bit for bit on each path: the vectorized kernel of
    each dtype combination (scalar head and tail included), the generic kernel (other dtypes, or
    no common alignment), with and without CFG / noise / x_out; nothing outside the views is
    written."""
    from _util import need_backend
    need_backend(OP_NAME, "cuda")
    if n > 2**20 and layout in ("shift3", "unaligned"):
        pytest.skip("the large size runs with the aligned and shift1 layouts only")
    shifts = STEP_LAYOUTS[layout]
    coef = COEFS["tcd"]  # zeta != 0
    for i, (cfg, noise, out) in enumerate(STEP_FLAGS):
        vals = _gpu_step_inputs(n, STEP_DTYPES[dtypes], seed=17 * n + i)
        bufs, views = zip(*(_in_buffer(v, s) for v, s in zip(vals, shifts)))
        state, cond, unc, z, x_out = views
        _check_cuda_step(state, x_out if out else None, cond, unc if cfg else None,
                         z if noise else None, coef, 4.5 if cfg else 1.0,
                         f"{dtypes} n={n} {layout} cfg={cfg} noise={noise} x_out={out}")
        for b, s in zip(bufs, shifts):  # the elements before each view are untouched
            assert torch.isnan(b[:s].float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["aligned", "shift1"])
def test_gpu_cuda_aliasing_bit_exact(layout):
    """cond/uncond/noise may be state or x_out themselves (the C ABI's contract): each element is
    read before the same thread writes it, on the vectorized kernel of two dtype combinations."""
    from _util import need_backend
    need_backend(OP_NAME, "cuda")
    n, shift = 2 * 2**20 + 3, STEP_LAYOUTS[layout][0]
    coef = COEFS["tcd"]
    g = torch.Generator(device="cuda").manual_seed(5)
    # all bf16: cond = x_out, uncond = state, noise = x_out
    _, state = _in_buffer(torch.randn(n, generator=g, device="cuda").to(BF16), shift)
    _, x_out = _in_buffer(torch.randn(n, generator=g, device="cuda").to(BF16), shift)
    _check_cuda_step(state, x_out, x_out, state, x_out, coef, 3.0, f"bf16 aliased, {layout}")
    # fp32 state, bf16 x_out: cond = x_out, noise = state, no CFG
    _, state = _in_buffer(torch.randn(n, generator=g, device="cuda"), shift)
    _, x_out = _in_buffer(torch.randn(n, generator=g, device="cuda").to(BF16), shift)
    _check_cuda_step(state, x_out, x_out, None, state, coef, 1.0, f"f32/bf16 aliased, {layout}")


@pytest.mark.gpu
def test_gpu_cuda_more_than_2pow31_elements():
    """n = 2^31 + 11 bf16 elements (int64 indexing): the ends and the elements around 2^31 equal the
    reference."""
    from _util import need_backend
    need_backend(OP_NAME, "cuda")
    n = 2**31 + 11
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * n * 2 + (2 << 30):
        pytest.skip(f"needs ~10 GiB free on the GPU, {free / 2**30:.1f} GiB available")
    state = torch.randn(n, device="cuda", dtype=BF16)
    cond = torch.randn(n, device="cuda", dtype=BF16)
    spans = [slice(0, 2**20), slice(2**31 - 2**19, 2**31 + 11), slice(n - 2**20, n)]
    coef = COEFS["euler"]
    want = [ref.sample_step(state[s], cond[s], None, None, coef.alpha, coef.beta, 0.0, 1.0)
            .to(BF16) for s in spans]
    torch.ops.pyops.sample_step(state, None, cond, None, None, coef.alpha, coef.beta, 0.0, 1.0,
                                "cuda")
    torch.cuda.synchronize()
    from _util import assert_bits_equal
    for s, w in zip(spans, want):
        assert_bits_equal(state[s], w, f"state[{s.start}:{s.stop}]")

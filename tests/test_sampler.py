"""pyops.sampler: schedules, exact-teacher validation, diffusers parity, CFG, graph mode (GPU).

Op-level tests of pyops::sample_step (bit-exact backends, opcheck, fakes) are in
tests/test_sample_step.py."""
import ast
import dataclasses
import inspect
import math
import pathlib
import textwrap

import pytest
import torch

import pyops  # noqa: F401
from pyops import sampler as S

HAS_CUDA = torch.cuda.is_available()
EPS32 = 2.0 ** -24

try:  # optional test dependency
    import diffusers  # noqa: F401
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler, TCDScheduler
    HAS_DIFFUSERS, WHY_NO_DIFFUSERS = True, ""
except Exception as e:  # pragma: no cover - depends on the machine
    HAS_DIFFUSERS, WHY_NO_DIFFUSERS = False, f"diffusers not importable ({type(e).__name__}: {e})"
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason=WHY_NO_DIFFUSERS)


def _linspace_sigmas(n):
    """σ = linspace(1, 1/n, n), the spacing FluxPipeline passes (flow_schedule(n) follows
    FlowMatchEulerDiscreteScheduler.set_timesteps(n), which ends at σ = 0.001)."""
    import numpy as np
    return np.linspace(1.0, 1.0 / n, n).tolist()


def _tvec(t, x):
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t


def toy_model(x, t, scale=1.0, bias=None):
    """A smooth deterministic 'network', elementwise (so batch doubling does not change it)."""
    tt = _tvec(t, x) / 1000.0
    out = 0.7 * torch.tanh(x) - 0.3 * x + 0.2 * tt * scale
    return out + bias if bias is not None else out


# ---- schedules -------------------------------------------------------------------------------------
def test_presets():
    for name in S.PRESETS:
        sched, kw = S.preset(name)
        smp = S.FewStepSampler(toy_model, sched, **kw)
        assert sched.num_steps == len(smp.coefficients) == (28 if name == "flux-dev" else 4)
        assert smp.coefficients[-1].zeta == 0.0  # the last step adds no noise
    # values diffusers 0.42 computes (the diffusers comparisons are below; these run without it)
    s, kw = S.preset("flux-schnell")
    assert s.times == (1.0, 0.75, 0.5, 0.25, 0.0) and s.timesteps == (1000.0, 750.0, 500.0, 250.0)
    s, _ = S.preset("sd35-turbo")  # FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(4)
    torch.testing.assert_close(torch.tensor(s.times), torch.tensor(
        [1.0, 0.8576923, 0.6021506, 0.0089286, 0.0]), rtol=0, atol=1e-6)
    assert s.timesteps[0] == 1000.0
    s, _ = S.preset("flux-dev", num_steps=4, image_seq_len=4096)  # mu = 1.15
    torch.testing.assert_close(torch.tensor(s.times), torch.tensor(
        [1.0, 0.9045308, 0.7595109, 0.5128441, 0.0]), rtol=0, atol=1e-6)
    s, _ = S.preset("dmd2")
    assert s.timesteps == (999.0, 749.0, 499.0, 249.0) and s.path == "vp" and s.times[-1] == -1
    assert s.boundary is not None  # LCMScheduler's boundary condition
    s, _ = S.preset("tcd")
    assert s.times == (999, 759, 499, 259, 0)  # TCDScheduler ends at timestep 0
    assert S.tcd_timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    s, _ = S.preset("rcm", num_steps=2)
    assert s.num_steps == 2 and s.init_sigma == pytest.approx(
        1 / (math.cos(math.atan(80)) + math.sin(math.atan(80))), abs=1e-12)
    with pytest.raises(ValueError, match="unknown preset"):
        S.preset("nope")
    with pytest.raises(ValueError, match="num_steps"):
        S.preset("dmd2", num_steps=2)
    with pytest.raises(ValueError, match="num_steps"):
        S.preset("rcm", num_steps=5)
    with pytest.raises(ValueError, match="image_seq_len"):
        S.preset("sd35-turbo", image_seq_len=4096)
    with pytest.raises(ValueError, match="image_seq_len"):
        S.preset("flux-dev", image_seq_len=0)


def test_schedule_validation():
    with pytest.raises(ValueError, match="decrease"):
        S.flow_schedule(sigmas=[0.5, 0.9])
    with pytest.raises(ValueError, match="decrease"):
        S.vp_schedule([10, 500])
    with pytest.raises(ValueError, match="num_steps"):
        S.flow_schedule()
    with pytest.raises(ValueError, match="unknown rule"):
        S.FewStepSampler(toy_model, S.flow_schedule(2), rule="heun")
    with pytest.raises(ValueError, match="unknown prediction"):
        S.FewStepSampler(toy_model, S.flow_schedule(2), prediction="score")
    with pytest.raises(ValueError, match="gamma"):
        S.FewStepSampler(toy_model, S.flow_schedule(2), rule="euler", gamma=0.5)
    with pytest.raises(ValueError, match="needs uncond"):
        S.FewStepSampler(toy_model, S.flow_schedule(2), guidance=3.0).sample((2, 3))


def test_eager_determinism_callbacks_progress():
    sched, kw = S.preset("dmd2")
    smp = S.FewStepSampler(toy_model, sched, **kw)
    seen = []
    a = smp.sample((3, 8), generator=torch.Generator().manual_seed(1), progress=True,
                   callback=lambda i, t, x, st: seen.append((i, t, x.dtype, st.dtype)))
    b = smp.sample((3, 8), generator=torch.Generator().manual_seed(1))
    c = smp.sample((3, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][1] == 999.0
    assert seen[0][3] == torch.float32


def test_bf16_model_keeps_fp32_state():
    sched = S.flow_schedule(4)
    got = []
    smp = S.FewStepSampler(toy_model, sched, model_dtype=torch.bfloat16)
    out = smp.sample((2, 16), generator=torch.Generator().manual_seed(0),
                     callback=lambda i, t, x, st: got.append((x.dtype, st.dtype,
                                                              torch.equal(x, st.bfloat16()))))
    assert out.dtype == torch.float32
    assert all(g == (torch.bfloat16, torch.float32, True) for g in got)


def test_triton_backend_equals_reference():
    sched, kw = S.preset("rcm")
    noise = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    outs = []
    for backend in ("reference", "triton"):
        smp = S.FewStepSampler(toy_model, sched, backend=backend, **kw)
        outs.append(smp.sample(noise.shape, generator=torch.Generator().manual_seed(3),
                               dtype=torch.bfloat16))
    assert torch.equal(outs[0], outs[1])


# ---- CFG ---------------------------------------------------------------------------------------------
def test_cfg_batch_equals_two_calls_and_formula():
    sched = S.flow_schedule(3, shift=2.0)
    cond = dict(scale=1.0, bias=torch.full((2, 5), 0.3))
    uncond = dict(scale=1.0, bias=torch.zeros(2, 5))
    outs = {}
    for mode in ("batch", "two_calls"):
        smp = S.FewStepSampler(toy_model, sched, guidance=4.0, cfg=mode)
        outs[mode] = smp.sample((2, 5), cond=cond, uncond=uncond,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(outs["batch"], outs["two_calls"])
    # by hand: x <- x + dt·(u + g·(c − u))
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        t = torch.tensor(sched.timesteps[i])
        c, u = toy_model(x, t, **cond), toy_model(x, t, **uncond)
        dt = torch.tensor(sched.times[i + 1]) - torch.tensor(sched.times[i])
        x = x + dt * (u + 4.0 * (c - u))
    torch.testing.assert_close(outs["batch"], x, rtol=1e-6, atol=1e-6)
    smp = S.FewStepSampler(toy_model, sched, guidance=4.0)
    with pytest.raises(ValueError, match="non-tensor argument"):
        smp.sample((2, 5), cond=dict(scale=1.0), uncond=dict(scale=2.0))


# ---- exact teachers ----------------------------------------------------------------------------------
def _path_lookup(sched):
    return {float(torch.tensor(ts, dtype=torch.float32)): sched.path_values(tau)
            for ts, tau in zip(sched.timesteps, sched.times)}


def _convert(x0, x, a, s, prediction):
    """An x0 estimate expressed as the model's prediction type."""
    if prediction == "x0":
        return x0
    eps = (x - a * x0) / s
    if prediction == "epsilon":
        return eps
    if prediction == "velocity":
        return eps - x0
    return a * eps - s * x0  # v_prediction


def _stats_err(samples, data):
    m_err = (samples.mean(0) - data.mean(0)).norm() / data.std(0).norm()
    c_err = (torch.cov(samples.T) - torch.cov(data.T)).norm() / torch.cov(data.T).norm()
    return float(m_err), float(c_err)


def _mmd(x, y, bw):
    """Unbiased MMD² with an RBF kernel of bandwidth bw (float64)."""
    x, y = x.double(), y.double()

    def k(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bw * bw))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diag().sum()) / (n * (n - 1))
                 + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1)) - 2 * kxy.mean())


GAUSS_MU = torch.tensor([1.5, -0.5, 0.0, 2.0, -1.0, 0.3], dtype=torch.float64)
GAUSS_SD = torch.tensor([0.5, 1.0, 2.0, 0.1, 0.8, 1.3], dtype=torch.float64)


def _gaussian_flow_map_model(sched, prediction):
    """The exact consistency function of N(μ, diag σ²) on the sampler's path: the PF-ODE moves
    x = a·μ + r·z with r = √(a²σ² + s²) at fixed z, so x0 = μ + σ·(x − a·μ)/r."""
    look = _path_lookup(sched)

    def model(x, t):
        a, s = look[float(t.reshape(-1)[0])]
        xd = x.double()
        r = torch.sqrt(a * a * GAUSS_SD ** 2 + s * s)
        x0 = GAUSS_MU + GAUSS_SD * (xd - a * GAUSS_MU) / r
        return _convert(x0, xd, a, s, prediction).to(x.dtype)
    return model


SCHEDULES = {
    # starts just below pure noise so that epsilon prediction is defined
    "flow": lambda n: S.flow_schedule(sigmas=[0.995 - i * (0.995 - 1 / n) / max(n - 1, 1)
                                              for i in range(n)], shift=3.0),
    "vp": lambda n: S.vp_schedule([int(999 - i * 999 // n) for i in range(n)]),
    "trigflow": lambda n: S.trigflow_schedule(
        [math.atan(80.0)] + [1.5 - i * 1.2 / n for i in range(1, n)], as_flow=False),
}


@pytest.mark.parametrize("path", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["velocity", "x0", "epsilon", "v_prediction"])
def test_exact_consistency_teacher_gaussian(path, prediction):
    """With the exact flow map, x0 + re-noise samples the data exactly at any step count: mean
    and covariance match the data to sampling error at 1, 2, 4 and 8 steps. (vp starts from
    N(0, I) as diffusers does, not from the marginal √ᾱ_T·μ + ..., hence its looser mean bound;
    flow starts at σ = 0.995 from N(0, I), an error of 0.005·μ.)"""
    rule = "renoise"
    if path == "vp" and prediction == "velocity":
        pytest.skip("flow-matching velocity on a VP path is unusual; covered by v_prediction")
    N = 20000
    data = GAUSS_MU + GAUSS_SD * torch.randn(N, 6, dtype=torch.float64,
                                             generator=torch.Generator().manual_seed(9))
    for n in (1, 2, 4, 8):
        sched = SCHEDULES[path](n)
        smp = S.FewStepSampler(_gaussian_flow_map_model(sched, prediction), sched,
                               prediction=prediction, rule=rule)
        x = smp.sample((N, 6), generator=torch.Generator().manual_seed(n)).double()
        m_err, c_err = _stats_err(x, data)
        # sampling error of N = 20000 draws is ~0.01 on these scales; a wrong coefficient
        # (no re-noise, a wrong sign, a wrong path) gives errors of 0.1 and more
        assert m_err < (0.05 if path == "vp" else 0.03) and c_err < 0.04, (n, m_err, c_err)
        z = (x - GAUSS_MU) / GAUSS_SD
        assert abs(float(z.std()) - 1.0) < 0.02


def test_exact_teacher_catches_a_broken_sampler():
    """The same check fails when the re-noise term is dropped (zeta = 0)."""
    sched = SCHEDULES["flow"](4)
    smp = S.FewStepSampler(_gaussian_flow_map_model(sched, "x0"), sched, prediction="x0",
                           rule="renoise")
    smp.coefficients = [S.StepCoefficients(c.alpha, c.beta, 0.0) for c in smp.coefficients]
    x = smp.sample((20000, 6), generator=torch.Generator().manual_seed(0)).double()
    data = GAUSS_MU + GAUSS_SD * torch.randn(20000, 6, dtype=torch.float64)
    m_err, c_err = _stats_err(x, data)
    assert m_err > 0.03 or c_err > 0.04


def _mixture():
    g = torch.Generator().manual_seed(5)
    K, D = 5, 4
    mu = torch.randn(K, D, generator=g, dtype=torch.float64) * 2.0
    sd = 0.2 + 0.3 * torch.rand(K, generator=g, dtype=torch.float64)
    w = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    return mu, sd, w


def _mixture_denoiser(mu, sd, w):
    """Ideal (posterior-mean) x0-predictor of an isotropic Gaussian mixture on the flow path."""
    def x0_hat(x, a, s):
        var = a * a * sd ** 2 + s * s                                      # (K,)
        d2 = torch.cdist(x, a * mu).pow(2)                                 # (N, K)
        logr = torch.log(w) - 0.5 * d2 / var - 0.5 * x.shape[1] * torch.log(var)
        r = torch.softmax(logr, dim=1)
        comp = mu[None] + (a * sd ** 2 / var)[None, :, None] * (x[:, None] - a * mu[None])
        return (r[..., None] * comp).sum(1)
    return x0_hat


def _ideal_model(x0_hat, sched, prediction):
    look = _path_lookup(sched)

    def model(x, t):
        a, s = look[float(t.reshape(-1)[0])]
        xd = x.double()
        return _convert(x0_hat(xd, a, s), xd, a, s, prediction).to(x.dtype)
    return model


def _sample_mixture(mu, sd, w, N, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(w, N, replacement=True, generator=g)
    return mu[k] + sd[k, None] * torch.randn(N, mu.shape[1], generator=g, dtype=torch.float64)


def test_ideal_denoiser_mixture_euler_converges():
    """Deterministic flow Euler (= DDIM) driven by the exact posterior mean of a Gaussian
    mixture: 1 step collapses onto the data mean (MMD large), 8 steps with shift approach the
    data; MMD decreases monotonically with the step count (and is ~0 at 32 steps)."""
    mu, sd, w = _mixture()
    den = _mixture_denoiser(mu, sd, w)
    data = _sample_mixture(mu, sd, w, 3000, 1)
    ref_mmd = _mmd(_sample_mixture(mu, sd, w, 3000, 2), data, bw=1.0)
    mmds = {}
    for n in (1, 2, 4, 8, 32):
        sched = S.flow_schedule(sigmas=_linspace_sigmas(n))
        smp = S.FewStepSampler(_ideal_model(den, sched, "velocity"), sched)
        x = smp.sample((3000, 4), generator=torch.Generator().manual_seed(n)).double()
        mmds[n] = _mmd(x, data, bw=1.0)
    assert mmds[1] > 0.5 and mmds[1] > mmds[2] > mmds[4] > mmds[8] > mmds[32], mmds
    assert mmds[4] < 0.06 and mmds[8] < 0.02 and mmds[32] < 0.003, mmds
    assert abs(ref_mmd) < 0.003, ref_mmd  # two independent data draws


def test_ideal_denoiser_mixture_renoise_x0():
    """x0 + fresh noise with the ideal denoiser, predictions given as x0: the samples stay
    within the data's support and their moments approach the data's with more steps."""
    mu, sd, w = _mixture()
    den = _mixture_denoiser(mu, sd, w)
    data = _sample_mixture(mu, sd, w, 3000, 1)
    errs = {}
    for n in (1, 2, 4, 8):
        sched = S.flow_schedule(sigmas=_linspace_sigmas(n))
        smp = S.FewStepSampler(_ideal_model(den, sched, "x0"), sched, prediction="x0",
                               rule="renoise")
        x = smp.sample((3000, 4), generator=torch.Generator().manual_seed(n)).double()
        errs[n] = _mmd(x, data, bw=1.0)
    assert errs[1] > 0.2 and errs[8] < 0.05 and errs[8] < errs[1], errs


def test_digits_ideal_denoiser():
    """scikit-learn's bundled 8x8 digits (no download): the ideal denoiser over the data set
    gives exact x0 predictions; 8 flow-Euler steps reproduce the data's mean/covariance and
    land next to training images, 1 step gives the blurry mean."""
    sk = pytest.importorskip("sklearn.datasets", reason="scikit-learn not installed")
    X = torch.tensor(sk.load_digits().data, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std().clamp_min(1e-6)            # global scale: ~unit variance
    sq = X.pow(2).sum(1)

    def x0_hat(x, a, s):
        logits = -(x.pow(2).sum(1, keepdim=True) - 2 * a * x @ X.T + a * a * sq) / (2 * s * s)
        return torch.softmax(logits, dim=1) @ X

    res = {}
    for n in (1, 8):
        sched = S.flow_schedule(sigmas=_linspace_sigmas(n))
        smp = S.FewStepSampler(_ideal_model(x0_hat, sched, "velocity"), sched)
        x = smp.sample((1000, 64), generator=torch.Generator().manual_seed(n)).double()
        m_err, c_err = _stats_err(x, X)
        nn = torch.cdist(x, X).min(1).values.median()
        res[n] = (m_err, c_err, float(nn))
    typical = float(torch.cdist(X[:200], X).topk(2, largest=False).values[:, 1].median())
    assert res[1][1] > 0.5, res                       # collapsed covariance
    # (1000 random data points differ from the set by ~0.02 / ~0.07; the ideal denoiser
    # memorizes with slightly unequal basins, ~0.04 / ~0.13 at 8 steps)
    assert res[8][0] < 0.08 and res[8][1] < 0.2, res  # moments of the data
    assert res[8][2] < 0.5 * typical, (res, typical)  # samples sit on data points


# ---- schedules against diffusers' schedulers (issue "Correct on the GPU", item 18) ------------
def _pipeline_function(relpath, name):
    """A module-level function of an installed diffusers pipeline file (e.g. FluxPipeline's
    calculate_shift, retrieve_timesteps), taken from its source: importing the pipeline module
    needs transformers, which the schedule tests do not."""
    import ast
    import inspect
    import os
    import numpy as np
    path = os.path.join(os.path.dirname(diffusers.__file__), "pipelines", relpath)
    with open(path) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {"inspect": inspect, "np": np, "torch": torch, "math": math}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    return ns[name]


# The named models' scheduler configs (scheduler/scheduler_config.json of the Hugging Face repos
# black-forest-labs/FLUX.1-schnell, black-forest-labs/FLUX.1-dev,
# stabilityai/stable-diffusion-3.5-large-turbo, stabilityai/stable-diffusion-xl-base-1.0).
FLUX_SCHNELL_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                           max_image_seq_len=4096)
FLUX_DEV_CONFIG = dict(FLUX_SCHNELL_CONFIG, shift=3.0, use_dynamic_shifting=True)
SD35_TURBO_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
SDXL_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                   set_alpha_to_one=False, prediction_type="epsilon", clip_sample=False)


def _assert_flow_equal(sched, sch):
    """pyops flow schedule == diffusers scheduler: sigmas (with the final 0) and timesteps."""
    got_s = torch.tensor(sched.times, dtype=torch.float32)
    got_t = torch.tensor(sched.timesteps, dtype=torch.float32)
    assert got_s.shape == sch.sigmas.shape and got_t.shape == sch.timesteps.shape
    torch.testing.assert_close(got_s, sch.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_t, sch.timesteps, rtol=2.0 ** -23, atol=0)


def _flux_pipeline_scheduler(config, n, image_seq_len):
    """The scheduler state FluxPipeline.__call__ (pipelines/flux/pipeline_flux.py, "5. Prepare
    timesteps") leaves: sigmas = linspace(1, 1/n, n), mu = calculate_shift(image_seq_len, the
    config's base/max seq len and shift), retrieve_timesteps(scheduler, n, sigmas=, mu=)."""
    import numpy as np
    sch = FlowMatchEulerDiscreteScheduler(**config)
    mu = _pipeline_function("flux/pipeline_flux.py", "calculate_shift")(
        image_seq_len, sch.config.get("base_image_seq_len", 256),
        sch.config.get("max_image_seq_len", 4096), sch.config.get("base_shift", 0.5),
        sch.config.get("max_shift", 1.15))
    _pipeline_function("flux/pipeline_flux.py", "retrieve_timesteps")(
        sch, n, "cpu", sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    return sch


def _sd3_pipeline_scheduler(config, n):
    """StableDiffusion3Pipeline.__call__ ("5. Prepare timesteps"): no sigmas, no mu (the config
    has no dynamic shifting): retrieve_timesteps(scheduler, n)."""
    sch = FlowMatchEulerDiscreteScheduler(**config)
    _pipeline_function("stable_diffusion_3/pipeline_stable_diffusion_3.py",
                       "retrieve_timesteps")(sch, n, "cpu")
    return sch


@needs_diffusers
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 28, 50])
def test_flow_schedule_equals_diffusers_default(n, shift):
    """flow_schedule(n, shift=s) == FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n):
    linspace between the shifted ends of the training grid, shifted again."""
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(n)
    _assert_flow_equal(S.flow_schedule(n, shift=shift), sch)


@needs_diffusers
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("n", [1, 4, 28])
def test_flow_schedule_explicit_sigmas_equal_diffusers(n, shift):
    """flow_schedule(sigmas=...) == set_timesteps(sigmas=...) (the shift in fp32)."""
    import numpy as np
    sig = np.linspace(1.0, 1 / n, n)
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(sigmas=sig)
    _assert_flow_equal(S.flow_schedule(sigmas=sig.tolist(), shift=shift), sch)


@needs_diffusers
@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 16384])
@pytest.mark.parametrize("n", [1, 4, 28])
def test_flow_schedule_dynamic_shift_equals_diffusers(n, image_seq_len, time_shift_type):
    """mu (use_dynamic_shifting) with explicit sigmas (Flux) and without (the linspace path)."""
    import numpy as np
    calculate_shift = _pipeline_function("flux/pipeline_flux.py", "calculate_shift")
    mu = S.flux_mu(image_seq_len)
    assert mu == calculate_shift(image_seq_len)
    for sig in (np.linspace(1.0, 1 / n, n), None):
        sch = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                              time_shift_type=time_shift_type)
        sch.set_timesteps(n if sig is None else None, sigmas=sig, mu=mu)
        got = S.flow_schedule(n, sigmas=None if sig is None else sig.tolist(), mu=mu,
                              time_shift_type=time_shift_type)
        _assert_flow_equal(got, sch)


def _check_flux_schnell(n, L):
    _assert_flow_equal(S.preset("flux-schnell", num_steps=n, image_seq_len=L)[0],
                       _flux_pipeline_scheduler(FLUX_SCHNELL_CONFIG, n, L or 4096))


def _check_flux_dev(n, L):
    _assert_flow_equal(S.preset("flux-dev", num_steps=n, image_seq_len=L)[0],
                       _flux_pipeline_scheduler(FLUX_DEV_CONFIG, n, 4096 if L is None else L))


def _check_sd35_turbo(n, L):
    _assert_flow_equal(S.preset("sd35-turbo", num_steps=n)[0],
                       _sd3_pipeline_scheduler(SD35_TURBO_CONFIG, n))


def _check_vp(sched, sch, end):
    assert sched.timesteps == tuple(float(t) for t in sch.timesteps.tolist())
    assert sched.times[:-1] == tuple(sch.timesteps.tolist()) and sched.times[-1] == end
    assert torch.equal(torch.tensor(sched.alphas_cumprod, dtype=torch.float32),
                       sch.alphas_cumprod)


def _check_dmd2(n, L):
    """DMD2 README: LCMScheduler.from_config(SDXL), pipe(timesteps=[999, 749, 499, 249]);
    LCMScheduler.step's last step returns the denoised sample (end point: clean, -1)."""
    sched = S.preset("dmd2", num_steps=n)[0]
    sch = LCMScheduler.from_config(SDXL_CONFIG)
    _pipeline_function("stable_diffusion_3/pipeline_stable_diffusion_3.py",
                       "retrieve_timesteps")(sch, None, "cpu", timesteps=[999, 749, 499, 249])
    _check_vp(sched, sch, -1)
    for t, (c_skip, c_out) in zip(sch.timesteps, sched.boundary):
        want = sch.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip == pytest.approx(float(want[0]), rel=1e-6, abs=1e-12)
        assert c_out == pytest.approx(float(want[1]), rel=1e-6)


def _check_tcd(n, L):
    """TCD model card: TCDScheduler.from_config(SDXL), n steps, eta 0.3. TCDScheduler.step:
    the next timestep is timesteps[i+1], or 0 after the last; the intermediate is
    floor((1 − eta)·next)."""
    sched, kw = S.preset("tcd", num_steps=n)
    sch = TCDScheduler.from_config(SDXL_CONFIG)
    _pipeline_function("stable_diffusion_3/pipeline_stable_diffusion_3.py",
                       "retrieve_timesteps")(sch, n, "cpu")
    _check_vp(sched, sch, 0)
    nxt = list(sch.timesteps[1:]) + [torch.tensor(0)]
    for tau_next, p in zip(sched.times[1:], nxt):
        assert sched.intermediate(tau_next, kw["gamma"]) == int(
            torch.floor((1 - kw["gamma"]) * p).to(dtype=torch.long))


def _check_rcm(n, L):
    """No diffusers pipeline exists for rCM: the source is NVlabs/rcm
    rcm/inference/wan2pt1_t2v_rcm_infer.py: t = [atan(80), *[1.5, 1.4, 1.0][:n-1], 0] (float64),
    the network sees c_noise = sin t / (cos t + sin t)·1000 and c_in·x with the TrigFlow state
    starting at unit noise (rcm/utils/denoiser_scaling.py)."""
    sched = S.preset("rcm", num_steps=n)[0]
    th = torch.tensor([math.atan(80.0), *[1.5, 1.4, 1.0][:n - 1], 0.0], dtype=torch.float64)
    sig = torch.sin(th) / (torch.cos(th) + torch.sin(th))
    torch.testing.assert_close(torch.tensor(sched.times, dtype=torch.float64), sig, rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(torch.tensor(sched.timesteps, dtype=torch.float64),
                               sig[:-1] * 1000, rtol=1e-6, atol=0)
    assert sched.init_sigma == pytest.approx(float(1 / (torch.cos(th[0]) + torch.sin(th[0]))),
                                             rel=1e-12)


PRESET_CHECKS = {  # every preset, with the step counts (and image sizes) it is checked at
    "flux-schnell": (_check_flux_schnell, [(1, None), (2, None), (4, None), (4, 1024), (8, None)]),
    "flux-dev": (_check_flux_dev, [(4, None), (8, 1024), (28, None), (28, 256), (28, 16384),
                                   (50, 4096)]),
    "sd35-turbo": (_check_sd35_turbo, [(1, None), (2, None), (4, None), (8, None)]),
    "dmd2": (_check_dmd2, [(4, None)]),
    "tcd": (_check_tcd, [(1, None), (2, None), (4, None), (8, None)]),
    "rcm": (_check_rcm, [(1, None), (2, None), (3, None), (4, None)]),
}


def test_every_preset_is_checked():
    assert set(PRESET_CHECKS) == set(S.PRESETS)


@needs_diffusers
@pytest.mark.parametrize("name", sorted(PRESET_CHECKS))
def test_preset_equals_its_pipeline(name):
    check, cases = PRESET_CHECKS[name]
    for n, image_seq_len in cases:
        check(n, image_seq_len)


@needs_diffusers
def test_parity_tcd_preset():
    """preset("tcd") through the sampler == the SDXL pipeline's TCDScheduler loop (eta 0.3,
    same noise), including the last step, which ends at timestep 0."""
    shape, seed = (2, 4, 8, 8), 4
    sched, kw = S.preset("tcd")
    sch = TCDScheduler.from_config(SDXL_CONFIG)
    sch.set_timesteps(4)

    def eps_model(x, t):
        return toy_model(x, t) * 0.5 + 0.5 * x

    want = _diffusers_loop(sch, eps_model, shape, seed)
    got = []
    S.FewStepSampler(eps_model, sched, **kw).sample(
        shape, generator=torch.Generator().manual_seed(seed),
        callback=lambda i, t, x, st: got.append(st.clone()))
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- diffusers parity --------------------------------------------------------------------------------
def _diffusers_loop(scheduler, model, shape, seed, x0_out=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    traj = []
    for t in scheduler.timesteps:
        out = model(x, t)
        res = scheduler.step(out, t, x, generator=g, return_dict=False)
        x = res[0]
        traj.append(x)
    return traj


def _noises(shape, seed, count):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float32) for _ in range(count + 1)]


@needs_diffusers
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_parity_flow_match_euler(shift):
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(num_inference_steps=4)
    want = _diffusers_loop(sch, toy_model, (2, 3, 8, 8), 0)
    sched = S.flow_schedule(sigmas=sch.sigmas.tolist(), timestep_scale=1000.0)
    assert torch.equal(torch.tensor(sched.timesteps), sch.timesteps)
    got = []
    S.FewStepSampler(toy_model, sched).sample(
        (2, 3, 8, 8), generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, x, st: got.append(st.clone()))
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # bit-exact: the same fp32 operations


@needs_diffusers
def test_parity_flow_match_stochastic():
    shape, seed = (2, 4, 8, 8), 1
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    sch.set_timesteps(num_inference_steps=4)
    want = _diffusers_loop(sch, toy_model, shape, seed)
    sched = S.flow_schedule(sigmas=sch.sigmas.tolist(), timestep_scale=1000.0)
    got = []
    S.FewStepSampler(toy_model, sched, rule="renoise").sample(
        shape, generator=torch.Generator().manual_seed(seed),
        callback=lambda i, t, x, st: got.append(st.clone()))
    # the truth in float64, same noise: x0 = x − σ·v; x' = (1 − σ')·x0 + σ'·z
    z = _noises(shape, seed, 4)
    x = z[0].double()
    sig = sch.sigmas.double()
    for i in range(4):
        v = toy_model(x.float(), sch.timesteps[i]).double()
        x = (1 - sig[i + 1]) * (x - sig[i] * v) + sig[i + 1] * z[i + 1].double()
        err_ours = (got[i].double() - x).abs().max()
        err_diff = (want[i].double() - x).abs().max()
        assert err_ours <= 2 * err_diff + 4 * EPS32 * x.abs().max(), (i, err_ours, err_diff)


@needs_diffusers
def test_parity_lcm():
    shape, seed = (2, 4, 8, 8), 2
    sch = LCMScheduler()
    sch.set_timesteps(num_inference_steps=4)
    ts = [int(t) for t in sch.timesteps]

    def eps_model(x, t):
        return toy_model(x, t) * 0.5 + 0.5 * x

    want = _diffusers_loop(sch, eps_model, shape, seed)
    sched = S.vp_schedule(ts, lcm_boundary=True)
    got = []
    S.FewStepSampler(eps_model, sched, prediction="epsilon", rule="lcm").sample(
        shape, generator=torch.Generator().manual_seed(seed),
        callback=lambda i, t, x, st: got.append(st.clone()))
    z = _noises(shape, seed, 3)
    ac = sch.alphas_cumprod.double()
    x = z[0].double()
    for i, t in enumerate(ts):
        e = eps_model(x.float(), torch.tensor(t)).double()
        a, s = ac[t].sqrt(), (1 - ac[t]).sqrt()
        st = t * 10.0
        c_skip, c_out = 0.25 / (st ** 2 + 0.25), st / math.sqrt(st ** 2 + 0.25)
        den = c_out * (x - s * e) / a + c_skip * x
        if i + 1 < len(ts):
            an = ac[ts[i + 1]]
            x = an.sqrt() * den + (1 - an).sqrt() * z[i + 1].double()
        else:
            x = den
        err_ours = (got[i].double() - x).abs().max()
        err_diff = (want[i].double() - x).abs().max()
        assert err_ours <= 2 * err_diff + 4 * EPS32 * x.abs().max(), (i, err_ours, err_diff)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                               attention_head_dim=16, num_attention_heads=2,
                               joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 4, 8)).eval()
    B, L, T = 1, 16, 6
    cond = dict(encoder_hidden_states=torch.randn(B, T, 32), pooled_projections=torch.randn(B, 32),
                txt_ids=torch.zeros(T, 3), img_ids=torch.stack(
                    torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                   indexing="ij"), -1).reshape(L, 3))
    return m, (B, L, 8), cond


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                              attention_head_dim=8, num_attention_heads=2,
                              joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=16, out_channels=4,
                              pos_embed_max_size=8).eval()
    cond = dict(encoder_hidden_states=torch.randn(1, 5, 16), pooled_projections=torch.randn(1, 16))
    return m, (1, 4, 8, 8), cond


def _tiny_wan():
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                              in_channels=4, out_channels=4, text_dim=16, freq_dim=32,
                              ffn_dim=32, num_layers=1, rope_max_seq_len=32).eval()
    cond = dict(encoder_hidden_states=torch.randn(1, 5, 16))
    return m, (1, 4, 2, 8, 8), cond


def _tiny_hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                       attention_head_dim=10, num_layers=1, num_single_layers=1,
                                       num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                       guidance_embeds=True, text_embed_dim=16,
                                       pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()
    cond = dict(encoder_hidden_states=torch.randn(1, 3, 16),
                encoder_attention_mask=torch.ones(1, 3), pooled_projections=torch.randn(1, 8),
                guidance=torch.tensor([6000.0]))
    return m, (1, 4, 1, 4, 4), cond


TINY = {"flux": _tiny_flux, "sd3": _tiny_sd3, "wan": _tiny_wan,
        "hunyuan_video": _tiny_hunyuan_video}


def _pipeline_timestep(family, t, batch, latents_dtype):
    """The ``timestep`` a family's diffusers pipeline gives its transformer for the scheduler's
    fp32 timestep ``t``, written as in the pipeline's denoising loop (diffusers 0.42)."""
    if family == "flux":  # pipelines/flux/pipeline_flux.py (latents in the transformer dtype)
        timestep = t.expand(batch).to(latents_dtype)
        return timestep / 1000
    if family == "hunyuan_video":  # pipelines/hunyuan_video/pipeline_hunyuan_video.py
        return t.expand(batch).to(torch.float32)  # .to(latents.dtype); latents are fp32 there
    # sd3: stable_diffusion_3/pipeline_stable_diffusion_3.py; wan: wan/pipeline_wan.py
    return t.expand(batch)


def _family_schedules(family, n, image_seq_len):
    """(pyops schedule, diffusers scheduler after the pipeline's set_timesteps) for a family."""
    import numpy as np
    if family == "flux":      # FLUX.1-dev: FluxPipeline, dynamic shift
        return (S.preset("flux-dev", num_steps=n, image_seq_len=image_seq_len)[0],
                _flux_pipeline_scheduler(FLUX_DEV_CONFIG, n, image_seq_len))
    if family == "hunyuan_video":  # HunyuanVideoPipeline: sigmas linspace(1, 0, n+1)[:-1], shift 7
        sig = np.linspace(1.0, 0.0, n + 1)[:-1]
        sch = FlowMatchEulerDiscreteScheduler(shift=7.0)
        sch.set_timesteps(sigmas=sig)
        return S.flow_schedule(sigmas=sig.tolist(), shift=7.0), sch
    return S.flow_schedule(n, shift=3.0), _sd3_pipeline_scheduler(dict(shift=3.0), n)


@needs_diffusers
@pytest.mark.parametrize("family", sorted(TINY))
def test_diffusers_model_passes_the_pipeline_timestep(family):
    """Issue item 19: with model_dtype=bf16 the transformer receives, at every step, exactly the
    timestep tensor (dtype and values) its diffusers pipeline passes for the same schedule:
    fp32 and unrounded for SD3/Wan/HunyuanVideo, bf16(t)/1000 in bf16 for Flux. 28 steps
    (SD3's default) where the tiny model is fast, 8 for the slower Flux/HunyuanVideo ones."""
    n = 8 if family in ("flux", "hunyuan_video") else 28
    m, shape, cond = TINY[family]()
    m = m.to(torch.bfloat16)
    cond = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in cond.items()}
    sched, sch = _family_schedules(family, n, shape[1] if family == "flux" else None)
    _assert_flow_equal(sched, sch)
    seen = []
    hook = m.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            out = S.FewStepSampler(S.diffusers_model(m), sched, model_dtype=torch.bfloat16).sample(
                shape, cond=cond, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert torch.isfinite(out).all()
    want = [_pipeline_timestep(family, t, shape[0], torch.bfloat16) for t in sch.timesteps]
    assert len(seen) == len(want) == n
    for i, (got, w) in enumerate(zip(seen, want)):
        assert got.dtype == w.dtype and got.shape == w.shape, (i, got, w)
        assert torch.equal(got, w), (i, got, w)


def _recorder(class_name, base=torch.nn.Module):
    """A stand-in transformer whose class is named like a diffusers one; records the timestep."""
    def forward(self, hidden_states, timestep, return_dict=True, **kwargs):
        self.seen.append(timestep.clone())
        return (torch.zeros_like(hidden_states),)

    def __init__(self):
        base.__init__(self)
        self.seen = []
    return type(class_name, (base,), {"forward": forward, "__init__": __init__})()


@pytest.mark.parametrize("class_name, mode", [
    ("FluxTransformer2DModel", "flux"), ("Flux2Transformer2DModel", "flux"),
    ("ChromaTransformer2DModel", "flux"), ("QwenImageTransformer2DModel", "flux"),
    ("SD3Transformer2DModel", "fp32"), ("WanTransformer3DModel", "fp32"),
    ("HunyuanVideoTransformer3DModel", "fp32")])
def test_diffusers_model_timestep_convention_by_class(class_name, mode):
    """The family is read from the class (also through a subclass and torch.compile's
    wrapper); "flux" pipelines pass bf16(t)/1000 (750 -> 752 -> 0.752), the others fp32 t."""
    t = torch.tensor([750.0, 1000.0, 857.6923217773438])
    x = torch.zeros(3, 4, dtype=torch.bfloat16)
    want = t.to(torch.bfloat16) / 1000 if mode == "flux" else t
    if mode == "flux":
        assert want.dtype == torch.bfloat16 and float(want[0]) != 0.75
    rec = _recorder(class_name)
    sub = _recorder("MyTuned" + class_name, base=type(rec))
    for module in (rec, sub):
        S.diffusers_model(module)(x, t)
        got = module.seen[-1]
        assert got.dtype == want.dtype and torch.equal(got, want)
    # torch.compile's wrapper (never called here, so nothing compiles): detected through it
    assert S.diffusers_model(torch.compile(rec)).timestep_mode == mode


def test_diffusers_model_unknown_class_needs_a_mode():
    rec = _recorder("MyTransformer")
    x, t = torch.zeros(2, 4, dtype=torch.bfloat16), torch.tensor([750.0, 500.0])
    with pytest.raises(ValueError, match="timestep_mode"):
        S.diffusers_model(rec)
    with pytest.raises(ValueError, match="unknown timestep_mode"):
        S.diffusers_model(rec, timestep_mode="bf16")
    S.diffusers_model(rec, timestep_mode="fp32")(x, t)
    assert rec.seen[-1].dtype == torch.float32 and torch.equal(rec.seen[-1], t)
    S.diffusers_model(rec, timestep_mode=lambda tt, xx: tt.to(xx.dtype))(x, t)
    assert rec.seen[-1].dtype == torch.bfloat16


@needs_diffusers
@pytest.mark.parametrize("family", ["flux", "sd3", "wan"])
def test_drive_diffusers_transformer(family):
    """A tiny random-config diffusers transformer through the sampler with its own calling
    convention, against the diffusers-style scheduler loop (same sigmas, same noise)."""
    m, shape, cond = TINY[family]()
    sch = FlowMatchEulerDiscreteScheduler(shift=1.0 if family == "flux" else 3.0)
    import numpy as np
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4).tolist() if family == "flux" else None,
                      num_inference_steps=4)

    @torch.no_grad()
    def pipe_model(x, t):  # the pipeline's own timestep convention
        tt = _pipeline_timestep(family, t, x.shape[0], x.dtype)
        return m(hidden_states=x, timestep=tt, return_dict=False, **cond)[0]

    want = _diffusers_loop(sch, pipe_model, shape, 0)[-1]
    sched = S.flow_schedule(sigmas=sch.sigmas.tolist(), timestep_scale=1000.0)
    model = S.diffusers_model(m)
    with torch.no_grad():
        got = S.FewStepSampler(model, sched).sample(
            shape, cond=cond, generator=torch.Generator().manual_seed(0))
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- structure ---------------------------------------------------------------------------------------
def _self_attributes_assigned(cls) -> set:
    """Names ``X`` of every ``self.X = ...`` (also in tuples, +=, annotated) in cls's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        else:
            continue
        for t in targets:
            for sub in ast.walk(t):
                if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                        and sub.value.id == "self"):
                    out.add(sub.attr)
    return out


def test_sampler_dataclasses_declare_every_attribute():
    # issue #10: no attributes a dataclass does not declare (CapturedSampler used to set its
    # static buffers and graph in __post_init__ without declaring them)
    checked = []
    for mod in (S.schedules, S.presets, S.loop, S.diffusers):
        for cls in vars(mod).values():
            if not (inspect.isclass(cls) and dataclasses.is_dataclass(cls)
                    and cls.__module__ == mod.__name__):
                continue
            declared = {f.name for f in dataclasses.fields(cls)}
            undeclared = _self_attributes_assigned(cls) - declared
            assert not undeclared, f"{cls.__name__} sets undeclared attributes {undeclared}"
            checked.append(cls.__name__)
    assert {"Schedule", "CapturedSampler"} <= set(checked)
    buffers = {f.name for f in dataclasses.fields(S.CapturedSampler) if not f.init}
    assert buffers == {"state", "x_in", "noise_buf", "ts", "graph"}


def test_sampler_package_never_touches_the_backend_registry():
    # issue #10: features compose ops (the public sample_step); backend choice is the op's
    files = sorted(pathlib.Path(S.__file__).parent.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "schedules.py", "presets.py", "loop.py",
                                       "diffusers.py"}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("_backend" in n.split(".") for n in names), (
                f"{f.name}:{node.lineno} imports the backend registry")
    assert S.sample_step is pyops.ops.sample_step.sample_step is pyops.sample_step


# ---- graph mode (GPU) --------------------------------------------------------------------------------
class _MLP(torch.nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(d + 1, 128), torch.nn.Linear(128, d)

    def forward(self, x, t, bias=None):
        tt = (t / 1000.0).to(x.dtype)[:, None, None].expand(*x.shape[:2], 1)
        h = self.l2(torch.nn.functional.gelu(self.l1(torch.cat([x, tt], -1))))
        return h + bias if bias is not None else h


def _gpu_sampler(rule, cfg):
    torch.manual_seed(0)
    model = _MLP().cuda().to(torch.bfloat16)
    sched, kw = (S.preset("rcm") if rule == "renoise" else S.preset("sd35-turbo"))
    smp = S.FewStepSampler(model, sched, guidance=3.0 if cfg else None, backend=None,
                           model_dtype=torch.bfloat16, **kw)
    cond = dict(bias=torch.full((2, 16, 64), 0.1, device="cuda", dtype=torch.bfloat16))
    uncond = dict(bias=torch.zeros(2, 16, 64, device="cuda", dtype=torch.bfloat16)) if cfg else None
    return smp, cond, uncond


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["euler", "renoise"])
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("own_generator", [False, True])
def test_graph_equals_eager_and_advances_noise(rule, cfg, own_generator):
    smp, cond, uncond = _gpu_sampler(rule, cfg)
    gen = torch.Generator(device="cuda") if own_generator else None
    seed = (lambda s: gen.manual_seed(s)) if own_generator else torch.cuda.manual_seed
    shape = (2, 16, 64)
    with torch.no_grad():
        seed(7)
        eager = smp.sample(shape, cond=cond, uncond=uncond, generator=gen, device="cuda",
                           dtype=torch.bfloat16)
        cap = smp.capture(shape, cond=cond, uncond=uncond, generator=gen, device="cuda",
                          dtype=torch.bfloat16)
        seed(7)
        first = cap.replay().clone()
        second = cap.replay().clone()
        seed(7)
        again = cap.replay().clone()
    torch.cuda.synchronize()
    assert torch.equal(first, eager)          # graph == eager, bit for bit
    assert not torch.equal(first, second)     # each replay draws new noise
    assert torch.equal(first, again)          # deterministic under a seed


@pytest.mark.gpu
def test_no_host_sync_inside_the_loop():
    smp, cond, uncond = _gpu_sampler("renoise", True)
    shape = (2, 16, 64)
    with torch.no_grad():
        smp.sample(shape, cond=cond, uncond=uncond, device="cuda", dtype=torch.bfloat16)  # warm
        cap = smp.capture(shape, cond=cond, uncond=uncond, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            smp.sample(shape, cond=cond, uncond=uncond, device="cuda", dtype=torch.bfloat16)
            cap.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_graph_update_cond():
    smp, cond, uncond = _gpu_sampler("euler", False)
    with torch.no_grad():
        cap = smp.capture((2, 16, 64), cond=cond, device="cuda", dtype=torch.bfloat16)
        torch.cuda.manual_seed(1)
        a = cap.replay().clone()
        cap.update_cond(bias=torch.full((2, 16, 64), -0.5, device="cuda"))
        torch.cuda.manual_seed(1)
        b = cap.replay().clone()
        torch.cuda.manual_seed(1)
        e = smp.sample((2, 16, 64), cond=cond, device="cuda", dtype=torch.bfloat16)
    assert not torch.equal(a, b) and torch.equal(b, e)
    assert set(vars(cap)) <= {f.name for f in dataclasses.fields(S.CapturedSampler)}

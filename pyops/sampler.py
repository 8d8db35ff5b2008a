"""Few-step sampling for distilled diffusion / flow models: schedules, rules, eager and graph loops.

Quick start::

    sched, kw = pyops.sampler.preset("flux-schnell")          # 4 steps, flow Euler, velocity
    s = pyops.sampler.FewStepSampler(model, sched, **kw)      # model(x, t, **cond) -> prediction
    x0 = s.sample((1, 4096, 64), cond=dict(...), generator=g)  # eager (tqdm bar, callbacks)
    g_s = s.capture((1, 4096, 64), cond=dict(...), generator=g)  # CUDA graph of the whole loop
    x0 = g_s.replay()                                          # new noise on every replay

Schedules reproduce the inference code each model family ships with (sources in each
function's docstring): :func:`flow_schedule` = diffusers' ``FlowMatchEulerDiscreteScheduler``
(static shift, dynamic shift with :func:`flux_mu`), :func:`vp_schedule` = the ᾱ table and LCM
boundary condition of diffusers' LCM/TCD schedulers, :func:`tcd_timesteps` = ``TCDScheduler``,
:func:`trigflow_schedule` = rCM's sampler; :func:`preset` names the models.
:func:`diffusers_model` calls a diffusers transformer with the timestep tensor its pipeline
passes.

Every step is one fused ``pyops::sample_step`` (CFG combine, prediction conversion, update with
fresh noise): ``x_next = α·x + β·p + ζ·z``. The host computes (α, β, ζ) per step from the formula
table in :mod:`pyops.reference.sample_step` once, before the loop, so nothing inside the loop
reads the device: no host syncs, and the loop (model forwards included) can be captured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ._checks import FLOAT_DTYPES
from .ops.sample_step import sample_step
from .reference import sample_step as _ref
from .reference.sample_step import PATHS, PREDICTIONS, RULES, StepCoefficients

__all__ = [
    "Schedule", "FewStepSampler", "CapturedSampler", "StepCoefficients", "sample_step",
    "flow_schedule", "vp_schedule", "trigflow_schedule", "preset", "PRESETS", "diffusers_model",
    "step_coefficients", "flux_mu", "tcd_timesteps", "TIMESTEP_MODES",
]

step_coefficients = _ref.step_coefficients


# ---- schedules ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """An explicit few-step schedule.

    path: ``"flow"`` (times are σ = t, from ~1 down to 0), ``"vp"`` (integer DDPM timesteps)
    or ``"trigflow"`` (angles θ from ~π/2 down to 0).
    times: the n+1 path times, the last being the end point (0 for flow/trigflow; for vp -1 =
    clean data, or a timestep such as TCD's 0).
    timesteps: the n values given to the model (its own units: σ·1000 as diffusers' flow
    schedulers, the integer timestep, θ·1000, ...), as fp32 numbers.
    alphas_cumprod: ᾱ table (vp only). init_sigma: the initial latent is ``init_sigma·ε``.
    boundary: optional per-step (c_skip, c_out) consistency boundary condition (LCM).
    """
    path: str
    times: tuple
    timesteps: tuple
    alphas_cumprod: Optional[tuple] = None
    init_sigma: float = 1.0
    boundary: Optional[tuple] = None
    name: str = ""

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"unknown path {self.path!r}; expected one of {PATHS}")
        if len(self.times) != len(self.timesteps) + 1 or len(self.timesteps) == 0:
            raise ValueError(f"a schedule of n steps needs n+1 times and n timesteps; got "
                             f"{len(self.times)} and {len(self.timesteps)}")
        if self.path == "vp" and self.alphas_cumprod is None:
            raise ValueError("a vp schedule needs alphas_cumprod")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def path_values(self, tau) -> tuple[float, float]:
        """(a, s) with x = a·x0 + s·ε at path time ``tau``."""
        if self.path == "flow":
            return 1.0 - float(tau), float(tau)
        if self.path == "trigflow":
            return math.cos(float(tau)), math.sin(float(tau))
        if tau < 0:
            return 1.0, 0.0
        ab = float(self.alphas_cumprod[int(tau)])
        return math.sqrt(ab), math.sqrt(1.0 - ab)

    def intermediate(self, tau_next, gamma: float):
        """TCD's intermediate time between the clean end and ``tau_next``."""
        if self.path == "vp":
            if tau_next < 0:
                return -1
            # TCDScheduler.step: floor((1 − eta)·prev_timestep) in fp32, then to int
            return int(torch.floor((1.0 - gamma) * torch.tensor(float(tau_next),
                                                                dtype=torch.float32)))
        return (1.0 - gamma) * float(tau_next)


def flux_mu(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The resolution-dependent shift ``mu`` of FLUX-style pipelines: linear in the number of
    image tokens, ``base_shift`` at ``base_seq_len`` and ``max_shift`` at ``max_seq_len``.

    Source: ``calculate_shift`` in diffusers ``pipelines/flux/pipeline_flux.py`` (same Python
    float operations, same order); the defaults are FLUX.1-dev's scheduler config
    (``base_image_seq_len`` 256, ``max_image_seq_len`` 4096, ``base_shift`` 0.5,
    ``max_shift`` 1.15). image_seq_len: packed latent tokens, ``(H/16)·(W/16)`` for an H×W image
    (4096 at 1024²). Raises ValueError for image_seq_len < 1.
    """
    if int(image_seq_len) != image_seq_len or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be a positive integer, got {image_seq_len!r}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return int(image_seq_len) * m + b


def _flow_match_sigmas(num_steps: Optional[int], sigmas: Optional[Sequence[float]],
                       shift: float, mu: Optional[float], time_shift_type: str,
                       num_train_timesteps: int) -> list:
    """The fp32 sigmas (without the final 0) that diffusers' ``FlowMatchEulerDiscreteScheduler(
    num_train_timesteps, shift, use_dynamic_shifting=mu is not None, time_shift_type)
    .set_timesteps(num_steps, sigmas=sigmas, mu=mu)`` computes, with the same arithmetic in the
    same precision (source: diffusers ``schedulers/scheduling_flow_match_euler_discrete.py``,
    ``__init__`` and ``set_timesteps``; karras/exponential/beta sigmas, ``shift_terminal`` and
    ``invert_sigmas`` are not reproduced):

    * ``__init__`` (torch fp32): training grid ``t = N … 1``, ``σ = t / N``, shifted by
      ``shift·σ / (1 + (shift − 1)·σ)`` unless dynamic shifting is on; its ends are
      ``sigma_max`` and ``sigma_min`` (``sigma_min`` is the shifted ``1/N``, not 0).
    * ``set_timesteps`` without sigmas (numpy float64):
      ``σ = linspace(sigma_max·N, sigma_min·N, n) / N``; with sigmas: ``σ = float32(sigmas)``
      and the rest in numpy float32.
    * then either the static shift ``shift·σ / (1 + (shift − 1)·σ)`` or, with ``mu``, the time
      shift ``e^mu / (e^mu + (1/σ − 1))`` (exponential) or ``mu / (mu + (1/σ − 1))`` (linear);
    * rounded to fp32.

    The static shift is applied in ``__init__`` *and* in ``set_timesteps``: the default schedule
    is shifted twice at its low end (SD3 with shift 3 and 4 steps: 1, 0.8577, 0.6022, 0.0089).
    """
    import numpy as np
    shift = float(shift)
    N = int(num_train_timesteps)
    if sigmas is None:
        grid = torch.tensor([float(N), 1.0], dtype=torch.float32) / N
        if mu is None:
            grid = shift * grid / (1 + (shift - 1) * grid)
        sigma_max, sigma_min = (float(v) for v in grid)
        sig = np.linspace(sigma_max * N, sigma_min * N, int(num_steps)) / N      # float64
    else:
        sig = np.array([float(v) for v in sigmas], dtype=np.float64).astype(np.float32)
    if mu is None:
        sig = shift * sig / (1 + (shift - 1) * sig)
    else:
        mu = float(mu)
        r = 1 / sig - 1                          # same dtype as sig (Python scalars are weak)
        if time_shift_type == "exponential":
            sig = math.exp(mu) / (math.exp(mu) + r)
        elif time_shift_type == "linear":
            sig = mu / (mu + r)
        else:
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got "
                             f"{time_shift_type!r}")
    return torch.from_numpy(np.asarray(sig)).to(torch.float32).tolist()


def flow_schedule(num_steps: Optional[int] = None, *, sigmas: Optional[Sequence[float]] = None,
                  shift: float = 1.0, mu: Optional[float] = None,
                  time_shift_type: str = "exponential", num_train_timesteps: int = 1000,
                  timestep_scale: float = 1000.0, name: str = "") -> Schedule:
    """Rectified-flow schedule, equal to diffusers' ``FlowMatchEulerDiscreteScheduler``.

    ``flow_schedule(n, shift=s)`` gives the sigmas and timesteps of
    ``FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n)`` (what the SD3 pipeline uses);
    ``flow_schedule(sigmas=..., shift=s)`` those of ``set_timesteps(sigmas=...)`` (what the Flux
    pipeline uses, with ``sigmas = linspace(1, 1/n, n)``); ``mu`` turns on dynamic shifting
    (``use_dynamic_shifting=True``, see :func:`flux_mu`). Bit-exact with diffusers (same
    arithmetic, same precision); the formulas and their source are in
    :func:`_flow_match_sigmas`.

    num_steps: n ≥ 1 (ignored when sigmas is given). sigmas: n decreasing values in (0, 1]
    before the shift (a trailing 0 is dropped). shift: static shift (scheduler config ``shift``).
    mu, time_shift_type: dynamic shift, as the scheduler's ``set_timesteps(mu=...)`` with its
    config ``time_shift_type``. num_train_timesteps: the scheduler's N (1000).
    timestep_scale: model timestep = fp32 σ · timestep_scale in fp32 (diffusers:
    ``timesteps = sigmas * num_train_timesteps``). Returns a flow :class:`Schedule`: times =
    the n fp32 sigmas and a final 0, timesteps = the n model timesteps. Raises ValueError for
    n < 1 or sigmas that do not decrease within (0, 1] after the shift.
    """
    if sigmas is None:
        if num_steps is None or int(num_steps) != num_steps or num_steps < 1:
            raise ValueError("flow_schedule needs num_steps >= 1 or explicit sigmas")
    else:
        sigmas = [float(s) for s in sigmas]
        if sigmas and sigmas[-1] == 0.0:
            sigmas = sigmas[:-1]
        if not sigmas:
            raise ValueError("flow_schedule: sigmas is empty")
        if any(not (0.0 < s <= 1.0) for s in sigmas):
            raise ValueError(f"flow sigmas must decrease within (0, 1]; got {sigmas}")
    sig = _flow_match_sigmas(num_steps, sigmas, shift, mu, time_shift_type, num_train_timesteps)
    if any(not (0.0 < s <= 1.0) for s in sig) or any(a <= b for a, b in zip(sig, sig[1:])):
        raise ValueError(f"flow sigmas must decrease within (0, 1]; got {sig}")
    ts = (torch.tensor(sig, dtype=torch.float32) * timestep_scale).tolist()
    return Schedule("flow", tuple(sig) + (0.0,), tuple(ts), init_sigma=1.0, name=name)


def _alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float,
                    beta_schedule: str) -> tuple:
    f = torch.float32
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                               dtype=f) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=f)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r} (linear, scaled_linear)")
    return tuple(torch.cumprod(1.0 - betas, dim=0).tolist())


def vp_schedule(timesteps: Sequence[int], *, num_train_timesteps: int = 1000,
                beta_start: float = 0.00085, beta_end: float = 0.012,
                beta_schedule: str = "scaled_linear", lcm_boundary: bool = False,
                timestep_scaling: float = 10.0, final_timestep: int = -1,
                name: str = "") -> Schedule:
    """DDPM (variance-preserving) schedule over explicit integer timesteps (e.g. DMD2's
    [999, 749, 499, 249]).

    ᾱ is computed in fp32 as diffusers' DDPM-family schedulers do (``betas`` linear or
    "scaled_linear" = linspace of √β squared, ``alphas_cumprod = cumprod(1 − betas)``; source:
    diffusers ``schedulers/scheduling_lcm.py`` / ``scheduling_tcd.py`` ``__init__``), SD/SDXL
    betas by default (stabilityai/stable-diffusion-xl-base-1.0 ``scheduler_config.json``:
    0.00085, 0.012, scaled_linear, 1000). lcm_boundary adds LCM's boundary condition
    ``c_skip = σd² / ((k·t)² + σd²)``, ``c_out = k·t / √((k·t)² + σd²)`` with σd = 0.5 and
    k = timestep_scaling (source: ``LCMScheduler.get_scalings_for_boundary_condition_discrete``).
    final_timestep: the end point of the last step: -1 = clean data (ᾱ = 1; LCMScheduler, whose
    last step returns the denoised sample) or a timestep below the last one (0 for
    TCDScheduler, whose last step ends at ``alphas_cumprod[0]``). Model timesteps = the integer
    timesteps as floats. Raises ValueError for timesteps that do not decrease within
    [0, num_train_timesteps) or a bad final_timestep.
    """
    ts = [int(t) for t in timesteps]
    if not ts or any(not (0 <= t < num_train_timesteps) for t in ts) or any(
            a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"vp timesteps must decrease within [0, {num_train_timesteps}); got {ts}")
    if int(final_timestep) != final_timestep or not (-1 <= final_timestep < ts[-1]):
        raise ValueError(f"final_timestep must be -1 (clean) or a timestep below {ts[-1]}; got "
                         f"{final_timestep!r}")
    ac = _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
    boundary = None
    if lcm_boundary:
        sd = 0.5
        bl = []
        for t in ts:
            st = t * timestep_scaling
            bl.append((sd * sd / (st * st + sd * sd), st / math.sqrt(st * st + sd * sd)))
        boundary = tuple(bl)
    return Schedule("vp", tuple(ts) + (int(final_timestep),), tuple(float(t) for t in ts),
                    alphas_cumprod=ac, init_sigma=1.0, boundary=boundary, name=name)


def tcd_timesteps(num_steps: int, *, original_inference_steps: int = 50,
                  num_train_timesteps: int = 1000) -> list:
    """The timesteps of diffusers' ``TCDScheduler.set_timesteps(num_steps)`` (strength 1):
    the distillation grid ``k·i − 1`` (i = 1 … original_inference_steps,
    k = num_train_timesteps // original_inference_steps), reversed, sampled at
    ``floor(linspace(0, len, num_steps, endpoint=False))``. 4 steps: [999, 759, 499, 259].
    Source: diffusers ``schedulers/scheduling_tcd.py`` ``set_timesteps``. Raises ValueError
    unless 1 ≤ num_steps ≤ original_inference_steps ≤ num_train_timesteps."""
    import numpy as np
    n, orig = int(num_steps), int(original_inference_steps)
    if n != num_steps or not (1 <= n <= orig <= num_train_timesteps):
        raise ValueError(f"tcd_timesteps needs 1 <= num_steps <= original_inference_steps <= "
                         f"num_train_timesteps; got {num_steps}, {original_inference_steps}, "
                         f"{num_train_timesteps}")
    k = num_train_timesteps // orig
    grid = [i * k - 1 for i in range(orig, 0, -1)]
    idx = np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)
    return [grid[int(i)] for i in idx]


def trigflow_schedule(angles: Optional[Sequence[float]] = None, *, sigma_max: float = 80.0,
                      mid_t: Sequence[float] = (1.5, 1.4, 1.0), as_flow: bool = True,
                      timestep_scale: float = 1000.0, name: str = "") -> Schedule:
    """TrigFlow (sCM / rCM) schedule: angles θ with x = cos θ·x0 + sin θ·ε, default
    ``[atan(sigma_max), *mid_t, 0]`` (rCM's Wan sampler: ``sigma_max`` 80, ``mid_t``
    [1.5, 1.4, 1.0]; source: NVlabs/rcm ``rcm/inference/wan2pt1_t2v_rcm_infer.py``).

    ``as_flow`` maps it onto the flow path for flow-trained networks such as Wan with rCM, as
    rCM's ``RectifiedFlow_TrigFlowWrapper`` (``rcm/utils/denoiser_scaling.py``) does: the flow
    state is ``x_flow = x_trig / (cos θ + sin θ)`` at σ = sin θ / (sin θ + cos θ), so the
    steps are the same points (exact for x0-predicting rules and re-noising, the rules rCM
    uses) and the initial latent, rCM's unit noise in TrigFlow space, is
    ``ε / (cos θ0 + sin θ0)`` (``init_sigma``). The model gets σ·timestep_scale (rCM:
    ``c_noise = σ·1000``) and predicts the flow velocity. Otherwise the path is trigflow and the
    model gets θ·timestep_scale and should predict ``v_prediction``. Raises ValueError for
    angles that do not decrease within (0, π/2].
    """
    th = [float(a) for a in angles] if angles is not None else [math.atan(sigma_max), *mid_t]
    if th and th[-1] == 0.0:
        th = th[:-1]
    if not th or any(not (0.0 < a <= math.pi / 2) for a in th) or any(
            a <= b for a, b in zip(th, th[1:])):
        raise ValueError(f"trigflow angles must decrease within (0, pi/2]; got {th}")
    if as_flow:
        sched = flow_schedule(sigmas=[math.sin(a) / (math.sin(a) + math.cos(a)) for a in th],
                              timestep_scale=timestep_scale, name=name)
        return replace(sched, init_sigma=1.0 / (math.cos(th[0]) + math.sin(th[0])))
    ts = [a * timestep_scale for a in th]
    return Schedule("trigflow", tuple(th) + (0.0,), tuple(ts), init_sigma=math.sin(th[0]),
                    name=name)


# Few-step model families. Each entry: (default step count, the step counts it accepts or None
# for any, whether it takes image_seq_len, schedule factory(num_steps, image_seq_len), sampler
# keyword arguments). Each schedule is the one the named model's own inference code builds (a
# diffusers pipeline with the model's scheduler config, or the model's reference sampler).
_FLUX_DEV_SEQ_LEN = 4096     # 1024² image: (1024/16)² packed latent tokens


def _flux_sigmas(n: int) -> list:
    # FluxPipeline.__call__: sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    import numpy as np
    return np.linspace(1.0, 1.0 / n, n).tolist()


def _presets() -> dict:
    return {
        # FLUX.1-schnell (model card: 4 steps, guidance 0). FluxPipeline passes
        # sigmas = linspace(1, 1/n, n); the model's scheduler config has shift 1.0 and no dynamic
        # shifting (the mu the pipeline computes is ignored), so image_seq_len has no effect.
        # Timesteps σ·1000 as the scheduler's; diffusers_model divides by 1000 as the pipeline.
        "flux-schnell": (4, None, True,
                         lambda n, L: flow_schedule(sigmas=_flux_sigmas(n), shift=1.0,
                                                    name="flux-schnell"),
                         dict(prediction="velocity", rule="euler")),
        # FLUX.1-dev (guidance-distilled; FluxPipeline's default 28 steps; also the base of
        # few-step Flux LoRAs). Scheduler config: shift 3.0 (unused), use_dynamic_shifting with
        # base/max image_seq_len 256/4096 and base/max shift 0.5/1.15; FluxPipeline passes
        # sigmas = linspace(1, 1/n, n) and mu = calculate_shift(image_seq_len).
        # image_seq_len defaults to 4096 (1024²). The guidance scale is a model input (cond).
        "flux-dev": (28, None, True,
                     lambda n, L: flow_schedule(sigmas=_flux_sigmas(n),
                                                mu=flux_mu(L if L is not None
                                                           else _FLUX_DEV_SEQ_LEN),
                                                name="flux-dev"),
                     dict(prediction="velocity", rule="euler")),
        # SD3.5-Large-Turbo (model card: 4 steps, guidance 0). Scheduler config shift 3.0, no
        # dynamic shifting; StableDiffusion3Pipeline calls set_timesteps(n) (no sigmas).
        "sd35-turbo": (4, None, False,
                       lambda n, L: flow_schedule(n, shift=3.0, name="sd35-turbo"),
                       dict(prediction="velocity", rule="euler")),
        # DMD2 SDXL 4-step (tianweiy/DMD2 README): LCMScheduler.from_config(SDXL config),
        # pipe(..., timesteps=[999, 749, 499, 249], guidance_scale=0). LCMScheduler.step: x0
        # from epsilon with LCM's boundary condition, fresh noise at the next timestep, the last
        # step returns the denoised sample.
        "dmd2": (4, (4,), False,
                 lambda n, L: vp_schedule([999, 749, 499, 249], lcm_boundary=True, name="dmd2"),
                 dict(prediction="epsilon", rule="renoise")),
        # rCM for Wan2.1 T2V (NVlabs/rcm wan2pt1_t2v_rcm_infer.py, 1-4 steps): TrigFlow angles
        # [atan(80), *[1.5, 1.4, 1.0][:n-1], 0] on the flow path, x0 + fresh noise.
        "rcm": (4, (1, 2, 3, 4), False,
                lambda n, L: trigflow_schedule(mid_t=(1.5, 1.4, 1.0)[:n - 1], name="rcm"),
                dict(prediction="velocity", rule="renoise")),
        # TCD SDXL LoRA h1t/TCD-SDXL-LoRA (jabir-zheng/TCD demo_styled_lora.py:
        # TCDScheduler.from_config(SDXL config), 4 steps, eta 0.3). TCDScheduler.set_timesteps(n)
        # timesteps; its last step ends at timestep 0 (alphas_cumprod[0]), not at clean data.
        "tcd": (4, None, False,
                lambda n, L: vp_schedule(tcd_timesteps(n), final_timestep=0, name="tcd"),
                dict(prediction="epsilon", rule="tcd", gamma=0.3)),
    }


PRESETS = tuple(_presets())


def preset(name: str, *, num_steps: Optional[int] = None,
           image_seq_len: Optional[int] = None) -> tuple[Schedule, dict]:
    """(schedule, sampler keyword arguments) for a known few-step model family.

    Each preset reproduces the schedule (sigmas / timesteps, end point, initial noise scale)
    of the inference code the model is named after; the per-preset source is in the comments
    of ``_presets`` and the tests compare each against diffusers' scheduler configured as that
    pipeline configures it:

    ============  =======  ======================================================================
    name          steps    source
    ============  =======  ======================================================================
    flux-schnell  4 (any)  FluxPipeline, FLUX.1-schnell scheduler config (shift 1, no dynamic)
    flux-dev      28 (any) FluxPipeline, FLUX.1-dev config (dynamic shift, mu from image_seq_len)
    sd35-turbo    4 (any)  StableDiffusion3Pipeline, SD3.5-Large-Turbo config (shift 3)
    dmd2          4        DMD2 README: LCMScheduler, timesteps [999, 749, 499, 249]
    rcm           4 (1-4)  NVlabs/rcm Wan2.1 sampler (TrigFlow mid_t 1.5, 1.4, 1.0)
    tcd           4 (1-50) TCD demos: TCDScheduler (original_inference_steps 50), eta 0.3
    ============  =======  ======================================================================

    num_steps: override the default step count (where the source defines other counts).
    image_seq_len: packed image tokens for presets with dynamic shifting (flux-dev; default
    4096 = a 1024² image); accepted and without effect for flux-schnell (as in FluxPipeline);
    other presets raise. Flow presets give timesteps σ·1000 (the scheduler's ``timesteps``);
    :func:`diffusers_model` converts them as each pipeline does. Raises ValueError for an
    unknown name, a step count the preset does not define, or image_seq_len where unused.
    """
    table = _presets()
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
    default_n, allowed, takes_seq_len, mk, kw = table[name]
    n = default_n if num_steps is None else num_steps
    if int(n) != n or n < 1 or (allowed is not None and n not in allowed):
        raise ValueError(f"preset {name!r}: num_steps={num_steps!r} not supported (expected "
                         f"{'a positive integer' if allowed is None else allowed})")
    if image_seq_len is not None and not takes_seq_len:
        raise ValueError(f"preset {name!r} does not depend on the image size; image_seq_len "
                         f"applies to the flux presets")
    if image_seq_len is not None:
        flux_mu(image_seq_len)  # validates it
    return mk(int(n), image_seq_len), dict(kw)


# ---- the sampler --------------------------------------------------------------------------------
def _plan(schedule: Schedule, prediction: str, gamma: float) -> list[StepCoefficients]:
    out = []
    for i in range(schedule.num_steps):
        tau, tau_n = schedule.times[i], schedule.times[i + 1]
        a, s = schedule.path_values(tau)
        an, sn = schedule.path_values(tau_n)
        cs, co = schedule.boundary[i] if schedule.boundary else (0.0, 1.0)
        flow_euler = (schedule.path == "flow" and prediction == "velocity" and gamma == 0.0
                      and schedule.boundary is None)
        am = sm = None
        if 0.0 < gamma < 1.0 and sn != 0.0:
            am, sm = schedule.path_values(schedule.intermediate(tau_n, gamma))
            if am == 0.0:
                raise ValueError("TCD intermediate point has no signal (a_mid = 0)")
        out.append(_ref.step_coefficients(prediction, a, s, an, sn, gamma=gamma, a_mid=am,
                                          s_mid=sm, c_skip=cs, c_out=co, flow_euler=flow_euler))
    return out


def _first(out):
    """Model outputs: a tensor, a tuple/list (first item) or an object with ``.sample``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"the model returned {type(out).__name__}; expected a tensor, a tuple or an "
                    f"object with .sample")


def _cat_cond(uncond: dict, cond: dict) -> dict:
    merged = {}
    for k in cond.keys() | uncond.keys():
        c, u = cond.get(k), uncond.get(k)
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            merged[k] = torch.cat([u, c], dim=0)
        elif isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor):
            raise ValueError(f"CFG by batch doubling: cond[{k!r}] and uncond[{k!r}] must both "
                             f"be tensors (or equal non-tensors)")
        else:
            if k in cond and k in uncond and c != u:
                raise ValueError(f"CFG by batch doubling: non-tensor argument {k!r} differs "
                                 f"between cond and uncond; use cfg='two_calls'")
            merged[k] = c if k in cond else u
    return merged


class FewStepSampler:
    """Drives ``model(x, t, **cond)`` through a few-step schedule.

    prediction: what the model returns (``velocity`` = ε − x0, ``x0``, ``epsilon``,
    ``v_prediction``). rule: ``euler`` (deterministic; flow Euler = DDIM), ``renoise`` (x0 then
    fresh noise: DMD2, LCM, rCM, consistency; aliases accepted) or ``tcd`` (with ``gamma``).
    guidance: classifier-free guidance scale (needs ``uncond=`` at sampling time), combined
    inside the fused step; cfg: ``"batch"`` (one forward on a doubled batch, uncond first) or
    ``"two_calls"``. model_dtype: the dtype of the latent given to the model (the fp32 state is
    kept beside it). backend: the fused step's backend (None = auto).
    """

    def __init__(self, model: Callable, schedule: Schedule, *, prediction: str = "velocity",
                 rule: str = "euler", gamma: Optional[float] = None,
                 guidance: Optional[float] = None, cfg: str = "batch",
                 model_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of {sorted(RULES)}")
        g = RULES[rule]
        if g is None:
            g = 0.3 if gamma is None else float(gamma)
        elif gamma is not None and float(gamma) != g:
            raise ValueError(f"rule {rule!r} fixes gamma={g}; use rule='tcd' for gamma={gamma}")
        if not 0.0 <= g <= 1.0:
            raise ValueError(f"gamma must be within [0, 1], got {g}")
        if cfg not in ("batch", "two_calls"):
            raise ValueError(f"cfg must be 'batch' or 'two_calls', got {cfg!r}")
        if model_dtype is not None and model_dtype not in FLOAT_DTYPES:
            raise TypeError(f"model_dtype must be one of {FLOAT_DTYPES}")
        self.model, self.schedule, self.prediction, self.rule = model, schedule, prediction, rule
        self.gamma, self.guidance, self.cfg = g, guidance, cfg
        self.model_dtype, self.backend = model_dtype, backend
        self.coefficients = _plan(schedule, prediction, g)
        self._ts_cache: dict = {}

    # -- pieces shared by eager and graph mode --
    def _use_cfg(self, uncond) -> bool:
        if self.guidance is None or self.guidance == 1.0:
            return False
        if uncond is None:
            raise ValueError(f"guidance={self.guidance} needs uncond= (the unconditional "
                             f"model arguments)")
        return True

    def _timesteps(self, device) -> torch.Tensor:
        # Made once per device (a host-to-device copy), so later calls do no transfer at all.
        key = str(torch.device(device))
        if key not in self._ts_cache:
            self._ts_cache[key] = torch.tensor(self.schedule.timesteps, dtype=torch.float32,
                                               device=device)
        return self._ts_cache[key]

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: Optional[dict],
                 use_cfg: bool):
        B = x.shape[0]
        if not use_cfg:
            return _first(self.model(x, t.expand(B), **cond)), None
        if self.cfg == "two_calls":
            u = _first(self.model(x, t.expand(B), **uncond))
            c = _first(self.model(x, t.expand(B), **cond))
            return c, u
        out = _first(self.model(torch.cat([x, x], dim=0), t.expand(2 * B),
                                **_cat_cond(uncond, cond)))
        u, c = out.chunk(2, dim=0)
        return c, u

    def _loop(self, state, x_in, ts, cond, uncond, generator, noise_buf, callback=None,
              progress=None):
        use_cfg = self._use_cfg(uncond)
        n = self.schedule.num_steps
        for i in range(n):
            c, u = self._forward(x_in, ts[i], cond, uncond, use_cfg)
            co = self.coefficients[i]
            z = None
            if co.needs_noise:
                z = torch.randn(state.shape, generator=generator, dtype=torch.float32,
                                device=state.device, out=noise_buf)
            sample_step(state, c, co, uncond=u, guidance=float(self.guidance) if use_cfg
                        else 1.0, noise=z, x_out=x_in, backend=self.backend)
            if progress is not None:
                progress.update(1)
            if callback is not None:
                callback(i, self.schedule.timesteps[i], x_in, state)

    def _buffers(self, shape, device, dtype, generator):
        state = torch.randn(tuple(shape), generator=generator, dtype=torch.float32,
                            device=device)
        if self.schedule.init_sigma != 1.0:
            state.mul_(self.schedule.init_sigma)
        return state

    def _model_dtype(self, dtype):
        return dtype or self.model_dtype or torch.float32

    def sample(self, shape: Sequence[int], *, cond: Optional[dict] = None,
               uncond: Optional[dict] = None, generator: Optional[torch.Generator] = None,
               device: Union[str, torch.device, None] = None,
               noise: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
               callback: Optional[Callable] = None, progress: bool = False) -> torch.Tensor:
        """Eager sampling. The initial latent is ``init_sigma·randn(shape, generator)`` in fp32
        (or ``noise`` if given); fresh step noise is drawn from the same generator, in order.
        callback(i, timestep, x_model_dtype, state_fp32) runs after each step. Returns the fp32
        state (the sample)."""
        if device is None:
            device = (noise.device if noise is not None
                      else generator.device if generator is not None else "cpu")
        device = torch.device(device)
        if noise is not None:
            state = noise.to(device=device, dtype=torch.float32).mul(self.schedule.init_sigma)
            shape = tuple(state.shape)
        else:
            state = self._buffers(shape, device, None, generator)
        x_in = state.to(self._model_dtype(dtype))
        if x_in.data_ptr() == state.data_ptr():
            x_in = x_in.clone()
        noise_buf = (torch.empty(state.shape, dtype=torch.float32, device=device)
                     if any(c.needs_noise for c in self.coefficients) else None)
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=self.schedule.num_steps, desc="sampling", leave=False)
            except ImportError:  # tqdm is optional
                bar = None
        try:
            self._loop(state, x_in, self._timesteps(device), cond or {}, uncond, generator,
                       noise_buf, callback, bar)
        finally:
            if bar is not None:
                bar.close()
        return state

    __call__ = sample

    def capture(self, shape: Sequence[int], *, cond: Optional[dict] = None,
                uncond: Optional[dict] = None, generator: Optional[torch.Generator] = None,
                device: Union[str, torch.device, None] = None,
                dtype: Optional[torch.dtype] = None, warmup: int = 1,
                pool=None) -> "CapturedSampler":
        """Capture the whole loop (initial noise, every forward, every step) into one CUDA
        graph. See :class:`CapturedSampler`."""
        return CapturedSampler(self, shape, cond=cond or {}, uncond=uncond,
                               generator=generator, device=device, dtype=dtype, warmup=warmup,
                               pool=pool)


@dataclass
class CapturedSampler:
    """The sampling loop as one CUDA graph with static buffers.

    ``replay()`` runs initial noise → n model forwards and fused steps, and returns the static
    fp32 ``state`` (overwritten by the next replay: clone it to keep it). The noise comes from
    ``generator`` (or the default CUDA generator), registered with the graph, so every replay
    draws new noise and advances the generator like an eager call would: after
    ``generator.manual_seed(s)``, ``replay()`` equals ``sampler.sample(..., generator=generator)``
    after the same seed. The conditioning tensors are captured by reference: update them in
    place (``update_cond``) between replays.
    """
    sampler: FewStepSampler
    shape: Sequence[int]
    cond: dict = field(default_factory=dict)
    uncond: Optional[dict] = None
    generator: Optional[torch.Generator] = None
    device: Any = None
    dtype: Optional[torch.dtype] = None
    warmup: int = 1
    pool: Any = None

    def __post_init__(self):
        if not torch.cuda.is_available():
            raise RuntimeError("pyops.sampler: graph mode needs CUDA")
        dev = torch.device(self.device if self.device is not None else
                           (self.generator.device if self.generator is not None else "cuda"))
        if dev.type != "cuda":
            raise ValueError(f"pyops.sampler: graph mode needs a CUDA device, got {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        s = self.sampler
        self.state = torch.empty(tuple(self.shape), dtype=torch.float32, device=dev)
        self.x_in = torch.empty(tuple(self.shape), dtype=s._model_dtype(self.dtype), device=dev)
        self.noise_buf = torch.empty_like(self.state)
        self.ts = s._timesteps(dev)
        gen = self.generator
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(max(1, int(self.warmup))):  # warm-up: cuBLAS handles, autotuning
                self._body()
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        if gen is not None and gen is not torch.cuda.default_generators[dev.index]:
            self.graph.register_generator_state(gen)
        with torch.cuda.graph(self.graph, pool=self.pool):
            self._body()

    def _body(self):
        s = self.sampler
        torch.randn(self.state.shape, generator=self.generator, dtype=torch.float32,
                    device=self.device, out=self.state)
        if s.schedule.init_sigma != 1.0:
            self.state.mul_(s.schedule.init_sigma)
        self.x_in.copy_(self.state)
        s._loop(self.state, self.x_in, self.ts, self.cond, self.uncond, self.generator,
                self.noise_buf)

    def update_cond(self, **tensors) -> None:
        """Copy new values into the captured conditioning tensors (same shapes)."""
        for k, v in tensors.items():
            self.cond[k].copy_(v)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.state

    __call__ = replay


# How each diffusers pipeline hands the scheduler's timestep t (fp32, σ·1000) to its
# transformer, read from the pipelines of diffusers 0.42 (``pipelines/<family>/pipeline_*.py``,
# the denoising loop):
#   "flux": ``timestep = t.expand(B).to(latents.dtype)`` then ``transformer(timestep=timestep /
#           1000)``: rounded to the latent dtype (the transformer's dtype, e.g. bf16: 750 -> 752)
#           and divided in that dtype. FluxPipeline (flux/pipeline_flux.py), Flux2Pipeline
#           (flux2/pipeline_flux2.py), ChromaPipeline (chroma/pipeline_chroma.py),
#           QwenImagePipeline (qwenimage/pipeline_qwenimage.py).
#   "fp32": the fp32 ``t.expand(B)`` unchanged. StableDiffusion3Pipeline
#           (stable_diffusion_3/pipeline_stable_diffusion_3.py), WanPipeline (wan/pipeline_wan.py;
#           fp32 with flow-match schedulers), HunyuanVideoPipeline
#           (hunyuan_video/pipeline_hunyuan_video.py: ``.to(latents.dtype)`` with fp32 latents).
TIMESTEP_MODES = ("flux", "fp32")
_TRANSFORMER_TIMESTEP_MODE = {
    "FluxTransformer2DModel": "flux",
    "Flux2Transformer2DModel": "flux",
    "ChromaTransformer2DModel": "flux",
    "QwenImageTransformer2DModel": "flux",
    "SD3Transformer2DModel": "fp32",
    "WanTransformer3DModel": "fp32",
    "HunyuanVideoTransformer3DModel": "fp32",
}


def _timestep_mode_of(transformer) -> Optional[str]:
    module = getattr(transformer, "_orig_mod", transformer)  # torch.compile'd modules
    for cls in type(module).__mro__:
        if cls.__name__ in _TRANSFORMER_TIMESTEP_MODE:
            return _TRANSFORMER_TIMESTEP_MODE[cls.__name__]
    return None


def diffusers_model(transformer, *, timestep_mode: Union[str, Callable, None] = None,
                    **fixed) -> Callable:
    """Adapt a diffusers transformer to ``model(x, t, **cond)``:
    ``transformer(hidden_states=x, timestep=T(t, x), return_dict=False, **fixed, **cond)[0]``,
    where ``T`` gives the transformer the same timestep tensor (dtype and values) its diffusers
    pipeline passes for the same scheduler timestep ``t``:

    * ``"flux"`` (Flux, Flux2, Chroma, Qwen-Image): ``t.to(x.dtype) / 1000``, computed in the
      latent dtype x.dtype (the pipelines keep latents in the transformer's dtype);
    * ``"fp32"`` (SD3/SD3.5, Wan, HunyuanVideo): ``t`` in fp32, unrounded.

    Sources: the denoising loops of the diffusers pipelines listed at ``TIMESTEP_MODES`` in
    this module. ``t`` is the sampler's timestep, σ·1000 in fp32 as diffusers' scheduler gives
    it: use flow schedules with the default ``timestep_scale=1000`` (the flow presets do).
    timestep_mode: None detects the family from the transformer's class (its MRO, through
    ``torch.compile``'s wrapper); a name from ``TIMESTEP_MODES`` or a callable ``T(t, x)``
    overrides. Not reproduced: Wan2.2-TI2V's per-token timesteps (``expand_timesteps``) and the
    int64 timesteps of Wan's default UniPC scheduler. Raises ValueError for an unknown mode or
    a transformer class whose pipeline convention is not known (pass ``timestep_mode``).
    """
    mode = timestep_mode
    if mode is None:
        mode = _timestep_mode_of(transformer)
        if mode is None:
            raise ValueError(
                f"pyops.sampler.diffusers_model: no known timestep convention for "
                f"{type(transformer).__name__} (known: {sorted(_TRANSFORMER_TIMESTEP_MODE)}); "
                f"pass timestep_mode='flux' (t.to(latent dtype) / 1000), 'fp32' (t as is) or a "
                f"callable(t, x)")
    if callable(mode):
        convert = mode
    elif mode == "flux":
        def convert(t, x):
            return t.to(x.dtype) / 1000
    elif mode == "fp32":
        def convert(t, x):
            return t.to(torch.float32)
    else:
        raise ValueError(f"pyops.sampler.diffusers_model: unknown timestep_mode {mode!r}; "
                         f"expected one of {TIMESTEP_MODES} or a callable")

    def model(x, t, **cond):
        return transformer(hidden_states=x, timestep=convert(t, x), return_dict=False,
                           **fixed, **cond)[0]
    model.timestep_mode = mode
    return model

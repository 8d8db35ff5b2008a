"""Few-step schedules: the path times, model timesteps and initial noise scale that each model
family's own inference code uses (sources in each function's docstring).

:func:`flow_schedule` = diffusers' ``FlowMatchEulerDiscreteScheduler`` (static shift, dynamic
shift with :func:`flux_mu`), :func:`vp_schedule` = the ᾱ table and LCM boundary condition of
diffusers' LCM/TCD schedulers, :func:`tcd_timesteps` = ``TCDScheduler``'s timesteps,
:func:`trigflow_schedule` = rCM's sampler. Pure host code: no tensors on a device, no ops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from ..reference.sample_step import PATHS

__all__ = ["Schedule", "flux_mu", "flow_schedule", "vp_schedule", "tcd_timesteps",
           "trigflow_schedule"]


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

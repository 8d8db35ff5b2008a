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

Layout: :mod:`.schedules` (Schedule and the schedule builders), :mod:`.presets` (named model
families), :mod:`.loop` (FewStepSampler, CapturedSampler), :mod:`.diffusers` (diffusers
transformers as ``model(x, t, **cond)``); the fused step itself is the op module
:mod:`pyops.ops.sample_step`. This package only re-exports.
"""
from __future__ import annotations

from ..ops.sample_step import sample_step
from ..reference.sample_step import StepCoefficients, step_coefficients
from .diffusers import TIMESTEP_MODES, diffusers_model
from .loop import CapturedSampler, FewStepSampler
from .presets import PRESETS, preset
from .schedules import (Schedule, flow_schedule, flux_mu, tcd_timesteps, trigflow_schedule,
                        vp_schedule)

__all__ = [
    "Schedule", "FewStepSampler", "CapturedSampler", "StepCoefficients", "sample_step",
    "flow_schedule", "vp_schedule", "trigflow_schedule", "preset", "PRESETS", "diffusers_model",
    "step_coefficients", "flux_mu", "tcd_timesteps", "TIMESTEP_MODES",
]

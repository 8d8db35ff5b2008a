"""Named few-step model families: :func:`preset` gives the schedule and sampler arguments the
model's own inference code uses (per-preset sources in the comments of ``_presets``)."""
from __future__ import annotations

from typing import Optional

from .schedules import (Schedule, flow_schedule, flux_mu, tcd_timesteps, trigflow_schedule,
                        vp_schedule)

__all__ = ["PRESETS", "preset"]


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

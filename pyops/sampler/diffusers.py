"""Calling a diffusers transformer from the sampler: :func:`diffusers_model` passes the timestep
tensor (dtype and values) that the model's diffusers pipeline passes. Needs no diffusers import."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

__all__ = ["TIMESTEP_MODES", "diffusers_model"]


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

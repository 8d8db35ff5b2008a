"""One few-step sampler update: the reference, and the spec for every backend.

Paths
-----
Every family samples along a path ``x = a·x0 + s·ε`` (ε ~ N(0, I)):

==========  ===================================  ===========================================
path        a, s at "time" τ                     used by
==========  ===================================  ===========================================
flow        a = 1 − t, s = t      (τ = t = σ)     FLUX, SD3, Wan (rectified flow)
vp          a = √ᾱ_τ, s = √(1 − ᾱ_τ)             DDPM-trained SD/SDXL (LCM, TCD, DMD2)
trigflow    a = cos θ, s = sin θ  (τ = θ)         sCM / rCM
==========  ===================================  ===========================================

Predictions
-----------
A model output ``p`` (after classifier-free guidance ``p = u + g·(c − u)``) is turned into
``x̂0 = A·x + B·p`` and ``ε̂ = C·x + D·p``, with ``n = a² + s²`` where needed:

=============  =========================  =============  =============  =============  =============
prediction     meaning                    A              B              C              D
=============  =========================  =============  =============  =============  =============
velocity       p = ε − x0 (flow matching) 1/(a+s)        −s/(a+s)       1/(a+s)        a/(a+s)
x0             p = x0                     0              1              1/s            −a/s
epsilon        p = ε                      1/a            −s/a           0              1
v_prediction   p = a·ε − s·x0 (VP, Trig)  a/n            −s/n           s/n            a/n
=============  =========================  =============  =============  =============  =============

An optional consistency boundary condition (LCM) replaces x̂0 by ``c_out·x̂0 + c_skip·x``.

Update rule (one formula for every family)
------------------------------------------
From (a, s) to the next point (a', s'), with fresh noise z and the TCD parameter γ ∈ [0, 1]:

    intermediate point   σ_m = (1 − γ)·σ'      (its path values a_m, s_m)
    x_m    = a_m·x̂0 + s_m·ε̂                                     (DDIM jump to the intermediate)
    x_next = (a'/a_m)·x_m + √(s'² − (a'/a_m)²·s_m²) · z            (forward-noise it to σ')

=====================================  ======  =============================================
rule                                   γ       x_next
=====================================  ======  =============================================
euler (deterministic; = DDIM)          0       a'·x̂0 + s'·ε̂      (flow velocity: x + (t'−t)·v)
renoise (DMD2, LCM, rCM, consistency)  1       a'·x̂0 + s'·z
tcd                                    γ       as above
last step (s' = 0)                     any     x̂0
=====================================  ======  =============================================

Everything is linear in (x, p, z), so the host folds the table into three fp32 scalars per step,

    x_next = α·x + β·p + ζ·z                                               (the fused step)

computed in float64 by :func:`step_coefficients` and rounded once to fp32. Deterministic flow
Euler with a velocity model is special-cased to ``α = 1, β = t' − t`` so it is bit-identical to
diffusers' ``sample + dt * model_output``.

The fused step, elementwise, in fp32, every operation rounded on its own (no FMA contraction),
in this order::

    p  = c                        (no CFG)      |  p = u + g·(c − u)      (CFG)
    y  = α·x + β·p
    y  = y + ζ·z                  (only when noise is given)
    state ← y (in state's dtype);  x_out ← y (in x_out's dtype)

``x`` is the current ``state`` (fp32 recommended: the state keeps full precision between steps
while ``x_out`` is the model-dtype copy the next forward reads). Inputs may be fp32, bf16 or fp16
each; they are widened to fp32 exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

PREDICTIONS = ("velocity", "x0", "epsilon", "v_prediction")
PATHS = ("flow", "vp", "trigflow")
RULES = {"euler": 0.0, "ddim": 0.0, "renoise": 1.0, "dmd2": 1.0, "lcm": 1.0, "consistency": 1.0,
         "rcm": 1.0, "tcd": None}


def f32(v: float) -> float:
    """Round a Python float to the nearest fp32 value (returned as a Python float)."""
    return float(torch.tensor(v, dtype=torch.float64).to(torch.float32))


@dataclass(frozen=True)
class StepCoefficients:
    """The three fp32 scalars of one fused step: ``x_next = alpha·x + beta·p + zeta·z``."""
    alpha: float
    beta: float
    zeta: float

    @property
    def needs_noise(self) -> bool:
        return self.zeta != 0.0


def prediction_to_x0_eps(prediction: str, a: float, s: float) -> tuple[float, float, float, float]:
    """(A, B, C, D) with x̂0 = A·x + B·p and ε̂ = C·x + D·p (float64)."""
    if prediction == "velocity":
        k = a + s
        return 1.0 / k, -s / k, 1.0 / k, a / k
    if prediction == "x0":
        if s == 0.0:  # ε is undefined at s = 0; only x̂0 is used there
            return 0.0, 1.0, 0.0, 0.0
        return 0.0, 1.0, 1.0 / s, -a / s
    if prediction == "epsilon":
        if a == 0.0:
            raise ValueError("epsilon prediction is undefined at pure noise (a = 0); start the "
                             "schedule slightly below it")
        return 1.0 / a, -s / a, 0.0, 1.0
    if prediction == "v_prediction":
        n = a * a + s * s
        return a / n, -s / n, s / n, a / n
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def step_coefficients(prediction: str, a: float, s: float, a_next: float, s_next: float, *,
                      gamma: float = 0.0, a_mid: Optional[float] = None,
                      s_mid: Optional[float] = None, c_skip: float = 0.0, c_out: float = 1.0,
                      flow_euler: bool = False) -> StepCoefficients:
    """Fold the formula table into (α, β, ζ) for one step (float64, rounded once to fp32).

    (a, s): path values now; (a_next, s_next): at the next point. gamma: 0 deterministic, 1 fresh
    noise, else TCD; then (a_mid, s_mid) are the path values at the intermediate point
    σ_m = (1 − γ)·σ' (computed by the caller, who knows the path). c_skip/c_out: consistency
    boundary condition on x̂0. flow_euler: the caller asserts flow path + velocity + γ = 0 with
    no boundary condition; returns the exact Euler form α = 1, β = t' − t.
    """
    if flow_euler:
        return StepCoefficients(1.0, f32(s_next - s), 0.0)
    A, B, C, D = prediction_to_x0_eps(prediction, a, s)
    A, B = c_out * A + c_skip, c_out * B
    if s_next == 0.0:  # the last step returns x̂0
        return StepCoefficients(f32(A), f32(B), 0.0)
    if gamma == 0.0:
        a_mid, s_mid = a_next, s_next
    elif gamma == 1.0:
        a_mid, s_mid = 1.0, 0.0
    elif a_mid is None or s_mid is None:
        raise ValueError("gamma strictly between 0 and 1 needs the intermediate path values")
    # x_m = a_m·x̂0 + s_m·ε̂ ; x_next = r·x_m + q·z
    r = a_next / a_mid
    q2 = s_next * s_next - r * r * s_mid * s_mid
    q = math.sqrt(max(q2, 0.0))
    alpha = r * (a_mid * A + s_mid * C)
    beta = r * (a_mid * B + s_mid * D)
    return StepCoefficients(f32(alpha), f32(beta), f32(q))


def sample_step(x: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, alpha: float = 1.0, beta: float = 0.0,
                zeta: float = 0.0, guidance: float = 1.0) -> torch.Tensor:
    """The fused step in fp32 (the spec). Returns ``y`` in fp32; callers cast it."""
    f = torch.float32
    alpha, beta, zeta, guidance = f32(alpha), f32(beta), f32(zeta), f32(guidance)
    p = cond.to(f)
    if uncond is not None:
        u = uncond.to(f)
        p = u + guidance * (p - u)
    y = alpha * x.to(f) + beta * p
    if noise is not None:
        y = y + zeta * noise.to(f)
    return y


def sample_step_unfused(x: torch.Tensor, cond: torch.Tensor, prediction: str, a: float, s: float,
                        a_next: float, s_next: float, *, uncond: Optional[torch.Tensor] = None,
                        guidance: float = 1.0, noise: Optional[torch.Tensor] = None,
                        gamma: float = 0.0, a_mid: Optional[float] = None,
                        s_mid: Optional[float] = None, c_skip: float = 0.0, c_out: float = 1.0
                        ) -> torch.Tensor:
    """The same step written the long way in float64 (x̂0, ε̂, intermediate, re-noise): used by
    the tests to check that :func:`step_coefficients` folds the table correctly."""
    d = torch.float64
    x = x.to(d)
    p = cond.to(d)
    if uncond is not None:
        p = uncond.to(d) + guidance * (p - uncond.to(d))
    A, B, C, D = prediction_to_x0_eps(prediction, a, s)
    x0 = c_out * (A * x + B * p) + c_skip * x
    eps = C * x + D * p
    if s_next == 0.0:
        return x0
    if gamma == 0.0:
        return a_next * x0 + s_next * eps
    if gamma == 1.0:
        a_mid, s_mid = 1.0, 0.0
    xm = a_mid * x0 + s_mid * eps
    r = a_next / a_mid
    q = math.sqrt(max(s_next ** 2 - r * r * s_mid ** 2, 0.0))
    return r * xm + q * noise.to(d)

"""Few-step sampling for distilled diffusion / flow models: schedules, rules, eager and graph loops.

Quick start::

    sched, kw = pyops.sampler.preset("flux-schnell")          # 4 steps, flow Euler, velocity
    s = pyops.sampler.FewStepSampler(model, sched, **kw)      # model(x, t, **cond) -> prediction
    x0 = s.sample((1, 4096, 64), cond=dict(...), generator=g)  # eager (tqdm bar, callbacks)
    g_s = s.capture((1, 4096, 64), cond=dict(...), generator=g)  # CUDA graph of the whole loop
    x0 = g_s.replay()                                          # new noise on every replay

Every step is one fused ``pyops::sample_step`` (CFG combine, prediction conversion, update with
fresh noise): ``x_next = α·x + β·p + ζ·z``. The host computes (α, β, ζ) per step from the formula
table in :mod:`pyops.reference.sample_step` once, before the loop, so nothing inside the loop
reads the device: no host syncs, and the loop (model forwards included) can be captured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from . import _backend
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, eager_fast_path, overlaps
from .ops import sample_step as _op
from .reference import sample_step as _ref
from .reference.sample_step import PATHS, PREDICTIONS, RULES, StepCoefficients

__all__ = [
    "Schedule", "FewStepSampler", "CapturedSampler", "StepCoefficients", "sample_step",
    "flow_schedule", "vp_schedule", "trigflow_schedule", "preset", "PRESETS", "diffusers_model",
    "step_coefficients",
]

OpTensor = Optional[torch.Tensor]


# ---- the fused step, public --------------------------------------------------------------------
def sample_step(state: torch.Tensor, cond: torch.Tensor, coefficients: StepCoefficients, *,
                uncond: OpTensor = None, guidance: float = 1.0, noise: OpTensor = None,
                x_out: OpTensor = None, backend: Optional[str] = None) -> torch.Tensor:
    """One fused sampler step, in place: ``state <- α·state + β·p + ζ·noise`` with
    ``p = uncond + guidance·(cond − uncond)`` (or ``cond``); ``x_out`` (optional) gets the same
    values in its own dtype. Returns ``state``. All tensors share a shape; fp32/bf16/fp16 each.
    """
    op = "sample_step"
    check_tensor(op, "state", state, dtypes=FLOAT_DTYPES)
    check_tensor(op, "cond", cond, dtypes=FLOAT_DTYPES)
    for name, t in (("uncond", uncond), ("noise", noise), ("x_out", x_out)):
        if t is not None:
            check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
            if t.shape != state.shape:
                raise ValueError(f"pyops.{op}: {name} has shape {tuple(t.shape)}, state has "
                                 f"{tuple(state.shape)}")
    if cond.shape != state.shape:
        raise ValueError(f"pyops.{op}: cond has shape {tuple(cond.shape)}, state has "
                         f"{tuple(state.shape)}")
    check_same_device(op, state, cond=cond, uncond=uncond, noise=noise, x_out=x_out)
    if not state.is_contiguous() or (x_out is not None and not x_out.is_contiguous()):
        raise ValueError(f"pyops.{op}: state and x_out are written in place and must be "
                         f"contiguous")
    if x_out is not None and (x_out is state or (not torch.compiler.is_compiling()
                                                 and overlaps(x_out, state))):
        raise ValueError(f"pyops.{op}: x_out must not overlap state in memory")
    if not isinstance(coefficients, StepCoefficients):
        raise TypeError(f"pyops.{op}: coefficients must be a StepCoefficients, got "
                        f"{type(coefficients).__name__}")
    a, b, z = coefficients.alpha, coefficients.beta, coefficients.zeta
    if not all(math.isfinite(v) for v in (a, b, z, guidance)):
        raise ValueError(f"pyops.{op}: non-finite coefficient in {coefficients} or guidance "
                         f"{guidance}")
    if z != 0.0 and noise is None:
        raise ValueError(f"pyops.{op}: the step needs fresh noise (zeta={z}) but noise is None")
    if uncond is None and guidance != 1.0:
        raise ValueError(f"pyops.{op}: guidance={guidance} given without uncond")
    cond = cond.contiguous()
    uncond = uncond.contiguous() if uncond is not None else None
    noise = noise.contiguous() if (noise is not None and z != 0.0) else None
    b_name = _backend.resolve(_op.OP, state.device, backend)
    args = (state, x_out, cond, uncond, noise, float(a), float(b), float(z), float(guidance))
    if eager_fast_path(state, x_out, cond, uncond, noise):
        _op.sample_step_impl(*args, b_name)
    else:
        torch.ops.pyops.sample_step(*args, b_name)
    return state


step_coefficients = _ref.step_coefficients


# ---- schedules ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """An explicit few-step schedule.

    path: ``"flow"`` (times are σ = t, from ~1 down to 0), ``"vp"`` (integer DDPM timesteps; the
    end point is clean data) or ``"trigflow"`` (angles θ from ~π/2 down to 0).
    times: the n+1 path times, the last being the end point (0 for flow/trigflow, -1 for vp).
    timesteps: the n values given to the model (its own units: σ·1000, σ, t, θ, ...).
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
            return int(math.floor((1.0 - gamma) * tau_next)) if tau_next >= 0 else -1
        return (1.0 - gamma) * float(tau_next)


def _shift(sigma: float, shift: float) -> float:
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flow_schedule(num_steps: Optional[int] = None, *, sigmas: Optional[Sequence[float]] = None,
                  shift: float = 1.0, timestep_scale: float = 1000.0, name: str = "") -> Schedule:
    """Rectified-flow schedule. Default sigmas as diffusers': linspace(1, 1/n, n), then the shift
    ``σ ← shift·σ / (1 + (shift − 1)·σ)``, then a final 0. Model timestep = σ·timestep_scale.
    Values are kept as fp32 numbers (as diffusers keeps them)."""
    if sigmas is None:
        if not num_steps or num_steps < 1:
            raise ValueError("flow_schedule needs num_steps >= 1 or explicit sigmas")
        import numpy as np
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
    sig = [float(s) for s in sigmas]
    if sig and sig[-1] == 0.0:
        sig = sig[:-1]
    if shift != 1.0:
        sig = [_shift(s, shift) for s in sig]
    sig = torch.tensor(sig, dtype=torch.float32).tolist()
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
                timestep_scaling: float = 10.0, name: str = "") -> Schedule:
    """DDPM (variance-preserving) schedule over explicit integer timesteps (e.g. DMD2's
    [999, 749, 499, 249]); ᾱ computed in fp32 as diffusers does (SD/SDXL betas by default).
    lcm_boundary adds LCM's c_skip/c_out (sigma_data 0.5, timestep_scaling 10)."""
    ts = [int(t) for t in timesteps]
    if any(not (0 <= t < num_train_timesteps) for t in ts) or any(a <= b for a, b in
                                                                   zip(ts, ts[1:])):
        raise ValueError(f"vp timesteps must decrease within [0, {num_train_timesteps}); got {ts}")
    ac = _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
    boundary = None
    if lcm_boundary:
        sd = 0.5
        bl = []
        for t in ts:
            st = t * timestep_scaling
            bl.append((sd * sd / (st * st + sd * sd), st / math.sqrt(st * st + sd * sd)))
        boundary = tuple(bl)
    return Schedule("vp", tuple(ts) + (-1,), tuple(float(t) for t in ts), alphas_cumprod=ac,
                    init_sigma=1.0, boundary=boundary, name=name)


def trigflow_schedule(angles: Optional[Sequence[float]] = None, *, sigma_max: float = 80.0,
                      mid_t: Sequence[float] = (1.5, 1.4, 1.0), as_flow: bool = True,
                      timestep_scale: float = 1000.0, name: str = "") -> Schedule:
    """TrigFlow (sCM / rCM) schedule: angles θ with x = cos θ·x0 + sin θ·ε, default
    ``[atan(sigma_max), *mid_t, 0]``. ``as_flow`` maps it onto the flow path (σ = sin/(sin+cos),
    exact for x0-predicting rules: the same points up to a per-step scale of x), for
    flow-trained networks such as Wan with rCM; otherwise the path is trigflow and the model
    gets θ·timestep_scale and should predict ``v_prediction``."""
    th = [float(a) for a in angles] if angles is not None else [math.atan(sigma_max), *mid_t]
    if th and th[-1] == 0.0:
        th = th[:-1]
    if any(not (0.0 < a <= math.pi / 2) for a in th) or any(a <= b for a, b in zip(th, th[1:])):
        raise ValueError(f"trigflow angles must decrease within (0, pi/2]; got {th}")
    if as_flow:
        return flow_schedule(sigmas=[math.sin(a) / (math.sin(a) + math.cos(a)) for a in th],
                             timestep_scale=timestep_scale, name=name)
    ts = [a * timestep_scale for a in th]
    return Schedule("trigflow", tuple(th) + (0.0,), tuple(ts), init_sigma=math.sin(th[0]),
                    name=name)


def _presets() -> dict:
    return {
        # FLUX.1-schnell: 4 steps, no shift, the transformer takes σ in [0, 1], no CFG.
        "flux-schnell": (lambda: flow_schedule(4, timestep_scale=1.0, name="flux-schnell"),
                         dict(prediction="velocity", rule="euler")),
        # SD3.5-Large-Turbo: 4 steps, shift 3, timestep = σ·1000, no CFG.
        "sd35-turbo": (lambda: flow_schedule(4, shift=3.0, name="sd35-turbo"),
                       dict(prediction="velocity", rule="euler")),
        # DMD2 (SDXL, 4 steps): x0 from epsilon, then fresh noise at the next timestep.
        "dmd2": (lambda: vp_schedule([999, 749, 499, 249], name="dmd2"),
                 dict(prediction="epsilon", rule="renoise")),
        # rCM / sCM-style TrigFlow 4 steps for a flow-trained network (Wan): x0 + fresh noise.
        "rcm": (lambda: trigflow_schedule(name="rcm"),
                dict(prediction="velocity", rule="renoise")),
        # TCD (SDXL), 4 steps, gamma 0.3.
        "tcd": (lambda: vp_schedule([999, 759, 499, 259], name="tcd"),
                dict(prediction="epsilon", rule="tcd", gamma=0.3)),
    }


PRESETS = tuple(_presets())


def preset(name: str) -> tuple[Schedule, dict]:
    """(schedule, sampler keyword arguments) for a known few-step model family."""
    table = _presets()
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
    mk, kw = table[name]
    return mk(), dict(kw)


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


def diffusers_model(transformer, **fixed) -> Callable:
    """Adapt a diffusers transformer (Flux, SD3, Wan, ...) to ``model(x, t, **cond)``:
    ``transformer(hidden_states=x, timestep=t, return_dict=False, **fixed, **cond)[0]``. The
    timestep is cast to the latent dtype as diffusers' pipelines do. (Flux expects σ in [0, 1]:
    use ``timestep_scale=1``; SD3 and Wan take σ·1000.)"""
    def model(x, t, **cond):
        return transformer(hidden_states=x, timestep=t.to(x.dtype), return_dict=False,
                           **fixed, **cond)[0]
    return model

"""The sampling loops: :class:`FewStepSampler` (eager) and :class:`CapturedSampler` (the whole
loop as one CUDA graph).

Every step is one call of the public op :func:`pyops.ops.sample_step.sample_step` (CFG combine,
prediction conversion, update with fresh noise): ``x_next = α·x + β·p + ζ·z``. :func:`_plan`
computes (α, β, ζ) per step on the host from the formula table in
:mod:`pyops.reference.sample_step` once, before the loop, so nothing inside the loop reads the
device: no host syncs, and the loop (model forwards included) can be captured.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .._checks import FLOAT_DTYPES
from ..ops.sample_step import sample_step
from ..reference import sample_step as _ref
from ..reference.sample_step import PREDICTIONS, RULES, StepCoefficients
from .schedules import Schedule

__all__ = ["FewStepSampler", "CapturedSampler"]


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

    Built by ``__post_init__`` (not arguments): ``state`` (fp32, ``shape``), ``x_in`` (the
    model-dtype latent), ``noise_buf`` (fp32 step noise), ``ts`` (the fp32 model timesteps on
    the device), ``graph`` (the ``torch.cuda.CUDAGraph``); ``device`` becomes the indexed CUDA
    device.
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
    state: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    x_in: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    noise_buf: Optional[torch.Tensor] = field(default=None, init=False, repr=False,
                                              compare=False)
    ts: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)
    graph: Any = field(default=None, init=False, repr=False, compare=False)

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

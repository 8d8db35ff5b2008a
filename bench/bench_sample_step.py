"""Fused sampler step (pyops.sample_step, op module pyops/ops/sample_step.py):
``state <- α·state + β·(u + g·(c − u)) + ζ·noise``, ``x_out <- the same in bf16``, in one pass:
GB/s against the copy bandwidth measured in the same run, and µs per step.

    python bench/bench_sample_step.py [--out bench/out] [--full | --quick] [--device cuda]

Tensors as pyops.sampler keeps them: state fp32 (read and written in place), the model's cond /
uncond outputs bf16, step noise fp32, x_out bf16 (the next forward's input).
Shapes (elements): default run: the Flux.1 1024² latent (1×4096×64: the real per-step cost,
launch-bound), the Flux activation size (1×4608×3072 elements, 255 MB moved with CFG and noise)
and the Wan 480p activation size (1×32760×5120 elements, 3.0 GB moved: the >= 256 MB figure);
``--full`` adds the Wan 480p latent (1×16×21×60×104); ``--quick`` (the default on a CPU): tiny
shapes. Latents are small next to the L2, so the large sizes are there for a meaningful
bandwidth figure.
Configurations: "cfg + noise" (guidance 5 over cond and uncond, the re-noise rule's fresh
noise: every operand; default) and, in ``--full`` / ``--quick``, "euler" (cond only, no noise:
flow Euler, α = 1, β = t' − t).
Providers: pyops cuda / triton, the PyTorch reference under ``torch.compile``, "torch eager"
(the step written in plain PyTorch: fp32 temporaries, state and x_out copied from the result)
and, in ``--full`` / ``--quick``, the eager reference backend.
GB/s counts exactly the bytes the op must move: state read and written (fp32), cond (bf16),
uncond (bf16) with CFG, noise (fp32) when ζ ≠ 0, x_out written (bf16). ``exact``: state and x_out
bit-identical to the reference (pyops.reference.sample_step) from the same inputs.
Columns: ms (do_bench median, L2 flushed), GB/s and % copy from it; ms graph (CUDA-graph replays
over rotating inputs, calls moving < 2x L2); µs per step (ms graph where measured, else ms);
x ideal = µs over the bytes' time at the copy bandwidth measured in the same run. Targets:
>= 85% of the copy bandwidth on >= 64 MB; <= 1.5x ideal at the Flux size.
"""
# Run length on an H200, estimated (not measured; this benchmark has not run on a GPU yet) from
# the H200 measurement of 2026-11-30 (bench/RESULTS.md, section 1: 4.17-4.3 TB/s copy bandwidth,
# so the 3.0 GB Wan-size step takes ~0.7 ms at copy speed and the eager PyTorch step several
# times that -- derived; sampler section: a pyops eager step ~40-60 µs per step with launches):
#   default, ~35 s: start-up + copy ceiling ~6 s + 3 shapes x 4 providers = 12 rows at ~0.5 s
#     (do_bench, graph replays for the latent, the bit-exact check; ~1 s for the eager rows at
#     Wan size) ~8 s + Triton compile ~2 s + torch.compile of the reference per shape: not
#     measured, assumed ~8 s + 2 x ~4 s.
#   --full, ~60 s: 4 shapes x 2 configurations x 5 providers.
# estimate-h200-s: 35
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

import pyops  # noqa: E402,F401
from pyops import _backend  # noqa: E402
from pyops.ops.sample_step import sample_step  # noqa: E402
from pyops.reference import sample_step as ref  # noqa: E402

NAME = "sample_step"
OP = "sample_step"
COLUMNS = ["shape", "MB moved", "config", "provider", "ms", "GB/s", "% copy", "ms graph", "µs",
           "x ideal", "exact", "note"]
# (label, shape): the Flux.1 1024² packed latent, the Wan2.1 480p 81-frame latent, and element
# counts of the Flux 1024² and Wan 480p activations (large enough for a bandwidth figure).
SHAPES = [("Flux 1024² latent", (1, 4096, 64)), ("Wan 480p latent", (1, 16, 21, 60, 104)),
          ("Flux act size", (1, 4608, 3072)), ("Wan act size", (1, 32760, 5120))]
QUICK_SHAPES = [("quick", (2, 64, 33)), ("quick odd", (1, 1000, 7))]
DEFAULT_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[3]]
GUIDANCE = 5.0
# (name, coefficients, CFG): re-noise from t = 0.75 to 0.5 with a velocity model (α = 0.5,
# β = −0.375, ζ = 0.5) and flow Euler over the same step (α = 1, β = −0.25), both from
# pyops.reference.sample_step.step_coefficients.
CONFIGS = [("cfg + noise", ref.step_coefficients("velocity", 0.25, 0.75, 0.5, 0.5, gamma=1.0),
            True),
           ("euler", ref.step_coefficients("velocity", 0.25, 0.75, 0.5, 0.5, flow_euler=True),
            False)]
DEFAULT_CONFIGS = [CONFIGS[0]]
DEFAULT_PROVIDERS = ("pyops cuda", "pyops triton", "torch.compile(reference)", "torch eager")
DEFAULT_BUDGET_S = 45
STATE_DTYPE, MODEL_DTYPE, NOISE_DTYPE = torch.float32, torch.bfloat16, torch.float32


def select(mode: str):
    """(shapes, configurations, provider names or None for all) of a run size."""
    return U.pick(mode, default=(DEFAULT_SHAPES, DEFAULT_CONFIGS, DEFAULT_PROVIDERS),
                  full=(SHAPES, CONFIGS, None), quick=(QUICK_SHAPES, CONFIGS, None))


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def nbytes_moved(n: int, cfg: bool, noise: bool, x_out: bool = True, state_el: int = 4,
                 model_el: int = 2, noise_el: int = 4) -> int:
    """state read + written, cond, uncond (CFG), noise (ζ ≠ 0), x_out (when written)."""
    return n * (2 * state_el + model_el + (model_el if cfg else 0) + (noise_el if noise else 0)
                + (model_el if x_out else 0))


def make_inputs(shape, cfg: bool, noise: bool, device, gen):
    """(state, x_out, cond, uncond or None, noise or None)."""
    r = lambda dt: torch.randn(shape, device=device, dtype=dt, generator=gen)  # noqa: E731
    return (r(STATE_DTYPE), torch.empty(shape, device=device, dtype=MODEL_DTYPE), r(MODEL_DTYPE),
            r(MODEL_DTYPE) if cfg else None, r(NOISE_DTYPE) if noise else None)


def torch_eager(co, guidance: float):
    """The step in plain PyTorch, in the order the spec rounds (pyops.reference.sample_step)."""
    a, b, z = co.alpha, co.beta, co.zeta

    def f(state, x_out, cond, uncond, noise):
        p = cond.float()
        if uncond is not None:
            u = uncond.float()
            p = u + guidance * (p - u)
        y = a * state + b * p
        if noise is not None:
            y = y + z * noise.float()
        x_out.copy_(y)
        state.copy_(y)
    return f


def _reference_step(co, guidance: float):
    def f(state, x_out, cond, uncond, noise):
        y = ref.sample_step(state, cond, uncond, noise, co.alpha, co.beta, co.zeta, guidance)
        x_out.copy_(y)
        state.copy_(y)
    return f


def _checker(inputs, co, guidance: float):
    """exact: from copies of the same state and a poisoned x_out, state and x_out equal the
    reference's bit for bit. The state is copied now: the timed calls update it in place."""
    state, x_out, cond, uncond, noise = inputs
    state0 = state.clone()
    want = None

    def fresh():
        return state0.clone(), torch.full_like(x_out, float("nan"))

    def check(fn) -> bool:
        nonlocal want
        if want is None:
            s, o = fresh()
            _reference_step(co, guidance)(s, o, cond, uncond, noise)
            want = (s.view(torch.int32), o.view(torch.int16))
        s, o = fresh()
        fn(s, o, cond, uncond, noise)
        return torch.equal(s.view(torch.int32), want[0]) and torch.equal(o.view(torch.int16),
                                                                         want[1])
    return check


def providers(cname: str, co, cfg: bool, device, compile_ok: bool, check, compiled_cache: dict,
              names=None):
    g = GUIDANCE if cfg else 1.0
    ps = []
    for b in ("cuda", "triton"):
        if _backend.available(OP, b, device)[0]:
            ps.append(U.Provider(
                f"pyops {b}",
                lambda s, o, c, u, n, b=b: sample_step(s, c, co, uncond=u, guidance=g, noise=n,
                                                       x_out=o, backend=b),
                check=check))
    if compile_ok:
        if cname not in compiled_cache:
            compiled_cache[cname] = torch.compile(_reference_step(co, g), dynamic=False)
        ps.append(U.Provider("torch.compile(reference)", compiled_cache[cname], slow=True,
                             compiles=True, check=check))
    ps.append(U.Provider("torch eager", torch_eager(co, g), check=check))
    ps.append(U.Provider("pyops reference (eager)",
                         lambda s, o, c, u, n: sample_step(s, c, co, uncond=u, guidance=g,
                                                           noise=n, x_out=o,
                                                           backend="reference"),
                         slow=True, graph=False, check=check))
    return [p for p in ps if names is None or p.name in names]


def run(args, device: torch.device, ceiling_gbps, budget: U.Budget, progress=None) -> U.Table:
    t = U.Table("Fused sampler step (fp32 state, bf16 cond/uncond/x_out, fp32 noise)", COLUMNS,
                notes=[
        "GB/s = (state read + written, cond, uncond with CFG, noise when ζ ≠ 0, x_out written) "
        "/ time; % copy = over the device-to-device copy measured in the same run (target "
        ">= 85% on >= 64 MB).",
        "ms: triton.testing.do_bench median, L2 flushed before each call; ms graph: CUDA-graph "
        "replay per call, rotating inputs (> 2x L2), for calls moving < 2x L2.",
        U.PER_CALL_NOTE,
        "cfg + noise: guidance 5, α = 0.5, β = -0.375, ζ = 0.5 (re-noise, velocity model, "
        "t 0.75 -> 0.5); euler: no CFG, no noise, α = 1, β = -0.25.",
        "exact: state and x_out bit-identical to pyops.reference.sample_step from the same "
        "inputs."])
    compile_ok = U.compile_allowed(args, device, t)
    U.raise_compile_limits()
    if progress:
        t.on_add = progress  # rewrite the files after every row
    shapes, configs, names = select(args.mode)
    compiled_cache: dict = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for label, shape in shapes:
        n = numel(shape)
        for cname, co, cfg in configs:
            noise = co.zeta != 0.0
            inputs = make_inputs(shape, cfg, noise, device, gen)
            nbytes = nbytes_moved(n, cfg, noise)
            graph_inputs = U.rotating_inputs(
                nbytes, device, lambda: make_inputs(shape, cfg, noise, device, gen))
            base = {"shape": f"{label} {'x'.join(map(str, shape))}", "MB moved": nbytes / 2**20,
                    "config": cname, "elements": n, "cfg": cfg, "noise": noise,
                    "alpha": co.alpha, "beta": co.beta, "zeta": co.zeta,
                    "guidance": GUIDANCE if cfg else 1.0}
            check = _checker(inputs, co, GUIDANCE if cfg else 1.0)
            U.bench_providers(t, base, providers(cname, co, cfg, device, compile_ok, check,
                                                 compiled_cache, names),
                              inputs, nbytes, ceiling_gbps, device, budget, graph_inputs,
                              warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
            del inputs, graph_inputs, check
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return t


def parser() -> argparse.ArgumentParser:
    p = U.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--compile", action="store_true", help="run torch.compile on CPU too")
    return p


def main(argv=None) -> int:
    return U.bandwidth_main(NAME, parser(), run, argv, DEFAULT_BUDGET_S)


if __name__ == "__main__":
    sys.exit(main())

"""Few-step sampler: non-model time per step (eager vs CUDA graph vs diffusers-style loops) and a
4-step Flux-size transformer end to end (eager vs graph).

    python bench/bench_sampler.py [--out bench/out] [--full | --quick] [--device cuda] [--no-flux]

Default run: part 1 at 1024² latents, 4 steps, both rules; part 2 at 1024². ``--full``: part 1
at 512² and 1024², 4 and 8 steps; part 2 at 512² and 1024². ``--quick`` (the default on a CPU):
a tiny latent and a tiny Flux.

Part 1 drives a trivial "model" (one elementwise negation) so the loop's own cost shows:
``µs/step non-model = (loop time − steps × model time) / steps``. Providers:
  * ``pyops eager``: ``FewStepSampler.sample`` (fused step op, fp32 state, no host sync);
  * ``pyops graph``: the whole loop captured once, ``CapturedSampler.replay``;
  * ``diffusers scheduler``: the diffusers pipeline loop with ``FlowMatchEulerDiscreteScheduler
    .step`` (``stochastic_sampling`` for the re-noise rule), if diffusers is installed;
  * ``python loop + sync``: a hand-written loop that reads a step decision back each step
    (``.item()``), as FastGen's loop and diffusers' LCM/TCD-style code paths do.
Part 2: diffusers ``FluxTransformer2DModel`` at its default (Flux.1, ~12 B parameters) size with
random bf16 weights, 4 steps at 512² and 1024² (1024 / 4096 image tokens, 512 text tokens).
"""
# Run length on an H200, estimated (not measured) from the H200 measurement of 2026-11-30
# (bench/RESULTS.md, section 1, "Sampler"):
#   default, ~30 s: start-up ~5 s; part 1: 2 rules x 4 providers at 0.03-0.65 ms per loop,
#     ~0.2 s each with the graph captures, ~2 s; part 2: building the 11.9 B-parameter model on
#     the GPU (not measured, assumed ~5 s), one forward timed (175 ms x 8 calls = 1.4 s), the
#     eager loop (718 ms x 8 calls = 5.7 s), the capture and the graph loop (708 ms x 9 calls
#     = 6.4 s), ~19 s.
#   --full, ~45 s: part 1 x4 (512² and 8 steps), part 2 adds 512² (58 / 232 / 223 ms: ~4 s).
# estimate-h200-s: 30
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

import pyops  # noqa: E402,F401
from pyops import sampler as S  # noqa: E402

NAME = "sampler"
COLS = ["part", "shape", "steps", "rule", "provider", "ms", "µs/step non-model", "note"]


def _print_row(table):
    r = table.rows[-1]
    print(" | ".join(U._fmt(r.get(c)) for c in table.columns), flush=True)


def _trivial_model(x, t):
    return torch.neg(x)


def _diffusers_loop(shape, steps, rule, device, dtype, model):
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler
    except Exception:
        return None
    sch = FlowMatchEulerDiscreteScheduler(stochastic_sampling=(rule == "renoise"))

    def run():
        sch.set_timesteps(num_inference_steps=steps, device=device)
        x = torch.randn(shape, device=device, dtype=dtype)
        for t in sch.timesteps:
            out = model(x, t.expand(shape[0]))
            x = sch.step(out, t, x, return_dict=False)[0]
        return x
    return run


def _sync_loop(shape, steps, rule, device, dtype, model):
    sig = torch.linspace(1.0, 0.0, steps + 1, device=device)

    def run():
        x = torch.randn(shape, device=device, dtype=torch.float32)
        for i in range(steps):
            out = model(x.to(dtype), (sig[i] * 1000).expand(shape[0])).float()
            last = bool((sig[i + 1] == 0).item())  # the per-step host read-back
            x0 = x - sig[i] * out
            if rule == "renoise" and not last:
                x = (1 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn_like(x)
            else:
                x = x + (sig[i + 1] - sig[i]) * out
        return x.to(dtype)
    return run


OVERHEAD_SHAPES = [("512² latents", (1, 1024, 64)), ("1024² latents", (1, 4096, 64))]
FLUX_SIZES = [("512²", 32, 32), ("1024²", 64, 64)]  # latent h, w (tokens = h * w)


def select(mode: str):
    """(part-1 shapes, part-1 step counts, part-2 Flux sizes) of a run size; the quick Flux
    size is built in ``flux_end_to_end``."""
    return U.pick(mode, default=(OVERHEAD_SHAPES[1:], (4,), FLUX_SIZES[1:]),
                  full=(OVERHEAD_SHAPES, (4, 8), FLUX_SIZES),
                  quick=([("quick", (1, 64, 16))], (4,), None))


def overhead(args, device, table):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes, step_counts, _ = select(args.mode)
    for label, shape in shapes:
        x = torch.randn(shape, device=device, dtype=dtype)
        t_model = U.time_ms(lambda: _trivial_model(x, None), device=device,
                            warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        for steps in step_counts:
            for rule in ("euler", "renoise"):
                sched = S.flow_schedule(steps, shift=3.0)
                smp = S.FewStepSampler(_trivial_model, sched, rule=rule, model_dtype=dtype)
                provs = [("pyops eager", lambda: smp.sample(shape, device=device, dtype=dtype))]
                if device.type == "cuda":
                    provs.append(("pyops graph", lambda: smp.capture(shape, device=device,
                                                                     dtype=dtype)))
                d = _diffusers_loop(shape, steps, rule, device, dtype, _trivial_model)
                if d is not None:
                    provs.append(("diffusers scheduler", d))
                provs.append(("python loop + sync", _sync_loop(shape, steps, rule, device, dtype,
                                                               _trivial_model)))
                for name, fn in provs:
                    row = dict(part="overhead", shape=label, steps=steps, rule=rule,
                               provider=name)
                    try:
                        if name == "pyops graph":  # fn captures; time the replays
                            fn = fn().replay
                        fn()
                        ms = U.time_ms(fn, device=device, warmup_ms=args.warmup_ms,
                                       rep_ms=args.rep_ms)
                        row.update(ms=ms, **{"µs/step non-model":
                                             (ms - steps * t_model) * 1e3 / steps})
                    except Exception as e:  # report, never invent a number
                        row["note"] = f"error: {type(e).__name__}: {e}".splitlines()[0][:160]
                    table.add(**row)
                    _print_row(table)


def flux_end_to_end(args, device, table):
    try:
        from diffusers import FluxTransformer2DModel
    except Exception as e:
        table.notes.append(f"Flux end to end skipped: diffusers not importable ({e})")
        return
    if device.type != "cuda" and not args.quick:
        table.notes.append("Flux end to end skipped on a CPU: the 12 B-parameter model needs "
                           "a GPU (the quick run uses a tiny one)")
        return
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        cfg = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=(4, 6, 6))
        sizes, txt, jd, pd, cin = [("quick 64²", 4, 4)], 8, 32, 32, 16
    else:
        cfg = dict(num_layers=args.flux_layers, num_single_layers=args.flux_single_layers)
        sizes, txt, jd, pd, cin = select(args.mode)[2], 512, 4096, 768, 64
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg).eval()
    finally:
        torch.set_default_dtype(old)
    nparam = sum(p.numel() for p in model.parameters())
    table.notes.append(f"Flux transformer: {nparam / 1e9:.2f} B parameters, random weights, "
                       f"{str(dtype).replace('torch.', '')}")
    fwd = S.diffusers_model(model)
    sched, kw = S.preset("flux-schnell")
    for label, h, w in sizes:
        L = h * w
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)),
                                         torch.arange(float(w)), indexing="ij"), -1)
        cond = dict(encoder_hidden_states=torch.randn(1, txt, jd, device=device, dtype=dtype),
                    pooled_projections=torch.randn(1, pd, device=device, dtype=dtype),
                    txt_ids=torch.zeros(txt, 3, device=device),
                    img_ids=ids.reshape(L, 3).to(device))
        shape = (1, L, cin)
        smp = S.FewStepSampler(fwd, sched, model_dtype=dtype, **kw)
        with torch.inference_mode():
            x = torch.randn(shape, device=device, dtype=dtype)
            t1 = torch.ones(1, device=device)
            one = lambda: fwd(x, t1, **cond)  # noqa: E731
            one()
            t_fwd = U.time_ms(one, device=device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
            provs = [("pyops eager", lambda: smp.sample(shape, cond=cond, device=device,
                                                        dtype=dtype))]
            note = ""
            if device.type == "cuda":
                try:
                    cap = smp.capture(shape, cond=cond, device=device, dtype=dtype)
                    provs.append(("pyops graph", cap.replay))
                except Exception as e:
                    note = f"graph capture failed: {type(e).__name__}: {e}"[:160]
                    table.notes.append(note)
            for name, fn in provs:
                row = dict(part="Flux 4-step", shape=f"{label} ({L} img + {txt} txt tok)",
                           steps=4, rule="euler", provider=name,
                           note=f"one forward {t_fwd:.3f} ms")
                try:
                    fn()
                    ms = U.time_ms(fn, device=device, warmup_ms=args.warmup_ms,
                                   rep_ms=args.rep_ms)
                    row.update(ms=ms, **{"µs/step non-model": (ms - 4 * t_fwd) * 1e3 / 4})
                except Exception as e:  # report, never invent a number
                    row["note"] = f"error: {type(e).__name__}: {e}".splitlines()[0][:160]
                table.add(**row)
                _print_row(table)


def parser() -> argparse.ArgumentParser:
    p = U.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--no-flux", action="store_true", help="skip the Flux-size end-to-end part")
    p.add_argument("--flux-layers", type=int, default=19, help="double-stream blocks (Flux: 19)")
    p.add_argument("--flux-single-layers", type=int, default=38,
                   help="single-stream blocks (Flux: 38)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = U.resolve_run(args)
    env = U.env_record(device)
    env["run"] = args.mode
    table = U.Table("Few-step sampler (trivial model; Flux-size end to end)", COLS, notes=[
        "µs/step non-model: (loop ms − steps × one model call) / steps; for Flux the model "
        "call is one measured transformer forward",
        "diffusers scheduler: FlowMatchEulerDiscreteScheduler.step in the pipeline loop "
        "(set_timesteps included, as a pipeline call does)"])
    U.autosave([table], args.out, NAME, env)
    overhead(args, device, table)
    U.write_results(args.out, NAME, [table], env)
    if not args.no_flux:
        flux_end_to_end(args, device, table)
    U.write_results(args.out, NAME, [table], env)
    print(U.env_markdown(env) + "\n\n" + table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())

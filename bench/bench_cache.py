"""Training-free caching on a Flux-size transformer: time and error per threshold.

    python bench/bench_cache.py [--out bench/out] [--full | --quick] [--device cuda]
                                [--steps 28] [--thresholds 0.1] [--layers 19 --single 38]

Default run: 28 steps at threshold 0.1. ``--full``: 28 and 50 steps at thresholds 0, 0.05, 0.1,
0.15, 0.25. ``--steps`` / ``--thresholds`` override either. ``--quick`` (the default on a CPU):
a tiny Flux, 6 steps, thresholds 0 and 2 (smoke test; numbers mean nothing).

diffusers ``FluxTransformer2DModel`` at its default (Flux.1, ~12 B parameters) size with random
bf16 weights, 1024² (4096 image + 512 text tokens), batch 1, a plain Euler flow loop
``x += (t_next − t)·v``. For every (steps, threshold):

* ``uncached``: the model as it is (the reference output and time);
* ``pyops eager``: ``pyops.cache`` step level (First-Block-Cache rule: the first block's residual
  gates the rest), decisions read on the host once per forward;
* ``pyops graph``: the same, one forward captured in a CUDA graph with the gated blocks in a CUDA
  IF node set by the check kernel (no host sync, the loop only copies x/t and replays);
* ``diffusers FBC``: diffusers' ``FirstBlockCacheConfig(threshold)`` (eager; same rule, its
  decisions), when the installed diffusers has it.
pyops runs with ``warmup=1, last_steps=0, fn=1, bn=0`` here, the configuration whose decisions
equal diffusers' First-Block Cache, so "skipped" should agree between the two rows.
Columns: fraction of forwards whose gated blocks were skipped, wall time of the loop (one timed
generation after a 2-step warm-up), speed-up over uncached, relative L1 error of the final latent
against uncached. With random weights the first block's residual changes too much between steps
for anything to be skipped at usual thresholds: the speed-up of caching needs trained weights;
these runs measure the cost of the check and that threshold 0 reproduces the uncached output.
"""
# Run length on an H200, estimated (not measured) from the H200 measurement of 2026-11-30
# (bench/RESULTS.md, section 1, "Cache on a Flux-size transformer": one 28-step generation
# 4.9-5.1 s):
#   default, ~35 s: start-up incl. diffusers ~5 s + building the 11.9 B-parameter model on the
#     GPU (not measured, assumed ~5 s) + 4 providers (uncached, pyops eager, pyops graph,
#     diffusers FBC) x (2-step warm-up ~0.4 s + one 28-step generation ~5 s) ~22 s + one graph
#     capture ~1 s.
#   --full, ~6 min: (1 + 5 thresholds x 3 providers) x (28 + 50 steps) of generations.
# estimate-h200-s: 35
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

import pyops  # noqa: E402,F401
from pyops import cache as C  # noqa: E402
from pyops import graphs as G  # noqa: E402

NAME = "cache"
DEFAULT_BUDGET_S = 45
COLUMNS = ["model", "steps", "threshold", "provider", "skipped", "s", "speed-up", "rel L1",
           "note"]


def build(args, device):
    from diffusers import FluxTransformer2DModel
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        cfg = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=(4, 6, 6))
        h = w = 4
        txt, jd, pd, cin = 8, 32, 32, 16
    else:
        cfg = dict(num_layers=args.layers, num_single_layers=args.single)
        h = w = 64
        txt, jd, pd, cin = 512, 4096, 768, 64
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg).eval()
    finally:
        torch.set_default_dtype(old)
    L = h * w
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)),
                                     torch.arange(float(w)), indexing="ij"), -1)
    g = torch.Generator(device=device).manual_seed(1)
    cond = dict(encoder_hidden_states=torch.randn(1, txt, jd, device=device, dtype=dtype,
                                                  generator=g),
                pooled_projections=torch.randn(1, pd, device=device, dtype=dtype, generator=g),
                txt_ids=torch.zeros(txt, 3, device=device), img_ids=ids.reshape(L, 3).to(device))
    x0 = torch.randn(1, L, cin, device=device, dtype=dtype, generator=g)
    nparam = sum(p.numel() for p in model.parameters())
    label = f"Flux {nparam / 1e9:.2f} B, {L} img + {txt} txt tok, {str(dtype)[6:]}"
    return model, cond, x0, label


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop(fwd, x0, steps, device, after=None):
    ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
    x = x0.clone()
    for k in range(steps):
        v = fwd(x, ts[k:k + 1] * 1000.0)
        x = x + (ts[k + 1] - ts[k]).to(x.dtype) * v
        if after is not None:
            after()
    return x


def select(mode: str, steps=None, thresholds=None):
    """(step counts, thresholds) of a run size; ``steps`` / ``thresholds`` (comma-separated
    strings) override them outside the quick run."""
    if mode == "quick":
        return [6], [0.0, 2.0]
    d_steps, d_thr = U.pick(mode, default=("28", "0.1"), full=("28,50", "0,0.05,0.1,0.15,0.25"),
                            quick=None)
    return ([int(x) for x in (steps or d_steps).split(",")],
            [float(x) for x in (thresholds or d_thr).split(",")])


def timed(fn, device, warm=None):
    """(result, seconds) of one ``fn()`` after ``warm()`` (default: ``fn`` itself) has run once:
    the first launches, handles and allocations are not timed."""
    (warm or fn)()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def rel_l1(a, b) -> float:
    return float((a.float() - b.float()).abs().sum() / b.float().abs().sum().clamp_min(1e-30))


WARM_STEPS = 2  # the untimed warm-up before each timed generation


def run(args, device, progress=None) -> U.Table:
    model, cond, x0, label = build(args, device)
    t = U.Table("Caching, threshold sweep (Euler flow loop)", COLUMNS, notes=[
        "skipped: fraction of forwards whose gated blocks were reused; s: wall time of one "
        "generation (after an untimed 2-step warm-up); rel L1: final latent vs uncached.",
        "pyops: CacheConfig(level='step', warmup=1, last_steps=0, fn=1, bn=0) = the "
        "First-Block-Cache rule; diffusers FBC: FirstBlockCacheConfig(threshold)."])
    if progress:
        t.on_add = progress  # rewrite the files after every row
    fwd = lambda x, tt: model(hidden_states=x, timestep=tt, return_dict=False, **cond)[0]  # noqa
    steps_list, thresholds = select(args.mode, args.steps, args.thresholds)
    budget = U.Budget(args.budget_s)
    for steps in steps_list:
        with torch.no_grad():
            ref_x, base_s = timed(lambda: loop(fwd, x0, steps, device), device,
                                  warm=lambda: loop(fwd, x0, min(steps, WARM_STEPS), device))
        t.add(model=label, steps=steps, threshold=None, provider="uncached", skipped=0.0,
              s=base_s, **{"speed-up": 1.0, "rel L1": 0.0})
        print("  " + str(t.rows[-1]), flush=True)
        for thr in thresholds:
            if budget.spent():
                t.notes.append(f"budget spent: stopped before steps={steps} thr={thr}")
                break
            cfg = C.CacheConfig(level="step", threshold=thr, warmup=1, last_steps=0, fn=1,
                                bn=0, num_steps=steps)
            for prov in ("pyops eager", "pyops graph", "diffusers FBC"):
                row = dict(model=label, steps=steps, threshold=thr, provider=prov)
                try:
                    out, sec, skipped = _provider(prov, model, fwd, cond, x0, steps, cfg, device)
                    if out is None:
                        continue
                    row.update(skipped=skipped, s=sec, **{"speed-up": base_s / sec,
                                                         "rel L1": rel_l1(out, ref_x)})
                except Exception as e:
                    row["note"] = f"error: {type(e).__name__}: {e}".splitlines()[0][:160]
                t.add(**row)
                print("  " + str(row), flush=True)
    return t


def _provider(prov, model, fwd, cond, x0, steps, cfg, device):
    if prov == "pyops eager":
        h = C.apply(model, cfg)
        try:
            skips = []

            def count():
                skips.append(int(h.regions()[-1].reuse[0]))  # eager reads it anyway
            with torch.no_grad():
                def gen(n=steps):
                    h.reset()
                    skips.clear()
                    return loop(fwd, x0, n, device, after=count)
                out, sec = timed(gen, device, warm=lambda: gen(min(steps, WARM_STEPS)))
            return out, sec, sum(skips) / steps
        finally:
            h.remove()
    if prov == "pyops graph":
        if device.type != "cuda":
            return None, None, None
        ok, why = G.supported()
        if not ok:
            raise RuntimeError(f"IF nodes unavailable: {why}")
        h = C.apply(model, cfg)
        try:
            with torch.no_grad():
                sx = x0.clone()
                st = torch.full((1,), 1000.0, device=device)
                fwd(sx, st)  # eager warm-up: side streams, cuBLAS handles, cache buffers
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    so = fwd(sx, st)
                flag = h.regions()[-1].reuse
                skips = torch.zeros((), dtype=torch.int32, device=device)

                def gfwd(x, tt):
                    sx.copy_(x)
                    st.copy_(tt)
                    g.replay()
                    skips.add_(flag[0])
                    return so

                def gen(n=steps):
                    h.reset()
                    skips.zero_()
                    return loop(gfwd, x0, n, device)
                out, sec = timed(gen, device, warm=lambda: gen(min(steps, WARM_STEPS)))
            return out, sec, int(skips) / steps
        finally:
            h.remove()
    if prov == "diffusers FBC":
        try:
            from diffusers import FirstBlockCacheConfig
        except ImportError:
            return None, None, None
        calls = []
        probe = model.transformer_blocks[1] if len(model.transformer_blocks) > 1 else \
            model.single_transformer_blocks[0]
        hook = probe.norm1.register_forward_pre_hook(lambda *a: calls.append(1))
        model.enable_cache(FirstBlockCacheConfig(threshold=cfg.threshold))
        try:
            ctx = model.cache_context("cond") if hasattr(model, "cache_context") else None
            with torch.no_grad():
                def gen(n=steps):
                    calls.clear()
                    if ctx is not None:
                        with model.cache_context("cond"):
                            out = loop(fwd, x0, n, device)
                        model._reset_stateful_cache() if hasattr(
                            model, "_reset_stateful_cache") else None
                        return out
                    return loop(fwd, x0, n, device)
                out, sec = timed(gen, device, warm=lambda: gen(min(steps, WARM_STEPS)))
            return out, sec, 1.0 - len(calls) / steps
        finally:
            hook.remove()
            model.disable_cache()
    raise ValueError(prov)


def parser() -> argparse.ArgumentParser:
    p = U.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--steps", default=None,
                   help="comma-separated step counts (default run: 28; --full: 28,50)")
    p.add_argument("--thresholds", default=None,
                   help="comma-separated thresholds (default run: 0.1; --full: "
                        "0,0.05,0.1,0.15,0.25)")
    p.add_argument("--layers", type=int, default=19, help="Flux double-stream blocks")
    p.add_argument("--single", type=int, default=38, help="Flux single-stream blocks")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = U.resolve_run(args, DEFAULT_BUDGET_S)
    env = U.env_record(device)
    env["run"] = args.mode
    t = run(args, device, progress=lambda tb: U.write_results(args.out, NAME, [tb], env))
    U.write_results(args.out, NAME, [t], env)
    print(U.env_markdown(env) + "\n\n" + t.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cache apply (pyops.cache_apply, op module pyops/ops/cache_apply.py): ``out = x + residual``
where a group reuses its cached residual, read on the device: GB/s against the copy bandwidth
measured in the same run, and µs per call.

    python bench/bench_cache_apply.py [--out bench/out] [--full | --quick] [--device cuda]

Shapes (bf16 out, x and residual, as pyops.cache keeps them): default run: the Flux.1 1024²
activation (1×4608×3072, 4096 image + 512 text tokens) and Wan 480p (1×32760×5120, 335 MB per
tensor); ``--full`` adds a 64 MB tensor and Flux with classifier-free guidance (batch 2, one
group per half); ``--quick`` (the default on a CPU): tiny shapes.
Cases: "reuse" (every group reuses: x and residual read, out written), default; ``--full`` and
``--quick`` add "compute" (no group reuses: only the flags are read, out is left alone: the
cost a computed block pays for the apply) and, with two groups, "half" (flags 1, 0).
Providers: pyops cuda / triton (the flag read on the device, no host sync), the PyTorch
reference under ``torch.compile`` and, in ``--full`` / ``--quick``, eager (device-side
``torch.where``), and "torch eager": ``torch.add(x, residual, out=out)`` on the groups a
host-side decision picked (what an eager cache such as diffusers' First-Block Cache runs after
its ``.item()``; the sync is not timed here).
GB/s counts exactly the bytes the op must move: the int32 flags, and x + residual read and
out written for each reusing group. ``exact``: out bit-identical to the reference's on the same
inputs, from the same poisoned out (so the groups that do not reuse are checked untouched).
Columns: ms (do_bench median, L2 flushed), GB/s and % copy from it; ms graph (CUDA-graph replays
over rotating inputs, calls moving < 2x L2); µs per call (ms graph where measured, else ms);
x ideal = µs over the bytes' time at the copy bandwidth measured in the same run. Targets:
>= 85% of the copy bandwidth on >= 64 MB; <= 1.5x ideal at the Flux size.
"""
# Run length on an H200, estimated (not measured; this benchmark has not run on a GPU yet) from
# the H200 measurement of 2026-11-30 (bench/RESULTS.md, section 1: 4.17-4.3 TB/s copy
# bandwidth, so a call moves its 85 MB (Flux) in ~20 µs and its 1 GB (Wan) in ~0.25 ms at copy
# speed -- derived):
#   default, ~25 s: start-up + copy ceiling ~6 s + 2 shapes x 4 providers = 8 rows at ~0.5 s
#     (do_bench ~80 ms of calls + an L2 flush per call, graph replays at Flux size, the
#     bit-exact check) ~4 s + Triton compile ~2 s + torch.compile of the reference per shape:
#     not measured, assumed ~8 s + ~4 s.
#   --full, ~45 s: 4 shapes x 2-3 cases x 5 providers.
# estimate-h200-s: 25
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

import pyops  # noqa: E402,F401
from pyops import _backend  # noqa: E402
from pyops.ops.cache_apply import cache_apply  # noqa: E402
from pyops.reference import block_similarity as ref  # noqa: E402

NAME = "cache_apply"
OP = "cache_apply"
COLUMNS = ["shape", "MB", "case", "provider", "ms", "GB/s", "% copy", "ms graph", "µs",
           "x ideal", "exact", "note"]
# (label, B, N, D, groups) bf16: Flux.1 1024² (4096 image + 512 text tokens), a 64 MB tensor,
# Flux with CFG (batch 2, one group per half), Wan2.1 480p 81 frames.
SHAPES = [("Flux 1024²", 1, 4608, 3072, 1), ("64 MB", 1, 8192, 4096, 1),
          ("Flux 1024² CFG", 2, 4608, 3072, 2), ("Wan 480p", 1, 32760, 5120, 1)]
QUICK_SHAPES = [("quick", 2, 64, 256, 2), ("quick odd", 1, 33, 1000, 1)]
DEFAULT_SHAPES = [SHAPES[0], SHAPES[3]]  # Flux 1024², Wan 480p
CASES = ("reuse", "compute", "half")
DEFAULT_CASES = ("reuse",)
DEFAULT_PROVIDERS = ("pyops cuda", "pyops triton", "torch.compile(reference)", "torch eager")
DEFAULT_BUDGET_S = 45


def select(mode: str):
    """(shapes, cases, provider names or None for all) of a run size."""
    return U.pick(mode, default=(DEFAULT_SHAPES, DEFAULT_CASES, DEFAULT_PROVIDERS),
                  full=(SHAPES, CASES, None), quick=(QUICK_SHAPES, CASES, None))


def flags(case: str, groups: int) -> list[int]:
    """The reuse flag per group of a case ("half": the first half of the groups reuses);
    None when the case does not apply to ``groups``."""
    if case == "reuse":
        return [1] * groups
    if case == "compute":
        return [0] * groups
    if case == "half" and groups >= 2:
        return [1 if g < groups // 2 else 0 for g in range(groups)]
    return None


def nbytes_moved(B: int, N: int, D: int, elsize: int, reuse: list[int]) -> int:
    """The flags read, and x + residual read and out written for each reusing group."""
    groups = len(reuse)
    group_bytes = (B // groups) * N * D * elsize
    return 4 * groups + 3 * group_bytes * sum(1 for r in reuse if r)


def torch_eager(reuse: list[int]):
    """``torch.add(x, residual, out=out)`` on the batch rows of the groups a host-side decision
    picked (one add per contiguous run of rows; nothing when no group reuses)."""
    groups = len(reuse)

    def f(out, x, residual, _flags):
        per = out.shape[0] // groups
        g = 0
        while g < groups:
            if not reuse[g]:
                g += 1
                continue
            e = g
            while e < groups and reuse[e]:
                e += 1
            s = slice(g * per, e * per)
            torch.add(x[s], residual[s], out=out[s])
            g = e
    return f


def _checker(x, residual, reuse_t, groups: int):
    """exact: from one poisoned out, the provider's out equals the reference's bit for bit.
    The poison is random and finite (a NaN's payload may legitimately change through fp32), so
    an element written where it should not be, or left unwritten, differs."""
    poison = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(7),
                         device=x.device).to(x.dtype) * 1000
    want = None

    def check(fn) -> bool:
        nonlocal want
        if want is None:
            want = poison.clone()
            ref.cache_apply(want, x, residual, reuse_t, groups)
        got = poison.clone()
        fn(got, x, residual, reuse_t)
        return torch.equal(got.view(torch.int16), want.view(torch.int16))
    return check


def _no_bandwidth_without_reuse(row: dict) -> None:
    """Where no group reuses, the call moves only the flags: GB/s, % copy and x ideal say
    nothing about the kernel, so they stay blank (µs is the figure)."""
    if not any(row.get("reuse") or ()):
        for k in ("GB/s", "% copy", "GB/s graph", "ideal µs", "x ideal"):
            row.pop(k, None)


def providers(reuse: list[int], groups: int, device, compile_ok: bool, check,
              compiled_cache: dict, names=None):
    ps = []
    for b in ("cuda", "triton"):
        if _backend.available(OP, b, device)[0]:
            ps.append(U.Provider(f"pyops {b}",
                                 lambda o, x, r, f, b=b: cache_apply(o, x, r, f, groups=groups,
                                                                     backend=b),
                                 check=check))
    if compile_ok:
        if groups not in compiled_cache:
            compiled_cache[groups] = torch.compile(
                lambda o, x, r, f: ref.cache_apply(o, x, r, f, groups), dynamic=False)
        ps.append(U.Provider("torch.compile(reference)", compiled_cache[groups], slow=True,
                             compiles=True, check=check))
    if any(reuse):
        ps.append(U.Provider("torch eager", torch_eager(reuse), check=check))
    ps.append(U.Provider("pyops reference (eager)",
                         lambda o, x, r, f: cache_apply(o, x, r, f, groups=groups,
                                                        backend="reference"),
                         slow=True, graph=False, check=check))
    return [p for p in ps if names is None or p.name in names]


def run(args, device: torch.device, ceiling_gbps, budget: U.Budget, progress=None) -> U.Table:
    t = U.Table("Cache apply: out = x + residual where reused (bf16)", COLUMNS, notes=[
        "GB/s = (int32 flags + x and residual read and out written per reusing group) / time; "
        "% copy = over the device-to-device copy measured in the same run (target >= 85% on "
        ">= 64 MB).",
        "ms: triton.testing.do_bench median, L2 flushed before each call; ms graph: CUDA-graph "
        "replay per call, rotating inputs (> 2x L2), for calls moving < 2x L2.",
        U.PER_CALL_NOTE,
        "case: reuse = every group reuses; compute = none does (out untouched, only the flags "
        "are read: GB/s, % copy and x ideal left blank, µs is the cost); half = the first half "
        "of the groups reuses.",
        "torch eager: torch.add on the reusing rows, the decision taken on the host (its sync "
        "is not timed).",
        "exact: out bit-identical to pyops.reference from the same poisoned out."])
    compile_ok = U.compile_allowed(args, device, t)
    U.raise_compile_limits()
    if progress:
        t.on_add = progress  # rewrite the files after every row
    shapes, cases, names = select(args.mode)
    compiled_cache: dict = {}
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    for label, B, N, D, groups in shapes:
        mk = lambda: torch.randn(B, N, D, device=device, dtype=dtype, generator=gen)  # noqa
        x, res = mk(), mk()
        size = x.numel() * x.element_size()
        for case in cases:
            reuse = flags(case, groups)
            if reuse is None:
                continue
            reuse_t = torch.tensor(reuse, dtype=torch.int32, device=device)
            nbytes = nbytes_moved(B, N, D, 2, reuse)
            out = torch.empty_like(x)
            if any(reuse):
                graph_inputs = U.rotating_inputs(
                    nbytes, device,
                    lambda: (torch.empty((B, N, D), device=device, dtype=dtype), mk(), mk(),
                             reuse_t))
            else:  # only the flags are read: nothing for the L2 to flatter, one set will do
                graph_inputs = [(out, x, res, reuse_t)] if device.type == "cuda" else None
            base = {"shape": f"{label} {B}x{N}x{D}", "MB": size / 2**20, "case": case,
                    "B": B, "N": N, "D": D, "groups": groups, "reuse": reuse,
                    "dtype": "bfloat16"}
            check = _checker(x, res, reuse_t, groups)
            U.bench_providers(t, base, providers(reuse, groups, device, compile_ok, check,
                                                 compiled_cache, names),
                              (out, x, res, reuse_t), nbytes, ceiling_gbps, device, budget,
                              graph_inputs, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                              finish_row=_no_bandwidth_without_reuse)
            del out, graph_inputs
        del x, res
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

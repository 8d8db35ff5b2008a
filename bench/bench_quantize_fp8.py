"""FP8 e4m3 dynamic quantization: pyops cuda / triton vs the reference under torch.compile
(what Inductor gives you), the eager reference, and plain torch eager (per-tensor, per-row).

    python bench/bench_quantize_fp8.py [--out bench/out] [--full | --quick] [--device cuda]

Default run: per-token ("row") scaling, the one the W8A8 linear layers use, at the Flux 1024²
(4608×3072) and Wan 480p (32760×5120) activation sizes; providers pyops cuda, pyops triton,
torch.compile(reference) and torch eager. ``--full``: every granularity (tensor, row, block1x128,
block128x128) at five shapes, plus the eager reference. ``--quick`` (the default on a CPU): tiny
shapes, every provider.
GB/s counts the fewest bytes the op must move: the input once (twice for per-tensor scaling,
whose amax must be known before any element is scaled), the e4m3 codes and the fp32 scales.
``exact``: the provider's codes and scales equal the reference's bit for bit on the same input
(the whole input, or its first rows when it is larger than --check-elems).
"""
# Run length on an H200, estimated (not measured) from the H200 measurement of 2026-11-30
# (bench/RESULTS.md, section 1, "Memory-bound kernels" and the run record's copy bandwidth):
#   default, ~25 s: start-up + copy ceiling ~6 s + 2 shapes x 4 providers = 8 rows; a call takes
#     0.02-0.1 ms at Flux size (42% of the 4.2 TB/s copy for pyops cuda) and ~0.3 ms at Wan
#     size, so do_bench (~80 ms of calls + an L2 flush per call) and the bit-exact check take
#     ~0.5 s per row, ~4 s; Triton compiles ~2 s; torch.compile of the reference per shape:
#     not measured, assumed ~8 s for the first and ~4 s for the second, ~12 s.
#   --full, ~3 min: 5 shapes x 4 granularities x 4-5 providers, 20 compiles.
# estimate-h200-s: 25
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

import pyops  # noqa: E402
from pyops import _backend  # noqa: E402
from pyops.reference import quantize_fp8 as ref  # noqa: E402

NAME = "quantize_fp8"
OP = "quantize_fp8"
COLUMNS = ["op", "shape", "config", "provider", "ms", "GB/s", "% copy", "ms graph", "µs",
           "x ideal", "exact", "note"]
# (label, M, K): DiT activations (Flux 1024², Wan 480p 81 frames, 75600 tokens) and weights.
SHAPES = [("act Flux 1024²", 4608, 3072), ("act Wan 480p", 32760, 5120),
          ("act 75600 tok", 75600, 3072), ("weight", 4096, 4096), ("weight", 12288, 3072)]
QUICK_SHAPES = [("quick", 256, 384), ("quick odd", 130, 200)]
DEFAULT_SHAPES = SHAPES[:2]  # the Flux 1024² and Wan 480p activations
GRANULARITIES = ("tensor", "row", "block1x128", "block128x128")
DEFAULT_GRANULARITIES = ("row",)
DEFAULT_PROVIDERS = ("pyops cuda", "pyops triton", "torch.compile(reference)", "torch eager")
DEFAULT_BUDGET_S = 45


def select(mode: str):
    """(shapes, granularities, provider names or None for all) of a run size."""
    return U.pick(mode, default=(DEFAULT_SHAPES, DEFAULT_GRANULARITIES, DEFAULT_PROVIDERS),
                  full=(SHAPES, GRANULARITIES, None), quick=(QUICK_SHAPES, GRANULARITIES, None))


def run_mode(args) -> str:
    """The run size of parsed ``args`` (``utils.resolve_run`` sets ``args.mode``)."""
    return getattr(args, "mode", None) or ("quick" if args.quick else "full")


def nbytes_moved(M: int, K: int, elsize: int, g: str) -> int:
    reads = M * K * elsize * (2 if g == "tensor" else 1)
    scales = 1
    for d in ref.scale_shape_2d(M, K, g):
        scales *= d
    return reads + M * K + 4 * scales


def _eager(g: str):
    """What a user writes in plain PyTorch: amax, divide, cast (per tensor or per row)."""
    if g == "tensor":
        def f(x):
            s = torch.clamp_min(x.abs().amax().float() / 448.0, ref.FLT_MIN)
            return (x.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s.reshape(1)
    else:
        def f(x):
            s = torch.clamp_min(x.abs().amax(dim=1, keepdim=True).float() / 448.0, ref.FLT_MIN)
            return (x.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s.reshape(-1)
    return f


def _outputs(res):
    """(codes as uint8, scales as int32 bits), flattened, from any provider's result."""
    if isinstance(res, pyops.FP8Tensor):
        q, s = res.data, res.scale
    else:
        q, s = res
    return q.reshape(-1).view(torch.uint8), s.float().reshape(-1).contiguous().view(torch.int32)


def _checker(x: torch.Tensor, g: str, check_elems: int):
    M, K = x.shape
    rows = M if M * K <= check_elems else max(128, (check_elems // K) // 128 * 128)
    xc = x[:rows]
    want = None

    def check(fn) -> bool:
        nonlocal want
        if want is None:
            want = _outputs(ref.quantize_fp8(xc, g))
        got = _outputs(fn(xc))
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want))
    return check, rows


def providers(g: str, device: torch.device, compile_ok: bool, check, compiled_cache: dict,
              names=None):
    ps = []
    for b in ("cuda", "triton"):
        ok, why = _backend.available(OP, b, device)
        if ok:
            ps.append(U.Provider(f"pyops {b}", lambda x, b=b: pyops.quantize_fp8(x, g, backend=b),
                                 check=check))
    if compile_ok:
        if g not in compiled_cache:
            compiled_cache[g] = torch.compile(lambda x: ref.quantize_fp8(x, g), dynamic=False)
        ps.append(U.Provider("torch.compile(reference)", compiled_cache[g], slow=True,
                             compiles=True, check=check))
    if g in ("tensor", "row"):
        ps.append(U.Provider("torch eager", _eager(g), check=check))
    ps.append(U.Provider("pyops reference (eager)",
                         lambda x: pyops.quantize_fp8(x, g, backend="reference"),
                         slow=True, graph=False, check=check))
    return [p for p in ps if names is None or p.name in names]


def run(args, device: torch.device, ceiling_gbps, budget: U.Budget, progress=None) -> U.Table:
    t = U.Table("FP8 e4m3 quantization (bf16 input)", COLUMNS, notes=[
        "GB/s = (input read once, twice for per-tensor amax + e4m3 codes + fp32 scales) / time; "
        "% copy = GB/s over the device-to-device copy measured in the same run.",
        "ms: triton.testing.do_bench median, L2 flushed before each call; ms graph: CUDA-graph "
        "replay per call, rotating inputs (> 2x L2), for calls moving < 2x L2.",
        U.PER_CALL_NOTE,
        "exact: codes and scales bit-identical to pyops.reference on the same input."])
    compile_ok = U.compile_allowed(args, device, t)
    U.raise_compile_limits()
    if progress:
        t.on_add = progress  # rewrite the files after every row
    shapes, granularities, names = select(run_mode(args))
    compiled_cache: dict = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for label, M, K in shapes:
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16, generator=gen)
        graph_inputs = U.rotating_inputs(
            max(nbytes_moved(M, K, 2, g) for g in granularities), device, lambda: (
                torch.randn(M, K, device=device, dtype=torch.bfloat16, generator=gen),))
        for g in granularities:
            check, rows = _checker(x, g, args.check_elems)
            base = {"op": "quantize_fp8", "shape": f"{label} {M}x{K}", "config": g,
                    "M": M, "K": K, "dtype": "bfloat16", "check_rows": rows}
            U.bench_providers(t, base, providers(g, device, compile_ok, check, compiled_cache,
                                                 names),
                              (x,), nbytes_moved(M, K, 2, g), ceiling_gbps, device, budget,
                              graph_inputs, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        del x, graph_inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if progress:
            progress(t)
    return t


def parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    """The quantizer benchmarks' options (shared with bench_quantize_nvfp4 / bench_quantize)."""
    p = U.add_common_args(argparse.ArgumentParser(description=description))
    p.add_argument("--compile", action="store_true", help="run torch.compile on CPU too")
    p.add_argument("--check-elems", type=int, default=2**28,
                   help="bit-exact check on the first rows holding at most this many elements")
    return p


def main(argv=None) -> int:
    return U.bandwidth_main(NAME, parser(), run, argv, DEFAULT_BUDGET_S)


if __name__ == "__main__":
    sys.exit(main())

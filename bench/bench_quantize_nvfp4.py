"""NVFP4 quantization (E2M1 + E4M3 per 16 + fp32 global): pyops cuda / triton vs the reference
under torch.compile (what Inductor gives you) and the eager reference; computed and static global
scale, swizzled scales on and off.

    python bench/bench_quantize_nvfp4.py [--out bench/out] [--full | --quick] [--device cuda]

Default run: the dynamic case (global scale computed from the input, scales not swizzled) at the
Flux 1024² (4608×3072) and Wan 480p (32760×5120) activation sizes; providers pyops cuda, pyops
triton and torch.compile(reference). ``--full``: computed and static global scale, swizzle on and
off, five shapes, plus the eager reference. ``--quick`` (the default on a CPU): tiny shapes, every
provider.
GB/s counts the fewest bytes the op must move: the input once (twice when the global scale is
computed, whose amax must be known before any block is scaled), the packed codes, the E4M3
scales (padded size when swizzled) and the 4-byte global scale (read when static, written when
computed). ``exact``: codes, scale bytes and global scale bit-identical to the reference on the
same input (the whole input, or its first rows when larger than --check-elems).
"""
# Run length on an H200, estimated (not measured) from the H200 measurement of 2026-11-30
# (bench/RESULTS.md, section 1, "Memory-bound kernels"):
#   default, ~25 s: start-up + copy ceiling ~6 s + 2 shapes x 3 providers = 6 rows; a call takes
#     ~0.05-0.2 ms at Flux size (17-28% of the copy bandwidth) and ~0.5-1 ms at Wan size, ~0.5 s
#     per row with do_bench and the bit-exact check, ~3 s; Triton compiles ~2 s; torch.compile
#     of the reference per shape: not measured, assumed ~8 s + ~4 s.
#   --full, ~3 min: 5 shapes x 4 configurations x 4 providers, 20 compiles.
# estimate-h200-s: 25
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402
from bench_quantize_fp8 import COLUMNS, DEFAULT_SHAPES, QUICK_SHAPES, SHAPES, run_mode  # noqa
from bench_quantize_fp8 import parser as fp8_parser  # noqa: E402

import pyops  # noqa: E402
from pyops import _backend  # noqa: E402
from pyops.reference import quantize_nvfp4 as ref  # noqa: E402

NAME = "quantize_nvfp4"
OP = "quantize_nvfp4"
CONFIGS = [(False, False), (False, True), (True, False), (True, True)]  # (static global, swizzle)
DEFAULT_CONFIGS = [(False, False)]  # computed global scale, plain scales: the dynamic case
DEFAULT_PROVIDERS = ("pyops cuda", "pyops triton", "torch.compile(reference)")
DEFAULT_BUDGET_S = 45


def select(mode: str):
    """(shapes, (static, swizzle) configurations, provider names or None for all)."""
    return U.pick(mode, default=(DEFAULT_SHAPES, DEFAULT_CONFIGS, DEFAULT_PROVIDERS),
                  full=(SHAPES, CONFIGS, None), quick=(QUICK_SHAPES, CONFIGS, None))


def config_name(static: bool, swizzle: bool) -> str:
    return f"global {'static' if static else 'computed'}, swizzle {'on' if swizzle else 'off'}"


def nbytes_moved(M: int, K: int, elsize: int, static: bool, swizzle: bool) -> int:
    nb = (K + ref.BLOCK - 1) // ref.BLOCK
    Ms, Ns = ref.swizzled_shape(M, nb) if swizzle else (M, nb)
    reads = M * K * elsize * (1 if static else 2)
    return reads + M * nb * 8 + Ms * Ns + 4


def _outputs(res):
    if isinstance(res, pyops.NVFP4Tensor):
        d, s, g = res.data, res.scales, res.global_scale
    else:
        d, s, g = res
    return (d.reshape(-1).view(torch.uint8), s.reshape(-1).view(torch.uint8),
            g.float().reshape(-1).contiguous().view(torch.int32))


def _checker(x: torch.Tensor, gs, swizzle: bool, check_elems: int):
    M, K = x.shape
    rows = M if M * K <= check_elems else max(128, (check_elems // K) // 128 * 128)
    xc = x[:rows]
    want = None

    def check(fn) -> bool:
        nonlocal want
        if want is None:
            want = _outputs(ref.quantize_nvfp4(xc, gs, swizzle))
        got = _outputs(fn(xc))
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want))
    return check, rows


def providers(static: bool, swizzle: bool, gs, device, compile_ok: bool, check,
              compiled_cache: dict, names=None):
    ps = []
    arg = gs if static else None
    for b in ("cuda", "triton"):
        if _backend.available(OP, b, device)[0]:
            ps.append(U.Provider(
                f"pyops {b}",
                lambda x, b=b: pyops.quantize_nvfp4(x, arg, swizzle=swizzle, backend=b),
                check=check))
    if compile_ok:
        key = (static, swizzle)
        if key not in compiled_cache:
            if static:
                compiled_cache[key] = torch.compile(
                    lambda x, g: ref.quantize_nvfp4(x, g, swizzle), dynamic=False)
            else:
                compiled_cache[key] = torch.compile(
                    lambda x: ref.quantize_nvfp4(x, None, swizzle), dynamic=False)
        cf = compiled_cache[key]
        fn = (lambda x: cf(x, gs)) if static else cf
        ps.append(U.Provider("torch.compile(reference)", fn, slow=True, compiles=True,
                             check=check))
    ps.append(U.Provider("pyops reference (eager)",
                         lambda x: pyops.quantize_nvfp4(x, arg, swizzle=swizzle,
                                                        backend="reference"),
                         slow=True, graph=False, check=check))
    return [p for p in ps if names is None or p.name in names]


def run(args, device: torch.device, ceiling_gbps, budget: U.Budget, progress=None) -> U.Table:
    t = U.Table("NVFP4 quantization (bf16 input)", COLUMNS, notes=[
        "GB/s = (input read once, twice when the global scale is computed + packed codes + "
        "E4M3 scales (padded when swizzled) + global scale) / time; % copy = GB/s over the "
        "device-to-device copy measured in the same run.",
        "static global = amax/2688 of the same input, computed once before timing.",
        "ms: triton.testing.do_bench median, L2 flushed before each call; ms graph: CUDA-graph "
        "replay per call, rotating inputs (> 2x L2), for calls moving < 2x L2.",
        U.PER_CALL_NOTE,
        "exact: codes, scale bytes and global scale bit-identical to pyops.reference."])
    compile_ok = U.compile_allowed(args, device, t)
    U.raise_compile_limits()
    if progress:
        t.on_add = progress  # rewrite the files after every row
    shapes, configs, names = select(run_mode(args))
    compiled_cache: dict = {}
    gen = torch.Generator(device=device).manual_seed(1)
    for label, M, K in shapes:
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16, generator=gen)
        gs = ref.global_scale_from_amax(x.abs().amax().float().reshape(1))
        graph_inputs = U.rotating_inputs(
            max(nbytes_moved(M, K, 2, st, sw) for st, sw in configs), device, lambda: (
                torch.randn(M, K, device=device, dtype=torch.bfloat16, generator=gen),))
        for static, swizzle in configs:
            check, rows = _checker(x, gs if static else None, swizzle, args.check_elems)
            base = {"op": "quantize_nvfp4", "shape": f"{label} {M}x{K}",
                    "config": config_name(static, swizzle), "M": M, "K": K,
                    "dtype": "bfloat16", "check_rows": rows}
            U.bench_providers(
                t, base, providers(static, swizzle, gs, device, compile_ok, check,
                                   compiled_cache, names),
                (x,), nbytes_moved(M, K, 2, static, swizzle), ceiling_gbps, device, budget,
                graph_inputs, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        del x, graph_inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if progress:
            progress(t)
    return t


def parser() -> argparse.ArgumentParser:
    return fp8_parser(__doc__.splitlines()[0])


def main(argv=None) -> int:
    return U.bandwidth_main(NAME, parser(), run, argv, DEFAULT_BUDGET_S)


if __name__ == "__main__":
    sys.exit(main())

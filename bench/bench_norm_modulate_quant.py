"""Fused LayerNorm + adaLN modulate + per-token FP8: pyops cuda / triton vs unfused PyTorch.

    python bench/bench_norm_modulate_quant.py [--out bench/out] [--full | --quick] [--device cuda]

Default run: Flux 1024² (1×4608×3072) and Wan 480p (1×32760×5120), every provider. ``--full``
adds Flux at batch 2 and a 12288-wide row. ``--quick`` (the default on a CPU): tiny shapes.
Providers: pyops cuda, pyops triton, and the unfused PyTorch path a DiT block would run
(``F.layer_norm`` in fp32 -> ``x * (1 + scale) + shift`` -> per-row FP8 quantization as in
``pyops.reference.quantize_fp8``), eager and under ``torch.compile``.
GB/s counts the fewest bytes the op must move: x read once, shift/scale read once, e4m3 codes
and fp32 per-token scales written. Target: >= 85% of the copy bandwidth measured in
the same run. Accuracy is not re-checked here (tests/test_norm_modulate_quant.py does it); the
``ok`` column says whether the provider's q/scale equal ``quantize_fp8`` of its own fp32 y.
"""
# Run length on an H200, estimated (not measured) from the H200 measurement of 2026-11-30
# (measured on an H200 on 2026-11-30 at 18432x3072 (side check, not in RESULTS.md): ~20% of the
# 4.2 TB/s copy (bench/RESULTS.md, section 1, run record), i.e. ~0.1 ms per call at Flux size
# and ~1 ms at Wan size):
#   default, ~25 s: start-up + copy ceiling ~6 s + 2 shapes x 4 providers = 8 rows at ~0.5 s
#     (do_bench, graph replays at Flux size, the self-consistency check) ~4 s + Triton compile
#     ~2 s + torch.compile of the unfused path per shape: not measured, assumed ~8 s + ~4 s.
#   --full, ~45 s: 4 shapes.
# estimate-h200-s: 25
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

from pyops import _backend  # noqa: E402
from pyops.ops.norm_modulate_quant import norm_modulate_quant  # noqa: E402
from pyops.reference import quantize_fp8 as qref  # noqa: E402

NAME = "norm_modulate_quant"
OP = "norm_modulate_quant"
COLUMNS = ["shape", "dtype", "provider", "ms", "GB/s", "% copy", "ms graph", "µs", "x ideal",
           "ok", "note"]
# (label, B, N, D): Flux.1 1024² (4096 image + 512 text tokens), Wan2.1-14B 480p 81 frames,
# Flux at batch 2, a wide MLP-sized row.
SHAPES = [("Flux 1024²", 1, 4608, 3072), ("Flux 1024² b2", 2, 4608, 3072),
          ("Wan 480p", 1, 32760, 5120), ("D 12288", 1, 4608, 12288)]
QUICK_SHAPES = [("quick", 2, 64, 256), ("quick odd", 1, 33, 1000)]
DEFAULT_SHAPES = [SHAPES[0], SHAPES[2]]  # Flux 1024², Wan 480p
DEFAULT_BUDGET_S = 45


def select(mode: str):
    """(shapes, provider names or None for all) of a run size."""
    return U.pick(mode, default=(DEFAULT_SHAPES, None), full=(SHAPES, None),
                  quick=(QUICK_SHAPES, None))


def nbytes_moved(B: int, N: int, D: int, elsize: int) -> int:
    M = B * N
    return M * D * elsize + 2 * B * D * elsize + M * D + 4 * M


def unfused(x, shift, scale, eps=1e-6):
    """What a DiT block runs without fusion: norm, modulate, then quantize (4+ kernels)."""
    D = x.shape[-1]
    n = torch.nn.functional.layer_norm(x.float(), (D,), eps=eps)
    y = n * (1 + scale.float()[:, None]) + shift.float()[:, None]
    q, s = qref.quantize_fp8(y.reshape(-1, D), "row")
    return q.view(x.shape), s


def _self_consistent(fn, x, sh, sc) -> bool:
    return U.fp8_row_self_consistent(*fn(x, sh, sc, y_dtype=torch.float32))


def providers(device: torch.device, compile_ok: bool, cache: dict):
    ps = []
    for b in ("cuda", "triton"):
        if _backend.available(OP, b, device)[0]:
            ps.append(U.Provider(
                f"pyops {b}",
                lambda x, sh, sc, b=b: norm_modulate_quant(x, sh, sc, backend=b)))
    ps.append(U.Provider("unfused eager", unfused, graph=False))
    if compile_ok:
        if "c" not in cache:
            cache["c"] = torch.compile(unfused, dynamic=False)
        ps.append(U.Provider("unfused torch.compile", cache["c"], slow=True, compiles=True))
    return ps


def run(args, device: torch.device, ceiling_gbps, budget: U.Budget, progress=None) -> U.Table:
    t = U.Table("LayerNorm + adaLN modulate + per-token FP8 e4m3", COLUMNS, notes=[
        "GB/s = (x read once + shift/scale + e4m3 codes + fp32 per-token scales) / time; "
        "% copy = GB/s over the device-to-device copy measured in the same run (target >= 85%).",
        "ms: median of triton.testing.do_bench, L2 flushed before each call; ms graph: "
        "CUDA-graph replay per call with rotating inputs (> 2x L2), for calls moving < 2x L2.",
        U.PER_CALL_NOTE,
        "ok: q/scale equal quantize_fp8(y, 'row') of the provider's own fp32 y (pyops only)."])
    compile_ok = U.compile_allowed(args, device, t)
    U.raise_compile_limits()
    if progress:
        t.on_add = progress  # rewrite the files after every row
    shapes, _ = select(args.mode)
    cache: dict = {}
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    for label, B, N, D in shapes:
        mk = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=gen)  # noqa: E731
        x, sh, sc = mk(B, N, D), mk(B, D), mk(B, D)
        nbytes = nbytes_moved(B, N, D, 2)
        graph_inputs = U.rotating_inputs(nbytes, device,
                                         lambda: (mk(B, N, D), mk(B, D), mk(B, D)))
        base = {"shape": f"{label} {B}x{N}x{D}", "dtype": "bfloat16", "B": B, "N": N, "D": D}
        ps = providers(device, compile_ok, cache)
        for p in ps:
            if p.name.startswith("pyops"):
                b = p.name.split()[1]
                p.check = (lambda fn, b=b: _self_consistent(
                    lambda *a, **k: norm_modulate_quant(*a, backend=b, **k), x, sh, sc))
        U.bench_providers(t, base, ps, (x, sh, sc), nbytes, ceiling_gbps, device, budget,
                          graph_inputs, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                          finish_row=U.ok_column)
        del x, sh, sc, graph_inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if progress:
            progress(t)
    return t


def parser() -> argparse.ArgumentParser:
    p = U.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--compile", action="store_true", help="run torch.compile on CPU too")
    return p


def main(argv=None) -> int:
    return U.bandwidth_main(NAME, parser(), run, argv, DEFAULT_BUDGET_S)


if __name__ == "__main__":
    sys.exit(main())

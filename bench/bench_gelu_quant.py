"""Fused GELU (tanh) + per-token FP8: pyops cuda / triton vs unfused PyTorch.

    python bench/bench_gelu_quant.py [--out bench/out] [--full | --quick] [--device cuda]

Default run: the MLP hidden state of Flux 1024² (1×4608×12288) and of Wan2.1-14B 480p
(1×32760×13824), every provider. ``--full`` adds Flux at batch 2 and SD3.5-large 1024²
(1×4429×9728). ``--quick`` (the default on a CPU): tiny shapes.
Providers: pyops cuda, pyops triton (on a CPU: the pyops reference instead), and the unfused
path a DiT MLP would run (``F.gelu(h, approximate="tanh")`` in bf16, then
``pyops.quantize_fp8(y, "row")`` with the backend pyops picks), eager and under
``torch.compile``.
GB/s counts the fewest bytes the op must move: x read once, e4m3 codes and fp32 per-token scales
written (the unfused path moves 7 bytes per bf16 element instead of 3; it is timed on the same
byte count, so its GB/s is the op's effective rate). Target: the copy bandwidth measured in the
same run. Accuracy is not re-checked here (tests/test_gelu_quant.py does it); the ``ok`` column
says whether the provider's q/scale equal ``quantize_fp8`` of its own fp32 y.
"""
# Run length on an H200, estimated (not measured): start-up + copy ceiling ~6 s; 2 shapes x 4
# providers = 8 rows at ~0.5 s (do_bench; no graph replays: both shapes move > 2x L2) ~4 s; the
# self-consistency checks (an fp32 y and the reference quantizer on the GPU) ~1 s; the Triton
# kernel's compile ~3 s; torch.compile of the unfused path, first shape ~8 s, second ~4 s
# (assumed as for bench_norm_modulate_quant, not measured). Per call at the copy bandwidth of
# the H200 measurement of 2026-11-30 (4.2 TB/s, bench/RESULTS.md): ~40 µs (Flux), ~0.32 ms (Wan).
#   default, ~26 s; --full, ~40 s: 4 shapes.
# estimate-h200-s: 26
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

import pyops  # noqa: E402
from pyops import _backend  # noqa: E402
from pyops.ops.gelu_quant import gelu_quant  # noqa: E402

NAME = "gelu_quant"
OP = "gelu_quant"
COLUMNS = ["shape", "dtype", "provider", "ms", "GB/s", "% copy", "ms graph", "µs", "x ideal",
           "ok", "note"]
# (label, B, N, K): Flux.1 1024² (4096 image + 512 text tokens, MLP 4 x 3072), Wan2.1-14B 480p
# 81 frames (ffn 13824), Flux at batch 2, SD3.5-large 1024² (4096 + 333 tokens, MLP 4 x 2432).
SHAPES = [("Flux 1024²", 1, 4608, 12288), ("Flux 1024² b2", 2, 4608, 12288),
          ("Wan 480p", 1, 32760, 13824), ("SD3.5-L 1024²", 1, 4429, 9728)]
QUICK_SHAPES = [("quick", 2, 64, 256), ("quick odd", 1, 33, 1000)]
DEFAULT_SHAPES = [SHAPES[0], SHAPES[2]]  # Flux 1024², Wan 480p
DEFAULT_BUDGET_S = 30


def select(mode: str):
    """(shapes, provider names or None for all) of a run size."""
    return U.pick(mode, default=(DEFAULT_SHAPES, None), full=(SHAPES, None),
                  quick=(QUICK_SHAPES, None))


def nbytes_moved(B: int, N: int, K: int, elsize: int) -> int:
    """x read once, e4m3 codes (1 byte per element) and one fp32 scale per token written."""
    M = B * N
    return M * K * elsize + M * K + 4 * M


def unfused(h):
    """What a DiT MLP runs without fusion: GELU in the activation dtype, then the per-token
    quantizer (two passes over the hidden state, an intermediate bf16 tensor)."""
    y = torch.nn.functional.gelu(h, approximate="tanh")
    return pyops.quantize_fp8(y, "row")


def _self_consistent(b: str, x) -> bool:
    return U.fp8_row_self_consistent(*gelu_quant(x, y_dtype=torch.float32, backend=b))


def providers(device: torch.device, compile_ok: bool, cache: dict):
    ps = []
    for b in ("cuda", "triton"):
        if _backend.available(OP, b, device)[0]:
            ps.append(U.Provider(f"pyops {b}", lambda x, b=b: gelu_quant(x, backend=b)))
    if device.type == "cpu":  # the smoke test runs the op (and its ok check) through the spec
        ps.append(U.Provider("pyops reference (eager)",
                             lambda x: gelu_quant(x, backend="reference"), graph=False))
    ps.append(U.Provider("unfused eager", unfused, graph=False))
    if compile_ok:
        if "c" not in cache:
            cache["c"] = torch.compile(unfused, dynamic=False)
        ps.append(U.Provider("unfused torch.compile", cache["c"], slow=True, compiles=True))
    return ps


def run(args, device: torch.device, ceiling_gbps, budget: U.Budget, progress=None) -> U.Table:
    t = U.Table("GELU (tanh) + per-token FP8 e4m3", COLUMNS, notes=[
        "GB/s = (x read once + e4m3 codes + fp32 per-token scales) / time; % copy = GB/s over "
        "the device-to-device copy measured in the same run (target: 100%).",
        "ms: median of triton.testing.do_bench, L2 flushed before each call; ms graph: "
        "CUDA-graph replay per call with rotating inputs (> 2x L2), for calls moving < 2x L2.",
        U.PER_CALL_NOTE,
        "ok: q/scale equal quantize_fp8(y, 'row') of the provider's own fp32 y (pyops only).",
        "unfused: F.gelu(approximate='tanh') in bf16, then pyops.quantize_fp8(y, 'row'); timed "
        "on the op's byte count (it moves 7 bytes per element, the fused op 3)."])
    compile_ok = U.compile_allowed(args, device, t)
    U.raise_compile_limits()
    if progress:
        t.on_add = progress  # rewrite the files after every row
    shapes, _ = select(args.mode)
    cache: dict = {}
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    for label, B, N, K in shapes:
        mk = lambda: torch.randn(B, N, K, device=device, dtype=dtype, generator=gen)  # noqa: E731
        x = mk()
        nbytes = nbytes_moved(B, N, K, 2)
        graph_inputs = U.rotating_inputs(nbytes, device, lambda: (mk(),))
        base = {"shape": f"{label} {B}x{N}x{K}", "dtype": "bfloat16", "B": B, "N": N, "K": K}
        ps = providers(device, compile_ok, cache)
        for p in ps:
            if p.name.startswith("pyops"):
                p.check = lambda fn, b=p.name.split()[1]: _self_consistent(b, x)
        U.bench_providers(t, base, ps, (x,), nbytes, ceiling_gbps, device, budget,
                          graph_inputs, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                          finish_row=U.ok_column)
        del x, graph_inputs
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

"""Quantized linear layers: bf16 nn.Linear vs FP8 (W8A8) and NVFP4 (W4A16), one run.

    python bench/bench_linear.py [--out bench/out] [--full | --quick] [--device cuda]
                                 [--budget-s S] [--only flux|wan|small]

Shapes (M, K, N). Default run: M 4608 with (K, N) = (3072, 3072) and (3072, 12288) (Flux 1024²
attention projections and MLP up), and M = 1 and 16 at K = N = 3072 (decode-like).
``--full``: Flux 1024²/2048²-ish (M 4608 and 9216; K, N from {3072, 12288, 15360}), Wan 480p
(M 32760; 5120, 13824) and small M (1, 16, 64). ``--quick`` (the default on a CPU): tiny shapes.

Providers (all bf16 in, bf16 out, bias on). Default run: bf16 nn.Linear, the _scaled_mm ceiling,
pyops fp8 auto / torch._scaled_mm / triton, pyops nvfp4 auto and torchao fp8 rowwise compiled
(the peer); ``--full`` adds torchao eager, the fused-norm pair and the explicit NVFP4 paths.
Provider names say who runs the GEMM (the backend names of ``pyops/_backend.py``):
* ``bf16 nn.Linear``: cuBLAS, the baseline of the ``x bf16`` column.
* ``_scaled_mm rowwise (pre-quantized)``: torch._scaled_mm on already-quantized e4m3 operands,
  per-token x per-channel scales: the FP8 GEMM ceiling (no activation quantization).
* ``torchao fp8 rowwise eager`` / ``compiled``: torchao's Float8DynamicActivationFloat8WeightConfig
  (PerRow), if torchao is importable (skipped otherwise); compiled = torch.compile of the layer.
* ``pyops fp8 (auto|torch._scaled_mm|triton)``: ``pyops.linear`` including the per-token
  activation quantization pass; ``torch._scaled_mm`` = backend ``torch`` (named ``cuda`` before,
  and in bench/RESULTS.md's section 1 table); auto = the per-shape policy of
  ``pyops/ops/fp8_linear.py`` (the note names the backend it chose).
* ``pyops norm_modulate_quant + fp8``: the input is the pre-norm hidden state; one fused
  LayerNorm + modulate + quantize pass feeds the FP8 GEMM. Baseline next to it:
  ``bf16 layernorm+modulate+nn.Linear`` (eager PyTorch). Only if ``pyops.norm_modulate_quant`` exists.
* ``pyops nvfp4 auto``: W4A16 through ``pyops.linear`` (the note names the backend and variant
  it chose); ``pyops nvfp4 triton fused`` = backend ``triton``, dequantize in the GEMM main loop
  (RESULTS.md section 1: "nvfp4 fused"); ``pyops nvfp4 torch dequant+cuBLAS`` = backend
  ``torch`` variant dequant, a Triton dequantize to bf16 + cuBLAS ("nvfp4 dequant").
* ``pyops nvfp4 torch w4a4 (cuBLASLt FP4)``: only with native NVFP4 (sm_100/103/120/121): per-call
  NVFP4 activation quantization + block-scaled ``torch._scaled_mm`` + global-scale/bias
  epilogue (unverified).

Columns: ms (do_bench median, L2 flushed), TFLOPS = 2·M·N·K / time, x bf16 = bf16 ms / ms,
weight MB (the stored weight and its scales), accuracy vs fp32 math on the original (unquantized)
operands over the first rows of the output: relative error ||y - ref|| / ||ref|| and SQNR (dB).
"""
# Run length on an H200, estimated (not measured) from the H200 measurement of 2026-11-30
# (bench/RESULTS.md, section 1: the Linear table and "Run length at 8d8b3ea"):
#   default, ~45 s: start-up (imports incl. torchao, environment) ~5 s + 4 shapes x 7 providers
#     = 28 rows at 0.01-0.5 ms per call, ~0.3 s per row (first call + accuracy + do_bench
#     ~80 ms of calls + the L2 flushes) ~8 s + Triton compiles (FP8 GEMM, activation quantizer,
#     NVFP4 kernels) ~10 s + torchao under torch.compile, once per shape: compile time was not
#     measured, assumed ~10 s for the first and ~5 s for each further shape, ~25 s. The default
#     soft budget (45 s) skips the remaining torchao compiles, marked so, if they take longer.
#   --full, ~5 min: 22 shapes x up to 12 providers with a torchao compile per shape; the 8d8b3ea
#     run was cut by its time limit.
# estimate-h200-s: 45
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

import pyops  # noqa: E402
from pyops import _backend  # noqa: E402
from pyops.ops import fp8_linear as _fp8  # noqa: E402
from pyops.ops import nvfp4_linear as _nv4  # noqa: E402
from pyops.ops.linear import linear  # noqa: E402
from pyops.weights import quantize_weight  # noqa: E402

NAME = "linear"
COLUMNS = ["shape", "M", "K", "N", "provider", "ms", "TFLOPS", "x bf16", "weight MB",
           "rel err", "SQNR dB", "note"]
FLUX = [(M, K, N) for M in (4608, 9216)
        for K, N in ((3072, 3072), (3072, 12288), (12288, 3072), (3072, 15360), (15360, 3072))]
WAN = [(32760, 5120, 5120), (32760, 5120, 13824), (32760, 13824, 5120)]
SMALL = [(M, K, N) for M in (1, 16, 64) for K, N in ((3072, 3072), (3072, 12288),
                                                      (12288, 3072))]
QUICK = [(1, 256, 128), (16, 128, 256), (64, 256, 192)]
DEFAULT = [("Flux", 4608, 3072, 3072), ("Flux", 4608, 3072, 12288),
           ("small M", 1, 3072, 3072), ("small M", 16, 3072, 3072)]
DEFAULT_PROVIDERS = ("bf16 nn.Linear", "_scaled_mm rowwise (pre-quantized)", "pyops fp8 auto",
                     "pyops fp8 torch._scaled_mm", "pyops fp8 triton", "pyops nvfp4 auto",
                     "torchao fp8 rowwise compiled")
DEFAULT_BUDGET_S = 45
ACC_ROWS = 1024


def select(mode: str, only=None):
    """(shapes as (label, M, K, N), provider names or None for all) of a run size."""
    if mode == "quick":
        return [("quick", *s) for s in QUICK], None
    if mode == "default" and only is None:
        return list(DEFAULT), DEFAULT_PROVIDERS
    groups = {"flux": [("Flux", *s) for s in FLUX], "wan": [("Wan", *s) for s in WAN],
              "small": [("small M", *s) for s in SMALL]}
    shapes = [s for g, ss in groups.items() if only in (None, g) for s in ss]
    if mode == "default":  # --only without --full: that group's default shapes, if any
        shapes = [s for s in shapes if s in DEFAULT] or shapes[:1]
        return shapes, DEFAULT_PROVIDERS
    return shapes, None


def _norm_quant_fn():
    fn = getattr(pyops, "norm_modulate_quant", None)
    if fn is None:
        try:
            from pyops.ops.norm_modulate_quant import norm_modulate_quant as fn
        except Exception:
            fn = None
    return fn


def _torchao_linear(lin: torch.nn.Linear):
    """A torchao FP8 rowwise copy of ``lin``, or (None, why)."""
    try:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, PerRow,
                                          quantize_)
    except Exception as e:
        return None, f"torchao not importable ({type(e).__name__})"
    m = copy.deepcopy(lin)
    try:
        quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    except Exception as e:
        return None, f"torchao quantize_ failed: {type(e).__name__}: {e}"[:160]
    return m, None


def accuracy(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    y = y.reshape(-1, ref.shape[-1])[: ref.shape[0]].double()
    r = ref.double()
    num = float(r.pow(2).sum())
    den = float((y - r).pow(2).sum())
    rel = math.sqrt(den / num) if num > 0 else float("nan")
    sqnr = 10 * math.log10(num / den) if den > 0 else float("inf")
    return rel, sqnr


def run_shape(table: U.Table, label: str, M: int, K: int, N: int, device, args, budget,
              names=None):
    gen = torch.Generator(device=device).manual_seed(M * 7 + K * 3 + N)
    dt = torch.bfloat16
    x = torch.randn(M, K, device=device, dtype=dt, generator=gen)
    lin = torch.nn.Linear(K, N, device=device, dtype=dt)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, device=device, generator=gen) / math.sqrt(K))
    w, b = lin.weight.detach(), lin.bias.detach()
    qw8 = quantize_weight(w, "fp8")
    qw4 = quantize_weight(w, "nvfp4")
    flops = 2.0 * M * N * K
    rows = min(M, ACC_ROWS)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = x[:rows].float() @ w.float().t() + b.float()
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    base = {"shape": label, "M": M, "K": K, "N": N}

    providers = []  # (name, fn, weight bytes, slow, note)
    providers.append(("bf16 nn.Linear", lambda: F.linear(x, w, b), w.numel() * 2, False, None))
    xt = pyops.quantize_fp8(x, "row")
    xq, xs = xt.data, xt.scale.reshape(M, 1)
    if device.type == "cuda" or args.quick:
        wq, ws = qw8.data, qw8.scale.reshape(1, N)
        providers.append(("_scaled_mm rowwise (pre-quantized)", lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=xs, scale_b=ws, bias=b, out_dtype=dt), qw8.nbytes, False,
            "ceiling: no activation quantization"))
    if device.type == "cuda":
        tao, why = _torchao_linear(lin)
        if tao is None:
            note = f"torchao providers skipped: {why}"
            if note not in table.notes:
                table.notes.append(note)
        else:
            providers.append(("torchao fp8 rowwise eager", lambda: tao(x), qw8.nbytes, False,
                              None))
            ctao = torch.compile(tao, dynamic=False)
            providers.append(("torchao fp8 rowwise compiled", lambda: ctao(x), qw8.nbytes, True,
                              "torch.compile"))
    b8 = _backend.resolve(_fp8.OP, device, None, M=M, N=N, K=K, out_dtype=dt)
    providers.append(("pyops fp8 auto", lambda: linear(x, qw8, b), qw8.nbytes, False,
                      f"incl. activation quantization; backend {b8}"))
    if device.type == "cuda":
        for label, be in (("torch._scaled_mm", "torch"), ("triton", "triton")):
            providers.append((f"pyops fp8 {label}", lambda be=be: linear(x, qw8, b, backend=be),
                              qw8.nbytes, False, "incl. activation quantization"))
    nmq = _norm_quant_fn()
    if nmq is not None and M > 1:
        shift = torch.randn(K, device=device, dtype=dt, generator=gen) * 0.1
        scale = torch.randn(K, device=device, dtype=dt, generator=gen) * 0.1
        h = x  # plays the pre-norm hidden state
        hn = F.layer_norm(h[:rows].float(), (K,), eps=1e-6) * (1 + scale.float()) + shift.float()
        ref_ln = hn @ w.float().t() + b.float()
        providers.append(("bf16 layernorm+modulate+nn.Linear", lambda: F.linear(
            F.layer_norm(h, (K,), eps=1e-6) * (1 + scale) + shift, w, b), w.numel() * 2, False,
            "eager baseline for the fused row"))
        providers.append(("pyops norm_modulate_quant + fp8", lambda: linear(
            nmq(h, shift, scale), qw8, b), qw8.nbytes, False, "fused norm+modulate+quant"))
    providers.append(("pyops nvfp4 auto", lambda: linear(x, qw4, b), qw4.nbytes, False,
                      "backend {} variant {}".format(*_nv4.choose(device, None, M, N, K, dt))))
    if device.type == "cuda":
        d4, s4, g4 = qw4.data, qw4.scales.view(torch.uint8), qw4.global_scale
        for label, be, var in (("triton fused", "triton", "fused"),
                               ("torch dequant+cuBLAS", "torch", "dequant")):
            providers.append((f"pyops nvfp4 {label}", lambda be=be, var=var:
                              _nv4.nvfp4_linear_op(x, d4, s4, g4, K, b, be, var),
                              qw4.nbytes, False, None))
        if _backend.native_fp4(device):
            s4sw = qw4.swizzled_scales().view(torch.uint8)
            providers.append(("pyops nvfp4 torch w4a4 (cuBLASLt FP4)",
                              lambda: _nv4.nvfp4_linear_op(x, d4, s4sw, g4, K, b, "torch", "w4a4"),
                              qw4.nbytes, False, "incl. NVFP4 activation quantization"))

    if names is not None:
        providers = [pr for pr in providers if pr[0] in names]
        # the compiled peer last: its compile is the part the soft budget may skip
        providers.sort(key=lambda pr: pr[3])
    bf16_ms = ln_ms = None
    for name, fn, wbytes, slow, note in providers:
        row = dict(base, provider=name, **{"weight MB": wbytes / 1e6})
        if slow and budget.spent():
            row["note"] = "skipped: time budget spent"
            table.add(**row)
            continue
        try:
            with torch.no_grad():
                t_first = time.perf_counter()
                y = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - t_first
                fused = "norm_modulate" in name or "layernorm" in name
                row["rel err"], row["SQNR dB"] = accuracy(y, ref_ln if fused else ref)
                del y
                ms = U.time_ms(fn, device=device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
            row["ms"] = ms
            row["TFLOPS"] = U.tflops(flops, ms)
            if name == "bf16 nn.Linear":
                bf16_ms = ms
            if name.startswith("bf16 layernorm"):
                ln_ms = ms
            base_ms = ln_ms if fused else bf16_ms
            if base_ms:
                row["x bf16"] = base_ms / ms
            if slow:  # the compile is in the first call
                note = f"{note}; first call (compile) {first_s:.1f} s" if note else \
                    f"first call (compile) {first_s:.1f} s"
            if note:
                row["note"] = note
        except Exception as e:  # one broken provider must not lose the others' numbers
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:160]
            row["note"] = f"error: {msg}"
            print(f"[bench] {label} {name}: {msg}", file=sys.stderr)
        table.add(**row)
        print("  " + "  ".join(f"{k}={U._fmt(v)}" for k, v in row.items()), flush=True)
    del x, xq, xs, lin, w, qw8, qw4, ref, providers
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = U.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--only", choices=("flux", "wan", "small"), default=None)
    args = p.parse_args(argv)
    device = U.resolve_run(args, DEFAULT_BUDGET_S)
    env = U.env_record(device)
    env["run"] = args.mode
    budget = U.Budget(args.budget_s)
    U.raise_compile_limits()
    table = U.Table("quantized linear (bf16 activations, bias)", COLUMNS, notes=[
        "ms: do_bench median (L2 flushed before each call); TFLOPS = 2*M*N*K / ms; "
        "x bf16 = bf16 nn.Linear ms / ms on the same shape (for the norm_modulate_quant row: "
        "over the bf16 layernorm+modulate+nn.Linear row).",
        "rel err / SQNR: against fp32 math on the original bf16 operands and unquantized "
        f"weight, first {ACC_ROWS} output rows.",
        "pyops fp8 rows include the per-token activation quantization; _scaled_mm "
        "(pre-quantized) does not (the ceiling)."])
    shapes, names = select(args.mode, args.only)
    U.autosave([table], args.out, NAME, env)
    for label, M, K, N in shapes:
        print(f"{label} M={M} K={K} N={N}", flush=True)
        run_shape(table, label, M, K, N, device, args, budget, names)
    U.write_results(args.out, NAME, [table], env)
    print(U.env_markdown(env) + "\n\n" + table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())

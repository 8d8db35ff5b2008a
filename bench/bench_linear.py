"""Quantized linear layers: bf16 nn.Linear (cuBLAS) beside every pyops path and torchao, one run.

    python bench/bench_linear.py [--out bench/out] [--full | --quick] [--device cuda]
                                 [--budget-s S] [--only flux|wan|small]

Shapes (M, K, N), labelled by model. Default run: small M (decode-like), M in {1, 16, 64} at
(K, N) = (3072, 3072) and (3072, 12288) (Flux hidden 3072, MLP 12288); large M: Flux 1024²
(4608, 3072, 3072) and (4608, 3072, 12288), Wan 480p (32760, 5120, 5120).
``--full``: Flux 1024²/2048²-ish (M 4608 and 9216; K, N from {3072, 12288, 15360}), Wan 480p
(M 32760; 5120, 13824) and small M (1, 16, 64 with K = 12288 too), every provider.
``--quick`` (the default on a CPU): tiny shapes.

Providers (all bf16 in, bf16 out, bias on). Names say who runs the GEMM (the backend names of
``pyops/_backend.py``: ``cuda`` = pyops' own kernel, ``triton`` = ours, ``torch`` = a vendor
GEMM through torch, ``reference`` = the PyTorch spec):
* ``bf16 nn.Linear``: cuBLAS, the baseline of the ``x bf16`` column.
* ``_scaled_mm rowwise (pre-quantized)``: torch._scaled_mm on already-quantized e4m3 operands,
  per-token x per-channel scales: the FP8 GEMM ceiling (no activation quantization).
* ``torchao fp8 rowwise eager`` / ``compiled``: torchao's Float8DynamicActivationFloat8WeightConfig
  (PerRow), if torchao is importable (skipped otherwise); compiled = torch.compile of the layer.
* ``pyops fp8 (auto|torch._scaled_mm|triton)``: ``pyops.linear`` (W8A8) including the per-token
  activation quantization pass; auto = the per-shape policy of ``pyops/ops/fp8_linear.py`` (the
  note names the backend it chose).
* ``pyops (fp8|nvfp4) weight-only (cuda|triton)``: ``pyops.weight_only_linear`` (W8A16 / W4A16,
  activations not quantized) at M <= 64 only. ``cuda`` = ``csrc/weight_only_linear.cu``,
  UNVERIFIED on hardware: it runs only where the extension is built, and these rows run after
  all the others (a faulting kernel can poison the CUDA context), each with its relative
  difference to the op's reference backend in the note. Off CUDA: backend ``reference``.
* ``pyops norm_modulate_quant + fp8``: the input is the pre-norm hidden state; one fused
  LayerNorm + modulate + quantize pass feeds the FP8 GEMM. Baseline next to it:
  ``bf16 layernorm+modulate+nn.Linear`` (eager PyTorch). Only where ``pyops.norm_modulate_quant``
  exists.
* ``pyops nvfp4 auto``: W4A16 through ``pyops.linear`` (the note names the backend and variant
  it chose); ``pyops nvfp4 triton fused`` = backend ``triton``, dequantize in the GEMM main loop;
  ``pyops nvfp4 torch dequant+cuBLAS`` = backend ``torch`` variant dequant, a Triton dequantize
  to bf16 + cuBLAS.
* ``pyops nvfp4 torch fp8 (convert + _scaled_mm)``: backend ``torch`` variant fp8: per call the
  NVFP4 weight becomes FP8 e4m3 + per-row scales (a transient copy), x is quantized per token,
  row-wise torch._scaled_mm; every conversion is in the time. Skipped, with a note, where this
  pyops has no such variant. Off CUDA: backend ``reference`` (the chain's math).
* ``pyops nvfp4 torch w4a4 (cuBLASLt FP4)``: only with native NVFP4 (sm_100/103/120/121): per-call
  NVFP4 activation quantization + block-scaled ``torch._scaled_mm`` (unverified).

Columns: ms (do_bench median, L2 flushed), TFLOPS = 2·M·N·K / time, GB/s = (stored weight bytes +
x bytes + output bytes) / time (the least traffic the call can have: at small M the weight read
dominates; compare with the copy bandwidth), x bf16 = bf16 ms / ms, weight MB = the stored weight
(bf16: N·K·2 bytes; fp8: e4m3 data + fp32 scales; nvfp4: packed data + e4m3 scales + the global
scale; a provider's transient copies are not stored, its note names them), accuracy vs fp32 math
on the original (unquantized) operands over the first rows of the output: relative error
||y - ref|| / ||ref|| and SQNR (dB).
"""
# Run length on an H200: an ESTIMATE (nothing of this version was timed), built as before from
# the H200 measurement of 2026-11-30 (bench/RESULTS.md, section 1: the Linear table and "Run
# length at 8d8b3ea"): ~0.25 s per row (first call + accuracy + do_bench's 20 + 60 ms of calls
# with the L2 flushes; the Wan rows' 2-4 ms calls fit the same window), Triton compiles ~1.5 s
# per kernel, torch.compile of torchao guessed (never measured) at ~10 s plus ~3 s of import.
#   default, ~50 s: start-up ~5 s; small M: 6 shapes x 7 providers (bf16, pyops fp8 auto, fp8 and
#     nvfp4 weight-only cuda + triton, nvfp4 auto) = 42 rows, large M: 3 shapes x 5 providers
#     (bf16, _scaled_mm ceiling, pyops fp8 auto, nvfp4 auto, nvfp4 torch fp8) = 15 rows: 57 rows
#     ~15 s (the unverified cuda rows' second pass re-creates 6 small inputs, <1 s); ~12 Triton
#     kernels (activation and weight quantizers, NVFP4 fused at three M and dequant, W8A16 +
#     split-K reduce, NVFP4 -> FP8) ~18 s; torchao compiled at one shape (M 16, 3072 x 12288)
#     ~13 s, skipped and marked so once the soft budget (45 s) is spent.
#   --full, ~6 min: 22 shapes x up to 17 providers with a torchao compile per shape.
# estimate-h200-s: 50
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

import pyops  # noqa: E402
from pyops import _backend  # noqa: E402
from pyops.ops import fp8_linear as _fp8  # noqa: E402
from pyops.ops import nvfp4_linear as _nv4  # noqa: E402
from pyops.ops.linear import linear  # noqa: E402
from pyops.ops.weight_only_linear import OP as WO_OP  # noqa: E402
from pyops.ops.weight_only_linear import weight_only_linear  # noqa: E402
from pyops.weights import quantize_weight  # noqa: E402

NAME = "linear"
COLUMNS = ["shape", "M", "K", "N", "provider", "ms", "TFLOPS", "GB/s", "x bf16", "weight MB",
           "rel err", "SQNR dB", "note"]
FLUX = [(M, K, N) for M in (4608, 9216)
        for K, N in ((3072, 3072), (3072, 12288), (12288, 3072), (3072, 15360), (15360, 3072))]
WAN = [(32760, 5120, 5120), (32760, 5120, 13824), (32760, 13824, 5120)]
SMALL = [(M, K, N) for M in (1, 16, 64) for K, N in ((3072, 3072), (3072, 12288),
                                                      (12288, 3072))]
QUICK = [(1, 256, 128), (16, 128, 256), (64, 256, 192)]
WEIGHT_ONLY_MAX_M = 64  # weight-only rows at M <= this (the small-M path; every run size)
DEFAULT = ([("small M", M, K, N) for M in (1, 16, 64) for K, N in ((3072, 3072), (3072, 12288))]
           + [("Flux", 4608, 3072, 3072), ("Flux", 4608, 3072, 12288),
              ("Wan", 32760, 5120, 5120)])
NV4_FP8 = "pyops nvfp4 torch fp8 (convert + _scaled_mm)"
UNVERIFIED = ("pyops fp8 weight-only cuda", "pyops nvfp4 weight-only cuda")  # run last
DEFAULT_SMALL = ("bf16 nn.Linear", "pyops fp8 auto", "pyops fp8 weight-only triton",
                 "pyops nvfp4 auto", "pyops nvfp4 weight-only triton") + UNVERIFIED
DEFAULT_LARGE = ("bf16 nn.Linear", "_scaled_mm rowwise (pre-quantized)", "pyops fp8 auto",
                 "pyops nvfp4 auto", NV4_FP8)
PEER, PEER_AT = "torchao fp8 rowwise compiled", (16, 3072, 12288)  # one compile in the default
DEFAULT_PROVIDERS = tuple(dict.fromkeys(DEFAULT_SMALL + DEFAULT_LARGE + (PEER,)))
DEFAULT_BUDGET_S = 45
ACC_ROWS = 1024


def select(mode: str, only=None):
    """(shapes as (label, M, K, N), provider names or None for all) of a run size; the default
    run narrows the names per shape with ``default_providers``."""
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


def default_providers(M: int, K: int, N: int) -> tuple:
    """The providers the default run times at (M, K, N)."""
    names = DEFAULT_SMALL if M <= WEIGHT_ONLY_MAX_M else DEFAULT_LARGE
    return names + ((PEER,) if (M, K, N) == PEER_AT else ())


class Prov(NamedTuple):
    name: str
    fn: Optional[Callable]  # None: not run, the note says why
    wbytes: int             # stored weight bytes (the weight MB column)
    slow: bool = False      # a compile in the first call: skipped once the budget is spent
    note: Optional[str] = None
    check: Optional[Callable] = None  # y -> a note on y against the op's reference backend
    ref: Optional[torch.Tensor] = None  # fp32 reference of this row if not the plain linear


def _runs(op: str, backend: str, device, **shape) -> tuple[bool, str]:
    """Whether ``op``'s ``backend`` runs here (a seam for the tests)."""
    return _backend.available(op, backend, device, **shape)


def weight_only_backends(device) -> tuple:
    """The weight_only_linear backends timed: cuda + triton on CUDA, else the reference (the
    CPU smoke test runs with TRITON_INTERPRET unset, where the Triton kernel cannot run)."""
    return ("cuda", "triton") if device.type == "cuda" else ("reference",)


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


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor stores; a tensor subclass (torchao's) the sum over its inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return t.numel() * t.element_size()
    names, _ = flatten()
    return sum(stored_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)


def accuracy(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    y = y.reshape(-1, ref.shape[-1])[: ref.shape[0]].double()
    r = ref.double()
    num = float(r.pow(2).sum())
    den = float((y - r).pow(2).sum())
    rel = math.sqrt(den / num) if num > 0 else float("nan")
    sqnr = 10 * math.log10(num / den) if den > 0 else float("inf")
    return rel, sqnr


def _weight_only(x, b, fmt: str, q, M: int, N: int, K: int, device) -> list[Prov]:
    """The weight-only rows of one format: cuda + triton on CUDA, the reference elsewhere."""
    ref = []  # the op's reference backend output, computed once, for the note

    def check(y):
        if not ref:
            ref.append(weight_only_linear(x, q, b, backend="reference").double())
        rel = float((y.double() - ref[0]).norm() / ref[0].norm().clamp_min(1e-30))
        return f"vs reference backend: rel diff {rel:.2e}"
    out = []
    for be in weight_only_backends(device):
        name = f"pyops {fmt} weight-only {be}"
        ok, why = _runs(WO_OP, be, device, M=M, N=N, K=K, dtype=x.dtype)
        note = "unverified kernel" if be == "cuda" else \
            "PyTorch reference (CPU smoke)" if be == "reference" else None
        fn = (lambda be=be: weight_only_linear(x, q, b, backend=be)) if ok else None
        out.append(Prov(name, fn, q.nbytes, note=note if ok else f"skipped: {why}"[:160],
                        check=check if be != "reference" else None))
    return out


def _nvfp4_fp8(x, b, qw4, K: int, device) -> Prov:
    be = "torch" if device.type == "cuda" else "reference"
    name = NV4_FP8 if be == "torch" else "pyops nvfp4 reference fp8 (convert + _scaled_mm)"
    if "fp8" not in getattr(_nv4, "VARIANTS", ()):
        return Prov(name, None, qw4.nbytes, note="skipped: this pyops' nvfp4_linear has no "
                    "variant 'fp8'")
    d4, s4, g4 = qw4.data, qw4.scales.view(torch.uint8), qw4.global_scale
    N = d4.shape[0]
    note = (f"stored NVFP4; per call a transient FP8 copy ({(N * K + 4 * N) / 1e6:.1f} MB) "
            "written and read, x quantized per token: all in the time")
    return Prov(name, lambda: _nv4.nvfp4_linear_op(x, d4, s4, g4, K, b, be, "fp8"), qw4.nbytes,
                note=note if be == "torch" else "PyTorch reference of the chain (CPU smoke)")


def build_providers(x, lin, qw8, qw4, gen, device, args, want, M: int, K: int, N: int):
    """The providers ``want(name)`` keeps at this shape (expensive ones built only if wanted)."""
    w, b, dt = lin.weight.detach(), lin.bias.detach(), x.dtype
    p = [Prov("bf16 nn.Linear", lambda: F.linear(x, w, b), w.numel() * 2)]
    if want("_scaled_mm rowwise (pre-quantized)") and (device.type == "cuda" or args.quick):
        xt = pyops.quantize_fp8(x, "row")
        xq, xs = xt.data, xt.scale.reshape(M, 1)
        wq, ws = qw8.data, qw8.scale.reshape(1, N)
        p.append(Prov("_scaled_mm rowwise (pre-quantized)", lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=xs, scale_b=ws, bias=b, out_dtype=dt), qw8.nbytes,
            note="ceiling: no activation quantization"))
    if device.type == "cuda" and (want("torchao fp8 rowwise eager") or want(PEER)):
        tao, why = _torchao_linear(lin)
        if tao is None:
            p.append(Prov(PEER, None, qw8.nbytes, note=f"skipped: {why}"))
        else:
            try:
                tb, tnote = stored_bytes(tao.weight), None
            except Exception:
                tb, tnote = qw8.nbytes, "weight MB: pyops fp8's (torchao's not readable)"
            p.append(Prov("torchao fp8 rowwise eager", lambda: tao(x), tb, note=tnote))
            ctao = torch.compile(tao, dynamic=False)
            p.append(Prov(PEER, lambda: ctao(x), tb, True, "torch.compile"))
    b8 = _backend.resolve(_fp8.OP, device, None, M=M, N=N, K=K, out_dtype=dt)
    p.append(Prov("pyops fp8 auto", lambda: linear(x, qw8, b), qw8.nbytes,
                  note=f"incl. activation quantization; backend {b8}"))
    if device.type == "cuda":
        for label, be in (("torch._scaled_mm", "torch"), ("triton", "triton")):
            p.append(Prov(f"pyops fp8 {label}", lambda be=be: linear(x, qw8, b, backend=be),
                          qw8.nbytes, note="incl. activation quantization"))
    if M <= WEIGHT_ONLY_MAX_M:
        p += _weight_only(x, b, "fp8", qw8, M, N, K, device)
        p += _weight_only(x, b, "nvfp4", qw4, M, N, K, device)
    nmq = _norm_quant_fn()
    if nmq is not None and M > 1 and want("pyops norm_modulate_quant + fp8"):
        shift = torch.randn(K, device=device, dtype=dt, generator=gen) * 0.1
        scale = torch.randn(K, device=device, dtype=dt, generator=gen) * 0.1
        h = x  # plays the pre-norm hidden state
        rows = min(M, ACC_ROWS)
        hn = F.layer_norm(h[:rows].float(), (K,), eps=1e-6) * (1 + scale.float()) + shift.float()
        ref_ln = hn @ w.float().t() + b.float()
        p.append(Prov("bf16 layernorm+modulate+nn.Linear", lambda: F.linear(
            F.layer_norm(h, (K,), eps=1e-6) * (1 + scale) + shift, w, b), w.numel() * 2,
            note="eager baseline for the fused row", ref=ref_ln))
        p.append(Prov("pyops norm_modulate_quant + fp8", lambda: linear(
            nmq(h, shift, scale), qw8, b), qw8.nbytes, note="fused norm+modulate+quant",
            ref=ref_ln))
    p.append(Prov("pyops nvfp4 auto", lambda: linear(x, qw4, b), qw4.nbytes,
                  note="backend {} variant {}".format(*_nv4.choose(device, None, M, N, K, dt))))
    if device.type == "cuda":
        d4, s4, g4 = qw4.data, qw4.scales.view(torch.uint8), qw4.global_scale
        for label, be, var in (("triton fused", "triton", "fused"),
                               ("torch dequant+cuBLAS", "torch", "dequant")):
            p.append(Prov(f"pyops nvfp4 {label}", lambda be=be, var=var:
                          _nv4.nvfp4_linear_op(x, d4, s4, g4, K, b, be, var), qw4.nbytes))
        if _backend.native_fp4(device):
            s4sw = qw4.swizzled_scales().view(torch.uint8)
            p.append(Prov("pyops nvfp4 torch w4a4 (cuBLASLt FP4)",
                          lambda: _nv4.nvfp4_linear_op(x, d4, s4sw, g4, K, b, "torch", "w4a4"),
                          qw4.nbytes, note="incl. NVFP4 activation quantization"))
    p.append(_nvfp4_fp8(x, b, qw4, K, device))
    return [pr for pr in p if want(pr.name)]


def run_shape(table: U.Table, label: str, M: int, K: int, N: int, device, args, budget,
              names=None, phase: str = "main", base_ms: Optional[dict] = None):
    """Time this shape's providers: phase ``main`` all but ``UNVERIFIED``, phase
    ``unverified`` only those (``base_ms`` carries the bf16 times across the phases)."""
    base_ms = {} if base_ms is None else base_ms

    def want(name):
        return (names is None or name in names) and (name in UNVERIFIED) == (phase != "main")
    gen = torch.Generator(device=device).manual_seed(M * 7 + K * 3 + N)
    dt = torch.bfloat16
    x = torch.randn(M, K, device=device, dtype=dt, generator=gen)
    lin = torch.nn.Linear(K, N, device=device, dtype=dt)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, device=device, generator=gen) / math.sqrt(K))
    w, b = lin.weight.detach(), lin.bias.detach()
    qw8 = quantize_weight(w, "fp8")
    qw4 = quantize_weight(w, "nvfp4")
    rows = min(M, ACC_ROWS)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = x[:rows].float() @ w.float().t() + b.float()
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    providers = build_providers(x, lin, qw8, qw4, gen, device, args, want, M, K, N)
    providers.sort(key=lambda pr: pr.slow)  # the compiled peer last: the budget may skip it
    base = {"shape": label, "M": M, "K": K, "N": N}
    io_bytes = (M * K + M * N) * x.element_size()
    for pr in providers:
        row = dict(base, provider=pr.name, **{"weight MB": pr.wbytes / 1e6})
        note = pr.note
        if pr.fn is None or (pr.slow and budget.spent()):
            row["note"] = note if pr.fn is None else "skipped: time budget spent"
            table.add(**row)
            continue
        try:
            with torch.no_grad():
                t_first = time.perf_counter()
                y = pr.fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - t_first
                row["rel err"], row["SQNR dB"] = accuracy(y, ref if pr.ref is None else pr.ref)
                if pr.check is not None:
                    note = "; ".join(n for n in (note, pr.check(y)) if n)
                del y
                ms = U.time_ms(pr.fn, device=device, warmup_ms=args.warmup_ms,
                               rep_ms=args.rep_ms)
            row.update({"ms": ms, "TFLOPS": U.tflops(2.0 * M * N * K, ms),
                        "GB/s": U.gbps(pr.wbytes + io_bytes, ms)})
            kind = "bf16" if pr.ref is None else "ln"
            if pr.name in ("bf16 nn.Linear", "bf16 layernorm+modulate+nn.Linear"):
                base_ms[(M, K, N, kind)] = ms
            if base_ms.get((M, K, N, kind)):
                row["x bf16"] = base_ms[(M, K, N, kind)] / ms
            if pr.slow:  # the compile is in the first call
                note = "; ".join(n for n in (note, f"first call (compile) {first_s:.1f} s") if n)
        except Exception as e:  # one broken provider must not lose the others' numbers
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:160]
            note = "; ".join(n for n in (pr.note, f"error: {msg}") if n)
            print(f"[bench] {label} {pr.name}: {msg}", file=sys.stderr)
        if note:
            row["note"] = note
        table.add(**row)
        print("  " + "  ".join(f"{k}={U._fmt(v)}" for k, v in row.items()), flush=True)
    del x, lin, w, qw8, qw4, ref, providers
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
        "ms: do_bench median (L2 flushed before each call); TFLOPS = 2*M*N*K / ms; GB/s = "
        "(stored weight + x + output bytes) / ms; x bf16 = bf16 nn.Linear ms / ms on the same "
        "shape (for the norm_modulate_quant row: over the bf16 layernorm+modulate+nn.Linear row).",
        "rel err / SQNR: against fp32 math on the original bf16 operands and unquantized "
        f"weight, first {ACC_ROWS} output rows.",
        "pyops fp8 rows include the per-token activation quantization; _scaled_mm "
        "(pre-quantized) does not (the ceiling); weight-only rows quantize no activations.",
        "weight-only cuda rows (pyops' own kernel, unverified on hardware) run after all the "
        "others, so a fault there cannot cost the other rows."])
    shapes, names = select(args.mode, args.only)
    U.autosave([table], args.out, NAME, env)
    base_ms: dict = {}
    for phase in ("main", "unverified"):
        for label, M, K, N in shapes:
            if phase != "main" and (M > WEIGHT_ONLY_MAX_M
                                    or "cuda" not in weight_only_backends(device)):
                continue
            print(f"{label} M={M} K={K} N={N}" + (" (unverified kernels)" if phase != "main"
                                                  else ""), flush=True)
            at = None if names is None else default_providers(M, K, N)
            try:
                run_shape(table, label, M, K, N, device, args, budget, at, phase, base_ms)
            except Exception as e:  # e.g. a CUDA context poisoned by an unverified kernel
                msg = f"{label} M={M} K={K} N={N} ({phase}): {type(e).__name__}: {e}"
                table.notes.append("shape not run: " + msg.splitlines()[0][:200])
                print(f"[bench] {msg}", file=sys.stderr)
    U.write_results(args.out, NAME, [table], env)
    print(U.env_markdown(env) + "\n\n" + table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())

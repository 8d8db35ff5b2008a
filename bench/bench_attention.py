"""Attention forward: cuDNN / flash SDPA, SageAttention, and the pyops.attention precisions.

    python bench/bench_attention.py [--out bench/out] [--full | --quick] [--device cuda]
                                    [--budget-s S] [--recipe]

Shapes (B, H, S, D), non-causal, bf16 in and out. Default run: (1,24,4608,128) Flux 1024² and
(1,40,32760,128) Wan 480p. ``--full`` adds (1,24,75600,128) long video and (2,16,16384,64).
``--quick`` (the default on a CPU): (1,1,24,64), pyops through the Triton interpreter; a smoke
test, the times mean nothing.

Providers (default run: cuDNN SDPA, sageattention, pyops int8, pyops cuda int8, pyops int8_fp16pv;
``--full`` and ``--quick``: all of them):
* ``cuDNN SDPA`` / ``flash SDPA``: ``F.scaled_dot_product_attention`` under
  ``torch.nn.attention.sdpa_kernel`` (CUDNN_ATTENTION / FLASH_ATTENTION), bf16.
* ``sageattention``: ``sageattention.sageattn`` (HND layout) if importable (its own
  quantization included, as it is called from bf16 tensors).
* ``pyops <precision>``: ``pyops.attention(q, k, v, precision=...)`` end to end with the
  automatic backend (the pre-pass counted); int8 is its default precision, int8_fp16pv the
  accuracy-first mode. Next to it: ``kernel ms`` (the attention kernel alone on pre-quantized
  buffers) and ``prepass ms``. On a CPU the Triton kernel runs in the interpreter.
* ``pyops cuda int8``: ``pyops.attention(..., precision="int8", backend="cuda")``, the sm_90a
  wgmma kernel (UNVERIFIED until this row has run on an H100/H200) after the same Triton
  pre-pass; ``kernel ms`` is the CUDA kernel alone on the pre-pass buffers. Elsewhere (other
  GPUs, no sm_90a build, the CPU) a row saying why it cannot run.
* CPU (``--quick``): ``F.sdpa (CPU)`` as the baseline.

Columns: ms (median, L2 flushed), TFLOPS = 4·B·H·S²·D / ms (quantization included for pyops),
kernel TFLOPS (pyops kernel alone), x cuDNN = cuDNN ms / ms, and accuracy against fp32 math on
two input kinds (``pyops.reference.attention.make_inputs``: "random" N(0,1); "outlier": K with
per-channel means and x20 outlier channels, 3x Q with x5 channels): cosine and relative L1
(sum|o - r| / sum|r|) over the first ``ACC_ROWS`` query rows of every head, the fp32 reference
being ``F.scaled_dot_product_attention`` on fp32 copies of those rows and all keys.
"""
# Run length on an H200, estimated (not measured) from the H200 measurement of 2026-11-30
# (bench/RESULTS.md, section 1: the Attention table and "Run length at 8d8b3ea"):
#   default, ~33 s: start-up (imports, environment) ~5 s + Triton compiles of two precisions
#     (kernel + pre-pass) ~10 s + 10 rows. Flux rows: 0.4-1.1 ms per call, ~0.3 s per row
#     (do_bench ~80 calls, kernel-only and pre-pass timings, accuracy on two inputs). Wan rows:
#     39-54 ms per call x ~25 calls (first call, do_bench 5 + 1 + 1, kernel-only and pre-pass,
#     two accuracy calls) + inputs ~1 s = ~2.5 s per row, 5 rows ~13 s (the "pyops cuda int8"
#     rows are counted at the Triton int8 row's cost: the CUDA kernel is unmeasured and needs no
#     JIT compile).
#   --full, ~2.7 min: 4 shapes x 9 providers; at 8d8b3ea this run needed 65 s for 23 of its 32
#     rows (long video and D64 mostly skipped: budget spent); nvfp4 alone 194 ms per call at Wan.
# estimate-h200-s: 33
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _native_fp4(device) -> bool:
    """Whether the nvfp4 run takes the native dot_scaled path (pyops' one definition)."""
    from pyops._backend import native_fp4
    return native_fp4(device)

NAME = "attention"
SHAPES = [("Flux 1024²", 1, 24, 4608, 128), ("Wan 480p", 1, 40, 32760, 128),
          ("long video", 1, 24, 75600, 128), ("D64", 2, 16, 16384, 64)]
DEFAULT_SHAPES = SHAPES[:2]
QUICK = [("quick", 1, 1, 24, 64)]
PRECISIONS = ("int8", "fp8", "int8_fp16pv", "nvfp4", "bf16")
# the default run: pyops' default precision and its accuracy-first mode, cuDNN, SageAttention
DEFAULT_PROVIDERS = ("cuDNN SDPA", "sageattention", "pyops int8", "pyops cuda int8",
                     "pyops int8_fp16pv")
CUDA_PROVIDER = "pyops cuda int8"  # the sm_90a kernel (backend="cuda"), int8 only
DEFAULT_BUDGET_S = 45
ACC_ROWS = 1024
COLUMNS = ["shape", "B", "H", "S", "D", "provider", "ms", "TFLOPS", "kernel ms",
           "kernel TFLOPS", "prepass ms", "x cuDNN", "cos random", "relL1 random",
           "cos outlier", "relL1 outlier", "path", "note"]


def _sdpa_provider(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = getattr(SDPBackend, backend_name)

    def fn(q, k, v):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


def select(mode: str):
    """(shapes, provider names or None for all) of a run size (``utils.resolve_run``)."""
    return U.pick(mode, default=(DEFAULT_SHAPES, DEFAULT_PROVIDERS), full=(SHAPES, None),
                  quick=(QUICK, None))


def providers(device, quick, names=None):
    """(name, fn(q, k, v) or None, precision or why-not) of every provider, or of ``names``."""
    from pyops.ops.attention import attention as pyops_attention
    out = []
    if device.type == "cuda":
        out.append(("cuDNN SDPA", _sdpa_provider("CUDNN_ATTENTION"), None))
        out.append(("flash SDPA", _sdpa_provider("FLASH_ATTENTION"), None))
        try:
            from sageattention import sageattn
            out.append(("sageattention", lambda q, k, v: sageattn(q, k, v, tensor_layout="HND",
                                                                   is_causal=False), None))
        except Exception as e:  # not installed: a row saying so
            out.append(("sageattention", None, f"not importable ({type(e).__name__})"))
    else:
        out.append(("F.sdpa (CPU)", lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                    None))
    # CUDA: the automatic backend (what a user gets); CPU: the Triton kernel in the interpreter
    backend = None if device.type == "cuda" else "triton"
    for p in PRECISIONS:
        out.append((f"pyops {p}", (lambda p: lambda q, k, v: pyops_attention(
            q, k, v, precision=p, backend=backend))(p), p))
        if p == "int8":
            out.append(cuda_provider(device))
    if names is not None:
        out = [o for o in out if o[0] in names]
    return out


def cuda_provider(device):
    """(name, fn or None, "int8" or why not) of the sm_90a CUDA kernel's row."""
    from pyops import _backend
    from pyops.ops.attention import attention as pyops_attention
    ok, why = _backend.available("attention", "cuda", device, precision="int8")
    if not ok:
        return CUDA_PROVIDER, None, f"cannot run here: {why}"
    return CUDA_PROVIDER, (lambda q, k, v: pyops_attention(q, k, v, precision="int8",
                                                           backend="cuda")), "int8"


def accuracy(fn, B, H, S, D, device):
    from pyops.reference.attention import error_stats, make_inputs
    res = {}
    rows = min(ACC_ROWS, S)
    for kind in ("random", "outlier"):
        q, k, v = make_inputs(B, H, H, S, S, D, kind, device=device, seed=7)
        o = fn(q, k, v)[:, :, :rows]
        ref = F.scaled_dot_product_attention(q[:, :, :rows].float(), k.float(), v.float())
        e = error_stats(o, ref)
        res[f"cos {kind}"], res[f"relL1 {kind}"] = e["cos"], e["rel_l1"]
        del q, k, v, o, ref
    return res


def kernel_only(prec, q, k, v, device, args, cuda=False):
    """(kernel ms, prepass ms) for a pyops precision (``cuda``: the sm_90a kernel, int8)."""
    from pyops.triton_kernels import attention as tk
    from pyops.triton_kernels import attention_quant as tq
    B, H, S, D = q.shape
    sc = D ** -0.5
    out = torch.empty_like(q)
    lse = None
    if prec == "bf16":
        run = lambda: tk.attention_fwd(q, k, v, None, None, None, None, out, lse, prec,  # noqa
                                       False, sc, H)
        run()
        return U.time_ms(run, device=device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms), 0.0
    pre = lambda: tq.quantize_qkv(q, k, v, prec, sc)  # noqa: E731
    if prec == "nvfp4" and _native_fp4(device):
        pre = lambda: tq.quantize_qkv(q, k, v, prec, sc, native=True)  # noqa: E731
    bf = pre()
    vt = bf["vt"].transpose(-1, -2)[:, :, :S]
    run = lambda: tk.attention_fwd(bf["qc"], bf["kc"], vt, bf["qs"], bf["ks"], bf["vs"],  # noqa
                                   bf["qb"], out, lse, prec, False, sc, H, bf.get("qsb"),
                                   bf.get("ksb"))
    if cuda:
        run = lambda: torch.ops.pyops._attention_cuda(  # noqa: E731
            bf["qc"], bf["qs"], bf["qb"], bf["kc"], bf["ks"], bf["vt"], bf["vs"], out, lse,
            False)
    run()
    kms = U.time_ms(run, device=device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    pms = U.time_ms(pre, device=device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    return kms, pms


def run_shape(table, label, B, H, S, D, device, args, budget, names=None):
    from pyops.reference.attention import make_inputs
    flops = 4.0 * B * H * S * S * D
    q, k, v = make_inputs(B, H, H, S, S, D, "random", device=device, seed=1)
    base = dict(shape=label, B=B, H=H, S=S, D=D)
    cudnn_ms = None
    for name, fn, extra in providers(device, args.quick, names):
        row = dict(base, provider=name)
        if fn is None:
            row["note"] = extra
            table.add(**row)
            continue
        if budget.spent() and name not in ("cuDNN SDPA", "pyops int8", CUDA_PROVIDER):
            row["note"] = "skipped: time budget spent"
            table.add(**row)
            continue
        if name == CUDA_PROVIDER:
            row["path"] = "sm_90a wgmma (CUDA)"
        if extra == "nvfp4":
            row["path"] = ("native dot_scaled QK^T, emulated PV"
                           if _native_fp4(device) else "emulated")
        try:
            fn(q, k, v)
            U._sync(device)
            ms = U.time_ms(lambda: fn(q, k, v), device=device, warmup_ms=args.warmup_ms,
                           rep_ms=args.rep_ms)
            row.update(ms=ms, TFLOPS=U.tflops(flops, ms))
            if name == "cuDNN SDPA":
                cudnn_ms = ms
            if cudnn_ms:
                row["x cuDNN"] = cudnn_ms / ms
            if extra in PRECISIONS:
                kms, pms = kernel_only(extra, q, k, v, device, args,
                                       cuda=name == CUDA_PROVIDER)
                row.update({"kernel ms": kms, "kernel TFLOPS": U.tflops(flops, kms),
                            "prepass ms": pms})
            row.update(accuracy(fn, B, H, S, D, device))
        except Exception as e:  # a failing provider gets a row with its error
            row["note"] = f"error: {type(e).__name__}: {str(e)[:160]}"
        table.add(**row)
        print(f"  {name:22s} " + " ".join(f"{c}={U._fmt(row.get(c))}" for c in
                                          ("ms", "TFLOPS", "kernel TFLOPS", "cos random",
                                           "relL1 random", "cos outlier", "note")
                                          if row.get(c) is not None), flush=True)


RECIPE_SHAPE = (1, 4, 2, 200, 300)  # B, Hq, Hk, Sq, Sk: small enough for the CPU
RECIPE_COLS = ["D", "inputs", "precision", "variant", "cos", "rel L1"]
# (name, simulated_attention kwargs): the outlier transforms, added one at a time
RECIPE_ABLATIONS = [
    ("no transforms", dict(smooth_k=False, smooth_qk=False, rotate=False)),
    ("K smoothing", dict(smooth_k=True, smooth_qk=False, rotate=False)),
    ("+ Q/K channel smoothing", dict(smooth_k=True, smooth_qk=True, rotate=False)),
    ("+ Hadamard rotation (default)", dict(smooth_k=True, smooth_qk=True, rotate=True)),
]


def recipe(args, device) -> U.Table:
    """Accuracy of the quantization recipe itself: the kernel's arithmetic simulated in fp32
    (pyops.reference.attention.simulated_attention) against fp64 attention, on random and
    outlier-channel inputs; every precision with the default transforms, and the transforms
    added one at a time for int8. Device-independent arithmetic, so it runs on the CPU."""
    from pyops.reference import attention as ref
    B, Hq, Hk, Sq, Sk = RECIPE_SHAPE
    t = U.Table(f"attention recipe accuracy vs fp64 (simulated kernel arithmetic, B{B} Hq{Hq} "
                f"Hk{Hk} Sq{Sq} Sk{Sk}, bf16 inputs)", RECIPE_COLS)
    for D in (64, 128):
        for kind in ("random", "outlier"):
            q, k, v = ref.make_inputs(B, Hq, Hk, Sq, Sk, D, kind, device=device, seed=0)
            exact, _ = ref.attention(q, k, v, dtype=torch.float64)
            runs = [(p, "default", {}) for p in ("fp8", "int8", "int8_fp16pv", "nvfp4")]
            runs += [("int8", name, kw) for name, kw in RECIPE_ABLATIONS[:-1]]
            for prec, variant, kw in runs:
                out, _ = ref.simulated_attention(q, k, v, prec, **kw)
                e = ref.error_stats(out, exact)
                t.add(D=D, inputs=kind, precision=prec, variant=variant,
                      cos=f"{e['cos']:.5f}", **{"rel L1": f"{e['rel_l1']:.4f}"})
    return t


def main(argv=None) -> int:
    p = U.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--recipe", action="store_true",
                   help="only the recipe accuracy study (simulated arithmetic; CPU is fine)")
    args = p.parse_args(argv)
    if args.recipe:  # device-independent arithmetic: meaningful on a CPU too
        device = U.pick_device(args.device)
        env = U.env_record(device)
        t = recipe(args, device)
        U.write_results(args.out, NAME + "_recipe", [t], env)
        print(U.env_markdown(env) + "\n\n" + t.markdown())
        return 0
    device = U.resolve_run(args, DEFAULT_BUDGET_S)
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined
    env = U.env_record(device)
    env["run"] = args.mode
    budget = U.Budget(args.budget_s)
    table = U.Table("attention forward (bf16 in/out, non-causal)", COLUMNS, notes=[
        "ms: median, L2 flushed before each call; TFLOPS = 4*B*H*S^2*D / ms. pyops rows "
        "include the quantization pre-pass; kernel ms/TFLOPS: the attention kernel alone on "
        "pre-quantized buffers; prepass ms: the pre-pass alone.",
        f"accuracy: cosine / relative L1 vs fp32 SDPA on the first {ACC_ROWS} query rows "
        "of every head, random and outlier-channel inputs (same shape).",
        "pyops cuda int8: the sm_90a wgmma kernel (backend='cuda') after the same Triton "
        "pre-pass; unverified before this run, never picked by auto (Triton is).",
        "pyops nvfp4: the path column says which kernel ran. emulated (Hopper): NVFP4 Q/K and "
        "two-level NVFP4 "
        "P decoded exactly to fp16, fp16 MMAs -- its accuracy is the Blackwell recipe's, its "
        "speed is not; native (sm_100/sm_120): QK^T through tl.dot_scaled e2m1 x e2m1 with "
        "E4M3 scales per 16, PV still emulated."])
    shapes, names = select(args.mode)
    U.autosave([table], args.out, NAME, env)
    t0 = time.time()
    for label, B, H, S, D in shapes:
        print(f"{label} B={B} H={H} S={S} D={D}", flush=True)
        run_shape(table, label, B, H, S, D, device, args, budget, names)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    U.write_results(args.out, NAME, [table], env)
    print(U.env_markdown(env) + "\n\n" + table.markdown())
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

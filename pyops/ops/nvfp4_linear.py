"""nvfp4_linear: x (bf16/fp16) x NVFP4 weight (public function, op, backends, policy).

Op ``pyops::nvfp4_linear(x, data, scales, global_scale, K, bias?, backend, variant) -> out``:
``x`` (M, K), ``data`` uint8 (N, ceil(K/16)*8), ``scales`` uint8 bits of e4m3, ``global_scale``
fp32 (1,), ``bias`` (N,) or None; ``out`` (M, N) in x's dtype. Spec:
``pyops/reference/nvfp4_linear.py``. Backends (destination-passing:
``impl(x, data, scales, global_scale, K, bias, out, variant)``), with the variant each runs:

* ``triton``, variant ``"fused"``: our W4A16 GEMM dequantizing E2M1 x E4M3 exactly in the main
  loop (``triton_kernels/nvfp4_linear.py``); the decode/small-M path. bf16/fp16 x.
* ``torch``, variant ``"dequant"``: a Triton pass writes the weight in x's dtype (each weight
  rounded once), then cuBLAS through ``torch.mm``/``torch.addmm``: a transient (N, K) buffer,
  for large M where a dense GEMM's speed matters more than the extra weight pass.
* ``torch``, variant ``"w4a4"`` (native NVFP4 only, ``_backend.native_fp4``; UNVERIFIED ON
  HARDWARE): x is quantized to NVFP4 per call (global scale on the device, no host sync), then
  cuBLASLt's block-scaled FP4 GEMM through ``torch._scaled_mm`` and a Triton epilogue for the
  global scales and bias (``prepare_w4a4_args`` / ``w4a4_gemm``). For this variant ``scales``
  is the weight's 128x4-SWIZZLED padded scale tensor (``NVFP4Weight.swizzled_scales()``), not
  the (N, ceil(K/16)) one: the variant defines the layout (the two shapes coincide when
  N % 128 == 0 and ceil(K/16) % 4 == 0, so it cannot be inferred).
* ``torch``, variant ``"fp8"`` (large M on Hopper; opt-in until measured): per call the weight
  is re-encoded as FP8 e4m3 + a per-channel scale (``nvfp4_to_fp8``, one pass, a transient
  (N, K) byte buffer; its error: ``pyops/reference/nvfp4_to_fp8.py``), x is quantized per token
  and row-wise ``torch._scaled_mm`` (sm_90+, K, N % 16 == 0, bf16 out) runs the GEMM. Stored
  memory stays NVFP4. (Published for vLLM on an H200: +62% over a W4A16 kernel.)
* ``reference``: any variant; ``"w4a4"`` computes ``nvfp4_linear_w4a4``, ``"fp8"`` the chain's
  references, the others the W4A16 spec.

``PYOPS_NVFP4_LINEAR_VARIANT=fused|dequant|w4a4|fp8`` is a tuning knob: for bf16/fp16
activations where pyops' Triton kernels run (a GPU, or the CPU with TRITON_INTERPRET=1) it picks
the variant (``fused`` -> backend ``triton``, ``dequant`` / ``w4a4`` -> backend ``torch``; one
that cannot run there raises); elsewhere (CPU tensors, fp32 activations) auto mode runs as
without it. An explicit backend must agree with it; the reference runs the forced variant's
math. Unset or ``auto``: the policy below.

torch API facts the ``"w4a4"`` path relies on (checked 2026 against torch 2.13's schema and
pytorch's ``aten/src/ATen/native/cuda/ScaledBlas.cpp``; the CUDA side is unverified here):
``aten::_scaled_mm(self, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None,
use_fast_accum=False)`` has no ``alpha``; ``scale_result`` is applied only for FP8 outputs.
For ``float4_e2m1fn_x2`` operands with ``float8_e4m3fn`` scales it runs the NVFP4 1x16
block-scaled cuBLASLt GEMM; each scale tensor must be contiguous with
roundup(rows, 128) * roundup(ceil(K/16), 4) elements in the 32_4_4 (128x4 tile) swizzle;
``mat_a`` (M, K/2) row-major, ``mat_b`` (K/2, N) column-major with K/2 % 16 == 0 and N % 16 == 0;
``use_fast_accum`` is rejected for FP4. The per-tensor global scales therefore go in our
epilogue: ``y = acc * (g_x * g_w) (+ bias)``, one elementwise pass with fp32 math. (The newer
``torch.nn.functional.scaled_mm`` takes two-level NVFP4 scales and passes ``g_a * g_b`` to
cuBLASLt as alpha, which would remove that pass; not used because torch 2.11 may lack it.)
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .. import _backend
from .._checks import check_same_device, check_tensor
from .._op import define
from ..reference import nvfp4_linear as ref
from ..reference import quantize_nvfp4 as ref_q
from ..weights import ACT_DTYPES, NVFP4Weight, check_linear_bias, linear_lead_shape
from .quantize_fp8 import FP8Tensor
from .quantize_nvfp4 import OP as QUANT_OP
from .quantize_nvfp4 import quantize_nvfp4_op

OP = "nvfp4_linear"
VARIANTS = ("fused", "dequant", "w4a4", "fp8")
BACKEND_OF_VARIANT = {"fused": "triton", "dequant": "torch", "w4a4": "torch", "fp8": "torch"}
VARIANT_ENV = "PYOPS_NVFP4_LINEAR_VARIANT"
HALF_DTYPES = (torch.bfloat16, torch.float16)
BLOCK = ref_q.BLOCK


# ---- backends: destination-passing --------------------------------------------------------------
def _reference(x, data, scales, g, K: int, bias, out, variant: str) -> None:
    if variant == "fp8":
        from ..reference import fp8_linear as ref8, nvfp4_to_fp8 as ref_conv, quantize_fp8 as ref_q8
        wq, ws = ref_conv.nvfp4_to_fp8(data, scales, g, K)
        xq, xs = ref_q8.quantize_fp8(x, "row")
        out.copy_(ref8.fp8_linear(xq, xs.reshape(-1), wq, ws, bias, out.dtype))
        return
    if variant == "w4a4":
        out.copy_(ref.nvfp4_linear_w4a4(x, data, scales, g, K, bias, out.dtype,
                                        scales_swizzled=True))
        return
    out.copy_(ref.nvfp4_linear(x, data, scales, g, K, bias, out.dtype))


def _triton(x, data, scales, g, K: int, bias, out, variant: str) -> None:
    from ..triton_kernels import nvfp4_linear as tk
    tk.nvfp4_linear(x, data, scales, g, K, bias, out)


# ---- the w4a4 variant: cuBLASLt NVFP4 GEMM through torch._scaled_mm -----------------------------
def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    if t.shape[1] == cols:
        return t
    return torch.nn.functional.pad(t, (0, cols - t.shape[1]))


def prepare_w4a4_args(a_data: torch.Tensor, a_scales: torch.Tensor, a_global: torch.Tensor,
                      w_data: torch.Tensor, w_scales: torch.Tensor, w_global: torch.Tensor,
                      K: int) -> dict:
    """The ``torch._scaled_mm`` arguments of the W4A4 GEMM, from already-quantized operands.

    a_*: the activation from ``quantize_nvfp4(x, swizzle=True)``: data uint8 (M, nb*8), scales
    e4m3 swizzled (roundup(M,128), roundup(nb,4)), global fp32 (1,). w_*: the weight's data
    uint8 (N, nb*8), swizzled scales (roundup(N,128), roundup(nb,4)), global fp32 (1,).

    Returns ``a`` float4_e2m1fn_x2 (M, Kb), ``b`` float4_e2m1fn_x2 (Kb, Np) (a transposed view of
    the weight rows: column-major, as cuBLASLt wants), ``scale_a`` / ``scale_b`` e4m3 (the
    swizzled tensors, contiguous), ``alpha`` fp32 0-dim = g_a * g_w (on the device, no sync) and
    ``N``. Kb = roundup(nb, 2) * 8 bytes (_scaled_mm wants K/2 % 16 == 0) and Np = roundup(N, 16);
    the padding is zero codes, which add nothing (the padded scale columns/rows are zeros too).
    Padding copies the operand, so it only happens for odd ceil(K/16) or N % 16 != 0 (never for
    DiT shapes).
    """
    M, N = a_data.shape[0], w_data.shape[0]
    nb = (K + BLOCK - 1) // BLOCK
    kb = ((nb + 1) // 2) * 16
    sw = ref_q.swizzled_shape(M, nb)
    if tuple(a_scales.shape) != sw:
        raise ValueError(f"pyops W4A4: activation scales have shape {tuple(a_scales.shape)}, "
                         f"expected the swizzled {sw}")
    sw = ref_q.swizzled_shape(N, nb)
    if tuple(w_scales.shape) != sw:
        raise ValueError(f"pyops W4A4: weight scales have shape {tuple(w_scales.shape)}, "
                         f"expected the swizzled {sw} (NVFP4Weight.swizzled_scales())")
    a = _pad_cols(a_data, kb)
    b = _pad_cols(w_data, kb)
    n16 = (N + 15) // 16 * 16
    if n16 != N:
        b = torch.nn.functional.pad(b, (0, 0, 0, n16 - N))
    f4 = torch.float4_e2m1fn_x2
    return {
        "a": a.contiguous().view(f4),
        "b": b.contiguous().view(f4).t(),
        "scale_a": a_scales.view(torch.float8_e4m3fn).contiguous(),
        "scale_b": w_scales.view(torch.float8_e4m3fn).contiguous(),
        "alpha": (a_global.float().reshape(()) * w_global.float().reshape(())),
        "N": N,
    }


def w4a4_epilogue(acc: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor],
                  out: torch.Tensor) -> None:
    """out = acc[:, :N] * alpha (+ bias) with fp32 math, rounded once to out's dtype.

    One Triton pass where Triton can run (the GPU, or the interpreter); PyTorch fp32 otherwise
    (alpha is never rounded to 16 bits: a 0-dim fp32 tensor in a bf16 PyTorch op would be)."""
    if _backend.triton_runs(out.device)[0]:
        from ..triton_kernels import nvfp4_w4a4 as tk4
        tk4.w4a4_epilogue(acc, alpha, bias, out)
        return
    y = acc[:, :out.shape[1]].float() * alpha.float().reshape(())
    if bias is not None:
        y = y + bias.float()
    out.copy_(y)


def w4a4_gemm(args: dict, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """torch._scaled_mm on prepared args, then the global-scale/bias epilogue into ``out``.

    The GEMM output is bf16 for a bf16 ``out`` (|acc| <= K * 2688**2 fits bf16; rounded twice:
    acc to bf16, then acc * alpha) and fp32 otherwise (an fp16 acc would overflow)."""
    acc_dtype = torch.bfloat16 if out.dtype == torch.bfloat16 else torch.float32
    acc = torch._scaled_mm(args["a"], args["b"], args["scale_a"], args["scale_b"],
                           out_dtype=acc_dtype)
    w4a4_epilogue(acc, args["alpha"], bias, out)


def _w4a4(x, data, scales, g, K: int, bias, out) -> None:
    ok, why = _backend.native_fp4_status(x.device)
    if not ok:
        raise RuntimeError(f"pyops: nvfp4_linear variant 'w4a4' cannot run: {why}")
    # activations: NVFP4 with a device-computed global scale, scales swizzled for cuBLASLt
    ad, asc, ag = quantize_nvfp4_op(x, None, True, _backend.resolve(QUANT_OP, x.device))
    w4a4_gemm(prepare_w4a4_args(ad, asc, ag, data, scales, g, K), bias, out)


def _fp8(x, data, scales, g, K: int, bias, out) -> None:
    """Variant fp8: NVFP4 -> FP8 per-channel (transient), x per token, _scaled_mm row-wise."""
    from . import fp8_linear as f8, nvfp4_to_fp8 as conv, quantize_fp8 as q8
    wq, ws = conv.nvfp4_to_fp8_op(data, scales, g, K, _backend.resolve(conv.OP, x.device))
    xq, xs = q8.quantize_fp8_op(x, "row", _backend.resolve(q8.OP, x.device))
    _backend.impl(f8.OP, "torch")(xq, xs.reshape(-1), wq, ws, bias, out)


def _torch(x, data, scales, g, K: int, bias, out, variant: str) -> None:
    if variant == "fp8":
        _fp8(x, data, scales, g, K, bias, out)
        return
    if variant == "w4a4":
        _w4a4(x, data, scales, g, K, bias, out)
        return
    from ..triton_kernels import nvfp4_linear as tk
    w = torch.empty((data.shape[0], K), dtype=x.dtype, device=x.device)
    tk.dequantize_weight(data, scales, g, K, w)
    b = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)


def _half(dtype, who: str) -> tuple[bool, str]:
    if dtype is None or dtype in HALF_DTYPES:
        return True, ""
    return False, f"{who} takes bf16/fp16 activations (x is {dtype}; fp32 runs the reference)"


def triton_available(device, dtype: Optional[torch.dtype] = None, **_) -> tuple[bool, str]:
    """(ok, why) of backend ``triton`` (the fused W4A16 kernel) for activations of ``dtype``."""
    ok, why = _half(dtype, "the Triton W4A16 kernel")
    return _backend.triton_runs(torch.device(device)) if ok else (ok, why)


def torch_variant(native: bool, forced: Optional[str] = None) -> str:
    """The variant backend ``torch`` runs: ``forced`` if it is ``"dequant"``/``"w4a4"``/``"fp8"``
    (``"fp8"`` is never chosen automatically: unmeasured), else
    ``"w4a4"`` on a device with native NVFP4 (``native`` = ``_backend.native_fp4(device)``), else
    ``"dequant"``."""
    if forced in ("dequant", "w4a4", "fp8"):
        return forced
    return "w4a4" if native else "dequant"


def torch_available(device, dtype: Optional[torch.dtype] = None,
                    variant: Optional[str] = None, native: Optional[bool] = None,
                    N: Optional[int] = None, K: Optional[int] = None, **_) -> tuple[bool, str]:
    """(ok, why) of backend ``torch`` running ``torch_variant(native, variant)`` (``native``
    as ``choose`` computed it; asked of the device when absent): w4a4 needs native NVFP4;
    dequant needs Triton for its weight pass (cuBLAS does the GEMM)."""
    device = torch.device(device)
    ok, why = _half(dtype, "the cuBLAS NVFP4 path")
    if not ok:
        return ok, why
    if native is None:
        native = _backend.native_fp4(device)
    if torch_variant(native, variant) == "fp8":
        from .fp8_linear import scaled_mm_available
        ok, why = scaled_mm_available(device, N=16 if N is None else N, K=16 if K is None else K,
                                      out_dtype=torch.bfloat16 if dtype is None else dtype)
        if ok:
            ok, why = _backend.triton_runs(device)  # the conversion and quantization passes
        return ok, (f"fp8: NVFP4 -> FP8 + torch._scaled_mm row-wise ({why})" if ok else
                    f"variant fp8 (NVFP4 -> FP8 + torch._scaled_mm) cannot run: {why}")
    if torch_variant(native, variant) == "w4a4":
        ok, why = _backend.native_fp4_status(device)
        return ok, (f"w4a4: cuBLASLt NVFP4 GEMM via torch._scaled_mm ({why})" if ok else
                    f"variant w4a4 (cuBLASLt NVFP4 via torch._scaled_mm) needs native NVFP4: "
                    f"{why}")
    ok, why = _backend.triton_runs(device)
    return ok, (f"dequant: Triton weight pass + torch.mm ({why})" if ok else
                f"variant dequant dequantizes the weight with a Triton kernel: {why}")


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton, available=triton_available)
_backend.register(OP, "torch", _torch, available=torch_available,
                  on_tensor_device=True)  # its dequant pass is a Triton kernel


# ---- auto policy: which backend, per device and shape -------------------------------------------
# Measured: NVIDIA H200 (sm_90), 2026-11-30, torch 2.11, Triton 3.6, pyops 8d8b3ea,
# bench/RESULTS.md section 1, table "Linear" (bench/bench_linear.py; x bf16 = cuBLAS bf16 ms / ms).
# "fused" (triton: W4A16 kernel) vs "dequant" (torch: Triton dequantize + cuBLAS), x bf16:
#   M K N             fused  dequant       M K N              fused  dequant
#   4608 3072 3072    0.17   0.88          9216 3072 3072     0.18   0.95
#   4608 3072 12288   0.17   0.86          9216 3072 12288    0.20   0.99
#   4608 12288 3072   0.17   1.00          9216 12288 3072    0.16   0.97
#   4608 3072 15360   0.17   0.95          1 3072 3072        0.25   0.12
#   4608 15360 3072   0.16   0.95          1 3072 12288       0.48   0.44
#   16 3072 3072      0.20   0.33          1 12288 3072       0.22   0.33
# sm_90 rule, reproducing every measured winner: "torch" (dequant) for M >= 16 (measured at M = 16
# and at every M >= 4608; 16 < M < 4608 unmeasured, taken as dequant since both ends are); for
# M < 16 "triton" (fused) when K <= N and "torch" (dequant) when K > N (measured at M = 1 only;
# M = 2..15 assumed to behave like M = 1).
# Other capabilities are unmeasured and keep the previous rule: fused for M < 1024, dequant
# above (the weight stream dominates small M; at large M the dequant pass is a few % of a
# cuBLAS GEMM). Native-NVFP4 devices prefer "torch" (its w4a4 variant): chosen by capability,
# unmeasured and unverified on hardware.
POLICY_SOURCE = ("sm_90: NVIDIA H200 2026-11-30, bench/RESULTS.md section 1 'Linear' (fused vs "
                 "dequant per M, K, N); native NVFP4 -> torch w4a4 and other capabilities: "
                 "unmeasured")


def _sm90(M: int, N: int, K: int) -> str:
    if M >= 16:
        return "torch"
    return "triton" if K <= N else "torch"


def _unmeasured(M: int, N: int, K: int) -> str:
    return "triton" if M < 1024 else "torch"  # the previous default; nothing measured


AUTO_POLICY = {(9, 0): _sm90}  # compute capability -> rule(M, N, K); others: _unmeasured


def auto_backend(capability: tuple[int, int], M: Optional[int] = None, N: Optional[int] = None,
                 K: Optional[int] = None, *, native: bool = False, **_) -> str:
    """The backend auto mode prefers for x (M, K) @ W (N, K).T on a CUDA device of compute
    ``capability``: ``"torch"`` where the device has native NVFP4 (``native``, the public
    function passes ``_backend.native_fp4(device)``; variant w4a4), else the per-capability rule
    (``AUTO_POLICY``; unmeasured capabilities: ``_unmeasured``). Without a shape
    (``pyops.info()``) it answers for large M: ``"torch"``. A preference only:
    ``_backend.resolve`` falls back where it cannot run (e.g. fp32 x -> the reference). Source:
    the H200 measurement cited above (``POLICY_SOURCE``)."""
    if native or M is None:
        return "torch"
    return AUTO_POLICY.get(tuple(capability), _unmeasured)(M, N, K)


_backend.register_policy(OP, auto_backend, POLICY_SOURCE)


# ---- the op -------------------------------------------------------------------------------------
def _fake(x, data, scales, global_scale, K, bias, backend, variant):
    return x.new_empty((x.shape[0], data.shape[0]))


@define(OP, fake=_fake)
def nvfp4_linear_op(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                    global_scale: torch.Tensor, K: int, bias: Optional[torch.Tensor],
                    backend: str, variant: str) -> torch.Tensor:
    if variant not in VARIANTS or (backend != "reference"
                                   and BACKEND_OF_VARIANT[variant] != backend):
        raise ValueError(f"pyops: nvfp4_linear backend {backend!r} has no variant {variant!r} "
                         f"(triton: fused; torch: dequant, w4a4, fp8; reference: any)")
    out = torch.empty((x.shape[0], data.shape[0]), dtype=x.dtype, device=x.device)
    _backend.impl(OP, backend)(x, data, scales, global_scale, K, bias, out, variant)
    return out


# ---- public function ----------------------------------------------------------------------------
def reads_swizzled_scales(device) -> bool:
    """Whether the NVFP4 GEMM auto mode runs on ``device`` reads the 128x4-swizzled weight scales
    (the W4A4 path of backend ``torch``, on native-NVFP4 GPUs: ``_backend.native_fp4``); used by
    ``pyops.quantize_weight`` to build them once, up front."""
    return _backend.native_fp4(device)


def forced_variant() -> Optional[str]:
    """``PYOPS_NVFP4_LINEAR_VARIANT`` (None when unset or ``auto``; ValueError if unknown)."""
    v = os.environ.get(VARIANT_ENV, "")
    if v in ("", "auto"):
        return None
    if v not in VARIANTS:
        raise ValueError(f"pyops: {VARIANT_ENV}={v!r}; expected one of {VARIANTS} or 'auto'")
    return v


def choose(device: torch.device, backend: Optional[str], M: int, N: int, K: int,
           dtype: torch.dtype) -> tuple[str, str]:
    """(backend, variant) ``nvfp4_linear`` runs x (M, K) of ``dtype`` with on ``device``.

    The backend: ``backend`` (or ``PYOPS_BACKEND_NVFP4_LINEAR`` / ``PYOPS_BACKEND``), else the
    one ``PYOPS_NVFP4_LINEAR_VARIANT`` names (bf16/fp16 where Triton runs), else
    ``_backend.resolve``'s auto choice (the reference off CUDA, ``auto_backend`` on CUDA). A requested backend that cannot run raises
    RuntimeError; one that contradicts the forced variant ValueError. The variant: ``fused`` for
    triton, ``torch_variant`` for torch, the forced one (or ``fused``) for the reference."""
    forced = forced_variant()
    want = _backend.requested(OP, backend)
    if forced is not None:
        if want is None:
            # a tuning knob: it names the backend for half-precision activations where pyops'
            # Triton kernels run (a GPU, or the interpreter; there a variant that cannot run
            # raises); CPU tensors, fp32 activations, Triton-less installs: auto as without it
            if dtype in HALF_DTYPES and _backend.triton_runs(device)[0]:
                want = BACKEND_OF_VARIANT[forced]
            else:
                forced = None  # not applied: auto's reference runs the W4A16 spec
        elif want != "reference" and want != BACKEND_OF_VARIANT[forced]:
            raise ValueError(f"pyops: {VARIANT_ENV}={forced} runs on backend "
                             f"{BACKEND_OF_VARIANT[forced]!r}, but {want!r} was requested")
    native = _backend.native_fp4(device)  # once per call: the policy, the rule and the variant
    b = _backend.resolve(OP, device, want, M=M, N=N, K=K, dtype=dtype, variant=forced,
                         native=native)
    if b == "triton":
        return b, "fused"
    if b == "torch":
        return b, torch_variant(native, forced)
    return b, forced or "fused"


def nvfp4_linear(x: torch.Tensor, qweight: NVFP4Weight, bias: Optional[torch.Tensor] = None, *,
                 backend: Optional[str] = None) -> torch.Tensor:
    """``x @ W.T + bias`` with an NVFP4 weight: (..., K) -> (..., N) in x's dtype.

    x: (..., K) bf16/fp16 (fp32: the reference only), or an ``FP8Tensor`` (dequantized first:
    W4A16 takes high-precision activations). qweight: ``NVFP4Weight``. bias: (N,) float or None.
    backend: ``"triton"`` (fused W4A16), ``"torch"`` (cuBLAS: dequant, or w4a4 on native NVFP4),
    ``"reference"`` or None (auto, see ``choose``). W4A16 error: each weight decoded exactly
    (E2M1 x E4M3 x fp32 global), fp32 accumulation, one rounding to x's dtype (dequant: plus one
    rounding of each weight to x's dtype; w4a4: x quantized to NVFP4 too).
    Errors (before any launch): TypeError for a wrong dtype or weight type; ValueError for a
    shape or device mismatch or a bad ``PYOPS_NVFP4_LINEAR_VARIANT``; RuntimeError for a
    requested backend that cannot run.
    """
    if not isinstance(qweight, NVFP4Weight):
        raise TypeError(f"pyops.linear: nvfp4_linear takes an NVFP4Weight, got "
                        f"{type(qweight).__name__}")
    if isinstance(x, FP8Tensor):
        x = x.dequantize()
    N, K = qweight.shape
    check_tensor("linear", "x", x, dtypes=ACT_DTYPES)
    lead = linear_lead_shape(x.shape, K, "x")
    M = math.prod(lead)
    check_same_device("linear", qweight.data, x=x, scales=qweight.scales,
                      global_scale=qweight.global_scale)
    check_linear_bias(bias, N, x)
    bias = None if bias is None else bias.contiguous()  # the kernels read bias + n
    b, variant = choose(x.device, backend, M, N, K, x.dtype)
    # the w4a4 variant takes the swizzled scales (its contract; see the module docstring)
    scales = (qweight.swizzled_scales() if variant == "w4a4" else qweight.scales)
    y = nvfp4_linear_op(x.reshape(M, K), qweight.data, scales.view(torch.uint8),
                        qweight.global_scale, K, bias, b, variant)
    return y.view(*lead, N)

"""pyops::nvfp4_linear: x (bf16/fp16) x NVFP4 weight (schema, fake, backends, policy).

Backends (destination-passing: ``impl(x, data, scales, global_scale, K, bias, out, variant)``):

* ``triton`` with variant ``"fused"``: W4A16 GEMM dequantizing E2M1 x E4M3 exactly in the main
  loop (``triton_kernels/nvfp4_linear.py``); the decode/small-M path.
* ``triton`` with variant ``"dequant"``: a Triton pass writes the weight in x's dtype (each weight
  rounded once), then cuBLAS via ``torch.nn.functional.linear``: a transient (N, K) buffer, for
  large M where a dense GEMM's speed matters more than the extra weight pass.
* ``triton`` with variant ``"w4a4"`` (Blackwell: sm_100/103/120/121 only; UNVERIFIED ON
  HARDWARE): the activations are quantized to NVFP4 per call (``quantize_nvfp4(x, swizzle=True)``,
  global scale computed on the device, no host sync), then cuBLASLt's block-scaled FP4 GEMM via
  ``torch._scaled_mm`` (see ``prepare_w4a4_args`` / ``w4a4_gemm``). For this variant ``scales``
  is the weight's 128x4-SWIZZLED padded scale tensor (``NVFP4Weight.swizzled_scales()``, cached),
  not the (N, ceil(K/16)) one: the variant defines the layout (the two shapes coincide when
  N % 128 == 0 and ceil(K/16) % 4 == 0, so it cannot be inferred).
* ``reference``: ``pyops/reference/nvfp4_linear.py`` (``nvfp4_linear_w4a4`` for ``"w4a4"``).

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
``torch.nn.functional.scaled_mm`` takes two-level NVFP4 scales ``[blockwise e4m3, tensorwise
fp32]`` and passes ``g_a * g_b`` to cuBLASLt as alpha, which would remove that pass; not used yet
because it is not known to exist in torch 2.11.)
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _backend
from ..reference import nvfp4_linear as ref
from ..reference import quantize_nvfp4 as ref_q

OP = "nvfp4_linear"
VARIANTS = ("fused", "dequant", "w4a4")
# compute capabilities with native NVFP4 (E2M1 x E4M3/16) MMA: B200/GB200, B300, RTX 50, DGX Spark
NATIVE_FP4_CAPABILITIES = _backend.NATIVE_FP4_CAPABILITIES
BLOCK = ref_q.BLOCK


def _reference(x, data, scales, g, K: int, bias, out, variant: str) -> None:
    if variant == "w4a4":
        out.copy_(ref.nvfp4_linear_w4a4(x, data, scales, g, K, bias, out.dtype,
                                        scales_swizzled=True))
        return
    out.copy_(ref.nvfp4_linear(x, data, scales, g, K, bias, out.dtype))


def native_fp4_supported(device) -> tuple[bool, str]:
    """Whether ``device`` has native NVFP4 MMA and this torch has the float4 dtype.
    ``PYOPS_NVFP4_NATIVE=0`` turns it off, as for every native NVFP4 path
    (``_backend.native_fp4``)."""
    device = torch.device(device)
    if os.environ.get("PYOPS_NVFP4_NATIVE", "1") == "0":
        return False, "native NVFP4 turned off by PYOPS_NVFP4_NATIVE=0"
    if device.type != "cuda":
        return False, f"W4A4 needs a CUDA device with native NVFP4 (sm_100/103/120/121), " \
                      f"got {device.type}"
    if not hasattr(torch, "float4_e2m1fn_x2"):
        return False, f"torch {torch.__version__} has no float4_e2m1fn_x2"
    cap = _backend.device_capability(device)
    if tuple(cap) not in NATIVE_FP4_CAPABILITIES:
        return False, f"sm_{cap[0]}{cap[1]} has no native NVFP4 MMA (needs sm_100/103/120/121)"
    return True, f"sm_{cap[0]}{cap[1]}"


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
    dev = out.device
    if _backend.available(OP, "triton", dev)[0]:
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
    ok, why = native_fp4_supported(x.device)
    if not ok:
        raise RuntimeError(f"pyops: nvfp4_linear variant 'w4a4' cannot run: {why}")
    from . import quantize_nvfp4 as qop
    qb = _backend.resolve(qop.OP, x.device)
    ad, asc, ag = qop.quantize_nvfp4_impl(x, None, True, qb)
    w4a4_gemm(prepare_w4a4_args(ad, asc, ag, data, scales, g, K), bias, out)


def _triton(x, data, scales, g, K: int, bias, out, variant: str) -> None:
    from ..triton_kernels import nvfp4_linear as tk
    if variant == "w4a4":
        _w4a4(x, data, scales, g, K, bias, out)
        return
    if variant == "dequant":
        w = torch.empty((data.shape[0], K), dtype=x.dtype, device=x.device)
        tk.dequantize_weight(data, scales, g, K, w)
        b = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
        if b is None:
            torch.mm(x, w.t(), out=out)
        else:
            torch.addmm(b, x, w.t(), out=out)
        return
    tk.nvfp4_linear(x, data, scales, g, K, bias, out)


_backend.register(OP, "reference", _reference)
_backend.register(OP, "triton", _triton)


# ---- auto policy: which variant, per device and shape --------------------------------------------
# Measured: NVIDIA H200 (sm_90), 2026-11-30, torch 2.11, Triton 3.6, pyops 8d8b3ea,
# bench/RESULTS.md section 1, table "Linear" (bench/bench_linear.py; x bf16 =
# cuBLAS bf16 ms / ms). "fused" (W4A16 kernel) vs "dequant" (Triton dequantize + cuBLAS), x bf16:
#   M K N             fused  dequant       M K N              fused  dequant
#   4608 3072 3072    0.17   0.88          9216 3072 3072     0.18   0.95
#   4608 3072 12288   0.17   0.86          9216 3072 12288    0.20   0.99
#   4608 12288 3072   0.17   1.00          9216 12288 3072    0.16   0.97
#   4608 3072 15360   0.17   0.95          1 3072 3072        0.25   0.12
#   4608 15360 3072   0.16   0.95          1 3072 12288       0.48   0.44
#   16 3072 3072      0.20   0.33          1 12288 3072       0.22   0.33
# sm_90 rule, reproducing every measured winner: "dequant" for M >= 16 (measured at M = 16 and
# at every M >= 4608; 16 < M < 4608 unmeasured, taken as dequant since both ends are); for
# M < 16 "fused" when K <= N and "dequant" when K > N (measured at M = 1 only; M = 2..15 assumed
# to behave like M = 1, where the previous rule also said fused).
# Other capabilities are unmeasured and keep the previous rule: fused for M < 1024, dequant
# above (the weight stream dominates small M; at large M the dequant pass is a few % of a
# cuBLAS GEMM). sm_100/103/120/121 take "w4a4" by capability in pick_variant (unmeasured,
# unchanged).
def _sm90(M: int, N: int, K: int) -> str:
    if M >= 16:
        return "dequant"
    return "fused" if K <= N else "dequant"


def _unmeasured(M: int, N: int, K: int) -> str:
    return "fused" if M < 1024 else "dequant"  # the previous default; nothing measured


AUTO_POLICY = {(9, 0): _sm90}  # compute capability -> rule(M, N, K); others: _unmeasured


def auto_variant(capability: Optional[tuple[int, int]], M: int, N: int, K: int) -> str:
    """``"fused"`` or ``"dequant"`` for x (M, K) @ W (N, K).T on a device of compute
    ``capability`` (major, minor); ``None`` (unknown device, the CPU interpreter) takes the
    unmeasured default. Source of the sm_90 rule: the H200 measurement cited above
    ``AUTO_POLICY``."""
    rule = AUTO_POLICY.get(tuple(capability), _unmeasured) if capability is not None \
        else _unmeasured
    return rule(M, N, K)


def pick_variant(M: int, N: int, K: int, device=None) -> str:
    """The variant ``pyops.linear`` runs the Triton backend with (called by ``pyops.qlinear``
    with x's device when the backend is "triton", else ``device=None``).

    ``PYOPS_NVFP4_LINEAR_VARIANT=fused|dequant|w4a4`` forces one (a forced ``w4a4`` on a
    device without native NVFP4 raises when the Triton backend runs). Otherwise ``"w4a4"``
    (native NVFP4 GEMM, activations quantized per call) whenever ``device`` is a CUDA device
    with native NVFP4 (sm_100/103/120/121; never Hopper): chosen by capability only, unmeasured
    and unverified on hardware. Otherwise ``auto_variant`` with the device's capability
    (``_backend.device_capability``, cached, safe under torch.compile).
    """
    forced = os.environ.get("PYOPS_NVFP4_LINEAR_VARIANT", "")
    if forced in VARIANTS:
        return forced
    cap = None
    if device is not None and torch.device(device).type == "cuda":
        if native_fp4_supported(device)[0]:
            return "w4a4"
        cap = _backend.device_capability(device)
    return auto_variant(cap, M, N, K)


def resolve(device: torch.device, backend: Optional[str], dtype: torch.dtype) -> str:
    want = _backend.requested(OP, backend)
    if want is not None:
        ok, why = _backend.available(OP, want, device)
        if ok and want == "triton" and dtype == torch.float32:
            ok, why = False, "the Triton W4A16 kernel takes bf16/fp16 activations"
        if not ok:
            raise RuntimeError(f"pyops: backend {want!r} requested for {OP} cannot run: {why}")
        return want
    if device.type == "cuda" and dtype != torch.float32 and \
            _backend.available(OP, "triton", device)[0]:
        return "triton"
    return "reference"


def nvfp4_linear_impl(x, data, scales, global_scale, K: int, bias, backend: str,
                      variant: str) -> torch.Tensor:
    out = torch.empty((x.shape[0], data.shape[0]), dtype=x.dtype, device=x.device)
    _backend.impl(OP, backend)(x, data, scales, global_scale, K, bias, out, variant)
    return out


@torch.library.custom_op("pyops::nvfp4_linear", mutates_args=())
def nvfp4_linear_op(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                    global_scale: torch.Tensor, K: int, bias: Optional[torch.Tensor],
                    backend: str, variant: str) -> torch.Tensor:
    return nvfp4_linear_impl(x, data, scales, global_scale, K, bias, backend, variant)


@nvfp4_linear_op.register_fake
def _(x, data, scales, global_scale, K, bias, backend, variant):
    return x.new_empty((x.shape[0], data.shape[0]))

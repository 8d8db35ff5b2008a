"""Number-format constants of the pyops specs: the one Python home of every format number.

Plain Python (no torch, no triton). The references in this package and the op modules import
these names; the Triton kernels hold the same numbers as ``tl.constexpr`` in
``triton_kernels/_cvt.py`` (kernels never import ``pyops``), and tests/test_layering.py checks
that the two sets are equal. The CUDA kernels have their own copies in ``csrc/``.

Sources:

* E4M3 (``float8_e4m3fn``: 1 sign, 4 exponent bits with bias 7, 3 mantissa bits, no infinity,
  S.1111.111 is NaN): OCP 8-bit Floating Point Specification (OFP8) rev 1.0 and OCP
  Microscaling Formats (MX) Specification v1.0, the E4M3 element table (max normal
  1.75 * 2**8 = 448, min normal 2**-6, min subnormal 2**-9); NVIDIA PTX ISA, "Alternate
  Floating-Point Data Formats" (``.e4m3``: no infinity, max 448, conversions with
  ``.satfinite`` clamp to it).
* E2M1 (FP4: 1 sign, 2 exponent bits with bias 1, 1 mantissa bit; magnitudes 0, 0.5, 1, 1.5, 2,
  3, 4, 6; no inf/NaN): OCP MX Specification v1.0, the FP4 E2M1 element table; NVIDIA PTX ISA
  ``.e2m1``.
* NVFP4 (E2M1 elements, one E4M3 scale per 16 consecutive elements along the reduction dim, and
  a per-tensor fp32 second-level scale): NVIDIA technical blog "Introducing NVFP4 for Efficient
  and Accurate Low-Precision Inference" (2025); cuBLAS documentation, block scaling mode
  ``CUBLASLT_MATMUL_MATRIX_SCALE_VEC16_UE4M3`` (16-element blocks, E4M3 scales).
* NVFP4 global-scale divisor 2688 = E2M1_MAX * E4M3_MAX: derived, not a spec constant. The
  second-level scale ``g = amax / 2688`` makes the largest block's first-level scale
  ``block_amax / 6 / g`` equal to 448 = E4M3_MAX exactly, so every block scale fits E4M3 and
  the largest uses its top of range (the recipe of pyops/reference/quantize_nvfp4.py).
* FP32: IEEE 754-2019 binary32 (FLT_MIN = 2**-126 smallest normal, FLT_MAX largest finite).
* FP8 block granularity 128 (1x128 along K, 128x128 tiles): pyops' choice, the fine-grained
  scheme of the DeepSeek-V3 technical report (arXiv:2412.19437, section 3.3); cuBLAS names the
  same layouts ``VEC128_32F`` / ``BLK128x128_32F``.
* INT8_MAX 127: symmetric int8 codes in [-127, 127] (-128 unused, so the range is symmetric).
"""
from __future__ import annotations

# ---- FP8 E4M3 (float8_e4m3fn) ------------------------------------------------------------------
E4M3_MAX = 448.0  # largest finite value, 1.75 * 2**8
E4M3_MIN_NORMAL = 2.0**-6
E4M3_MIN_SUBNORMAL = 2.0**-9
E4M3_NAN = 0x7F  # the NaN byte with the sign clear (0xFF is the other one)

# ---- FP4 E2M1 -----------------------------------------------------------------------------------
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of codes 0..7; bit 3 = sign

# ---- NVFP4 --------------------------------------------------------------------------------------
NVFP4_BLOCK = 16  # elements per E4M3 block scale
NVFP4_GLOBAL_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688: g = max(amax / 2688, FLT_MIN)

# ---- FP8 block granularity, int8 ---------------------------------------------------------------
FP8_BLOCK = 128
INT8_MAX = 127.0

# ---- FP32 and math constants -------------------------------------------------------------------
FLT_MIN = 2.0**-126  # smallest normal fp32; keeps 0/0 out of all-zero groups
FLT_MAX = float.fromhex("0x1.fffffep+127")
LOG2E = 1.4426950408889634  # log2(e), the double nearest
LN2 = 0.6931471805599453  # ln(2), the double nearest

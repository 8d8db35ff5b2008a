/*
 * pyops/quantize_fp8.h - FP8 e4m3fn dynamic quantization of a 2-D (M, K) view (libpyops C ABI).
 * Bit-exact spec: pyops/reference/quantize_fp8.py. Conventions: pyops/common.h.
 *
 * Per group: amax over |x|; scale = max(amax / 448, FLT_MIN) (IEEE division);
 * q = e4m3(clamp(x / scale, -448, 448)); a group holding inf/NaN gets scale NaN (bits
 * 0x7FC00000) and codes 0. M == 0 or K == 0: nothing to do, returns cudaSuccess.
 */
#ifndef PYOPS_QUANTIZE_FP8_H_
#define PYOPS_QUANTIZE_FP8_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* FP8 scale granularity; the values match pyops.ops.quantize_fp8.GRANULARITY_CODE. */
typedef enum pyops_fp8_granularity {
  PYOPS_FP8_TENSOR = 0,        /* one scale;                     scale has 1 float           */
  PYOPS_FP8_ROW = 1,           /* one scale per row;             scale has M floats          */
  PYOPS_FP8_BLOCK1X128 = 2,    /* 1x128 along K;  scale (M, ceil(K/128)) row-major            */
  PYOPS_FP8_BLOCK128X128 = 3   /* 128x128 tiles;  scale (ceil(M/128), ceil(K/128)) row-major  */
} pyops_fp8_granularity_t;

typedef struct pyops_quantize_fp8_params {
  /* input: element (m, k) at x + m*stride_m + k*stride_k (elements of `dtype`). Fast (16-byte
   * vector) path when stride_k == 1 and every row start is 16-byte aligned; any other layout
   * takes a correct strided path. */
  const void* x;
  pyops_dtype_t dtype;
  int64_t M, K;            /* logical shape (>= 0) */
  int64_t stride_m, stride_k;
  /* output codes, float8_e4m3fn bytes, contiguous (M, K): byte (m, k) at q[m*K + k]. Fully
   * written. Any alignment; 8-byte aligned with K % 8 == 0 takes whole-word stores. */
  uint8_t* q;
  /* output fp32 dequantization scales, contiguous, shape given by `granularity`. Fully written.
   * For PYOPS_FP8_TENSOR the single float is also the in-flight amax accumulator (memset +
   * atomicMax, then rewritten with the final scale): no granularity needs a workspace. */
  float* scale;
  pyops_fp8_granularity_t granularity;
} pyops_quantize_fp8_params;

cudaError_t pyops_quantize_fp8(const pyops_quantize_fp8_params* p, cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_QUANTIZE_FP8_H_ */

/*
 * pyops/weight_only_linear.h - weight-only quantized linear for small M (libpyops C ABI):
 * y (M, N) = x (M, K) @ W (N, K)^T (+ bias), x bf16 or fp16 (not quantized), W stored as FP8
 * e4m3 with one fp32 scale per row (W8A16) or as NVFP4 (W4A16). Spec: pyops/reference/
 * weight_only_linear.py (NVFP4 layout: pyops/reference/nvfp4_linear.py). Conventions:
 * pyops/common.h.
 *
 *   FP8:   W[n, k] = e4m3(w[n, k]) * w_scale[n]
 *   NVFP4: W[n, k] = e2m1(code[n, k]) * e4m3(w_scale[n, k / 16]) * global_scale[0]
 *
 * Numerics: the MMA's weight operand is e4m3(w) (FP8) or e2m1 * e4m3 block scale (NVFP4), both
 * exact in x's dtype; products are summed in fp32 (tensor cores, summation order unspecified);
 * the fp32 sum is multiplied by w_scale[n] (FP8) or global_scale[0] (NVFP4), then the bias
 * (widened to fp32) is added, then one round-to-nearest-even to the out dtype (= x's dtype).
 * Deterministic for a given split_k (fixed reduction order).
 *
 * M == 0 or N == 0: nothing to do. K == 0: out = bias (or 0), no scale applied.
 * Needs compute capability >= 8.9 (cudaErrorNotSupported otherwise).
 */
#ifndef PYOPS_WEIGHT_ONLY_LINEAR_H_
#define PYOPS_WEIGHT_ONLY_LINEAR_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* K granularity of the split-K work division: the K axis is cut into nchunks = ceil(K / CHUNK_K)
 * chunks (64 weight bytes of a row in both formats) and split_k must lie in [1, nchunks]; each
 * split gets ceil(nchunks / split_k) consecutive chunks (the last ones may get none). */
#define PYOPS_WOL_FP8_CHUNK_K 64
#define PYOPS_WOL_NVFP4_CHUNK_K 128
/* Largest split_k (a grid dimension). */
#define PYOPS_WOL_MAX_SPLIT_K 65535

/* Weight storage format; the values match pyops.ops.weight_only_linear's format codes. */
typedef enum pyops_weight_format {
  PYOPS_WEIGHT_FP8 = 0,   /* w: e4m3 bytes (N, K) row-major; w_scale: float (N,)             */
  PYOPS_WEIGHT_NVFP4 = 1  /* w: (N, ceil(K/16)*8) bytes, two E2M1 codes a byte (element 2i in
                           * the low nibble); w_scale: e4m3 bytes (N, ceil(K/16)) row-major;
                           * global_scale: one float                                          */
} pyops_weight_format_t;

typedef struct pyops_weight_only_linear_params {
  /* activations: element (m, k) at x + m*stride_xm + k, of `dtype` (bf16 or f16; also the out
   * dtype). Fast path (16-byte loads) when x is 16-byte aligned, stride_xm % 8 == 0 and the
   * weight rows are 16-byte aligned (see w); any other layout takes a correct element path. */
  const void* x;
  pyops_dtype_t dtype;
  int64_t M, N, K;
  int64_t stride_xm;     /* >= K when M > 1 */
  /* weight bytes, contiguous rows (row stride K bytes for FP8, ceil(K/16)*8 for NVFP4). Fast
   * path also needs w 16-byte aligned and K % 16 == 0 (FP8) / K % 32 == 0 (NVFP4, and w_scale
   * 2-byte aligned). Elements k >= K (NVFP4 padding codes) are never used. */
  const uint8_t* w;
  pyops_weight_format_t format;
  const void* w_scale;        /* FP8: float (N,); NVFP4: e4m3 bytes (N, ceil(K/16)) */
  const float* global_scale;  /* NVFP4: one float on the device; FP8: NULL */
  const void* bias;           /* (N,) of bias_dtype (f32, f16 or bf16), or NULL */
  pyops_dtype_t bias_dtype;
  void* out;                  /* (M, N) contiguous, of `dtype`; fully written */
  /* split_k in [1, min(nchunks, PYOPS_WOL_MAX_SPLIT_K)] (any value >= 1 when K == 0). For
   * split_k > 1, workspace is (split_k, M, N) fp32 contiguous: split s writes its unscaled fp32
   * partial sums to workspace[s][m][n] (every element, 0 for an empty K range), then a second
   * kernel sums the splits in order s = 0, 1, ... and applies scale, bias and rounding. */
  int32_t split_k;
  float* workspace;
} pyops_weight_only_linear_params;

cudaError_t pyops_weight_only_linear(const pyops_weight_only_linear_params* p,
                                     cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_WEIGHT_ONLY_LINEAR_H_ */

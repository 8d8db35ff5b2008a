/*
 * pyops/gelu_quant.h - torch-free C ABI of the fused GELU + per-token FP8 e4m3 quantization
 * kernel (spec: pyops/reference/gelu_quant.py): the input of an FP8 W8A8 MLP-out linear.
 *
 * For every row m of x (M, K), in fp32:
 *   PYOPS_GELU_TANH: y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
 *   PYOPS_GELU_ERF:  y = 0.5 x (1 + erf(x / sqrt(2)))      (torch's approximate="none")
 *   q_scale[m] = max(amax|y| / 448, FLT_MIN); q = e4m3(clamp(y / q_scale[m], -448, 448))
 *   a row whose y holds inf/NaN (x holds inf/NaN): q_scale[m] = NaN (bits 0x7FC00000), codes 0.
 * tanh / erf / exp are computed with exactly rounded fp32 operations only (no hardware
 * approximation), so y is within 4 * 2^-24 * (|x| + |y|) of the reference's and does not depend
 * on fast-math build flags; q and q_scale are always exactly the FP8 row quantization of the
 * fp32 y that is written to `y` when y_dtype is PYOPS_DTYPE_F32.
 *
 * Conventions: pyops/common.h (int64 sizes/strides in elements, device pointers, enqueued on
 * `stream` only, cudaErrorInvalidValue for bad arguments without enqueuing anything).
 * M == 0 or K == 0 is a no-op.
 */
#ifndef PYOPS_GELU_QUANT_H_
#define PYOPS_GELU_QUANT_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pyops_gelu_kind {
  PYOPS_GELU_TANH = 0, /* approximate="tanh" */
  PYOPS_GELU_ERF = 1   /* approximate="none": the exact GELU, with erf */
} pyops_gelu_kind_t;

typedef struct pyops_gelu_quant_params {
  /* input: element (m, k) at x + m*stride_m + k*stride_k (elements of x_dtype) */
  const void* x;
  pyops_dtype_t x_dtype;
  int64_t M, K, stride_m, stride_k;
  pyops_gelu_kind_t approximate;
  /* outputs, contiguous: q (M, K) e4m3 bytes, q_scale (M) fp32, y (M, K) of y_dtype or NULL */
  uint8_t* q;
  float* q_scale;
  void* y;
  pyops_dtype_t y_dtype;
} pyops_gelu_quant_params;

cudaError_t pyops_gelu_quant(const pyops_gelu_quant_params* p, cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_GELU_QUANT_H_ */

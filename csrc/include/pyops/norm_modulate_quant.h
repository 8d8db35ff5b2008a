/*
 * pyops/norm_modulate_quant.h - torch-free C ABI of the fused LayerNorm/RMSNorm + adaLN modulate
 * + per-token FP8 e4m3 quantization kernel (spec: pyops/reference/norm_modulate_quant.py).
 *
 * For every row m of x (M, D), in fp32, each operation rounded on its own:
 *   LayerNorm: mean = sum(x)/D; d = x - mean; var = sum(d*d)/D; n = d * (1/sqrt(var + eps))
 *   RMSNorm:   n = x * (1/sqrt(sum(x*x)/D + eps))
 *   n = n * weight; n = n + bias                        (each if given)
 *   y = n * (1 + scale[r]); y = y + shift[r]            (each if given), r = m / rows_per_mod
 *   q_scale[m] = max(amax|y| / 448, FLT_MIN); q = e4m3(clamp(y / q_scale[m], -448, 448))
 *   a row whose y holds inf/NaN: q_scale[m] = NaN (bits 0x7FC00000) and its codes 0.
 * The row sums may be taken in any order (results differ from the reference by a few ulps);
 * q and q_scale are always exactly the FP8 row quantization of the fp32 y that is written to
 * `y` when y_dtype is PYOPS_DTYPE_F32.
 *
 * Conventions: pyops/common.h (int64 sizes/strides in elements, device pointers, enqueued on
 * `stream` only, cudaErrorInvalidValue for bad arguments without enqueuing anything).
 * M == 0 or D == 0 is a no-op.
 */
#ifndef PYOPS_NORM_MODULATE_QUANT_H_
#define PYOPS_NORM_MODULATE_QUANT_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pyops_norm_kind {
  PYOPS_NORM_LAYER = 0, /* LayerNorm (biased variance, two-pass) */
  PYOPS_NORM_RMS = 1    /* RMSNorm */
} pyops_norm_kind_t;

typedef struct pyops_norm_modulate_quant_params {
  /* input: element (m, d) at x + m*stride_m + d*stride_d (elements of x_dtype) */
  const void* x;
  pyops_dtype_t x_dtype;
  int64_t M, D, stride_m, stride_d;
  pyops_norm_kind_t norm;
  float eps;
  /* optional parameters (NULL = absent), all of param_dtype, unit stride along D:
   *   weight, bias: D elements;  shift, scale: row r starts at ptr + r*{shift,scale}_stride
   *   (a stride of 0 broadcasts one row to every x row). */
  const void* weight;
  const void* bias;
  const void* shift;
  const void* scale;
  int64_t shift_stride, scale_stride;
  int64_t rows_per_mod; /* x rows per modulation row, >= 1 */
  pyops_dtype_t param_dtype;
  /* outputs, contiguous: q (M, D) e4m3 bytes, q_scale (M) fp32, y (M, D) of y_dtype or NULL */
  uint8_t* q;
  float* q_scale;
  void* y;
  pyops_dtype_t y_dtype;
} pyops_norm_modulate_quant_params;

cudaError_t pyops_norm_modulate_quant(const pyops_norm_modulate_quant_params* p,
                                      cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_NORM_MODULATE_QUANT_H_ */

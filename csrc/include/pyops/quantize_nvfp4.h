/*
 * pyops/quantize_nvfp4.h - NVFP4 quantization of a 2-D (M, K) view (libpyops C ABI): E2M1 codes,
 * one e4m3 scale per 16 elements along K, one fp32 global scale. nb = ceil(K / 16); the last
 * block is padded with zeros. Bit-exact spec: pyops/reference/quantize_nvfp4.py. Conventions:
 * pyops/common.h. M == 0 or K == 0: nothing to do, returns cudaSuccess.
 */
#ifndef PYOPS_QUANTIZE_NVFP4_H_
#define PYOPS_QUANTIZE_NVFP4_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pyops_quantize_nvfp4_params {
  /* input, as in pyops_quantize_fp8_params */
  const void* x;
  pyops_dtype_t dtype;
  int64_t M, K;
  int64_t stride_m, stride_k;
  /* output, uint8 contiguous (M, nb*8), 4-byte aligned: two codes a byte, element 2i in the low
   * nibble; padding elements of the last block encode as 0. Fully written. */
  uint8_t* data;
  /* output e4m3 scale bytes, contiguous:
   *   swizzle == 0: (M, nb) row-major; fully written.
   *   swizzle != 0: padded (roundup(M,128), roundup(nb,4)) in the 128x4-tiled Blackwell
   *   block-scaled-GEMM layout. Only the M*nb real entries are written: THE CALLER MUST
   *   ZERO-FILL the buffer beforehand (padding stays 0).
   * A block holding inf/NaN gets scale byte 0x7F and codes 0. */
  uint8_t* scales;
  /* ONE fp32 on the device.
   *   compute_global == 0: read (the static global scale; should be finite, > 0).
   *   compute_global != 0: written with max(amax / 2688, FLT_MIN), amax over the finite
   *   elements of x. Used as the amax accumulator while in flight (memset + atomicMax +
   *   finalize), so no workspace is needed. */
  float* global_scale;
  int compute_global;
  int swizzle;
} pyops_quantize_nvfp4_params;

cudaError_t pyops_quantize_nvfp4(const pyops_quantize_nvfp4_params* p, cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_QUANTIZE_NVFP4_H_ */

/*
 * pyops.h - torch-free C ABI of the pyops CUDA kernels (libpyops).
 *
 * Plain C (C99) and C++. Only <stdint.h> and <cuda_runtime_api.h> are needed.
 *
 * Conventions shared by every entry point:
 *  - All sizes, strides and offsets are int64_t; strides are in ELEMENTS (not bytes), may be any
 *    non-negative value (0 for broadcast views, stride_k != 1 for transposed / sliced views).
 *    Tensors with more than 2^31 elements are supported.
 *  - All pointers are device pointers (or managed memory) on the current CUDA device.
 *  - Work is enqueued on `stream` only; no host synchronization, no allocation, no host reads of
 *    device data: every call is safe inside CUDA-graph stream capture.
 *  - Return value: cudaSuccess, cudaErrorInvalidValue for bad arguments (nothing is enqueued
 *    then), or the error of the first failed launch / memset (cudaGetLastError after launch).
 *    Asynchronous kernel faults show up later, as usual in CUDA.
 *  - M == 0 or K == 0: nothing to do, returns cudaSuccess without touching the outputs.
 *  - Bit-exact spec: pyops/reference/quantize_fp8.py and pyops/reference/quantize_nvfp4.py
 *    (fp32 math, IEEE division, round-to-nearest-even casts).
 */
#ifndef PYOPS_H_
#define PYOPS_H_

#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of the input x. */
typedef enum pyops_dtype {
  PYOPS_DTYPE_F32 = 0,  /* float32 */
  PYOPS_DTYPE_F16 = 1,  /* IEEE half */
  PYOPS_DTYPE_BF16 = 2  /* bfloat16 */
} pyops_dtype_t;

/* FP8 scale granularity; the values match pyops.ops.quantize_fp8.GRANULARITY_CODE. */
typedef enum pyops_fp8_granularity {
  PYOPS_FP8_TENSOR = 0,        /* one scale;                     scale has 1 float           */
  PYOPS_FP8_ROW = 1,           /* one scale per row;             scale has M floats          */
  PYOPS_FP8_BLOCK1X128 = 2,    /* 1x128 along K;  scale (M, ceil(K/128)) row-major            */
  PYOPS_FP8_BLOCK128X128 = 3   /* 128x128 tiles;  scale (ceil(M/128), ceil(K/128)) row-major  */
} pyops_fp8_granularity_t;

/*
 * FP8 e4m3fn dynamic quantization of a 2-D (M, K) view.
 *
 *   x           input, element (m, k) at x + m*stride_m + k*stride_k (elements of `dtype`).
 *               Fast (16-byte vector) path when stride_k == 1 and every row start is 16-byte
 *               aligned; any other layout takes a correct strided path.
 *   dtype       element type of x.
 *   M, K        logical shape (>= 0).
 *   stride_m    stride between rows, in elements.
 *   stride_k    stride between columns, in elements.
 *   q           output codes, float8_e4m3fn bytes, contiguous (M, K): byte (m, k) at q[m*K + k].
 *               Fully written.
 *               Any alignment; 8-byte aligned with K % 8 == 0 takes whole-word stores.
 *   scale       output fp32 dequantization scales, contiguous, shape given by `granularity`
 *               (see pyops_fp8_granularity_t). Fully written. For PYOPS_FP8_TENSOR the single
 *               float is also used as the in-flight amax accumulator (memset + atomicMax, then
 *               rewritten with the final scale): no workspace is needed by any granularity.
 *               A group holding inf/NaN gets scale NaN (bits 0x7FC00000) and codes 0.
 *   granularity see pyops_fp8_granularity_t.
 *   stream      CUDA stream to enqueue on (0 = legacy default stream).
 */
cudaError_t pyops_quantize_fp8(const void* x, pyops_dtype_t dtype, int64_t M, int64_t K,
                               int64_t stride_m, int64_t stride_k, uint8_t* q, float* scale,
                               pyops_fp8_granularity_t granularity, cudaStream_t stream);

/*
 * NVFP4 quantization of a 2-D (M, K) view: E2M1 codes, one e4m3 scale per 16 elements along K,
 * one fp32 global scale. nb = ceil(K / 16); the last block is padded with zeros.
 *
 *   x, dtype, M, K, stride_m, stride_k   as for pyops_quantize_fp8.
 *   data        output, uint8 contiguous (M, nb*8), 4-byte aligned: two codes a byte, element
 *               2i in the low nibble; padding elements of the last block encode as 0. Fully
 *               written.
 *   scales      output e4m3 scale bytes, contiguous:
 *                 swizzle == 0: (M, nb) row-major; fully written.
 *                 swizzle != 0: padded (roundup(M,128), roundup(nb,4)) in the 128x4-tiled
 *                 Blackwell block-scaled-GEMM layout. Only the M*nb real entries are written:
 *                 THE CALLER MUST ZERO-FILL the buffer beforehand (padding stays 0).
 *               A block holding inf/NaN gets scale byte 0x7F and codes 0.
 *   global_scale pointer to ONE fp32 on the device.
 *                 compute_global == 0: read (the static global scale; should be finite, > 0).
 *                 compute_global != 0: written with max(amax / 2688, FLT_MIN), amax over the
 *                 finite elements of x. It is used as the amax accumulator while in flight
 *                 (memset + atomicMax + finalize), so no workspace is needed.
 *   compute_global  see global_scale.
 *   swizzle     see scales.
 *   stream      CUDA stream to enqueue on.
 */
cudaError_t pyops_quantize_nvfp4(const void* x, pyops_dtype_t dtype, int64_t M, int64_t K,
                                 int64_t stride_m, int64_t stride_k, uint8_t* data,
                                 uint8_t* scales, float* global_scale, int compute_global,
                                 int swizzle, cudaStream_t stream);

/*
 * The GPU architectures the library's kernels were compiled for, as a static string of
 * compute-capability numbers separated by ';' (e.g. "90;100" for sm_90a + sm_100a). Never NULL.
 */
const char* pyops_cuda_archs(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_H_ */

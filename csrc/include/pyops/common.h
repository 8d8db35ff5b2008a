/*
 * pyops/common.h - what every entry point of the torch-free C ABI of libpyops shares.
 *
 * Plain C (C99) and C++; needs only <stdint.h> and <cuda_runtime_api.h>.
 *
 * One entry-point style (model: the params struct of Dao-AILab/flash-attention hopper/flash.h):
 *
 *     cudaError_t pyops_<op>(const pyops_<op>_params* p, cudaStream_t stream);
 *
 * declared in pyops/<op>.h, whose params struct holds the op's pointers, sizes, strides and flags.
 * Conventions shared by every entry point:
 *  - Sizes, strides and offsets are int64_t; strides are in ELEMENTS (not bytes).
 *  - Pointers are device pointers (or managed memory) on the current CUDA device.
 *  - Work is enqueued on `stream` only (0 = legacy default stream): no host synchronization, no
 *    allocation, no host reads of device data, so every call is safe inside CUDA-graph capture.
 *  - Return value: cudaSuccess; cudaErrorInvalidValue for a NULL `p` or bad arguments (nothing is
 *    enqueued then); or the error of the first failed launch / memset (cudaGetLastError after
 *    the launch). Asynchronous kernel faults show up later, as usual in CUDA.
 *  - fp32 math with IEEE round-to-nearest-even, each operation rounded on its own (no FMA
 *    contraction, subnormals kept even in a -use_fast_math / -ftz=true build); casts to a
 *    narrower float round to nearest even. The spec of each op is its PyTorch reference in
 *    pyops/reference/<op>.py.
 */
#ifndef PYOPS_COMMON_H_
#define PYOPS_COMMON_H_

#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of a float buffer; the one dtype enum of the ABI. */
typedef enum pyops_dtype {
  PYOPS_DTYPE_F32 = 0,  /* float32 */
  PYOPS_DTYPE_F16 = 1,  /* IEEE half */
  PYOPS_DTYPE_BF16 = 2  /* bfloat16 */
} pyops_dtype_t;

/*
 * The GPU architectures libpyops was compiled for, as a static string of compute-capability
 * numbers separated by ';' (e.g. "90;100" for sm_90a + sm_100a). Never NULL; host-only, needs
 * no device.
 */
const char* pyops_cuda_archs(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_COMMON_H_ */

// Device-side setter of a CUDA graph conditional node (spec: pyops/graphs.py). Torch-free.
#include <cuda_runtime.h>
#include <stdint.h>

#include "pyops_graph_conditional.h"

namespace {

__global__ void set_conditional_kernel(cudaGraphConditionalHandle handle, const int32_t* flag,
                                       int64_t index, int invert) {
  const unsigned int v = (flag[index] != 0) ? 1u : 0u;
  cudaGraphSetConditional(handle, invert ? (v ^ 1u) : v);
}

}  // namespace

extern "C" int pyops_graph_set_conditional(uint64_t handle, const int32_t* flag, int64_t index,
                                           int invert, cudaStream_t stream) {
  if (flag == nullptr || index < 0) return static_cast<int>(cudaErrorInvalidValue);
  set_conditional_kernel<<<1, 1, 0, stream>>>(static_cast<cudaGraphConditionalHandle>(handle),
                                              flag, index, invert);
  return static_cast<int>(cudaGetLastError());
}

// graph_conditional.cu - device-side setter of a CUDA graph conditional node + the
// pyops_graph_set_conditional C ABI (pyops/graph_conditional.h). Spec: pyops/graphs.py.
// Torch-free.
#include <cuda_runtime.h>

#include "pyops/graph_conditional.h"

namespace {

__global__ void set_conditional_kernel(cudaGraphConditionalHandle handle, const int32_t* flag,
                                       int64_t index, int invert) {
  const unsigned int v = (flag[index] != 0) ? 1u : 0u;
  cudaGraphSetConditional(handle, invert ? (v ^ 1u) : v);
}

}  // namespace

extern "C" cudaError_t pyops_graph_set_conditional(const pyops_graph_set_conditional_params* p,
                                                   cudaStream_t stream) {
  if (p == nullptr || p->flag == nullptr || p->index < 0) return cudaErrorInvalidValue;
  set_conditional_kernel<<<1, 1, 0, stream>>>(static_cast<cudaGraphConditionalHandle>(p->handle),
                                              p->flag, p->index, p->invert);
  return cudaGetLastError();
}

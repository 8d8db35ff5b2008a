// pyops graph_conditional: C ABI of the device-side setter of a CUDA graph conditional node
// (torch-free). Spec: pyops/graphs.py.
//
// Launches one thread that calls cudaGraphSetConditional(handle, value) with
//   value = (flag[index] != 0) XOR invert
// so a CUDA IF node created with that handle runs its body when value is 1. The kernel must be
// captured into the same graph as the handle (CUDA >= 12.4 device API).
#ifndef PYOPS_GRAPH_CONDITIONAL_H_
#define PYOPS_GRAPH_CONDITIONAL_H_

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// handle: a cudaGraphConditionalHandle (unsigned long long) as an integer.
// Returns cudaSuccess or the launch error; NULL flag or index < 0 gives cudaErrorInvalidValue.
int pyops_graph_set_conditional(uint64_t handle, const int32_t* flag, int64_t index, int invert,
                                cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif  // PYOPS_GRAPH_CONDITIONAL_H_

/*
 * pyops/graph_conditional.h - torch-free C ABI of the device-side setter of a CUDA graph
 * conditional node. Spec: pyops/graphs.py. Conventions: pyops/common.h.
 *
 * Launches one thread that calls cudaGraphSetConditional(handle, value) with
 *   value = (flag[index] != 0) XOR invert
 * so a CUDA IF node created with that handle runs its body when value is 1. The launch must be
 * captured into the same graph as the handle (CUDA >= 12.4 device API).
 */
#ifndef PYOPS_GRAPH_CONDITIONAL_H_
#define PYOPS_GRAPH_CONDITIONAL_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pyops_graph_set_conditional_params {
  uint64_t handle;       /* a cudaGraphConditionalHandle (unsigned long long) as an integer */
  const int32_t* flag;   /* device int32 array */
  int64_t index;         /* element of flag to read, >= 0 */
  int invert;            /* != 0: set the negation */
} pyops_graph_set_conditional_params;

/* cudaErrorInvalidValue without launching for a NULL p / flag or index < 0. */
cudaError_t pyops_graph_set_conditional(const pyops_graph_set_conditional_params* p,
                                        cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_GRAPH_CONDITIONAL_H_ */

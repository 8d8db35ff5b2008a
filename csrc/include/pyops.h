/*
 * pyops.h - umbrella header of libpyops, the torch-free C ABI of the pyops CUDA kernels.
 *
 * Plain C (C99) and C++. Every entry point has the form
 *     cudaError_t pyops_<op>(const pyops_<op>_params* p, cudaStream_t stream);
 * with its params struct in pyops/<op>.h; the shared dtype enum, conventions and
 * pyops_cuda_archs() are in pyops/common.h. Include this header or only the ops you use.
 */
#ifndef PYOPS_H_
#define PYOPS_H_

#include "pyops/common.h"
#include "pyops/quantize_fp8.h"
#include "pyops/quantize_nvfp4.h"
#include "pyops/norm_modulate_quant.h"
#include "pyops/gelu_quant.h"
#include "pyops/block_similarity.h"
#include "pyops/cache_apply.h"
#include "pyops/sample_step.h"
#include "pyops/graph_conditional.h"
#include "pyops/attention.h"
#include "pyops/weight_only_linear.h"

#endif /* PYOPS_H_ */

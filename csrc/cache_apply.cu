// cache_apply.cu - the predicated residual apply of the block cache + the pyops_cache_apply C
// ABI (pyops/cache_apply.h). Spec: pyops/reference/block_similarity.py (cache_apply). Torch-free.
//
// out = x + residual, the fp32 sum rounded once to out's dtype (RNE), in the rows of the groups
// that reuse; one CTA row per batch row, the row's elements strided over grid.y.
#include "pyops/cache_apply.h"

#include "common.cuh"

namespace pyops {
namespace {

__global__ void __launch_bounds__(kThreads) cache_apply_kernel(pyops_cache_apply_params p) {
  const int64_t row = blockIdx.x;
  if (p.reuse[row / (p.rows / p.groups)] == 0) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < p.row_len;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t k = row * p.row_len + i;
    store_float(p.out, p.out_dtype, k,
                add_rn(load_float(p.x, p.x_dtype, k), load_float(p.residual, p.residual_dtype, k)));
  }
}

}  // namespace
}  // namespace pyops

extern "C" cudaError_t pyops_cache_apply(const pyops_cache_apply_params* params,
                                         cudaStream_t stream) {
  using namespace pyops;
  if (params == nullptr) return cudaErrorInvalidValue;
  const pyops_cache_apply_params& p = *params;
  if (p.out == nullptr || p.x == nullptr || p.residual == nullptr || p.reuse == nullptr ||
      !valid_dtype(p.out_dtype) || !valid_dtype(p.x_dtype) || !valid_dtype(p.residual_dtype) ||
      p.rows <= 0 || p.row_len <= 0 || p.groups <= 0 || p.rows % p.groups != 0 ||
      p.rows > 0x7fffffff)
    return cudaErrorInvalidValue;
  int64_t by = cdiv(p.row_len, kThreads * 4);
  if (by > 65535) by = 65535;
  cache_apply_kernel<<<dim3(static_cast<unsigned>(p.rows), static_cast<unsigned>(by)), kThreads, 0,
                       stream>>>(p);
  return cudaGetLastError();
}

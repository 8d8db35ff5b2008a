// sample_step.cu - the fused few-step sampler update + the pyops_sample_step C ABI
// (pyops/sample_step.h). Spec: pyops/reference/sample_step.py (bit-exact). Torch-free.
//
// Element-wise, fp32, in the reference's order, each operation rounded on its own through the
// exact helpers of common.cuh (no FMA contraction, subnormals kept in any build):
//   p = c  |  p = u + g*(c - u);   y = a*x + b*p;   y = y + z*noise;   state, x_out <- y (RNE)
#include "pyops/sample_step.h"

#include "common.cuh"

namespace pyops {
namespace {

template <bool kCfg, bool kNoise, bool kOut>
__global__ void __launch_bounds__(kThreads) sample_step_kernel(pyops_sample_step_params p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += stride) {
    const float x = load_float(p.state, p.state_dtype, i);
    float pred = load_float(p.cond, p.cond_dtype, i);
    if (kCfg) {
      const float u = load_float(p.uncond, p.uncond_dtype, i);
      pred = add_rn(u, mul_rn(p.guidance, sub_rn(pred, u)));
    }
    float y = add_rn(mul_rn(p.alpha, x), mul_rn(p.beta, pred));
    if (kNoise) y = add_rn(y, mul_rn(p.zeta, load_float(p.noise, p.noise_dtype, i)));
    store_float(p.state, p.state_dtype, i, y);
    if (kOut) store_float(p.x_out, p.x_out_dtype, i, y);
  }
}

template <bool kCfg, bool kNoise>
void launch_out(const pyops_sample_step_params& p, int blocks, cudaStream_t stream) {
  if (p.x_out != nullptr)
    sample_step_kernel<kCfg, kNoise, true><<<blocks, kThreads, 0, stream>>>(p);
  else
    sample_step_kernel<kCfg, kNoise, false><<<blocks, kThreads, 0, stream>>>(p);
}

}  // namespace
}  // namespace pyops

extern "C" cudaError_t pyops_sample_step(const pyops_sample_step_params* params,
                                         cudaStream_t stream) {
  using namespace pyops;
  if (params == nullptr) return cudaErrorInvalidValue;
  const pyops_sample_step_params& p = *params;
  if (p.n < 0 || p.state == nullptr || p.cond == nullptr) return cudaErrorInvalidValue;
  if (!valid_dtype(p.state_dtype) || !valid_dtype(p.cond_dtype) ||
      (p.x_out != nullptr && !valid_dtype(p.x_out_dtype)) ||
      (p.uncond != nullptr && !valid_dtype(p.uncond_dtype)) ||
      (p.noise != nullptr && !valid_dtype(p.noise_dtype)))
    return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  // 4 elements per thread on average; the grid-stride loop covers any n with int64 indices.
  const int64_t want = cdiv(p.n, 4 * kThreads);
  const int blocks = static_cast<int>(want < 65535 * 16 ? want : 65535 * 16);
  const bool cfg = p.uncond != nullptr, noise = p.noise != nullptr;
  if (cfg && noise) launch_out<true, true>(p, blocks, stream);
  else if (cfg) launch_out<true, false>(p, blocks, stream);
  else if (noise) launch_out<false, true>(p, blocks, stream);
  else launch_out<false, false>(p, blocks, stream);
  return cudaGetLastError();
}

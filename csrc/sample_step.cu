// sample_step.cu - the fused few-step sampler update + the pyops_sample_step C ABI
// (pyops/sample_step.h). Spec: pyops/reference/sample_step.py (bit-exact). Torch-free.
//
// Element-wise, fp32, in the reference's order, each operation rounded on its own through the
// exact helpers of common.cuh (no FMA contraction, subnormals kept in any build):
//   p = c  |  p = u + g*(c - u);   y = a*x + b*p;   y = y + z*noise;   state, x_out <- y (RNE)
//
// Two kernels (memory-bound; the design of issue #11):
//  - step_vec_kernel: the buffers' dtypes are template parameters, for the combinations a
//    sampler uses (all fp32 / all fp16 / all bf16, and fp32 state + fp32 noise with fp16 or
//    bf16 cond/uncond/x_out; see pyops_sample_step below). Each thread takes units of 8
//    consecutive elements (16-byte loads/stores: one per fp16/bf16 buffer, two per fp32 one),
//    two units per grid-stride step when only state and cond are read, with the loads of both in
//    flight before any math; a grid of kCtasPerSm CTAs per SM. Every buffer's runs of 8 must be
//    aligned to their size (16 bytes, 32 for fp32) from one common element h < 8 on (h = 0 for
//    fresh tensors, 7 for tensor[1:] views of fresh buffers): elements [0, h) are a scalar head,
//    the last < 8 elements a scalar tail.
//  - step_any_kernel: any other dtype combination, or buffers without a common alignment; one
//    element per thread per grid-stride step, each buffer's dtype read at run time.
// Indices are int64 everywhere, so n > 2^31 works. In place: every element is read (state, and
// cond/uncond/noise, which may be state or x_out exactly) before the same thread writes it, and
// no thread reads an element another thread writes.
#include "pyops/sample_step.h"

#include "common.cuh"

namespace pyops {
namespace {

constexpr int kUnit = 8;      // elements per unit (16 bytes of fp16/bf16, 32 of fp32)
constexpr int kCtasPerSm = 4;  // the grid, and __launch_bounds__' budget: <= 64 registers

// One element of the step, in the reference's order.
template <bool kCfg, bool kNoise>
__device__ __forceinline__ float step_value(const pyops_sample_step_params& p, float x, float c,
                                            float u, float z) {
  float pred = c;
  if (kCfg) pred = add_rn(u, mul_rn(p.guidance, sub_rn(c, u)));
  float y = add_rn(mul_rn(p.alpha, x), mul_rn(p.beta, pred));
  if (kNoise) y = add_rn(y, mul_rn(p.zeta, z));
  return y;
}

// Elements [k0, end) (end - k0 <= 8) of every buffer, one by one: the head and the tail.
// S state, C cond and uncond, Z noise, O x_out.
template <typename S, typename C, typename Z, typename O, bool kCfg, bool kNoise, bool kOut>
__device__ __forceinline__ void step_part(const pyops_sample_step_params& p, int64_t k0,
                                          int64_t end) {
  float x[kUnit], c[kUnit], u[kUnit], z[kUnit], y[kUnit];
  load_floats<S, kUnit>(p.state, 0, k0, end, false, x);
  load_floats<C, kUnit>(p.cond, 0, k0, end, false, c);
  if (kCfg) load_floats<C, kUnit>(p.uncond, 0, k0, end, false, u);
  if (kNoise) load_floats<Z, kUnit>(p.noise, 0, k0, end, false, z);
#pragma unroll
  for (int j = 0; j < kUnit; ++j) y[j] = step_value<kCfg, kNoise>(p, x[j], c[j], u[j], z[j]);
  store_floats<S, kUnit>(p.state, 0, k0, end, false, y);
  if (kOut) store_floats<O, kUnit>(p.x_out, 0, k0, end, false, y);
}

// Every buffer's runs of 8 are aligned from element `head` (< 8) on: elements [0, head) are the
// scalar head, then whole units of 8 with vector accesses, then a scalar tail of < 8 elements.
template <typename S, typename C, typename Z, typename O, bool kCfg, bool kNoise, bool kOut>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    step_vec_kernel(const pyops_sample_step_params p, int64_t head) {
  // Units per thread per step: 2 while two buffers are read, else 1 (<= 32 floats in flight
  // per thread).
  constexpr int kU = (kCfg || kNoise) ? 1 : 2;
  const int64_t n = p.n;
  const int64_t units = (n - head) / kUnit;
  if (blockIdx.x == 0 && threadIdx.x == 0 && head > 0)
    step_part<S, C, Z, O, kCfg, kNoise, kOut>(p, 0, head);
  if (blockIdx.x == 0 && threadIdx.x == 32 && head + units * kUnit < n)
    step_part<S, C, Z, O, kCfg, kNoise, kOut>(p, head + units * kUnit, n);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
#pragma unroll 1  // (unrolled, sm_100a's register use doubles and spills)
  for (int64_t u0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u0 < units;
       u0 += kU * stride) {
    // The loads of all kU units first (in flight together), then math and stores.
    float x[kU][kUnit], c[kU][kUnit], u[kU][kUnit], z[kU][kUnit];
#pragma unroll
    for (int t = 0; t < kU; ++t) {
      const int64_t k0 = head + (u0 + t * stride) * kUnit;
      if (u0 + t * stride < units) {
        load_floats<S, kUnit>(p.state, 0, k0, k0 + kUnit, true, x[t]);
        load_floats<C, kUnit>(p.cond, 0, k0, k0 + kUnit, true, c[t]);
        if (kCfg) load_floats<C, kUnit>(p.uncond, 0, k0, k0 + kUnit, true, u[t]);
        if (kNoise) load_floats<Z, kUnit>(p.noise, 0, k0, k0 + kUnit, true, z[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < kU; ++t) {
      const int64_t k0 = head + (u0 + t * stride) * kUnit;
      if (u0 + t * stride < units) {
        float y[kUnit];
#pragma unroll
        for (int j = 0; j < kUnit; ++j)
          y[j] = step_value<kCfg, kNoise>(p, x[t][j], c[t][j], u[t][j], z[t][j]);
        store_floats<S, kUnit>(p.state, 0, k0, k0 + kUnit, true, y);
        if (kOut) store_floats<O, kUnit>(p.x_out, 0, k0, k0 + kUnit, true, y);
      }
    }
  }
}

// Any dtype combination: one element per thread per grid-stride step.
template <bool kCfg, bool kNoise, bool kOut>
__global__ void __launch_bounds__(kThreads) step_any_kernel(const pyops_sample_step_params p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += stride) {
    const float x = load_float(p.state, p.state_dtype, i);
    const float c = load_float(p.cond, p.cond_dtype, i);
    const float u = kCfg ? load_float(p.uncond, p.uncond_dtype, i) : 0.0f;
    const float z = kNoise ? load_float(p.noise, p.noise_dtype, i) : 0.0f;
    const float y = step_value<kCfg, kNoise>(p, x, c, u, z);
    store_float(p.state, p.state_dtype, i, y);
    if (kOut) store_float(p.x_out, p.x_out_dtype, i, y);
  }
}

// The smallest h in [0, 8) at which every given buffer's run of 8 elements is aligned to its size
// (16 bytes for fp16/bf16, 32 for fp32: load_floats' VEC contract), or -1.
// (A local helper: the same rule as cache_apply.cu's, see the report of issue #11.)
int step_head(const pyops_sample_step_params& p) {
  const void* ptr[5] = {p.state, p.cond, p.uncond, p.noise, p.x_out};
  const pyops_dtype_t dt[5] = {p.state_dtype, p.cond_dtype, p.uncond_dtype, p.noise_dtype,
                               p.x_out_dtype};
  for (int h = 0; h < kUnit; ++h) {
    bool ok = true;
    for (int b = 0; b < 5; ++b) {
      if (ptr[b] == nullptr) continue;
      const uintptr_t es = static_cast<uintptr_t>(elem_size(dt[b]));
      ok = ok && (reinterpret_cast<uintptr_t>(ptr[b]) + h * es) % (kUnit * es) == 0;
    }
    if (ok) return h;
  }
  return -1;
}

// The vectorized kernel for dtypes (S, C, Z, O) if the given buffers have them; false if not.
template <typename S, typename C, typename Z, typename O>
bool launch_vec(const pyops_sample_step_params& p, cudaStream_t stream, cudaError_t* err) {
  const bool cfg = p.uncond != nullptr, noise = p.noise != nullptr, out = p.x_out != nullptr;
  if (p.state_dtype != S::dtype || p.cond_dtype != C::dtype ||
      (cfg && p.uncond_dtype != C::dtype) || (noise && p.noise_dtype != Z::dtype) ||
      (out && p.x_out_dtype != O::dtype))
    return false;
  const int h = step_head(p);
  if (h < 0) return false;  // no common alignment: the generic kernel
  const int64_t head = h < p.n ? h : p.n;
  int grid = 0;
  *err = grid_for((p.n - head) / kUnit, kThreads, kCtasPerSm, &grid);
  if (*err != cudaSuccess) return true;
#define PYOPS_STEP_LAUNCH(CFG, NOISE, OUT)                                            \
  step_vec_kernel<S, C, Z, O, CFG, NOISE, OUT><<<grid, kThreads, 0, stream>>>(p, head)
  if (cfg && noise && out) PYOPS_STEP_LAUNCH(true, true, true);
  else if (cfg && noise) PYOPS_STEP_LAUNCH(true, true, false);
  else if (cfg && out) PYOPS_STEP_LAUNCH(true, false, true);
  else if (cfg) PYOPS_STEP_LAUNCH(true, false, false);
  else if (noise && out) PYOPS_STEP_LAUNCH(false, true, true);
  else if (noise) PYOPS_STEP_LAUNCH(false, true, false);
  else if (out) PYOPS_STEP_LAUNCH(false, false, true);
  else PYOPS_STEP_LAUNCH(false, false, false);
#undef PYOPS_STEP_LAUNCH
  *err = cudaGetLastError();
  return true;
}

cudaError_t launch_any(const pyops_sample_step_params& p, cudaStream_t stream) {
  int grid = 0;
  const cudaError_t e = grid_for(p.n, kThreads, 8, &grid);
  if (e != cudaSuccess) return e;
  const bool cfg = p.uncond != nullptr, noise = p.noise != nullptr, out = p.x_out != nullptr;
#define PYOPS_STEP_LAUNCH(CFG, NOISE, OUT) \
  step_any_kernel<CFG, NOISE, OUT><<<grid, kThreads, 0, stream>>>(p)
  if (cfg && noise && out) PYOPS_STEP_LAUNCH(true, true, true);
  else if (cfg && noise) PYOPS_STEP_LAUNCH(true, true, false);
  else if (cfg && out) PYOPS_STEP_LAUNCH(true, false, true);
  else if (cfg) PYOPS_STEP_LAUNCH(true, false, false);
  else if (noise && out) PYOPS_STEP_LAUNCH(false, true, true);
  else if (noise) PYOPS_STEP_LAUNCH(false, true, false);
  else if (out) PYOPS_STEP_LAUNCH(false, false, true);
  else PYOPS_STEP_LAUNCH(false, false, false);
#undef PYOPS_STEP_LAUNCH
  return cudaGetLastError();
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
  // The vectorized kernel for the dtype combinations of a sampler, the generic one otherwise.
  cudaError_t e = cudaSuccess;
  if (launch_vec<F32, F32, F32, F32>(p, stream, &e) ||
      launch_vec<BF16, BF16, BF16, BF16>(p, stream, &e) ||
      launch_vec<F16, F16, F16, F16>(p, stream, &e) ||
      launch_vec<F32, BF16, F32, BF16>(p, stream, &e) ||
      launch_vec<F32, F16, F32, F16>(p, stream, &e))
    return e;
  return launch_any(p, stream);
}

// cache_apply.cu - the predicated residual apply of the block cache + the pyops_cache_apply C
// ABI (pyops/cache_apply.h). Spec: pyops/reference/block_similarity.py (cache_apply). Torch-free.
//
// out = x + residual, the fp32 sum rounded once to out's dtype (RNE), in the rows of the groups
// that reuse; other rows are neither read nor written. The flags are read on the device (no host
// sync, graph-capturable).
//
// The buffers are seen flat: n = rows * row_len elements, group g = elements
// [g*G, (g+1)*G) with G = (rows / groups) * row_len. Two kernels (memory-bound; the design of
// issue #11):
//  - apply_vec_kernel: out, x and residual of one dtype (the block cache's case), a template
//    parameter, and groups of >= 8 elements. Units of 8 consecutive elements (one 16-byte access
//    per fp16/bf16 buffer, two per fp32 one), two units per thread per grid-stride step: first
//    the flags of both, then the loads of those that reuse, then math and stores; a grid of
//    kCtasPerSm CTAs per SM. The runs of 8 of all three buffers must be aligned to their size
//    (16 bytes, 32 for fp32) from one common element h < 8 on (h = 0 for fresh tensors, 7 for
//    tensor[1:] views of fresh buffers): elements [0, h) are a scalar head, the last < 8
//    elements a scalar tail. A unit whose group does not reuse is neither
//    read nor written; a unit across a group boundary (only when G % 8 != 0) is stored element
//    by element under each group's flag.
//  - apply_any_kernel: mixed dtypes, buffers without a common alignment, or groups of < 8
//    elements; one element per thread per grid-stride step, each buffer's dtype read at run time.
// Indices are int64 everywhere, so n > 2^31 works. out may be x or residual exactly: each element
// is read before the same thread writes it, and no thread reads an element another one writes.
#include "pyops/cache_apply.h"

#include "common.cuh"

namespace pyops {
namespace {

constexpr int kUnit = 8;   // elements per unit
constexpr int kU = 2;      // units per thread per grid-stride step
constexpr int kCtasPerSm = 4;  // the grid, and __launch_bounds__' budget: <= 64 registers

// Where elements [k0, k0 + len) (len <= 8 <= G) may be written: they lie in group g, or in g
// and g + 1 with the first nb of them in g. f0, f1: the two groups' flags (f1 = f0 in one group).
struct Span {
  bool f0, f1;
  int nb;
};

__device__ __forceinline__ Span apply_span(const pyops_cache_apply_params& p, int64_t G,
                                           int64_t k0, int len) {
  int64_t rem = k0, g = 0;
  if (p.groups != 1) g = divmod(k0, G, rem);
  Span s;
  s.f0 = __ldg(p.reuse + g) != 0;
  s.f1 = s.f0;
  s.nb = len;
  if (rem + len > G) {  // crosses into group g + 1
    s.nb = static_cast<int>(G - rem);
    s.f1 = __ldg(p.reuse + g + 1) != 0;
  }
  return s;
}

// out[k0 + j] <- y[j] for j < len where the element's group reuses; vec: a whole aligned
// unit (len == 8) in one reusing group is one vector store.
template <typename E>
__device__ __forceinline__ void apply_put(const pyops_cache_apply_params& p, int64_t k0,
                                          int len, bool vec, const Span& s,
                                          const float (&y)[kUnit]) {
  if (s.f0 && s.f1) {
    store_floats<E, kUnit>(p.out, 0, k0, k0 + len, vec, y);
    return;
  }
#pragma unroll
  for (int j = 0; j < kUnit; ++j)
    if (j < len && (j < s.nb ? s.f0 : s.f1)) store_float(p.out, E::dtype, k0 + j, y[j]);
}

// Elements [k0, end) (end - k0 < 8), scalar: the head and the tail.
template <typename E>
__device__ __forceinline__ void apply_part(const pyops_cache_apply_params& p, int64_t G,
                                           int64_t k0, int64_t end) {
  const int len = static_cast<int>(end - k0);
  const Span s = apply_span(p, G, k0, len);
  if (!s.f0 && !s.f1) return;
  float x[kUnit], r[kUnit], y[kUnit];
  load_floats<E, kUnit>(p.x, 0, k0, end, false, x);
  load_floats<E, kUnit>(p.residual, 0, k0, end, false, r);
#pragma unroll
  for (int j = 0; j < kUnit; ++j) y[j] = add_rn(x[j], r[j]);
  apply_put<E>(p, k0, len, false, s, y);
}

// Every buffer's runs of 8 are aligned from element `head` (< 8) on; G >= 8.
template <typename E>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    apply_vec_kernel(const pyops_cache_apply_params p, int64_t G, int64_t n, int64_t head) {
  const int64_t units = (n - head) / kUnit;
  if (blockIdx.x == 0 && threadIdx.x == 0 && head > 0) apply_part<E>(p, G, 0, head);
  if (blockIdx.x == 0 && threadIdx.x == 32 && head + units * kUnit < n)
    apply_part<E>(p, G, head + units * kUnit, n);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
#pragma unroll 1  // one step per iteration (as in sample_step.cu)
  for (int64_t u0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u0 < units;
       u0 += kU * stride) {
    // The flags of both units, then the loads of those that reuse, then math and stores.
    Span s[kU];
#pragma unroll
    for (int t = 0; t < kU; ++t) {
      s[t] = Span{false, false, kUnit};
      if (u0 + t * stride < units) s[t] = apply_span(p, G, head + (u0 + t * stride) * kUnit, kUnit);
    }
    float x[kU][kUnit], r[kU][kUnit];
#pragma unroll
    for (int t = 0; t < kU; ++t) {
      const int64_t k0 = head + (u0 + t * stride) * kUnit;
      if (s[t].f0 || s[t].f1) {
        load_floats<E, kUnit>(p.x, 0, k0, k0 + kUnit, true, x[t]);
        load_floats<E, kUnit>(p.residual, 0, k0, k0 + kUnit, true, r[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < kU; ++t) {
      const int64_t k0 = head + (u0 + t * stride) * kUnit;
      if (s[t].f0 || s[t].f1) {
        float y[kUnit];
#pragma unroll
        for (int j = 0; j < kUnit; ++j) y[j] = add_rn(x[t][j], r[t][j]);
        apply_put<E>(p, k0, kUnit, true, s[t], y);
      }
    }
  }
}

// Any dtypes and alignment: one element per thread per grid-stride step.
__global__ void __launch_bounds__(kThreads)
    apply_any_kernel(const pyops_cache_apply_params p, int64_t G, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    int64_t rem, g = 0;
    if (p.groups != 1) g = divmod(i, G, rem);
    if (__ldg(p.reuse + g) == 0) continue;
    store_float(p.out, p.out_dtype, i,
                add_rn(load_float(p.x, p.x_dtype, i), load_float(p.residual, p.residual_dtype, i)));
  }
}

// The smallest h in [0, 8) at which the runs of 8 elements of out, x and residual are aligned to
// their size (16 bytes for fp16/bf16, 32 for fp32: load_floats' VEC contract), or -1.
// (A local helper: the same rule as sample_step.cu's, see the report of issue #11.)
int apply_head(const pyops_cache_apply_params& p) {
  const void* ptr[3] = {p.out, p.x, p.residual};
  const pyops_dtype_t dt[3] = {p.out_dtype, p.x_dtype, p.residual_dtype};
  for (int h = 0; h < kUnit; ++h) {
    bool ok = true;
    for (int b = 0; b < 3; ++b) {
      const uintptr_t es = static_cast<uintptr_t>(elem_size(dt[b]));
      ok = ok && (reinterpret_cast<uintptr_t>(ptr[b]) + h * es) % (kUnit * es) == 0;
    }
    if (ok) return h;
  }
  return -1;
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
      p.rows > 0x7fffffff || p.row_len > INT64_MAX / p.rows)
    return cudaErrorInvalidValue;
  const int64_t n = p.rows * p.row_len;
  const int64_t G = (p.rows / p.groups) * p.row_len;  // elements per group
  const int h = apply_head(p);
  int grid = 0;
  cudaError_t e;
  if (p.out_dtype == p.x_dtype && p.x_dtype == p.residual_dtype && h >= 0 && G >= kUnit) {
    const int64_t head = h < n ? h : n;
    if ((e = grid_for((n - head) / kUnit, kThreads, kCtasPerSm, &grid)) != cudaSuccess) return e;
    return dispatch_dtype(p.out_dtype, [&](auto tag) -> cudaError_t {
      apply_vec_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(p, G, n, head);
      return cudaGetLastError();
    });
  }
  if ((e = grid_for(n, kThreads, 8, &grid)) != cudaSuccess) return e;
  apply_any_kernel<<<grid, kThreads, 0, stream>>>(p, G, n);
  return cudaGetLastError();
}

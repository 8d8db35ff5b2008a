// block_similarity.cu - the fused cache check + the pyops_block_similarity C ABI
// (pyops/block_similarity.h). Spec: pyops/reference/block_similarity.py. Torch-free.
// Three launches: partial sums, finalize (decision + state), ref write. Loads, |.|, sums and the
// division go through the exact helpers of common.cuh (IEEE RNE, subnormals kept in any build).
#include "pyops/block_similarity.h"

#include "common.cuh"

namespace pyops {
namespace {

constexpr int64_t kSplit = PYOPS_BLOCK_SIMILARITY_SPLIT;  // elements per stage-1 block

// Fixed-order block reduction of two values (tree over shared memory): deterministic.
__device__ __forceinline__ void block_sum2(float& x, float& y) {
  __shared__ float sx[kThreads], sy[kThreads];
  sx[threadIdx.x] = x;
  sy[threadIdx.x] = y;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      sx[threadIdx.x] = add_rn(sx[threadIdx.x], sx[threadIdx.x + s]);
      sy[threadIdx.x] = add_rn(sy[threadIdx.x], sy[threadIdx.x + s]);
    }
    __syncthreads();
  }
  x = sx[0];
  y = sy[0];
}

// grid (rows*chunks, splits)
__global__ void __launch_bounds__(kThreads) partials_kernel(pyops_block_similarity_params p,
                                                            int64_t splits) {
  const int64_t rc = blockIdx.x, sp = blockIdx.y;
  const int64_t row = rc / p.chunks, c = rc % p.chunks;
  const int64_t lc = p.row_len / p.chunks;
  const int64_t base = row * p.row_len + c * lc;
  const int64_t start = sp * kSplit;
  const int64_t stop = start + kSplit < lc ? start + kSplit : lc;
  float d = 0.f, n = 0.f;
  for (int64_t i = start + threadIdx.x; i < stop; i += kThreads) {
    const float a = load_float(p.a, p.dtype, base + i);
    const float b = load_float(p.ref, p.dtype, base + i);
    d = add_rn(d, abs_rn(sub_rn(a, b)));
    n = add_rn(n, abs_rn(b));
    if (p.write_ref == 2) copy_elem(p.ref, p.a, p.dtype, base + i);
  }
  block_sum2(d, n);
  if (threadIdx.x == 0) {
    p.workspace[(rc * splits + sp) * 2] = d;
    p.workspace[(rc * splits + sp) * 2 + 1] = n;
  }
}

// grid (chunks,), one block: every group of this chunk.
__global__ void __launch_bounds__(kThreads) finalize_kernel(pyops_block_similarity_params p,
                                                            int64_t splits) {
  const int c = blockIdx.x;
  const int64_t rpg = p.rows / p.groups;
  const int64_t n_part = rpg * splits;
  __shared__ int cand_all;
  if (threadIdx.x == 0) cand_all = 1;
  __syncthreads();
  for (int g = 0; g < p.groups; ++g) {
    float d = 0.f, n = 0.f;
    for (int64_t j = threadIdx.x; j < n_part; j += kThreads) {
      const int64_t row = g * rpg + j / splits, s = j % splits;
      const float* w = p.workspace + ((row * p.chunks + c) * splits + s) * 2;
      d = add_rn(d, w[0]);
      n = add_rn(n, w[1]);
    }
    block_sum2(d, n);
    if (threadIdx.x == 0) {
      const int cell = g * p.chunks + c;
      const float m = div_rn(d, max_nan(n, p.eps));  // d / n.clamp_min(eps)
      const float step = p.state[cell * 4], consec = p.state[cell * 4 + 1];
      const float acc = p.state[cell * 4 + 2];
      bool forced = step == 0.f || step < static_cast<float>(p.warmup);
      if (p.num_steps > 0 && step >= static_cast<float>(p.num_steps - p.last_steps)) forced = true;
      if (p.max_reuse >= 0 && consec >= static_cast<float>(p.max_reuse)) forced = true;
      const bool cand = p.rule == 0 ? (m < p.threshold) : (add_rn(acc, m) < p.threshold);
      const int r = (!forced && cand) ? 1 : 0;
      p.metric[cell] = m;
      p.reuse[cell] = r;
      cand_all &= r;
    }
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  for (int g = 0; g < p.groups; ++g) {
    const int cell = g * p.chunks + c;
    int r = p.reuse[cell];
    if (p.all_groups && p.groups > 1) r &= cand_all;
    const float m = p.metric[cell];
    float step = p.state[cell * 4], consec = p.state[cell * 4 + 1], acc = p.state[cell * 4 + 2];
    consec = r ? add_rn(consec, 1.f) : 0.f;
    acc = (p.rule == 1 && r) ? add_rn(acc, m) : 0.f;
    step = add_rn(step, 1.f);
    if (p.num_steps > 0 && step >= static_cast<float>(p.num_steps)) step = consec = acc = 0.f;
    p.state[cell * 4] = step;
    p.state[cell * 4 + 1] = consec;
    p.state[cell * 4 + 2] = acc;
    p.state[cell * 4 + 3] = m;
    p.reuse[cell] = r;
  }
}

// grid (rows*chunks, blocks): ref <- a in the cells that recompute.
__global__ void __launch_bounds__(kThreads) write_ref_kernel(pyops_block_similarity_params p) {
  const int64_t rc = blockIdx.x;
  const int64_t row = rc / p.chunks, c = rc % p.chunks;
  const int64_t rpg = p.rows / p.groups;
  if (p.reuse[(row / rpg) * p.chunks + c] != 0) return;
  const int64_t lc = p.row_len / p.chunks;
  const int64_t base = row * p.row_len + c * lc;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; i < lc;
       i += static_cast<int64_t>(gridDim.y) * kThreads)
    copy_elem(p.ref, p.a, p.dtype, base + i);
}

int64_t n_splits(int64_t row_len, int chunks) {
  const int64_t lc = row_len / chunks;
  return (lc + kSplit - 1) / kSplit;
}

}  // namespace
}  // namespace pyops

extern "C" int64_t pyops_block_similarity_workspace_size(const pyops_block_similarity_params* p) {
  if (p == nullptr || p->rows <= 0 || p->row_len <= 0 || p->chunks <= 0) return 0;
  return p->rows * p->chunks * pyops::n_splits(p->row_len, p->chunks) * 2;
}

extern "C" cudaError_t pyops_block_similarity(const pyops_block_similarity_params* params,
                                              cudaStream_t stream) {
  using namespace pyops;
  if (params == nullptr) return cudaErrorInvalidValue;
  const pyops_block_similarity_params& p = *params;
  if (p.a == nullptr || p.ref == nullptr || p.state == nullptr || p.metric == nullptr ||
      p.reuse == nullptr || p.workspace == nullptr || !valid_dtype(p.dtype) || p.rows <= 0 ||
      p.row_len <= 0 || p.chunks <= 0 || p.groups <= 0 || p.rows % p.groups != 0 ||
      p.row_len % p.chunks != 0 || p.rule < 0 || p.rule > 1 || p.write_ref < 0 ||
      p.write_ref > 2)
    return cudaErrorInvalidValue;
  const int64_t splits = n_splits(p.row_len, p.chunks);
  const int64_t rc = p.rows * p.chunks;
  if (rc > 0x7fffffff || splits > 65535) return cudaErrorInvalidValue;
  partials_kernel<<<dim3(static_cast<unsigned>(rc), static_cast<unsigned>(splits)), kThreads, 0,
                    stream>>>(p, splits);
  finalize_kernel<<<p.chunks, kThreads, 0, stream>>>(p, splits);
  if (p.write_ref == 1) {
    const int64_t lc = p.row_len / p.chunks;
    int64_t blocks = (lc + kThreads * 4 - 1) / (kThreads * 4);
    if (blocks > 65535) blocks = 65535;
    write_ref_kernel<<<dim3(static_cast<unsigned>(rc), static_cast<unsigned>(blocks)), kThreads, 0,
                       stream>>>(p);
  }
  return cudaGetLastError();
}

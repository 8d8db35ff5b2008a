// Fused cache check and predicated residual apply (spec: pyops/reference/block_similarity.py).
// Torch-free. Three launches for the check: partial sums, finalize (decision + state), ref write.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "pyops_block_similarity.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kSplit = 16384;  // elements per stage-1 block (same as the Triton kernel)

__device__ __forceinline__ float load_f32(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case PYOPS_BS_BFLOAT16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case PYOPS_BS_FLOAT16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_f32(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case PYOPS_BS_BFLOAT16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case PYOPS_BS_FLOAT16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

__device__ __forceinline__ void copy_elem(void* dst, const void* src, int dtype, int64_t i) {
  if (dtype == PYOPS_BS_FLOAT32)
    static_cast<uint32_t*>(dst)[i] = static_cast<const uint32_t*>(src)[i];
  else
    static_cast<uint16_t*>(dst)[i] = static_cast<const uint16_t*>(src)[i];
}

// Fixed-order block reduction of two values (tree over shared memory): deterministic.
__device__ __forceinline__ void block_sum2(float& x, float& y) {
  __shared__ float sx[kThreads], sy[kThreads];
  sx[threadIdx.x] = x;
  sy[threadIdx.x] = y;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      sx[threadIdx.x] += sx[threadIdx.x + s];
      sy[threadIdx.x] += sy[threadIdx.x + s];
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
    const float a = load_f32(p.a, p.dtype, base + i);
    const float b = load_f32(p.ref, p.dtype, base + i);
    d += fabsf(__fsub_rn(a, b));
    n += fabsf(b);
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
      d += w[0];
      n += w[1];
    }
    block_sum2(d, n);
    if (threadIdx.x == 0) {
      const int cell = g * p.chunks + c;
      const float m = __fdiv_rn(d, fmaxf(n, p.eps));
      const float step = p.state[cell * 4], consec = p.state[cell * 4 + 1];
      const float acc = p.state[cell * 4 + 2];
      bool forced = step == 0.f || step < static_cast<float>(p.warmup);
      if (p.num_steps > 0 && step >= static_cast<float>(p.num_steps - p.last_steps)) forced = true;
      if (p.max_reuse >= 0 && consec >= static_cast<float>(p.max_reuse)) forced = true;
      const bool cand = p.rule == 0 ? (m < p.threshold) : (__fadd_rn(acc, m) < p.threshold);
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
    consec = r ? consec + 1.f : 0.f;
    acc = (p.rule == 1 && r) ? __fadd_rn(acc, m) : 0.f;
    step = step + 1.f;
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

__global__ void __launch_bounds__(kThreads) cache_apply_kernel(pyops_cache_apply_params p) {
  const int64_t row = blockIdx.x;
  if (p.reuse[row / (p.rows / p.groups)] == 0) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < p.row_len;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t k = row * p.row_len + i;
    store_f32(p.out, p.out_dtype, k,
              __fadd_rn(load_f32(p.x, p.x_dtype, k), load_f32(p.residual, p.residual_dtype, k)));
  }
}

bool valid_dtype(int d) {
  return d == PYOPS_BS_FLOAT32 || d == PYOPS_BS_BFLOAT16 || d == PYOPS_BS_FLOAT16;
}

int64_t n_splits(int64_t row_len, int chunks) {
  const int64_t lc = row_len / chunks;
  return (lc + kSplit - 1) / kSplit;
}

}  // namespace

extern "C" int64_t pyops_block_similarity_workspace(int64_t rows, int64_t row_len, int chunks) {
  if (rows <= 0 || row_len <= 0 || chunks <= 0) return 0;
  return rows * chunks * n_splits(row_len, chunks) * 2;
}

extern "C" int pyops_block_similarity(const pyops_block_similarity_params* params,
                                      cudaStream_t stream) {
  if (params == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const pyops_block_similarity_params& p = *params;
  if (p.a == nullptr || p.ref == nullptr || p.state == nullptr || p.metric == nullptr ||
      p.reuse == nullptr || p.workspace == nullptr || !valid_dtype(p.dtype) || p.rows <= 0 ||
      p.row_len <= 0 || p.chunks <= 0 || p.groups <= 0 || p.rows % p.groups != 0 ||
      p.row_len % p.chunks != 0 || p.rule < 0 || p.rule > 1 || p.write_ref < 0 ||
      p.write_ref > 2)
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t splits = n_splits(p.row_len, p.chunks);
  const int64_t rc = p.rows * p.chunks;
  if (rc > 0x7fffffff || splits > 65535) return static_cast<int>(cudaErrorInvalidValue);
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
  return static_cast<int>(cudaGetLastError());
}

extern "C" int pyops_cache_apply(const pyops_cache_apply_params* params, cudaStream_t stream) {
  if (params == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const pyops_cache_apply_params& p = *params;
  if (p.out == nullptr || p.x == nullptr || p.residual == nullptr || p.reuse == nullptr ||
      !valid_dtype(p.out_dtype) || !valid_dtype(p.x_dtype) || !valid_dtype(p.residual_dtype) ||
      p.rows <= 0 || p.row_len <= 0 || p.groups <= 0 || p.rows % p.groups != 0 ||
      p.rows > 0x7fffffff)
    return static_cast<int>(cudaErrorInvalidValue);
  int64_t by = (p.row_len + kThreads * 4 - 1) / (kThreads * 4);
  if (by > 65535) by = 65535;
  cache_apply_kernel<<<dim3(static_cast<unsigned>(p.rows), static_cast<unsigned>(by)), kThreads, 0,
                       stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

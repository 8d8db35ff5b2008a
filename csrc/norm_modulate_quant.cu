// norm_modulate_quant.cu - fused LayerNorm/RMSNorm + adaLN modulate + per-token FP8 e4m3
// quantization, and the pyops_norm_modulate_quant C ABI. Torch-free.
// Spec: pyops/reference/norm_modulate_quant.py (ABI: pyops/norm_modulate_quant.h).
//
// nmq_warp_kernel (aligned rows, D % V == 0, D <= 1536 chunks): 1-8 warps per row, the row in
// registers as fp32 from the single load to the codes. Otherwise nmq_kernel:
// one CTA per row (grid-stride over rows). Each thread keeps up to kR 16-byte chunks of the row
// in registers as fp32 (rows longer than kR * blockDim chunks stream the rest, re-read from L2):
//   sum -> block reduce -> mean; sum (x-mean)^2 -> block reduce -> rstd     (warp shuffles)
//   y = ((x - mean) * rstd * w + b) * (1 + scale) + shift   in registers, amax -> block reduce
//   q = e4m3(clamp(y / s)) stored V bytes at a time; y optionally stored (fp32/fp16/bf16, RNE)
// All element math uses explicit _rn intrinsics (no FMA contraction), so y equals the reference
// up to the order of the two row sums, and a chunk recomputed for the streamed part gives the
// same bits as the first time.
#include "pyops/norm_modulate_quant.h"

#include "common.cuh"

namespace pyops {
namespace {

constexpr int kR = 4;             // chunks per thread held in registers
constexpr int kMaxThreads = 512;  // 128 registers per thread: the row stays in registers

struct NmqArgs {
  pyops_norm_modulate_quant_params p;
  bool pvec;  // 16-byte aligned parameter rows: vector loads
  bool ovec;  // D % V == 0 and aligned outputs: vector stores
};

__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = add_rn(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  float r = 0.0f;
  // same order in every thread: one value per CTA
  for (int i = 0; i < nw; ++i) r = add_rn(r, red[i]);
  __syncthreads();
  return r;
}

// v (x as fp32) -> y, for the chunk at k0 of a row with modulation row mr.
template <typename P, int V>
__device__ __forceinline__ void norm_modulate(float (&v)[V], const NmqArgs& a, int64_t k0,
                                              int64_t mr, float mean, float rstd) {
  const pyops_norm_modulate_quant_params& p = a.p;
  const bool rms = p.norm == PYOPS_NORM_RMS;
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = mul_rn(rms ? v[j] : sub_rn(v[j], mean), rstd);
  float t[V];
  if (p.weight != nullptr) {
    load_floats<P, V>(p.weight, 0, k0, p.D, a.pvec, t);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = mul_rn(v[j], t[j]);
  }
  if (p.bias != nullptr) {
    load_floats<P, V>(p.bias, 0, k0, p.D, a.pvec, t);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = add_rn(v[j], t[j]);
  }
  if (p.scale != nullptr) {
    load_floats<P, V>(p.scale, mr * p.scale_stride, k0, p.D, a.pvec, t);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = mul_rn(v[j], add_rn(1.0f, t[j]));
  }
  if (p.shift != nullptr) {
    load_floats<P, V>(p.shift, mr * p.shift_stride, k0, p.D, a.pvec, t);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = add_rn(v[j], t[j]);
  }
}

// amax bits of the chunk's valid elements.
template <int V>
__device__ __forceinline__ uint32_t chunk_amax(const float (&v)[V], int64_t k0, int64_t D) {
  uint32_t mx = 0;
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (k0 + j < D) mx = umax(mx, abs_bits(v[j]));
  return mx;
}

// Codes of the chunk (zero if bad) into q row m, and y (rounded to y_dtype) if requested.
template <int V>
__device__ __forceinline__ void store_chunk(const NmqArgs& a, int64_t m, int64_t k0,
                                            const float (&v)[V], const ScaleDiv& div,
                                            bool bad) {
  const pyops_norm_modulate_quant_params& p = a.p;
  const int64_t D = p.D;
  uint32_t w[V / 4];
  fp8_codes<V>(v, div, bad, w);
  store_codes<V>(p.q + m * D, k0, D, a.ovec, w);
  if (p.y == nullptr) return;
  switch (p.y_dtype) {
    case PYOPS_DTYPE_BF16: store_floats<BF16, V>(p.y, m * D, k0, D, a.ovec, v); break;
    case PYOPS_DTYPE_F16: store_floats<F16, V>(p.y, m * D, k0, D, a.ovec, v); break;
    default: store_floats<F32, V>(p.y, m * D, k0, D, a.ovec, v); break;
  }
}

template <typename E, typename P, bool VEC>
__global__ void __launch_bounds__(kMaxThreads) nmq_kernel(const NmqArgs a) {
  constexpr int V = E::V;
  __shared__ float fred[32];
  __shared__ uint32_t ured[32];
  const pyops_norm_modulate_quant_params& p = a.p;
  const InView in{p.x, p.M, p.D, p.stride_m, p.stride_d};
  const int64_t D = p.D;
  const int64_t nc = (D + V - 1) / V;
  const int T = blockDim.x;
  const int64_t tail0 = threadIdx.x + static_cast<int64_t>(kR) * T;  // first streamed chunk
  const float d_f = static_cast<float>(D);
  const bool rms = p.norm == PYOPS_NORM_RMS;
  for (int64_t m = blockIdx.x; m < p.M; m += gridDim.x) {  // block-uniform
    float v[kR][V];
#pragma unroll
    for (int i = 0; i < kR; ++i) {
      const int64_t kc = threadIdx.x + static_cast<int64_t>(i) * T;
      uint4 c = make_uint4(0u, 0u, 0u, 0u);
      if (kc < nc) c = load_chunk<E, VEC>(in, m, kc * V);
      chunk_to_float<E>(c, v[i]);  // past D: zeros
    }
    // pass 1: sum (LayerNorm) or sum of squares (RMSNorm)
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kR; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) s = add_rn(s, rms ? mul_rn(v[i][j], v[i][j]) : v[i][j]);
    for (int64_t kc = tail0; kc < nc; kc += T) {
      float f[V];
      chunk_to_float<E>(load_chunk<E, VEC>(in, m, kc * V), f);
#pragma unroll
      for (int j = 0; j < V; ++j) s = add_rn(s, rms ? mul_rn(f[j], f[j]) : f[j]);
    }
    s = block_sum(s, fred);
    float mean = 0.0f, rstd;
    if (rms) {
      rstd = rsqrt_rn(add_rn(div_rn(s, d_f), p.eps));
    } else {
      mean = div_rn(s, d_f);
      float s2 = 0.0f;
#pragma unroll
      for (int i = 0; i < kR; ++i) {
        const int64_t k0 = (threadIdx.x + static_cast<int64_t>(i) * T) * V;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = k0 + j < D ? sub_rn(v[i][j], mean) : 0.0f;
          s2 = add_rn(s2, mul_rn(d, d));
        }
      }
      for (int64_t kc = tail0; kc < nc; kc += T) {
        float f[V];
        chunk_to_float<E>(load_chunk<E, VEC>(in, m, kc * V), f);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = kc * V + j < D ? sub_rn(f[j], mean) : 0.0f;
          s2 = add_rn(s2, mul_rn(d, d));
        }
      }
      s2 = block_sum(s2, fred);
      rstd = rsqrt_rn(add_rn(div_rn(s2, d_f), p.eps));
    }
    // pass 2: y and its amax
    const int64_t mr = m / p.rows_per_mod;
    uint32_t mx = 0;
#pragma unroll
    for (int i = 0; i < kR; ++i) {
      const int64_t kc = threadIdx.x + static_cast<int64_t>(i) * T;
      if (kc < nc) {
        norm_modulate<P, V>(v[i], a, kc * V, mr, mean, rstd);
        mx = umax(mx, chunk_amax<V>(v[i], kc * V, D));
      }
    }
    for (int64_t kc = tail0; kc < nc; kc += T) {
      float f[V];
      chunk_to_float<E>(load_chunk<E, VEC>(in, m, kc * V), f);
      norm_modulate<P, V>(f, a, kc * V, mr, mean, rstd);
      mx = umax(mx, chunk_amax<V>(f, kc * V, D));
    }
    mx = block_max(mx, ured);
    const bool bad = mx >= kInfBits;
    const float sc = fp8_scale(mx);
    if (threadIdx.x == 0) p.q_scale[m] = sc;
    const ScaleDiv div(sc);
    // pass 3: codes (and y)
#pragma unroll
    for (int i = 0; i < kR; ++i) {
      const int64_t kc = threadIdx.x + static_cast<int64_t>(i) * T;
      if (kc < nc) store_chunk<V>(a, m, kc * V, v[i], div, bad);
    }
    for (int64_t kc = tail0; kc < nc; kc += T) {
      float f[V];
      chunk_to_float<E>(load_chunk<E, VEC>(in, m, kc * V), f);
      norm_modulate<P, V>(f, a, kc * V, mr, mean, rstd);  // same operations: same y
      store_chunk<V>(a, m, kc * V, f, div, bad);
    }
  }
}

// The common case -- 16-byte aligned rows with D % V == 0, aligned parameters and outputs, rows
// up to 8 * 32 * kWCPL chunks (D <= 12288 in bf16) -- on `wpr` warps per row (1 to 8; rows of a
// CTA run side by side): each lane loads all of its <= kWCPL chunks of the row at once and keeps
// them as fp32 in registers through the row sums, the modulation (y stays in registers) and the
// codes, so x is read once and q (and y) written once. Row sums: warp shuffles, then one
// shared-memory step across the row's warps.
constexpr int kWCPL = 6;
constexpr int kWThreads = 256;

// Sum over the `wpr` warps of a row (every thread of the CTA calls; wpr uniform).
__device__ __forceinline__ float row_sum(float v, float* red, int wpr) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = add_rn(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  if (wpr == 1) return v;
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) red[warp] = v;
  __syncthreads();
  const int w0 = warp - warp % wpr;
  float r = 0.0f;
  for (int i = 0; i < wpr; ++i) r = add_rn(r, red[w0 + i]);  // same order in the row's threads
  __syncthreads();
  return r;
}


template <typename E, typename P>
__global__ void __launch_bounds__(kWThreads) nmq_warp_kernel(const NmqArgs a, int wpr) {
  constexpr int V = E::V;
  using S = typename E::storage;
  __shared__ float fred[kWThreads / 32];
  __shared__ uint32_t ured[kWThreads / 32];
  const pyops_norm_modulate_quant_params& p = a.p;
  const int warp = threadIdx.x >> 5;
  const int rpc = (kWThreads / 32) / wpr;
  const int rloc = warp / wpr;
  const int tpr = wpr * 32;
  const int t = (warp % wpr) * 32 + (threadIdx.x & 31);
  const int64_t D = p.D;
  const int nc = static_cast<int>(D / V);
  const float d_f = static_cast<float>(D);
  const bool rms = p.norm == PYOPS_NORM_RMS;
  for (int64_t rb = static_cast<int64_t>(blockIdx.x) * rpc; rb < p.M;
       rb += static_cast<int64_t>(gridDim.x) * rpc) {  // block-uniform
    const int64_t m = rb + rloc;
    const bool valid = m < p.M;
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const S*>(p.x) +
                                                      (valid ? m : 0) * p.stride_m);
    float v[kWCPL][V];
    {
      uint4 c[kWCPL];
#pragma unroll
      for (int i = 0; i < kWCPL; ++i) {
        const int kc = t + i * tpr;
        c[i] = (valid && kc < nc) ? __ldg(src + kc) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int i = 0; i < kWCPL; ++i) chunk_to_float<E>(c[i], v[i]);  // past D: zeros
    }
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kWCPL; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) s = add_rn(s, rms ? mul_rn(v[i][j], v[i][j]) : v[i][j]);
    s = row_sum(s, fred, wpr);
    float mean = 0.0f, rstd;
    if (rms) {
      rstd = rsqrt_rn(add_rn(div_rn(s, d_f), p.eps));
    } else {
      mean = div_rn(s, d_f);
      float s2 = 0.0f;
#pragma unroll
      for (int i = 0; i < kWCPL; ++i) {
        const bool in = t + i * tpr < nc;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = in ? sub_rn(v[i][j], mean) : 0.0f;
          s2 = add_rn(s2, mul_rn(d, d));
        }
      }
      s2 = row_sum(s2, fred, wpr);
      rstd = rsqrt_rn(add_rn(div_rn(s2, d_f), p.eps));
    }
    const int64_t mr = (valid ? m : 0) / p.rows_per_mod;
    uint32_t mx = 0;
#pragma unroll
    for (int i = 0; i < kWCPL; ++i) {
      const int kc = t + i * tpr;
      if (valid && kc < nc) {
        norm_modulate<P, V>(v[i], a, static_cast<int64_t>(kc) * V, mr, mean, rstd);
#pragma unroll
        for (int j = 0; j < V; ++j) mx = umax(mx, abs_bits(v[i][j]));
      }
    }
    mx = row_max(mx, ured, wpr);
    if (!valid) continue;
    const bool bad = mx >= kInfBits;
    const float sc = fp8_scale(mx);
    if (t == 0) p.q_scale[m] = sc;
    const ScaleDiv div(sc);
#pragma unroll
    for (int i = 0; i < kWCPL; ++i) {
      const int kc = t + i * tpr;
      if (kc < nc) store_chunk<V>(a, m, static_cast<int64_t>(kc) * V, v[i], div, bad);
    }
  }
}

// Warps per row for nmq_warp_kernel (1, 2, 4 or 8), or 0 when the row does not fit.
inline int nmq_row_warps(int64_t nc) {
  for (int w = 1; w <= 8; w *= 2)
    if (nc <= static_cast<int64_t>(w) * 32 * kWCPL) return w;
  return 0;
}



template <typename E, typename P>
cudaError_t launch_nmq(const pyops_norm_modulate_quant_params& p, cudaStream_t stream) {
  constexpr int V = E::V;
  const int64_t psize = elem_size(p.param_dtype);
  NmqArgs a{p, true, false};
  for (const void* t : {p.weight, p.bias, p.shift, p.scale})
    if (t != nullptr && !aligned16(t)) a.pvec = false;
  if (p.shift != nullptr && (p.shift_stride * psize) % 16 != 0) a.pvec = false;
  if (p.scale != nullptr && (p.scale_stride * psize) % 16 != 0) a.pvec = false;
  a.ovec = p.D % V == 0 && aligned16(p.q) && (p.y == nullptr || aligned16(p.y));
  const InView in{p.x, p.M, p.D, p.stride_m, p.stride_d};
  const bool vec = vec_ok(in, elem_size(p.x_dtype));
  const int64_t nc = cdiv(p.D, V);
  const int wpr = nmq_row_warps(nc);
  if (vec && a.pvec && a.ovec && wpr > 0) {  // a.ovec implies D % V == 0
    int grid = 0;  // one CTA per rpc rows, at most 16 per SM
    const cudaError_t e = grid_for(p.M, (kWThreads / 32) / wpr, 16, &grid);
    if (e != cudaSuccess) return e;
    nmq_warp_kernel<E, P><<<grid, kWThreads, 0, stream>>>(a, wpr);
    return cudaGetLastError();
  }
  int64_t threads = cdiv(cdiv(nc, kR), 32) * 32;
  threads = threads < 64 ? 64 : (threads > kMaxThreads ? kMaxThreads : threads);
  // one CTA per row, as many as fill every SM four times over at full occupancy
  int grid = 0;
  const cudaError_t e = grid_for(p.M, 1, 4 * (2048 / static_cast<int>(threads)), &grid);
  if (e != cudaSuccess) return e;
  if (vec)
    nmq_kernel<E, P, true><<<grid, static_cast<int>(threads), 0, stream>>>(a);
  else
    nmq_kernel<E, P, false><<<grid, static_cast<int>(threads), 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace pyops

extern "C" cudaError_t pyops_norm_modulate_quant(const pyops_norm_modulate_quant_params* params,
                                                 cudaStream_t stream) {
  using namespace pyops;
  if (params == nullptr) return cudaErrorInvalidValue;
  const pyops_norm_modulate_quant_params& p = *params;
  if (p.M < 0 || p.D < 0 || p.stride_m < 0 || p.stride_d < 0 || !valid_dtype(p.x_dtype) ||
      !valid_dtype(p.param_dtype) || (p.y != nullptr && !valid_dtype(p.y_dtype)) ||
      (p.norm != PYOPS_NORM_LAYER && p.norm != PYOPS_NORM_RMS) || p.rows_per_mod < 1 ||
      p.shift_stride < 0 || p.scale_stride < 0 || !(p.eps >= 0.0f))
    return cudaErrorInvalidValue;
  if (p.M == 0 || p.D == 0) return cudaSuccess;
  if (p.x == nullptr || p.q == nullptr || p.q_scale == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(p.x_dtype, [&](auto xtag) -> cudaError_t {
    using E = decltype(xtag);
    return dispatch_dtype(p.param_dtype, [&](auto ptag) -> cudaError_t {
      using P = decltype(ptag);
      return launch_nmq<E, P>(p, stream);
    });
  });
}

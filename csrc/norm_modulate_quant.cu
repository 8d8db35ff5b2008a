// norm_modulate_quant.cu - fused LayerNorm/RMSNorm + adaLN modulate + per-token FP8 e4m3
// quantization, and the pyops_norm_modulate_quant C ABI. Torch-free.
// Spec: pyops/reference/norm_modulate_quant.py (ABI: pyops_norm_modulate_quant.h).
//
// One CTA per row (grid-stride over rows). Each thread keeps up to kR 16-byte chunks of the row
// in registers as fp32 (rows longer than kR * blockDim chunks stream the rest, re-read from L2):
//   sum -> block reduce -> mean; sum (x-mean)^2 -> block reduce -> rstd     (warp shuffles)
//   y = ((x - mean) * rstd * w + b) * (1 + scale) + shift   in registers, amax -> block reduce
//   q = e4m3(clamp(y / s)) stored V bytes at a time; y optionally stored (fp32/fp16/bf16, RNE)
// All element math uses explicit _rn intrinsics (no FMA contraction), so y equals the reference
// up to the order of the two row sums, and a chunk recomputed for the streamed part gives the
// same bits as the first time.
#include "pyops_norm_modulate_quant.h"

#include <cuda_bf16.h>

#include "common.cuh"

namespace pyops {
namespace {

constexpr float kNmqFp8Max = 448.0f;
constexpr int kR = 4;             // chunks per thread held in registers
constexpr int kMaxThreads = 512;  // 128 registers per thread: the row stays in registers

struct NmqArgs {
  pyops_norm_modulate_quant_params p;
  bool pvec;  // 16-byte aligned parameter rows: vector loads
  bool ovec;  // D % V == 0 and aligned outputs: vector stores
};

__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  float r = 0.0f;
  for (int i = 0; i < nw; ++i) r += red[i];  // same order in every thread: one value per CTA
  __syncthreads();
  return r;
}

__device__ __forceinline__ float nmq_scale(uint32_t mx) {
  if (mx >= kInfBits) return __uint_as_float(kNanBits);
  return fmaxf(div_rn(__uint_as_float(mx), kNmqFp8Max), kFltMin);
}

__device__ __forceinline__ float rsqrt_rn(float v) { return div_rn(1.0f, sqrt_rn(v)); }

// V parameter elements d = k0 .. k0+V-1 of the row at `base + off` as fp32 (0 past D).
template <typename P, int V>
__device__ __forceinline__ void load_params(const void* base, int64_t off, int64_t k0, int64_t D,
                                            bool vec, float (&f)[V]) {
  using S = typename P::storage;
  const S* ptr = static_cast<const S*>(base) + off + k0;
  constexpr int kBytes = V * static_cast<int>(sizeof(S));
  if (vec && k0 + V <= D) {
    uint32_t w[kBytes / 4];
    if constexpr (kBytes == 8) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(ptr));
      w[0] = u.x;
      w[1] = u.y;
    } else {
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(ptr) + i);
        w[4 * i] = u.x;
        w[4 * i + 1] = u.y;
        w[4 * i + 2] = u.z;
        w[4 * i + 3] = u.w;
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if constexpr (sizeof(S) == 4) {
        f[j] = P::to_float(w[j]);
      } else {
        f[j] = P::to_float(static_cast<uint16_t>((w[j >> 1] >> ((j & 1) * 16)) & 0xFFFFu));
      }
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) f[j] = (k0 + j < D) ? P::to_float(__ldg(ptr + j)) : 0.0f;
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
    load_params<P, V>(p.weight, 0, k0, p.D, a.pvec, t);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = mul_rn(v[j], t[j]);
  }
  if (p.bias != nullptr) {
    load_params<P, V>(p.bias, 0, k0, p.D, a.pvec, t);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = add_rn(v[j], t[j]);
  }
  if (p.scale != nullptr) {
    load_params<P, V>(p.scale, mr * p.scale_stride, k0, p.D, a.pvec, t);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = mul_rn(v[j], add_rn(1.0f, t[j]));
  }
  if (p.shift != nullptr) {
    load_params<P, V>(p.shift, mr * p.shift_stride, k0, p.D, a.pvec, t);
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

// Codes of the chunk (zero if bad) into q row `qrow`, and y if requested.
template <int V>
__device__ __forceinline__ void store_chunk(const NmqArgs& a, int64_t m, int64_t k0,
                                            const float (&v)[V], float sc, bool bad) {
  const pyops_norm_modulate_quant_params& p = a.p;
  const int64_t D = p.D;
  const bool full = a.ovec && k0 + V <= D;
  uint32_t w[V / 4];
#pragma unroll
  for (int i = 0; i < V / 4; ++i) {
    const float* f = v + 4 * i;
    const uint32_t lo = e4m3x2(clamp_nan(div_rn(f[0], sc), -kNmqFp8Max, kNmqFp8Max),
                               clamp_nan(div_rn(f[1], sc), -kNmqFp8Max, kNmqFp8Max));
    const uint32_t hi = e4m3x2(clamp_nan(div_rn(f[2], sc), -kNmqFp8Max, kNmqFp8Max),
                               clamp_nan(div_rn(f[3], sc), -kNmqFp8Max, kNmqFp8Max));
    w[i] = bad ? 0u : (lo | (hi << 16));
  }
  const int64_t off = m * D + k0;
  uint8_t* qd = p.q + off;
  if (full) {
    if constexpr (V == 8) {
      *reinterpret_cast<uint2*>(qd) = make_uint2(w[0], w[1]);
    } else {
      *reinterpret_cast<uint32_t*>(qd) = w[0];
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (k0 + j < D) qd[j] = static_cast<uint8_t>(w[j >> 2] >> ((j & 3) * 8));
  }
  if (p.y == nullptr) return;
  if (p.y_dtype == PYOPS_DTYPE_F32) {
    float* yd = static_cast<float*>(p.y) + off;
    if (full) {
#pragma unroll
      for (int i = 0; i < V / 4; ++i)
        reinterpret_cast<float4*>(yd)[i] =
            make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (k0 + j < D) yd[j] = v[j];
    }
    return;
  }
  uint16_t h[V];
  const bool bf = p.y_dtype == PYOPS_DTYPE_BF16;
#pragma unroll
  for (int j = 0; j < V; ++j)
    h[j] = bf ? __bfloat16_as_ushort(__float2bfloat16_rn(v[j]))
              : __half_as_ushort(__float2half_rn(v[j]));
  uint16_t* yd = static_cast<uint16_t*>(p.y) + off;
  if (full) {
    uint32_t hw[V / 2];
#pragma unroll
    for (int i = 0; i < V / 2; ++i)
      hw[i] = static_cast<uint32_t>(h[2 * i]) | (static_cast<uint32_t>(h[2 * i + 1]) << 16);
    if constexpr (V == 8) {
      *reinterpret_cast<uint4*>(yd) = make_uint4(hw[0], hw[1], hw[2], hw[3]);
    } else {
      *reinterpret_cast<uint2*>(yd) = make_uint2(hw[0], hw[1]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (k0 + j < D) yd[j] = h[j];
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
    const float sc = nmq_scale(mx);
    if (threadIdx.x == 0) p.q_scale[m] = sc;
    // pass 3: codes (and y)
#pragma unroll
    for (int i = 0; i < kR; ++i) {
      const int64_t kc = threadIdx.x + static_cast<int64_t>(i) * T;
      if (kc < nc) store_chunk<V>(a, m, kc * V, v[i], sc, bad);
    }
    for (int64_t kc = tail0; kc < nc; kc += T) {
      float f[V];
      chunk_to_float<E>(load_chunk<E, VEC>(in, m, kc * V), f);
      norm_modulate<P, V>(f, a, kc * V, mr, mean, rstd);  // same operations: same y
      store_chunk<V>(a, m, kc * V, f, sc, bad);
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

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
  int64_t threads = cdiv(cdiv(nc, kR), 32) * 32;
  threads = threads < 64 ? 64 : (threads > kMaxThreads ? kMaxThreads : threads);
  int dev = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
    return e;
  const int64_t cap = static_cast<int64_t>(sms) * (2048 / threads) * 4;
  const int grid = static_cast<int>(p.M < cap ? p.M : cap);
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

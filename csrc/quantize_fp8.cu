// quantize_fp8.cu - FP8 e4m3 dynamic quantization kernels + the pyops_quantize_fp8 C ABI
// (pyops/quantize_fp8.h). Spec: pyops/reference/quantize_fp8.py. Torch-free.
//
// Per group: amax over finite |x|; scale = max(amax / 448, FLT_MIN) (IEEE division);
// q = e4m3(clamp(x / scale, -448, 448)); a group holding inf/NaN gets scale NaN and codes 0.
//
// Kernels (all memory-bound; one read of x and one write of q, plus one more read of x for the
// per-tensor amax):
//   fp8_group_kernel<.., TENSOR=false>  block1x128: 128/V lanes per group, shuffle reduction.
//   fp8_tensor_flat_kernel              per-tensor quantize pass, contiguous input, 4 loads in
//                                       flight per thread; scale read from memory.
//   fp8_group_kernel<.., TENSOR=true>   per-tensor quantize pass for strided inputs.
//   fp8_row_warp_kernel                 per-row and block1x128 with 16-byte loads, rows up to
//                                       1536 chunks: one to four warps per row, row in registers.
//   fp8_row_kernel                      per-row otherwise: a segment of threads per row, row
//                                       cached in registers (up to R chunks per thread, then
//                                       re-read).
//   fp8_tile_kernel                     block128x128: one CTA per tile, tile in registers.
#include "pyops/quantize_fp8.h"

#include "common.cuh"

namespace pyops {
namespace {

struct Fp8Params {
  InView in;
  uint8_t* q;     // (M, K) contiguous codes (M, K of `in` as launched)
  float* scale;   // per-group scales, or the single per-tensor scale
  int64_t ng;     // groups (block1x128) or V-chunks (tensor) per row
  int qvec;       // K % V == 0 and q 8-byte aligned: whole chunks stored as one word
};

template <typename E, bool VEC, bool TENSOR>
__global__ void __launch_bounds__(kThreads) fp8_group_kernel(Fp8Params p) {
  constexpr int V = E::V;
  constexpr int TPG = TENSOR ? 1 : 128 / V;  // lanes per group (power of 2, divides 32)
  constexpr int G = TPG * V;                 // elements per group (128, or V for TENSOR)
  const int lane = threadIdx.x & 31;
  const int64_t total = p.in.M * p.ng * TPG;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  float tsc = 0.0f;
  if constexpr (TENSOR) tsc = p.scale[0];  // written by the finalize kernel
  const ScaleDiv tdiv(tsc);
  // Warp-uniform loop: the shuffles below need every lane of the warp.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31);
       base < total; base += stride) {
    const int64_t s = base + lane;
    const bool valid = s < total;
    const int li = static_cast<int>(s & (TPG - 1));
    int64_t m = 0, gk = 0;
    if (valid) m = divmod(s / TPG, p.ng, gk);
    const int64_t k0 = gk * G + static_cast<int64_t>(li) * V;
    uint4 c = make_uint4(0u, 0u, 0u, 0u);
    if (valid) c = load_chunk<E, VEC>(p.in, m, k0);
    float f[V];
    chunk_to_float<E>(c, f);
    float sc;
    bool bad;
    if constexpr (TENSOR) {
      sc = tsc;
      bad = abs_bits(tsc) > kInfBits;  // NaN: the tensor holds inf/NaN
    } else {
      uint32_t mx = 0;
#pragma unroll
      for (int j = 0; j < V; ++j) mx = umax(mx, abs_bits(f[j]));
      mx = group_max<TPG>(mx);
      bad = mx >= kInfBits;
      sc = fp8_scale(mx);
      if (valid && li == 0) p.scale[m * p.ng + gk] = sc;
    }
    if (!valid || k0 >= p.in.K) continue;  // no shuffles after this point
    uint32_t w[V / 4];
    if constexpr (TENSOR)
      fp8_codes<V>(f, tdiv, bad, w);
    else
      fp8_codes<V>(f, ScaleDiv(sc), bad, w);
    store_codes<V>(p.q + m * p.in.K, k0, p.in.K, p.qvec != 0, w);
  }
}

// Per-row scales. `tpr` threads per row (a multiple of 32), blockDim.x / tpr rows per CTA.
template <typename E, bool VEC, int R>
__global__ void __launch_bounds__(1024) fp8_row_kernel(Fp8Params p, int tpr) {
  constexpr int V = E::V;
  __shared__ uint32_t red[32];
  const int rpc = blockDim.x / tpr;
  const int t = threadIdx.x % tpr;
  const int rloc = threadIdx.x / tpr;
  const int wpr = tpr >> 5;  // warps per row
  const int64_t M = p.in.M, K = p.in.K;
  const int64_t nc = (K + V - 1) / V;
  for (int64_t rb = static_cast<int64_t>(blockIdx.x) * rpc; rb < M;
       rb += static_cast<int64_t>(gridDim.x) * rpc) {  // block-uniform
    const int64_t m = rb + rloc;
    const bool valid = m < M;
    uint4 c[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t kc = t + static_cast<int64_t>(i) * tpr;
      c[i] = make_uint4(0u, 0u, 0u, 0u);
      if (valid && kc < nc) c[i] = load_chunk<E, VEC>(p.in, m, kc * V);
    }
    uint32_t mx = 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      float f[V];
      chunk_to_float<E>(c[i], f);
#pragma unroll
      for (int j = 0; j < V; ++j) mx = umax(mx, abs_bits(f[j]));
    }
    // Rows longer than R chunks per thread: stream the rest (re-read below, from L2).
    for (int64_t kc = t + static_cast<int64_t>(R) * tpr; valid && kc < nc; kc += tpr) {
      float f[V];
      chunk_to_float<E>(load_chunk<E, VEC>(p.in, m, kc * V), f);
#pragma unroll
      for (int j = 0; j < V; ++j) mx = umax(mx, abs_bits(f[j]));
    }
    mx = row_max(mx, red, wpr);
    const bool bad = mx >= kInfBits;
    const float sc = fp8_scale(mx);
    if (!valid) continue;
    if (t == 0) p.scale[m] = sc;
    const ScaleDiv div(sc);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t kc = t + static_cast<int64_t>(i) * tpr;
      if (kc < nc) {
        float f[V];
        chunk_to_float<E>(c[i], f);
        uint32_t w[V / 4];
        fp8_codes<V>(f, div, bad, w);
        store_codes<V>(p.q + m * K, kc * V, K, p.qvec != 0, w);
      }
    }
    for (int64_t kc = t + static_cast<int64_t>(R) * tpr; kc < nc; kc += tpr) {
      float f[V];
      chunk_to_float<E>(load_chunk<E, VEC>(p.in, m, kc * V), f);
      uint32_t w[V / 4];
      fp8_codes<V>(f, div, bad, w);
      store_codes<V>(p.q + m * K, kc * V, K, p.qvec != 0, w);
    }
  }
}

// Row and block1x128 scales for rows of up to kWarpCPL * 32 * 4 chunks with the 16-byte vector
// path, K % V == 0 and 8-byte aligned codes (the common case: DiT activations, K <= 12288 in
// bf16). `wpr` warps per row (1, 2 or 4),
// kWarpThreads / (32 * wpr) rows per CTA; each lane holds up to kWarpCPL chunks of its row as raw
// 16-byte words in registers, all loads issued before any reduction, so the row is read once
// and written once. The row amax is a warp shuffle (plus one shared-memory step across the
// row's warps); a 1x128 group is 128/V consecutive lanes of the same chunk index (128/V divides
// 32), so its amax is a shuffle within the warp. Published per-token FP8 quantizers use this
// shape (one warp per row, 16-byte loads and stores, shuffle amax, the row in registers).
constexpr int kWarpCPL = 12;
constexpr int kWarpThreads = 256;

template <typename E, bool GROUPS>
__global__ void __launch_bounds__(kWarpThreads) fp8_row_warp_kernel(Fp8Params p, int wpr) {
  constexpr int V = E::V;
  constexpr int TPG = 128 / V;  // lanes per 1x128 group
  using S = typename E::storage;
  __shared__ uint32_t red[kWarpThreads / 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rpc = (kWarpThreads / 32) / wpr;  // rows per CTA
  const int rloc = warp / wpr;
  const int tpr = wpr * 32;
  const int t = (warp % wpr) * 32 + lane;
  const int64_t M = p.in.M, K = p.in.K;
  const int nc = static_cast<int>(K / V);  // K % V == 0 (host-checked)
  for (int64_t rb = static_cast<int64_t>(blockIdx.x) * rpc; rb < M;
       rb += static_cast<int64_t>(gridDim.x) * rpc) {  // block-uniform
    const int64_t m = rb + rloc;
    const bool valid = m < M;
    const uint4* src =
        reinterpret_cast<const uint4*>(static_cast<const S*>(p.in.base) + (valid ? m : 0) * p.in.sm);
    uint2* dst = reinterpret_cast<uint2*>(p.q + (valid ? m : 0) * K);  // V == 8 (16-bit inputs)
    uint32_t* dst4 = reinterpret_cast<uint32_t*>(p.q + (valid ? m : 0) * K);  // V == 4 (fp32)
    uint4 c[kWarpCPL];
#pragma unroll
    for (int i = 0; i < kWarpCPL; ++i) {
      const int kc = t + i * tpr;
      c[i] = (valid && kc < nc) ? __ldg(src + kc) : make_uint4(0u, 0u, 0u, 0u);
    }
    if constexpr (GROUPS) {
      // block1x128: chunk index i of lanes [g*TPG, (g+1)*TPG) is one group
#pragma unroll
      for (int i = 0; i < kWarpCPL; ++i) {
        const int kc = t + i * tpr;
        const uint32_t mx = group_max<TPG>(chunk_amax_bits<E>(c[i]));
        if (!valid || kc >= nc) continue;
        const float sc = fp8_scale(mx);
        if ((lane & (TPG - 1)) == 0) p.scale[m * p.ng + ((kc * V) >> 7)] = sc;
        float f[V];
        chunk_to_float<E>(c[i], f);
        uint32_t w[V / 4];
        fp8_codes<V>(f, ScaleDiv(sc), mx >= kInfBits, w);
        if constexpr (V == 8) dst[kc] = make_uint2(w[0], w[1]);
        else dst4[kc] = w[0];
      }
    } else {
      uint32_t mx = 0;
#pragma unroll
      for (int i = 0; i < kWarpCPL; ++i) mx = umax(mx, chunk_amax_bits<E>(c[i]));
      mx = row_max(mx, red, wpr);
      if (!valid) continue;
      const float sc = fp8_scale(mx);
      if (t == 0) p.scale[m] = sc;
      const ScaleDiv div(sc);
      const bool bad = mx >= kInfBits;
#pragma unroll
      for (int i = 0; i < kWarpCPL; ++i) {
        const int kc = t + i * tpr;
        if (kc < nc) {
          float f[V];
          chunk_to_float<E>(c[i], f);
          uint32_t w[V / 4];
          fp8_codes<V>(f, div, bad, w);
          if constexpr (V == 8) dst[kc] = make_uint2(w[0], w[1]);
          else dst4[kc] = w[0];
        }
      }
    }
  }
}

// Per-tensor quantize pass over a contiguous input seen as n/V chunks (n % V == 0, 16-byte
// aligned x, 8-byte aligned q): kTensorU independent 16-byte loads in flight per thread.
constexpr int kTensorU = 4;

template <typename E>
__global__ void __launch_bounds__(kThreads) fp8_tensor_flat_kernel(const void* x, uint8_t* q,
                                                                  const float* scale,
                                                                  int64_t nchunks) {
  constexpr int V = E::V;
  const float sc = scale[0];  // written by the finalize kernel
  const ScaleDiv div(sc);
  const bool bad = abs_bits(sc) > kInfBits;  // NaN: the tensor holds inf/NaN
  const uint4* src = static_cast<const uint4*>(x);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s0 < nchunks;
       s0 += kTensorU * stride) {
    uint4 c[kTensorU];
#pragma unroll
    for (int u = 0; u < kTensorU; ++u) {
      const int64_t s = s0 + u * stride;
      c[u] = s < nchunks ? __ldg(src + s) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kTensorU; ++u) {
      const int64_t s = s0 + u * stride;
      if (s >= nchunks) break;
      float f[V];
      chunk_to_float<E>(c[u], f);
      uint32_t w[V / 4];
      fp8_codes<V>(f, div, bad, w);
      if constexpr (V == 8) reinterpret_cast<uint2*>(q)[s] = make_uint2(w[0], w[1]);
      else reinterpret_cast<uint32_t*>(q)[s] = w[0];
    }
  }
}

// Warps per row for fp8_row_warp_kernel (1, 2 or 4), or 0 when the row does not fit.
inline int row_warps(int64_t nc) {
  for (int w = 1; w <= 4; w *= 2)
    if (nc <= static_cast<int64_t>(w) * 32 * kWarpCPL) return w;
  return 0;
}

template <typename E, bool GROUPS>
cudaError_t launch_row_warp(const Fp8Params& p, int wpr, cudaStream_t stream) {
  int grid = 0;  // one CTA per rpc rows, at most 16 per SM (>= a full wave at any occupancy)
  const cudaError_t e = grid_for(p.in.M, (kWarpThreads / 32) / wpr, 16, &grid);
  if (e != cudaSuccess) return e;
  fp8_row_warp_kernel<E, GROUPS><<<grid, kWarpThreads, 0, stream>>>(p, wpr);
  return cudaGetLastError();
}

// block128x128: one CTA of kTileThreads per tile, grid-stride over tiles; tile in registers.
constexpr int kTileThreads = 512;

template <typename E, bool VEC>
__global__ void __launch_bounds__(kTileThreads) fp8_tile_kernel(Fp8Params p, int64_t ntk,
                                                                int64_t ntiles) {
  constexpr int V = E::V;
  constexpr int CPR = 128 / V;                      // chunks per tile row
  constexpr int NCH = 128 * CPR / kTileThreads;     // chunks per thread
  __shared__ uint32_t red[32];
  const int64_t M = p.in.M, K = p.in.K;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    int64_t tk;
    const int64_t tm = divmod(tile, ntk, tk);
    uint4 c[NCH];
#pragma unroll
    for (int i = 0; i < NCH; ++i) {
      const int cidx = threadIdx.x + i * kTileThreads;
      const int64_t m = tm * 128 + cidx / CPR;
      const int64_t k0 = tk * 128 + static_cast<int64_t>(cidx % CPR) * V;
      c[i] = make_uint4(0u, 0u, 0u, 0u);
      if (m < M && k0 < K) c[i] = load_chunk<E, VEC>(p.in, m, k0);
    }
    uint32_t mx = 0;
#pragma unroll
    for (int i = 0; i < NCH; ++i) {
      float f[V];
      chunk_to_float<E>(c[i], f);
#pragma unroll
      for (int j = 0; j < V; ++j) mx = umax(mx, abs_bits(f[j]));
    }
    mx = block_max(mx, red);
    const bool bad = mx >= kInfBits;
    const float sc = fp8_scale(mx);
    if (threadIdx.x == 0) p.scale[tile] = sc;  // (tm, tk) row-major == tile
    const ScaleDiv div(sc);
#pragma unroll
    for (int i = 0; i < NCH; ++i) {
      const int cidx = threadIdx.x + i * kTileThreads;
      const int64_t m = tm * 128 + cidx / CPR;
      const int64_t k0 = tk * 128 + static_cast<int64_t>(cidx % CPR) * V;
      if (m < M && k0 < K) {
        float f[V];
        chunk_to_float<E>(c[i], f);
        uint32_t w[V / 4];
        fp8_codes<V>(f, div, bad, w);
        store_codes<V>(p.q + m * p.in.K, k0, p.in.K, p.qvec != 0, w);
      }
    }
  }
}

inline int qvec_ok(const InView& in, const uint8_t* q, int V) {
  return (in.K % V) == 0 && reinterpret_cast<uintptr_t>(q) % 8 == 0;
}

// amax bits (from launch_amax<false>) -> per-tensor scale, in place.
__global__ void fp8_finalize_kernel(float* scale) {
  const uint32_t mx = *reinterpret_cast<const uint32_t*>(scale);
  *scale = fp8_scale(mx);
}

// row / block1x128 / block128x128 (one pass over x).
template <typename E>
cudaError_t launch_fp8(const InView& in, uint8_t* q, float* scale, pyops_fp8_granularity_t g,
                       cudaStream_t stream) {
  constexpr int V = E::V;
  const int esize = static_cast<int>(sizeof(typename E::storage));
  int grid = 0;
  cudaError_t e;
  if (g == PYOPS_FP8_BLOCK1X128) {
    const bool vec = vec_ok(in, esize);
    Fp8Params p{in, q, scale, cdiv(in.K, 128), qvec_ok(in, q, V)};
    const int wpr = row_warps(cdiv(in.K, V));
    if (vec && p.qvec && wpr > 0) return launch_row_warp<E, true>(p, wpr, stream);
    const int64_t slots = in.M * p.ng * (128 / V);
    if ((e = grid_for(slots, kThreads, 8, &grid)) != cudaSuccess) return e;
    if (vec)
      fp8_group_kernel<E, true, false><<<grid, kThreads, 0, stream>>>(p);
    else
      fp8_group_kernel<E, false, false><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  if (g == PYOPS_FP8_ROW) {
    constexpr int R = 4;
    const bool vec = vec_ok(in, esize);
    Fp8Params p{in, q, scale, 0, qvec_ok(in, q, V)};
    const int64_t nc = cdiv(in.K, V);
    const int wpr = row_warps(nc);
    if (vec && p.qvec && wpr > 0) return launch_row_warp<E, false>(p, wpr, stream);
    int64_t tpr = cdiv(cdiv(nc, R), 32) * 32;
    if (tpr == 96) tpr = 128;
    if (tpr > 1024) tpr = 1024;
    const int block = tpr >= 128 ? static_cast<int>(tpr) : 128;
    const int rpc = block / static_cast<int>(tpr);
    int dev = 0, sms = 0;
    if ((e = cudaGetDevice(&dev)) != cudaSuccess) return e;
    if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
      return e;
    const int64_t need = cdiv(in.M, rpc);
    const int64_t cap = static_cast<int64_t>(sms) * (2048 / block) * 4;
    grid = static_cast<int>(need < cap ? need : cap);
    if (vec)
      fp8_row_kernel<E, true, R><<<grid, block, 0, stream>>>(p, static_cast<int>(tpr));
    else
      fp8_row_kernel<E, false, R><<<grid, block, 0, stream>>>(p, static_cast<int>(tpr));
    return cudaGetLastError();
  }
  if (g == PYOPS_FP8_BLOCK128X128) {
    const bool vec = vec_ok(in, esize);
    Fp8Params p{in, q, scale, 0, qvec_ok(in, q, V)};
    const int64_t ntk = cdiv(in.K, 128);
    const int64_t ntiles = cdiv(in.M, 128) * ntk;
    int dev = 0, sms = 0;
    if ((e = cudaGetDevice(&dev)) != cudaSuccess) return e;
    if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
      return e;
    const int64_t cap = static_cast<int64_t>(sms) * 8;
    grid = static_cast<int>(ntiles < cap ? ntiles : cap);
    if (vec)
      fp8_tile_kernel<E, true><<<grid, kTileThreads, 0, stream>>>(p, ntk, ntiles);
    else
      fp8_tile_kernel<E, false><<<grid, kTileThreads, 0, stream>>>(p, ntk, ntiles);
    return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}

// Per-tensor: zero + atomicMax amax into scale[0], finalize in place, then quantize.
template <typename E>
cudaError_t launch_fp8_tensor(const InView& in0, pyops_dtype_t dtype, uint8_t* q, float* scale,
                              cudaStream_t stream) {
  cudaError_t e = launch_amax<false>(in0, dtype, reinterpret_cast<uint32_t*>(scale), stream);
  if (e != cudaSuccess) return e;
  fp8_finalize_kernel<<<1, 1, 0, stream>>>(scale);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  const InView in = flatten_if_contiguous(in0);  // q is contiguous: same flat indexing
  const bool vec = vec_ok(in, static_cast<int>(sizeof(typename E::storage)));
  Fp8Params p{in, q, scale, cdiv(in.K, E::V), qvec_ok(in, q, E::V)};
  int grid = 0;
  if (in.M == 1 && vec && p.qvec) {  // contiguous: the flat kernel
    const int64_t nchunks = in.K / E::V;
    if ((e = grid_for(cdiv(nchunks, kTensorU), kThreads, 8, &grid)) != cudaSuccess) return e;
    fp8_tensor_flat_kernel<E><<<grid, kThreads, 0, stream>>>(in.base, q, scale, nchunks);
    return cudaGetLastError();
  }
  if ((e = grid_for(in.M * p.ng, kThreads, 8, &grid)) != cudaSuccess) return e;
  if (vec)
    fp8_group_kernel<E, true, true><<<grid, kThreads, 0, stream>>>(p);
  else
    fp8_group_kernel<E, false, true><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace pyops

extern "C" cudaError_t pyops_quantize_fp8(const pyops_quantize_fp8_params* params,
                                          cudaStream_t stream) {
  using namespace pyops;
  if (params == nullptr) return cudaErrorInvalidValue;
  const pyops_quantize_fp8_params& p = *params;
  if (p.M < 0 || p.K < 0 || !valid_dtype(p.dtype)) return cudaErrorInvalidValue;
  if (p.granularity < PYOPS_FP8_TENSOR || p.granularity > PYOPS_FP8_BLOCK128X128)
    return cudaErrorInvalidValue;
  if (p.M == 0 || p.K == 0) return cudaSuccess;
  if (p.x == nullptr || p.q == nullptr || p.scale == nullptr) return cudaErrorInvalidValue;
  const InView in{p.x, p.M, p.K, p.stride_m, p.stride_k};
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    if (p.granularity == PYOPS_FP8_TENSOR)
      return launch_fp8_tensor<E>(in, p.dtype, p.q, p.scale, stream);
    return launch_fp8<E>(in, p.q, p.scale, p.granularity, stream);
  });
}

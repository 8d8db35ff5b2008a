// quantize_fp8.cu - FP8 e4m3 dynamic quantization kernels + the pyops_quantize_fp8 C ABI
// (pyops/quantize_fp8.h). Spec: pyops/reference/quantize_fp8.py. Torch-free.
//
// Per group: amax over finite |x|; scale = max(amax / 448, FLT_MIN) (IEEE division);
// q = e4m3(clamp(x / scale, -448, 448)); a group holding inf/NaN gets scale NaN and codes 0.
//
// Kernels (all memory-bound; one read of x and one write of q, plus one more read of x for the
// per-tensor amax):
//   fp8_group_kernel<.., TENSOR=false>  block1x128: 128/V lanes per group, shuffle reduction.
//   fp8_group_kernel<.., TENSOR=true>   per-tensor quantize pass, scale read from memory.
//   fp8_row_kernel                      per-row: a segment of threads per row, row cached in
//                                       registers (up to R chunks per thread, then re-read).
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
    fp8_codes<V>(f, sc, bad, w);
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
    mx = group_max<32>(mx);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
    __syncthreads();
    mx = 0;
    for (int i = 0; i < wpr; ++i) mx = umax(mx, red[rloc * wpr + i]);
    __syncthreads();
    const bool bad = mx >= kInfBits;
    const float sc = fp8_scale(mx);
    if (!valid) continue;
    if (t == 0) p.scale[m] = sc;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t kc = t + static_cast<int64_t>(i) * tpr;
      if (kc < nc) {
        float f[V];
        chunk_to_float<E>(c[i], f);
        uint32_t w[V / 4];
        fp8_codes<V>(f, sc, bad, w);
        store_codes<V>(p.q + m * K, kc * V, K, p.qvec != 0, w);
      }
    }
    for (int64_t kc = t + static_cast<int64_t>(R) * tpr; kc < nc; kc += tpr) {
      float f[V];
      chunk_to_float<E>(load_chunk<E, VEC>(p.in, m, kc * V), f);
      uint32_t w[V / 4];
      fp8_codes<V>(f, sc, bad, w);
      store_codes<V>(p.q + m * K, kc * V, K, p.qvec != 0, w);
    }
  }
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
#pragma unroll
    for (int i = 0; i < NCH; ++i) {
      const int cidx = threadIdx.x + i * kTileThreads;
      const int64_t m = tm * 128 + cidx / CPR;
      const int64_t k0 = tk * 128 + static_cast<int64_t>(cidx % CPR) * V;
      if (m < M && k0 < K) {
        float f[V];
        chunk_to_float<E>(c[i], f);
        uint32_t w[V / 4];
        fp8_codes<V>(f, sc, bad, w);
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

// gelu_quant.cu - fused GELU + per-token FP8 e4m3 quantization, and the pyops_gelu_quant C ABI.
// Torch-free. Spec: pyops/reference/gelu_quant.py (ABI: pyops/gelu_quant.h).
//
// gq_warp_kernel (the common case: 16-byte aligned rows, K % V == 0, K <= 14336): 1-16 warps
// per row, each lane loads all of its chunks of the row at once (x read once), turns them into
// y = GELU(x) in fp32 registers (GELU computed once per element), takes the row amax (warp
// shuffles, one shared-memory step across the row's warps) and writes the codes (and y) from
// the same registers. Otherwise gq_kernel: one CTA per row, up to kR chunks per thread kept as fp32 y,
// the rest of a long row streamed twice (amax, then codes; y recomputed, same bits).
//
// GELU uses exactly rounded fp32 operations only (common.cuh's fma_rn / mul_rn / add_rn /
// sub_rn / div_rn, integer bit moves, min.f32 / max.f32): tanh / erf / exp are written out below
// instead of calling tanhf / erff / expf, whose PTX holds ex2.approx / rcp.approx / .ftz
// instructions and a contracted FMA under fast math (test_build's check). The operation sequence
// and the constants are those of triton_kernels/gelu_quant.py (which documents the derivation;
// tests/test_gelu_quant.py checks the constants are the same bits), so on a GPU the two
// backends' y agree bit for bit and the Triton interpreter's y on a CPU is this kernel's y.
// Per element (tanh form): ~15 FP operations and one IEEE division.
#include "pyops/gelu_quant.h"

#include "common.cuh"

namespace pyops {
namespace {

// ---- GELU in exactly rounded fp32 operations ------------------------------------------------
// tanh form: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), -2u = x (kTanhA + kTanhB x^2)
constexpr float kTanhA = -0x1.988454p+0f;  // fp32(-2 sqrt(2/pi))
constexpr float kTanhB = -0x1.2444f2p-4f;  // fp32(-2 sqrt(2/pi) 0.044715)
constexpr float kExpLo = -87.0f;           // exponent clamp: 1 + e^-87 rounds to 1
constexpr float kExpHi = 88.8f;            // 2^k = inf from here on: y = +-0 (reference: t = -1)
constexpr float kLog2e = 0x1.715476p+0f;   // fp32(log2(e))
constexpr float kLn2 = 0x1.62e430p-1f;     // fp32(ln 2)
constexpr float kRneInt = 12582912.0f;     // 1.5 * 2^23: (v + it) - it = rint(v), |v| < 2^22
constexpr int kRneIntBits = 0x4B400000;    // its bits: bits(v + it) - kRneIntBits = rint(v)
// exp(r) = 1 + r (1 + r (kExp2 + r (kExp3 + r (kExp4 + r (kExp5 + r kExp6))))), |r| <= ln2/2
constexpr float kExp2 = 0x1.fffffcp-2f;
constexpr float kExp3 = 0x1.55541ap-3f;
constexpr float kExp4 = 0x1.555822p-5f;
constexpr float kExp5 = 0x1.126792p-7f;
constexpr float kExp6 = 0x1.6ae72p-10f;
// erf form: (0.5 x) (1 + erf(x / sqrt 2)), erf of a = min(|z|, 4)
constexpr float kSqrt1_2 = 0x1.6a09e6p-1f;  // fp32(1/sqrt(2)), the reference's constant
constexpr float kErfClamp = 4.0f;           // erf(4) rounds to 1
constexpr float kErfSplit = 0.875f;
constexpr float kErfMid = 2.4375f;
// a < 0.875: erf(a) = a (S0 + a^2 (S1 + a^2 (S2 + a^2 (S3 + a^2 (S4 + a^2 S5)))))
constexpr float kErfS0 = 0x1.20dd74p+0f;
constexpr float kErfS1 = -0x1.8126bep-2f;
constexpr float kErfS2 = 0x1.ce187ep-4f;
constexpr float kErfS3 = -0x1.b68df6p-6f;
constexpr float kErfS4 = 0x1.47bd04p-8f;
constexpr float kErfS5 = -0x1.3d812ap-11f;
// a >= 0.875: erf(a) = 1 - exp(L(a - 2.4375) - a^2), L approximates log(erfc(a)) + a^2
constexpr float kErfL0 = -0x1.88d888p+0f;
constexpr float kErfL1 = -0x1.707994p-2f;
constexpr float kErfL2 = 0x1.dcd512p-5f;
constexpr float kErfL3 = -0x1.709abep-7f;
constexpr float kErfL4 = 0x1.5953a8p-9f;
constexpr float kErfL5 = -0x1.4c4488p-13f;
constexpr float kErfL6 = 0x1.a33954p-13f;

// exp(v) ~= p * (*s), p = exp(r) in [0.7, 1.42], *s = 2^k (k = 128 gives inf); v in [-87.3, 88.8].
__device__ __forceinline__ float exp_split(float v, float* s) {
  const float j = fma_rn(v, kLog2e, kRneInt);
  const float kf = sub_rn(j, kRneInt);
  const float r = fma_rn(kf, -kLn2, v);
  float p = fma_rn(r, kExp6, kExp5);
  p = fma_rn(p, r, kExp4);
  p = fma_rn(p, r, kExp3);
  p = fma_rn(p, r, kExp2);
  p = fma_rn(p, r, 1.0f);
  p = fma_rn(p, r, 1.0f);
  const int kb = static_cast<int>(__float_as_uint(j)) - kRneIntBits;
  *s = __uint_as_float(static_cast<uint32_t>(kb + 127) << 23);
  return p;
}

__device__ __forceinline__ float gelu_tanh(float x) {
  const float x2 = mul_rn(x, x);
  float v = mul_rn(x, fma_rn(x2, kTanhB, kTanhA));
  v = min_num(max_num(v, kExpLo), kExpHi);  // NaN -> kExpLo; y = NaN / .. = NaN through x
  float s;
  const float p = exp_split(v, &s);
  return div_rn(x, fma_rn(p, s, 1.0f));
}

__device__ __forceinline__ float gelu_erf(float x) {
  const float z = mul_rn(x, kSqrt1_2);
  const uint32_t zb = __float_as_uint(z);
  const float a = min_num(__uint_as_float(zb & 0x7FFFFFFFu), kErfClamp);  // NaN -> 4
  const float a2 = mul_rn(a, a);
  float ps = fma_rn(a2, kErfS5, kErfS4);
  ps = fma_rn(ps, a2, kErfS3);
  ps = fma_rn(ps, a2, kErfS2);
  ps = fma_rn(ps, a2, kErfS1);
  ps = fma_rn(ps, a2, kErfS0);
  const float small = mul_rn(a, ps);
  const float t = sub_rn(a, kErfMid);
  float pl = fma_rn(t, kErfL6, kErfL5);
  pl = fma_rn(pl, t, kErfL4);
  pl = fma_rn(pl, t, kErfL3);
  pl = fma_rn(pl, t, kErfL2);
  pl = fma_rn(pl, t, kErfL1);
  pl = fma_rn(pl, t, kErfL0);
  const float na = __uint_as_float(__float_as_uint(a) ^ 0x80000000u);  // -a on the bits
  float s;
  const float p = exp_split(fma_rn(na, a, pl), &s);
  const float large = sub_rn(1.0f, mul_rn(p, s));
  const float e = __uint_as_float(__float_as_uint(a < kErfSplit ? small : large) |
                                  (zb & 0x80000000u));
  return mul_rn(mul_rn(0.5f, x), add_rn(1.0f, e));
}

template <int APPROX>
__device__ __forceinline__ float gelu(float x) {
  if constexpr (APPROX == PYOPS_GELU_TANH) {
    return gelu_tanh(x);
  } else {
    return gelu_erf(x);
  }
}

// ---- shared pieces of the two kernels --------------------------------------------------------
struct GqArgs {
  pyops_gelu_quant_params p;
  bool ovec;  // K % V == 0 and 16-byte aligned q / y: whole chunks stored as words
};

// Chunk of raw x -> y = GELU(x) in place (as fp32) and the max |y| bits of the elements k < K.
template <typename E, int APPROX>
__device__ __forceinline__ uint32_t gelu_chunk(const uint4& c, int64_t k0, int64_t K,
                                               float (&v)[E::V]) {
  chunk_to_float<E>(c, v);
  uint32_t mx = 0;
#pragma unroll
  for (int j = 0; j < E::V; ++j) {
    v[j] = gelu<APPROX>(v[j]);
    if (k0 + j < K) mx = umax(mx, abs_bits(v[j]));
  }
  return mx;
}

// Codes of the chunk (zero if bad) into q row m, and y (rounded to y_dtype) if requested.
template <int V>
__device__ __forceinline__ void gq_store(const GqArgs& a, int64_t m, int64_t k0,
                                         const float (&v)[V], const ScaleDiv& div, bool bad) {
  const pyops_gelu_quant_params& p = a.p;
  const int64_t K = p.K;
  uint32_t w[V / 4];
  fp8_codes<V>(v, div, bad, w);
  store_codes<V>(p.q + m * K, k0, K, a.ovec, w);
  if (p.y == nullptr) return;
  switch (p.y_dtype) {
    case PYOPS_DTYPE_BF16: store_floats<BF16, V>(p.y, m * K, k0, K, a.ovec, v); break;
    case PYOPS_DTYPE_F16: store_floats<F16, V>(p.y, m * K, k0, K, a.ovec, v); break;
    default: store_floats<F32, V>(p.y, m * K, k0, K, a.ovec, v); break;
  }
}

// ---- the warp-per-row kernel -----------------------------------------------------------------
// `wpr` warps per row (1, 2, 4, ... up to a whole CTA), threads / (32 wpr) rows per CTA; each lane
// holds up to kGChunks chunks of its row as fp32 y (56 registers for 16-bit x in CTAs of 256,
// 28 for fp32 x in CTAs of 512): K <= 14336 for every dtype, no spills (ptxas -v).
constexpr int kGChunks = 7;

template <typename E>
struct WarpShape {
  static constexpr int threads = E::V == 8 ? 256 : 512;
  static constexpr int max_wpr = threads / 32;
  // 16-bit x: 2 CTAs (16 warps) per SM, <= 128 registers (ptxas takes ~200 on sm_100a
  // otherwise); fp32 x: one CTA of 16 warps (<= 128 registers; 64 would spill)
  static constexpr int min_ctas = E::V == 8 ? 2 : 1;
};

template <typename E, int APPROX>
__global__ void __launch_bounds__(WarpShape<E>::threads, WarpShape<E>::min_ctas)
    gq_warp_kernel(const GqArgs a, int wpr) {
  constexpr int V = E::V;
  constexpr int CPL = kGChunks;
  constexpr int kThreadsW = WarpShape<E>::threads;
  using S = typename E::storage;
  __shared__ uint32_t red[kThreadsW / 32];
  const pyops_gelu_quant_params& p = a.p;
  const int warp = threadIdx.x >> 5;
  const int rpc = (kThreadsW / 32) / wpr;
  const int rloc = warp / wpr;
  const int tpr = wpr * 32;
  const int t = (warp % wpr) * 32 + (threadIdx.x & 31);
  const int64_t K = p.K;
  const int nc = static_cast<int>(K / V);  // K % V == 0, nc <= tpr * CPL (host-checked)
  for (int64_t rb = static_cast<int64_t>(blockIdx.x) * rpc; rb < p.M;
       rb += static_cast<int64_t>(gridDim.x) * rpc) {  // block-uniform
    const int64_t m = rb + rloc;
    const bool valid = m < p.M;
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const S*>(p.x) +
                                                      (valid ? m : 0) * p.stride_m);
    float v[CPL][V];
    uint32_t mx = 0;
    {
      uint4 c[CPL];
#pragma unroll
      for (int i = 0; i < CPL; ++i) {
        const int kc = t + i * tpr;
        c[i] = (valid && kc < nc) ? __ldg(src + kc) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int i = 0; i < CPL; ++i)  // past the row: GELU(0) = 0, no effect on the amax
        mx = umax(mx, gelu_chunk<E, APPROX>(c[i], 0, K, v[i]));
    }
    mx = row_max(mx, red, wpr);
    if (!valid) continue;
    const bool bad = mx >= kInfBits;
    const float sc = fp8_scale(mx);
    if (t == 0) p.q_scale[m] = sc;
    const ScaleDiv div(sc);
#pragma unroll
    for (int i = 0; i < CPL; ++i) {
      const int kc = t + i * tpr;
      if (kc < nc) gq_store<V>(a, m, static_cast<int64_t>(kc) * V, v[i], div, bad);
    }
  }
}

// Warps per row for gq_warp_kernel (1, 2, 4 or 8), or 0 when the row does not fit.
inline int gq_row_warps(int64_t nc, int max_wpr) {
  for (int w = 1; w <= max_wpr; w *= 2)
    if (nc <= static_cast<int64_t>(w) * 32 * kGChunks) return w;
  return 0;
}

// ---- the generic kernel: any strides, alignment and length -----------------------------------
constexpr int kR = 4;             // chunks per thread kept as fp32 y
constexpr int kMaxThreads = 512;

template <typename E, bool VEC, int APPROX>
__global__ void __launch_bounds__(kMaxThreads) gq_kernel(const GqArgs a) {
  constexpr int V = E::V;
  __shared__ uint32_t red[32];
  const pyops_gelu_quant_params& p = a.p;
  const InView in{p.x, p.M, p.K, p.stride_m, p.stride_k};
  const int64_t K = p.K;
  const int64_t nc = (K + V - 1) / V;
  const int T = blockDim.x;
  const int64_t tail0 = threadIdx.x + static_cast<int64_t>(kR) * T;  // first streamed chunk
  for (int64_t m = blockIdx.x; m < p.M; m += gridDim.x) {  // block-uniform
    float v[kR][V];
    uint32_t mx = 0;
#pragma unroll
    for (int i = 0; i < kR; ++i) {
      const int64_t kc = threadIdx.x + static_cast<int64_t>(i) * T;
      uint4 c = make_uint4(0u, 0u, 0u, 0u);
      if (kc < nc) c = load_chunk<E, VEC>(in, m, kc * V);
      mx = umax(mx, gelu_chunk<E, APPROX>(c, kc * V, K, v[i]));
    }
    for (int64_t kc = tail0; kc < nc; kc += T) {  // long rows: the rest, amax only
      float f[V];
      mx = umax(mx, gelu_chunk<E, APPROX>(load_chunk<E, VEC>(in, m, kc * V), kc * V, K, f));
    }
    mx = block_max(mx, red);
    const bool bad = mx >= kInfBits;
    const float sc = fp8_scale(mx);
    if (threadIdx.x == 0) p.q_scale[m] = sc;
    const ScaleDiv div(sc);
#pragma unroll
    for (int i = 0; i < kR; ++i) {
      const int64_t kc = threadIdx.x + static_cast<int64_t>(i) * T;
      if (kc < nc) gq_store<V>(a, m, kc * V, v[i], div, bad);
    }
    for (int64_t kc = tail0; kc < nc; kc += T) {  // recomputed: same operations, same y
      float f[V];
      gelu_chunk<E, APPROX>(load_chunk<E, VEC>(in, m, kc * V), kc * V, K, f);
      gq_store<V>(a, m, kc * V, f, div, bad);
    }
  }
}

template <typename E, int APPROX>
cudaError_t launch_gq(const pyops_gelu_quant_params& p, cudaStream_t stream) {
  constexpr int V = E::V;
  GqArgs a{p, false};
  a.ovec = p.K % V == 0 && aligned16(p.q) && (p.y == nullptr || aligned16(p.y));
  const InView in{p.x, p.M, p.K, p.stride_m, p.stride_k};
  const bool vec = vec_ok(in, elem_size(p.x_dtype));
  const int64_t nc = cdiv(p.K, V);
  const int wpr = gq_row_warps(nc, WarpShape<E>::max_wpr);
  int grid = 0;
  cudaError_t e;
  if (vec && a.ovec && wpr > 0) {  // a.ovec implies K % V == 0
    // one CTA per rpc rows, at most 16 per SM (>= a full wave at any occupancy)
    constexpr int threads = WarpShape<E>::threads;
    if ((e = grid_for(p.M, (threads / 32) / wpr, 16, &grid)) != cudaSuccess) return e;
    gq_warp_kernel<E, APPROX><<<grid, threads, 0, stream>>>(a, wpr);
    return cudaGetLastError();
  }
  int64_t threads = cdiv(cdiv(nc, kR), 32) * 32;
  threads = threads < 64 ? 64 : (threads > kMaxThreads ? kMaxThreads : threads);
  // one CTA per row, as many as fill every SM four times over at full occupancy
  if ((e = grid_for(p.M, 1, 4 * (2048 / static_cast<int>(threads)), &grid)) != cudaSuccess)
    return e;
  if (vec)
    gq_kernel<E, true, APPROX><<<grid, static_cast<int>(threads), 0, stream>>>(a);
  else
    gq_kernel<E, false, APPROX><<<grid, static_cast<int>(threads), 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace pyops

extern "C" cudaError_t pyops_gelu_quant(const pyops_gelu_quant_params* params,
                                        cudaStream_t stream) {
  using namespace pyops;
  if (params == nullptr) return cudaErrorInvalidValue;
  const pyops_gelu_quant_params& p = *params;
  if (p.M < 0 || p.K < 0 || p.stride_m < 0 || p.stride_k < 0 || !valid_dtype(p.x_dtype) ||
      (p.y != nullptr && !valid_dtype(p.y_dtype)) ||
      (p.approximate != PYOPS_GELU_TANH && p.approximate != PYOPS_GELU_ERF))
    return cudaErrorInvalidValue;
  if (p.M == 0 || p.K == 0) return cudaSuccess;
  if (p.x == nullptr || p.q == nullptr || p.q_scale == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(p.x_dtype, [&](auto xtag) -> cudaError_t {
    using E = decltype(xtag);
    if (p.approximate == PYOPS_GELU_TANH) return launch_gq<E, PYOPS_GELU_TANH>(p, stream);
    return launch_gq<E, PYOPS_GELU_ERF>(p, stream);
  });
}

// quantize_nvfp4.cu - NVFP4 quantization kernel + the pyops_quantize_nvfp4 C ABI
// (pyops/quantize_nvfp4.h). Spec: pyops/reference/quantize_nvfp4.py. Torch-free.
//
// Per 16-element block along K (all fp32, IEEE RNE, in this order):
//   s     = e4m3(min((block_amax / 6) / g, 448))       (block_amax over finite |x|)
//   v     = clamp(x / (float(s) * g), -6, 6)
//   code  = e2m1 threshold sum | (v < 0 ? 8 : 0); 0 for the whole block if s == 0 or the block
//           holds inf/NaN; the scale byte of such a block is 0x7F.
// g: read from *global_scale, or computed first as max(amax / 2688, FLT_MIN) by a grid-stride
// amax pass (atomicMax into *global_scale itself) and a one-thread finalize kernel.
//
// Blocks: nvfp4_block_kernel (one thread per block, 16-byte loads, one 8-byte store) when rows
// are 16-byte aligned and K % 16 == 0; otherwise nvfp4_kernel: 16/V lanes per block (2 for
// 16-bit inputs, 4 for fp32), each lane loads one 16-byte chunk, the block amax is a 1-2 step
// shuffle, each lane writes V/2 bytes.
#include "pyops/quantize_nvfp4.h"

#include "common.cuh"

namespace pyops {
namespace {

constexpr float kFp4Max = 6.0f;
constexpr float kGlobalDiv = 2688.0f;  // 6 * 448
constexpr uint32_t kScaleNan = 0x7Fu;

struct Nvfp4Params {
  InView in;
  uint8_t* data;          // (M, nb*8)
  uint8_t* scales;        // (M, nb) or swizzled (roundup(M,128), roundup(nb,4))
  const float* gscale;    // one fp32
  int64_t nb;             // ceil(K / 16)
  int64_t np;             // roundup(nb, 4) (swizzled row length)
  int swizzle;
};

// Offset of scale (m, c) in the 128x4-tiled layout.
__device__ __forceinline__ int64_t swizzle_offset(int64_t m, int64_t c, int64_t np) {
  const int64_t tile = (m >> 7) * (np >> 2) + (c >> 2);
  const int64_t rr = m & 127;
  return tile * 512 + (rr & 31) * 16 + (rr >> 5) * 4 + (c & 3);
}

template <typename E, bool VEC>
__global__ void __launch_bounds__(kThreads) nvfp4_kernel(Nvfp4Params p) {
  constexpr int V = E::V;
  constexpr int TPG = 16 / V;  // lanes per block
  const int lane = threadIdx.x & 31;
  const float g = p.gscale[0];
  const int64_t total = p.in.M * p.nb * TPG;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t row_bytes = p.nb * 8;
  // Warp-uniform loop: the shuffles need every lane of the warp.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31);
       base < total; base += stride) {
    const int64_t s = base + lane;
    const bool valid = s < total;
    const int li = static_cast<int>(s & (TPG - 1));
    int64_t m = 0, gk = 0;
    if (valid) m = divmod(s / TPG, p.nb, gk);
    const int64_t k0 = gk * 16 + static_cast<int64_t>(li) * V;
    uint4 c = make_uint4(0u, 0u, 0u, 0u);
    if (valid) c = load_chunk<E, VEC>(p.in, m, k0);  // k >= K reads as 0 (the block padding)
    float f[V];
    chunk_to_float<E>(c, f);
    uint32_t mx = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) mx = umax(mx, abs_bits(f[j]));
    mx = group_max<TPG>(mx);
    if (!valid) continue;  // no shuffles after this point
    const bool bad = mx >= kInfBits;
    // Only finite elements enter the block amax; a bad block's scale/codes are overwritten.
    const float bamax = bad ? 0.0f : __uint_as_float(mx);
    const float s_f = clamp_nan(div_rn(div_rn(bamax, kFp4Max), g), -INFINITY, kFp8Max);
    const uint32_t sbyte = e4m3(s_f);
    const float sf = e4m3_to_float(sbyte);
    const bool zero = bad || sf == 0.0f;
    const float denom = mul_rn(sf, g);
    uint32_t packed = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float v = clamp_nan(div_rn(f[j], denom), -kFp4Max, kFp4Max);
      packed |= e2m1_code(v) << (4 * j);
    }
    if (zero) packed = 0;
    uint8_t* dst = p.data + m * row_bytes + (k0 >> 1);  // V/2-byte aligned
    if constexpr (V == 8) {
      *reinterpret_cast<uint32_t*>(dst) = packed;
    } else {
      *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(packed);
    }
    if (li == 0) {
      const int64_t off = p.swizzle ? swizzle_offset(m, gk, p.np) : m * p.nb + gk;
      p.scales[off] = static_cast<uint8_t>(bad ? kScaleNan : sbyte);
    }
  }
}

// The common case (16-byte aligned rows, stride_k 1, K % 16 == 0): one thread per 16-element
// block, 16/V 16-byte loads, no shuffles; the block's 16 codes leave as one 8-byte store. The
// divisions go through ScaleDiv (exact; exact_tiny where the sign of an underflowing quotient
// decides the code) and the E2M1 code is the bit-rounding form (e2m1_code_finite).
template <typename E>
__global__ void __launch_bounds__(kThreads) nvfp4_block_kernel(Nvfp4Params p) {
  constexpr int V = E::V;
  constexpr int C = 16 / V;  // chunks per block
  using S = typename E::storage;
  const float g = p.gscale[0];
  const ScaleDiv gdiv(g), six(kFp4Max);
  const int64_t total = p.in.M * p.nb;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < total;
       b += stride) {
    int64_t kb;
    const int64_t m = divmod(b, p.nb, kb);
    const uint4* src =
        reinterpret_cast<const uint4*>(static_cast<const S*>(p.in.base) + m * p.in.sm) + kb * C;
    uint4 c[C];
#pragma unroll
    for (int i = 0; i < C; ++i) c[i] = __ldg(src + i);
    uint32_t mx = 0;
#pragma unroll
    for (int i = 0; i < C; ++i) mx = umax(mx, chunk_amax_bits<E>(c[i]));
    const bool bad = mx >= kInfBits;
    const float bamax = bad ? 0.0f : __uint_as_float(mx);
    const float s_f = clamp_nan(gdiv.exact_tiny(six.exact_tiny(bamax)), -INFINITY, kFp8Max);
    const uint32_t sbyte = e4m3(s_f);
    const float sf = e4m3_to_float(sbyte);
    // sf NaN (a NaN or negative-NaN static global scale): the reference's codes are all 0 too
    // (every threshold comparison of a NaN is false); e2m1_code_finite needs finite values.
    const bool zero = bad || sf == 0.0f || abs_bits(sf) > kInfBits;
    const ScaleDiv div(mul_rn(sf, g));
    uint32_t packed[2] = {0u, 0u};
#pragma unroll
    for (int i = 0; i < C; ++i) {
      float f[V];
      chunk_to_float<E>(c[i], f);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int e = i * V + j;  // element of the block
        const float v = clamp_nan(div.exact_tiny(f[j]), -kFp4Max, kFp4Max);
        packed[e >> 3] |= e2m1_code_finite(v) << (4 * (e & 7));
      }
    }
    if (zero) packed[0] = packed[1] = 0u;
    reinterpret_cast<uint2*>(p.data + m * p.nb * 8)[kb] = make_uint2(packed[0], packed[1]);
    const int64_t off = p.swizzle ? swizzle_offset(m, kb, p.np) : m * p.nb + kb;
    p.scales[off] = static_cast<uint8_t>(bad ? kScaleNan : sbyte);
  }
}

// amax bits of the finite elements (from launch_amax<true>) -> global scale, in place.
__global__ void nvfp4_finalize_kernel(float* gscale) {
  const uint32_t mx = *reinterpret_cast<const uint32_t*>(gscale);
  *gscale = max_nan(div_rn(__uint_as_float(mx), kGlobalDiv), kFltMin);
}

}  // namespace
}  // namespace pyops

extern "C" cudaError_t pyops_quantize_nvfp4(const pyops_quantize_nvfp4_params* params,
                                            cudaStream_t stream) {
  using namespace pyops;
  if (params == nullptr) return cudaErrorInvalidValue;
  const pyops_quantize_nvfp4_params& p = *params;
  if (p.M < 0 || p.K < 0 || !valid_dtype(p.dtype)) return cudaErrorInvalidValue;
  if (p.M == 0 || p.K == 0) return cudaSuccess;
  if (p.x == nullptr || p.data == nullptr || p.scales == nullptr || p.global_scale == nullptr)
    return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(p.data) % 4 != 0) return cudaErrorInvalidValue;
  const InView in{p.x, p.M, p.K, p.stride_m, p.stride_k};
  cudaError_t e;
  if (p.compute_global) {
    e = launch_amax<true>(in, p.dtype, reinterpret_cast<uint32_t*>(p.global_scale), stream);
    if (e != cudaSuccess) return e;
    nvfp4_finalize_kernel<<<1, 1, 0, stream>>>(p.global_scale);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  const int64_t nb = cdiv(p.K, 16);
  Nvfp4Params kp{in, p.data, p.scales, p.global_scale, nb, cdiv(nb, 4) * 4, p.swizzle ? 1 : 0};
  const bool vec = vec_ok(in, elem_size(p.dtype));
  const bool blocks = vec && p.K % 16 == 0 && reinterpret_cast<uintptr_t>(p.data) % 8 == 0;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    int grid = 0;
    if (blocks) {
      cudaError_t err = grid_for(p.M * nb, kThreads, 8, &grid);
      if (err != cudaSuccess) return err;
      nvfp4_block_kernel<E><<<grid, kThreads, 0, stream>>>(kp);
      return cudaGetLastError();
    }
    cudaError_t err = grid_for(p.M * nb * (16 / E::V), kThreads, 8, &grid);
    if (err != cudaSuccess) return err;
    if (vec)
      nvfp4_kernel<E, true><<<grid, kThreads, 0, stream>>>(kp);
    else
      nvfp4_kernel<E, false><<<grid, kThreads, 0, stream>>>(kp);
    return cudaGetLastError();
  });
}

// common.cuh - the one set of device helpers of the pyops kernels: element load/store, exact
// fp32 arithmetic, FP8/FP4 codecs, reductions, launch helpers. Torch-free; every csrc/*.cu uses
// these (no kernel file defines its own loads, stores, conversions or _rn arithmetic).
//
// Bit-exactness rules (spec: pyops/reference/*.py, fp32 math, IEEE RNE):
//  - every division / product / sum / difference / square root is div_rn, mul_rn, add_rn,
//    sub_rn, sqrt_rn: inline PTX div.rn.f32 etc. without .ftz, so neither -use_fast_math /
//    -ftz=true nor FMA contraction can change a result (libdevice's __fdiv_rn / __fadd_rn /
//    __fmul_rn follow -ftz and flush subnormals, fabsf/fmaxf become abs.ftz / max.ftz);
//  - clamps and maxima propagate NaN like torch.clamp (a comparison-select, never fminf/fmaxf);
//  - widening fp16/bf16 -> fp32 is exact; narrowing fp32 -> fp16/bf16 rounds to nearest even
//    (torch's Tensor.to); fp32 -> e4m3 is the hardware RNE cast with satfinite (inputs are
//    already clamped to +-448 as in the spec, so saturation never decides a finite result);
//  - E2M1 is the branch-free threshold sum of the reference, sign bit = (v < 0).
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "pyops/common.h"

namespace pyops {

constexpr float kFltMin = 1.17549435082228750797e-38f;  // 2^-126, smallest normal fp32
constexpr uint32_t kInfBits = 0x7F800000u;              // |x| bits >= this: inf or NaN
constexpr uint32_t kNanBits = 0x7FC00000u;              // torch's float('nan') in fp32
constexpr int kThreads = 256;

// ---- element types ----------------------------------------------------------------------------
// Each type moves in 16-byte chunks of V elements; a chunk is kept as raw bits in a uint4 and
// converted to fp32 exactly (all three input types embed exactly in fp32). from_float rounds
// fp32 to the type, to nearest even (the hardware cvt.rn, which keeps subnormals).
struct F32 {
  using storage = uint32_t;
  static constexpr int V = 4;
  static constexpr pyops_dtype_t dtype = PYOPS_DTYPE_F32;
  static __device__ __forceinline__ float to_float(uint32_t b) { return __uint_as_float(b); }
  static __device__ __forceinline__ uint32_t from_float(float v) { return __float_as_uint(v); }
};
struct F16 {
  using storage = uint16_t;
  static constexpr int V = 8;
  static constexpr pyops_dtype_t dtype = PYOPS_DTYPE_F16;
  static __device__ __forceinline__ float to_float(uint16_t b) {
    return __half2float(__ushort_as_half(b));
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};
struct BF16 {
  using storage = uint16_t;
  static constexpr int V = 8;
  static constexpr pyops_dtype_t dtype = PYOPS_DTYPE_BF16;
  static __device__ __forceinline__ float to_float(uint16_t b) {
    return __uint_as_float(static_cast<uint32_t>(b) << 16);
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// ---- scalar loads / stores with the dtype known at run time (element-wise kernels) ----------
// Element i of a buffer of dtype t (PYOPS_DTYPE_F32 / F16 / BF16), widened to fp32 exactly.
__device__ __forceinline__ float load_float(const void* p, pyops_dtype_t t, int64_t i) {
  switch (t) {
    case PYOPS_DTYPE_BF16: return BF16::to_float(static_cast<const uint16_t*>(p)[i]);
    case PYOPS_DTYPE_F16: return F16::to_float(static_cast<const uint16_t*>(p)[i]);
    default: return F32::to_float(static_cast<const uint32_t*>(p)[i]);
  }
}

// Element i of a buffer of dtype t <- v, rounded to nearest even.
__device__ __forceinline__ void store_float(void* p, pyops_dtype_t t, int64_t i, float v) {
  switch (t) {
    case PYOPS_DTYPE_BF16: static_cast<uint16_t*>(p)[i] = BF16::from_float(v); break;
    case PYOPS_DTYPE_F16: static_cast<uint16_t*>(p)[i] = F16::from_float(v); break;
    default: static_cast<uint32_t*>(p)[i] = F32::from_float(v); break;
  }
}

// dst[i] = src[i], both of dtype t, as raw bits.
__device__ __forceinline__ void copy_elem(void* dst, const void* src, pyops_dtype_t t, int64_t i) {
  if (t == PYOPS_DTYPE_F32)
    static_cast<uint32_t*>(dst)[i] = static_cast<const uint32_t*>(src)[i];
  else
    static_cast<uint16_t*>(dst)[i] = static_cast<const uint16_t*>(src)[i];
}

// Input view: element (m, k) at base + m*sm + k*sk (elements).
struct InView {
  const void* base;
  int64_t M, K, sm, sk;
};

// Raw bits of element j of a little-endian run of 32-bit words holding elements of type E.
template <typename E>
__device__ __forceinline__ typename E::storage word_elem(const uint32_t* w, int j) {
  if constexpr (sizeof(typename E::storage) == 4) {
    return w[j];
  } else {
    return static_cast<uint16_t>((w[j >> 1] >> ((j & 1) * 16)) & 0xFFFFu);
  }
}

// Raw bits of element j (0 <= j < V) of a chunk.
template <typename E>
__device__ __forceinline__ typename E::storage chunk_elem(const uint4& c, int j) {
  const uint32_t w[4] = {c.x, c.y, c.z, c.w};
  return word_elem<E>(w, j);
}

template <typename E>
__device__ __forceinline__ void chunk_set(uint4& c, int j, typename E::storage v) {
  uint32_t* w = reinterpret_cast<uint32_t*>(&c);
  if constexpr (sizeof(typename E::storage) == 4) {
    w[j] = v;
  } else {
    w[j >> 1] |= static_cast<uint32_t>(v) << ((j & 1) * 16);
  }
}

template <typename E>
__device__ __forceinline__ void chunk_to_float(const uint4& c, float (&f)[E::V]) {
#pragma unroll
  for (int j = 0; j < E::V; ++j) f[j] = E::to_float(chunk_elem<E>(c, j));
}

// Load elements (m, k0 .. k0+V-1) as raw bits; elements with k >= K read as +0.
// VEC: stride_k == 1 and every row start 16-byte aligned (checked on the host); k0 % V == 0.
template <typename E, bool VEC>
__device__ __forceinline__ uint4 load_chunk(const InView& in, int64_t m, int64_t k0) {
  using S = typename E::storage;
  const S* x = static_cast<const S*>(in.base);
  uint4 c = make_uint4(0u, 0u, 0u, 0u);
  if (VEC && k0 + E::V <= in.K) {
    return __ldg(reinterpret_cast<const uint4*>(x + m * in.sm + k0));
  }
  const int64_t row = m * in.sm;
#pragma unroll
  for (int j = 0; j < E::V; ++j) {
    const int64_t k = k0 + j;
    if (k < in.K) chunk_set<E>(c, j, __ldg(x + row + k * in.sk));
  }
  return c;
}

// N (4 or 8) consecutive elements k0 .. k0+N-1 of type E at base + off + k, as fp32; 0 for
// k >= D. VEC: base + off + k0 is aligned to the N elements' size (>= 8 bytes) -- then a whole
// run is one or two vector loads.
template <typename E, int N>
__device__ __forceinline__ void load_floats(const void* base, int64_t off, int64_t k0,
                                            int64_t D, bool vec, float (&f)[N]) {
  using S = typename E::storage;
  const S* ptr = static_cast<const S*>(base) + off + k0;
  constexpr int kWords = N * static_cast<int>(sizeof(S)) / 4;
  static_assert(kWords == 2 || kWords % 4 == 0, "runs of 8, 16 or 32 bytes");
  if (vec && k0 + N <= D) {
    uint32_t w[kWords];
    if constexpr (kWords == 2) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(ptr));
      w[0] = u.x;
      w[1] = u.y;
    } else {
#pragma unroll
      for (int i = 0; i < kWords / 4; ++i) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(ptr) + i);
        w[4 * i] = u.x;
        w[4 * i + 1] = u.y;
        w[4 * i + 2] = u.z;
        w[4 * i + 3] = u.w;
      }
    }
#pragma unroll
    for (int j = 0; j < N; ++j) f[j] = E::to_float(word_elem<E>(w, j));
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) f[j] = (k0 + j < D) ? E::to_float(__ldg(ptr + j)) : 0.0f;
}

// Elements k0 .. k0+N-1 (those < D) of type E at base + off + k <- f, rounded to nearest even.
// VEC as for load_floats.
template <typename E, int N>
__device__ __forceinline__ void store_floats(void* base, int64_t off, int64_t k0, int64_t D,
                                             bool vec, const float (&f)[N]) {
  using S = typename E::storage;
  S* ptr = static_cast<S*>(base) + off + k0;
  constexpr int kWords = N * static_cast<int>(sizeof(S)) / 4;
  static_assert(kWords == 2 || kWords % 4 == 0, "runs of 8, 16 or 32 bytes");
  if (vec && k0 + N <= D) {
    uint32_t w[kWords];
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0u;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if constexpr (sizeof(S) == 4) {
        w[j] = E::from_float(f[j]);
      } else {
        w[j >> 1] |= static_cast<uint32_t>(E::from_float(f[j])) << ((j & 1) * 16);
      }
    }
    if constexpr (kWords == 2) {
      *reinterpret_cast<uint2*>(ptr) = make_uint2(w[0], w[1]);
    } else {
#pragma unroll
      for (int i = 0; i < kWords / 4; ++i)
        reinterpret_cast<uint4*>(ptr)[i] =
            make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (k0 + j < D) ptr[j] = E::from_float(f[j]);
}

// |x| bits: max over a group of these is the group's amax when < kInfBits; a value >= kInfBits
// means the group holds inf or NaN (bits are ordered like the non-negative floats they encode).
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }

// Same, but inf/NaN count as 0 (amax over finite elements only).
__device__ __forceinline__ uint32_t finite_abs_bits(float v) {
  const uint32_t a = abs_bits(v);
  return a >= kInfBits ? 0u : a;
}

__device__ __forceinline__ uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }

// max |x| over the V elements of a raw chunk, as fp32 |x| bits (>= kInfBits: inf or NaN among
// them), computed on the stored bits: for non-negative fp16/bf16 bit patterns the integer order
// is the value order (inf and NaN above every finite value), so the maximum is taken on 16-bit
// lanes (packed max) and only the winner is widened. Equals max_j abs_bits(to_float(x_j)) when
// that is finite, and is >= kInfBits exactly when an element is inf/NaN (payloads may differ).
template <typename E>
__device__ __forceinline__ uint32_t chunk_amax_bits(const uint4& c) {
  if constexpr (sizeof(typename E::storage) == 4) {
    return umax(umax(c.x & 0x7FFFFFFFu, c.y & 0x7FFFFFFFu),
                umax(c.z & 0x7FFFFFFFu, c.w & 0x7FFFFFFFu));
  } else {
    const uint32_t m = __vmaxu2(__vmaxu2(c.x & 0x7FFF7FFFu, c.y & 0x7FFF7FFFu),
                                __vmaxu2(c.z & 0x7FFF7FFFu, c.w & 0x7FFF7FFFu));
    const uint32_t h = umax(m & 0xFFFFu, m >> 16);
    return abs_bits(E::to_float(static_cast<typename E::storage>(h)));
  }
}

// Max over aligned groups of W lanes (W a power of 2 <= 32); every lane of the warp must call.
template <int W>
__device__ __forceinline__ uint32_t group_max(uint32_t v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v = umax(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

// Max over the whole block (blockDim.x a multiple of 32, <= 1024). Every thread must call;
// `red` is __shared__ uint32_t[32]. Ends with a barrier so `red` can be reused right away.
__device__ __forceinline__ uint32_t block_max(uint32_t v, uint32_t* red) {
  v = group_max<32>(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  uint32_t r = 0;
  for (int i = 0; i < nw; ++i) r = umax(r, red[i]);
  __syncthreads();
  return r;
}

// Max over the `wpr` warps that hold one row (rows of wpr consecutive warps, side by side in the
// CTA; wpr block-uniform, every thread calls; `red` is __shared__ uint32_t[blockDim.x / 32]).
// A single-warp row needs no barrier. Ends with a barrier so `red` can be reused right away.
__device__ __forceinline__ uint32_t row_max(uint32_t v, uint32_t* red, int wpr) {
  v = group_max<32>(v);
  if (wpr == 1) return v;
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) red[warp] = v;
  __syncthreads();
  const int w0 = warp - warp % wpr;
  uint32_t r = 0;
  for (int i = 0; i < wpr; ++i) r = umax(r, red[w0 + i]);
  __syncthreads();
  return r;
}

// IEEE fp32 division / product, round to nearest even, subnormals kept, never contracted.
__device__ __forceinline__ float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sub_rn(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// fma(a, b, c) = a*b + c rounded once (IEEE RNE), subnormals kept.
__device__ __forceinline__ float fma_rn(float a, float b, float c) {
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
}
__device__ __forceinline__ float sqrt_rn(float a) {
  float r;
  asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}

// 1 / sqrt(v), both steps IEEE RNE (rsqrtf is approximate).
__device__ __forceinline__ float rsqrt_rn(float v) { return div_rn(1.0f, sqrt_rn(v)); }

// |v| from the bits (abs.f32 would be abs.ftz.f32 in an -ftz build); NaN stays NaN.
__device__ __forceinline__ float abs_rn(float v) { return __uint_as_float(abs_bits(v)); }

// torch.clamp_min(v, lo) / max(v, lo) with NaN passing through (fmaxf would drop the NaN).
__device__ __forceinline__ float max_nan(float v, float lo) { return v < lo ? lo : v; }

// min / max returning the other operand when one is NaN (IEEE minNum / maxNum; PTX min.f32 /
// max.f32, one instruction, no .ftz in a fast-math build, which fminf / fmaxf would get). For
// clamps whose NaN input is handled elsewhere (gelu_quant.cu: y = NaN / .. through x).
__device__ __forceinline__ float min_num(float a, float b) {
  float r;
  asm("min.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float max_num(float a, float b) {
  float r;
  asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// (v < 0) from the bits, so an -ftz build cannot turn a negative subnormal into -0:
// sign set, not +-0, not NaN.
__device__ __forceinline__ bool is_negative(float v) {
  const uint32_t b = __float_as_uint(v);
  const uint32_t a = b & 0x7FFFFFFFu;
  return (b >> 31) != 0u && a != 0u && a <= kInfBits;
}

// torch.clamp semantics: NaN passes through.
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Two fp32 -> e4m3 codes, RNE, satfinite; `a` in the low byte.
__device__ __forceinline__ uint32_t e4m3x2(float a, float b) {
  return static_cast<uint32_t>(
      __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ uint32_t e4m3(float a) {
  return static_cast<uint32_t>(__nv_cvt_float_to_fp8(a, __NV_SATFINITE, __NV_E4M3));
}

// e4m3 byte -> fp32, exact (e4m3 embeds in fp16).
__device__ __forceinline__ float e4m3_to_float(uint32_t byte) {
  const __half_raw h =
      __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(byte), __NV_E4M3);
  return __half2float(__half(h));
}

// E2M1 code of an fp32 already clamped to [-6, 6] (NaN -> 0): the reference's threshold sum.
__device__ __forceinline__ uint32_t e2m1_code(float v) {
  const float m = abs_rn(v);
  const uint32_t idx = static_cast<uint32_t>(m > 0.25f) + static_cast<uint32_t>(m >= 0.75f) +
                       static_cast<uint32_t>(m > 1.25f) + static_cast<uint32_t>(m >= 1.75f) +
                       static_cast<uint32_t>(m > 2.5f) + static_cast<uint32_t>(m >= 3.5f) +
                       static_cast<uint32_t>(m > 5.0f);
  return idx | (is_negative(v) ? 8u : 0u);
}

// The same code for a finite v in [-6, 6] in fewer instructions, by rounding on the bits (checked
// equal to the threshold sum for every fp32 in [0, 6], tests/test_cvt.py):
//   |v| <  1: RN(|v| + 2^22) - 2^22 rounds to the 0.5 grid with ties to even -> 0, 1, 2;
//   |v| >= 1: round the fp32 to one mantissa bit (RNE: add 0x1FFFFF + the kept bit), then
//             (exponent, mantissa bit) - (126, 0) is the E2M1 code 2..7.
__device__ __forceinline__ uint32_t e2m1_code_finite(float v) {
  const uint32_t a = abs_bits(v);
  const float m = __uint_as_float(a);
  uint32_t mag;
  if (m < 1.0f) {
    mag = __float_as_uint(add_rn(m, 4194304.0f)) - 0x4A800000u;  // bits of 2^22
  } else {
    mag = ((a + 0x1FFFFFu + ((a >> 22) & 1u)) >> 22) - 252u;
  }
  return mag | ((__float_as_uint(v) >> 31) != 0u && a != 0u ? 8u : 0u);
}

// ---- FP8 e4m3 group quantization (quantize_fp8, norm_modulate_quant) ------------------------
constexpr float kFp8Max = 448.0f;

// Dequantization scale of a group from the max |x| bits of its elements:
// max(amax / 448, FLT_MIN); NaN bits when the group holds inf/NaN (mx >= kInfBits).
__device__ __forceinline__ float fp8_scale(uint32_t mx) {
  if (mx >= kInfBits) return __uint_as_float(kNanBits);
  return max_nan(div_rn(__uint_as_float(mx), kFp8Max), kFltMin);
}

// x / d for many x and one d, bit-identical to div_rn(x, d) (IEEE RNE) at three FP instructions
// per element instead of a full division: with r = RN(1/d) (one IEEE division per group),
//   q0 = RN(x * r);  e = RN(x - q0 * d) (exact, one FMA);  q = RN(q0 + e * r) (one FMA)
// is RN(x / d) whenever nothing underflows or overflows (Markstein's theorem: r within half an
// ulp of 1/d and q0 within one ulp of x/d; P. Markstein, IBM J. Res. Dev. 34(1), 1990;
// J.-M. Muller, "Accelerating floating-point division when the divisor is known in advance",
// LIP report 2002-30). `fast` keeps d in [2^-90, 2^90] so 1/d, x*r and the remainder are normal
// for every quotient >= 2^-13 (the remainder x - q0*d is a multiple of ulp(q0)*ulp(d) >= 2^-149).
// Smaller quotients may be off by an ulp; callers whose result depends on them (NVFP4's sign of
// a value that underflows to -0) use exact_tiny(). d outside the range, or NaN: div_rn per
// element. x = -0 keeps its sign (q0 + e*r would give +0).
struct ScaleDiv {
  float d, nd, r;  // nd = -d (negated on the bits: no neg.ftz in a fast-math build)
  bool fast;
  __device__ __forceinline__ explicit ScaleDiv(float d_) : d(d_) {
    nd = __uint_as_float(__float_as_uint(d_) ^ 0x80000000u);
    fast = d_ >= 0x1p-90f && d_ <= 0x1p+90f;  // false for NaN
    r = fast ? div_rn(1.0f, d_) : 0.0f;
  }
  __device__ __forceinline__ float operator()(float x) const {
    if (!fast) return div_rn(x, d);
    const float q0 = mul_rn(x, r);
    const float e = fma_rn(q0, nd, x);  // x - q0 * d, exact
    const float q = fma_rn(e, r, q0);
    return __uint_as_float(__float_as_uint(q) | (__float_as_uint(x) & 0x80000000u));
  }
  // operator() exact also where |x / d| < 2^-13: the rare x != 0 whose quotient is that small
  // takes the IEEE division (a zero x never does).
  __device__ __forceinline__ float exact_tiny(float x) const {
    const float q = (*this)(x);
    // 0x39000000: the bits of 2^-13
    if (fast && abs_bits(q) < 0x39000000u && abs_bits(x) != 0u) return div_rn(x, d);
    return q;
  }
};

// e4m3(clamp(f / sc, -448, 448)) of V elements into V bytes (little-endian words); all zero if
// bad (the group holds inf/NaN). In a good group every f / sc is finite, so the satfinite cast
// is the clamp (|v| > 448 -> +-448, the same code as clamping first); the division is exact
// (ScaleDiv), quotients below 2^-13 all encode as +-0 whatever their last bit.
template <int V>
__device__ __forceinline__ void fp8_codes(const float (&f)[V], const ScaleDiv& div, bool bad,
                                          uint32_t (&w)[V / 4]) {
#pragma unroll
  for (int i = 0; i < V / 4; ++i) {
    const float* v = f + 4 * i;
    const uint32_t lo = e4m3x2(div(v[0]), div(v[1]));
    const uint32_t hi = e4m3x2(div(v[2]), div(v[3]));
    w[i] = bad ? 0u : (lo | (hi << 16));
  }
}

// Store the V code bytes of elements k0 .. k0+V-1 of a row (length K) at `row`, skipping
// k >= K. VEC: row + k0 is V-byte aligned -- then a full chunk is one 4- or 8-byte store.
template <int V>
__device__ __forceinline__ void store_codes(uint8_t* row, int64_t k0, int64_t K, bool vec,
                                            const uint32_t (&w)[V / 4]) {
  uint8_t* dst = row + k0;
  if (vec && k0 + V <= K) {
    if constexpr (V == 8) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
    } else {
      *reinterpret_cast<uint32_t*>(dst) = w[0];
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (k0 + j < K) dst[j] = static_cast<uint8_t>(w[j >> 2] >> ((j & 3) * 8));
}

// (a / b, a % b) for non-negative int64; 32-bit hardware path when both fit.
__device__ __forceinline__ int64_t divmod(int64_t a, int64_t b, int64_t& rem) {
  if (((a | b) >> 32) == 0) {
    const uint32_t q = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    rem = static_cast<int64_t>(static_cast<uint32_t>(a) - q * static_cast<uint32_t>(b));
    return q;
  }
  const int64_t q = a / b;
  rem = a - q * b;
  return q;
}

// ---- host side --------------------------------------------------------------------------------
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int elem_size(pyops_dtype_t t) { return t == PYOPS_DTYPE_F32 ? 4 : 2; }

inline bool valid_dtype(pyops_dtype_t t) {
  return t == PYOPS_DTYPE_F32 || t == PYOPS_DTYPE_F16 || t == PYOPS_DTYPE_BF16;
}

// True when the 16-byte vector path may be used for every row.
inline bool vec_ok(const InView& in, int esize) {
  if (in.sk != 1 && in.K > 1) return false;
  if (reinterpret_cast<uintptr_t>(in.base) % 16 != 0) return false;
  return in.M <= 1 || (in.sm * esize) % 16 == 0;
}

// A contiguous (M, K) input seen as one row of M*K elements (for whole-tensor passes).
inline InView flatten_if_contiguous(const InView& in) {
  if ((in.sk == 1 || in.K == 1) && (in.sm == in.K || in.M == 1)) {
    return InView{in.base, 1, in.M * in.K, in.M * in.K, 1};
  }
  return in;
}

// Grid size for grid-stride kernels: enough CTAs to fill the device a few times over.
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

inline cudaError_t grid_for(int64_t work_items, int threads, int ctas_per_sm, int* grid) {
  int dev = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  const int64_t need = cdiv(work_items, threads);
  const int64_t cap = static_cast<int64_t>(sms) * ctas_per_sm;
  int64_t g = need < cap ? need : cap;
  *grid = static_cast<int>(g < 1 ? 1 : g);
  return cudaSuccess;
}

// Dispatch a callable on the element type: f(F32{}) etc.
template <typename Fn>
inline cudaError_t dispatch_dtype(pyops_dtype_t t, Fn&& f) {
  switch (t) {
    case PYOPS_DTYPE_F32: return f(F32{});
    case PYOPS_DTYPE_F16: return f(F16{});
    case PYOPS_DTYPE_BF16: return f(BF16{});
  }
  return cudaErrorInvalidValue;
}

// ---- whole-tensor amax (pass 1 of the per-tensor FP8 scale and of the NVFP4 global scale) ----
// atomicMax of |x| bits into *acc (which the launcher zeroes first). FINITE_ONLY: inf/NaN count
// as 0 (NVFP4 global amax); otherwise they push the result to >= kInfBits (FP8 'bad' flag).
template <typename E, bool VEC, bool FINITE_ONLY>
__global__ void __launch_bounds__(kThreads) amax_kernel(InView in, uint32_t* acc) {
  __shared__ uint32_t red[32];
  const int64_t nc = (in.K + E::V - 1) / E::V;  // chunks per row
  const int64_t total = in.M * nc;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint32_t mx = 0;
  constexpr int U = 4;  // independent loads in flight per thread
  for (int64_t s0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s0 < total;
       s0 += U * stride) {
    uint4 c[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t s = s0 + u * stride;
      c[u] = make_uint4(0u, 0u, 0u, 0u);
      if (s < total) {
        int64_t kc;
        const int64_t m = divmod(s, nc, kc);
        c[u] = load_chunk<E, VEC>(in, m, kc * E::V);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float f[E::V];
      chunk_to_float<E>(c[u], f);
#pragma unroll
      for (int j = 0; j < E::V; ++j)
        mx = umax(mx, FINITE_ONLY ? finite_abs_bits(f[j]) : abs_bits(f[j]));
    }
  }
  mx = block_max(mx, red);
  if (threadIdx.x == 0 && mx != 0u) atomicMax(acc, mx);
}

// Zero *acc, then atomicMax the amax bits of `in` into it. Flattens contiguous inputs.
template <bool FINITE_ONLY>
inline cudaError_t launch_amax(const InView& in0, pyops_dtype_t dtype, uint32_t* acc,
                               cudaStream_t stream) {
  cudaError_t e = cudaMemsetAsync(acc, 0, sizeof(uint32_t), stream);
  if (e != cudaSuccess) return e;
  const InView in = flatten_if_contiguous(in0);
  const bool vec = vec_ok(in, elem_size(dtype));
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    const int64_t chunks = in.M * ((in.K + E::V - 1) / E::V);
    int grid = 0;
    cudaError_t err = grid_for(cdiv(chunks, 4), kThreads, 8, &grid);
    if (err != cudaSuccess) return err;
    if (vec)
      amax_kernel<E, true, FINITE_ONLY><<<grid, kThreads, 0, stream>>>(in, acc);
    else
      amax_kernel<E, false, FINITE_ONLY><<<grid, kThreads, 0, stream>>>(in, acc);
    return cudaGetLastError();
  });
}

}  // namespace pyops

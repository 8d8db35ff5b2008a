// weight_only_linear.cu - weight-streaming skinny GEMM for small M (W8A16 / W4A16), and the
// pyops_weight_only_linear C ABI. Torch-free. Spec: pyops/reference/weight_only_linear.py (ABI and
// numerics: pyops/weight_only_linear.h). UNVERIFIED ON HARDWARE: compiled for sm_90a / sm_100a.
//
// y (M, N) = x (M, K) @ W (N, K)^T: the weight is the MMA's A operand ("M" side, 16 rows), the
// tokens its B operand (x^T, n-tiles of 8 tokens), so a small M wastes no weight bandwidth.
//   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}; lane = 4 g + t (g = lane / 4, t = lane % 4)
//   holds A rows g and g+8 and B column (token) g at the k-slots {2t, 2t+1, 2t+8, 2t+9}, and the
//   fp32 results D[g][2t, 2t+1], D[g+8][2t, 2t+1] (PTX ISA, "Matrix fragments for mma.m16n8k16").
//
// K permutation (no shuffled weight layout): a dot product does not care in which order k is
// visited as long as A and B use the same order. Each lane loads 16 CONTIGUOUS weight bytes of
// row g (and of row g+8) at byte 16t of a 64-byte "chunk" of the row, and the same physical k's
// of x row g. MMA k16-step s of a chunk gives logical slot j (0..15) the physical k
//     kseg + 4 s + 2 (j / 8) + (j % 2),   kseg = chunk_k0 + EPT * t   (EPT = 16 FP8, 32 NVFP4)
// i.e. slots {2t, 2t+1} -> kseg + 4s + {0, 1}, slots {2t+8, 2t+9} -> kseg + 4s + {2, 3}: a
// function of the slot only (the same for A and B, whatever g), and over the steps s and the four
// t a bijection onto the chunk's k's (16 t + 4 s + 2 h + e, t < 4, s < 4 (FP8) / 32 t + 4 s + ..,
// s < 8 (NVFP4)). So in step s the A register pair {a0, a2} of row g is weight elements
// 4s .. 4s+3 of the lane's segment and {b0, b1} is x words 2s, 2s+1 (elements 4s .. 4s+3).
//   FP8:   chunk = 64 k = 64 bytes a row; 4 k16-steps; segment = 16 e4m3 bytes.
//   NVFP4: chunk = 128 k = 64 bytes a row; 8 k16-steps; segment = 32 codes = exactly 2 scale
//          blocks (steps 0-3 use block 2t of the chunk, steps 4-7 block 2t+1).
//
// Weight operand, exact in x's dtype (header): FP8 -> cvt.rn.f16x2.e4m3x2 (exact), then for bf16
// f16 -> f32 -> bf16 (exact: <= 4 significant bits, |v| in [2^-9, 448]). NVFP4 -> per code pair
// the fp16 bits sign | (code & 7) << 9 are e2m1 * 2^-14 (code 1 = 0.5 becomes the fp16 subnormal
// 2^-15, codes >= 2 have exponent field e and mantissa bit m: 2^(e-15) (1 + m/2)); times 2^14 and
// times the block scale in mul.rn.f16x2 (no .ftz: subnormal inputs kept; both products exact:
// <= 6 significant bits, |v| in [2^-10, 2688]); bf16: converted as above. NaN scales stay NaN.
//
// CTA = 4 warps on the SAME 16 weight rows and up to 64 tokens (NT n-tiles of 8); the warps
// interleave the CTA's chunks (warp w: chunks w, w+4, ...), each loading the weights of kUnroll
// chunks (up to 128 bytes a lane in flight, ld.global.nc.L1::no_allocate) before their MMAs, x
// through the read-only cache (__ldg: x is small and read by every CTA). The four fp32 partial tiles are
// summed through shared memory in warp order 0+1+2+3 (deterministic). grid = (ceil(N/16),
// split_k, min(ceil(M/64), 65535)); CTAs loop over further M tiles.
// split_k == 1: the CTA finishes (scale, bias, RNE) and writes out. split_k > 1: split s covers
// chunks [s*per, (s+1)*per) (per = ceil(nchunks / split_k); may be empty), writes its UNSCALED
// fp32 sums to workspace[s][m][n] (all of them, zeros if empty), and wol_finalize sums the splits
// in order s = 0, 1, ... and finishes. Epilogue (finish): fp32 mul_rn by the scale, add_rn the
// bias, one RNE rounding (common.cuh helpers: fast-math-proof).
//
// Tails: rows n >= N load zeros and are not stored; tokens m >= M load zeros and are not stored;
// weights and x at k >= K are zero (both, so no NaN * 0). VEC (template) = 16-byte loads, needs
// x 16-byte aligned with stride_xm % 8 == 0, w 16-byte aligned and K % 16 == 0 (FP8) / K % 32 == 0
// (NVFP4, then also w_scale 2-byte aligned): then every segment is entirely inside or entirely
// past K. Otherwise element loads with per-element masks (correct, slower).
//
// Not done (measure first): x staged in shared memory for M > 16 (x is re-read from L1/L2 by
// every CTA: 2 bytes per token per k against 1 (FP8) / 0.5 (NVFP4) weight bytes per row per k),
// more rows per warp to reuse B fragments, software pipelining across loop iterations, a cheaper
// NVFP4 -> bf16 dequantization (~4.5 integer/fp16 instructions per weight element here).
#include "pyops/weight_only_linear.h"

#include "common.cuh"

namespace pyops {
namespace {

constexpr int kWarps = 4;                 // warps per CTA, all on the same 16 weight rows
constexpr int kWolThreads = 32 * kWarps;
constexpr int kRows = 16;                 // weight rows per CTA (the MMA's M)
constexpr int kTileM = 64;                // tokens per CTA: at most 8 n-tiles of 8
// Per format and tile width (NT n-tiles of 8 tokens): the chunks whose weights a warp loads
// before their MMAs (4 = 128 bytes a lane in flight; fewer where the x fragments of 32-64 tokens
// need the registers: NVFP4 reads 32 x elements a lane per n-tile and chunk) and the CTAs per SM
// the register budget is sized for (launch bounds: 4 -> <= 128 registers, 2 -> <= 255). Chosen
// so that ptxas -v reports no spills for sm_90a and sm_100a.
template <int FMT, int NT>
constexpr int kUnroll = NT >= 8 ? (FMT == PYOPS_WEIGHT_NVFP4 ? 1 : 2) : (NT >= 4 ? 2 : 4);
template <int NT>
constexpr int kMinCtas = NT >= 4 ? 2 : 4;
constexpr int kMaxGridYZ = 65535;

struct WolArgs {
  pyops_weight_only_linear_params p;
  int64_t row_bytes;  // weight row stride (bytes)
  int64_t nb;         // NVFP4 scale blocks per row, ceil(K / 16)
  int64_t nchunks;    // ceil(K / chunk_k)
  int64_t per_split;  // chunks per split, ceil(nchunks / split_k)
  int64_t mtiles;     // ceil(M / 64)
};

// ---- device helpers -----------------------------------------------------------------------------
// 16 weight bytes, streamed (read once: not kept in L1).
__device__ __forceinline__ uint4 ldg_stream16(const uint8_t* ptr) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(ptr));
  return r;
}

// Two e4m3 bytes (bits 16 HI .. 16 HI + 15 of v, the lower byte first) -> f16x2 (lower byte in
// the low half), exact. sm_89+.
template <int HI>
__device__ __forceinline__ uint32_t fp8pair_to_f16x2(uint32_t v) {
  uint32_t r;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(static_cast<uint16_t>(v >> (16 * HI))));
  return r;
}

// f16x2 -> bf16x2 through fp32; exact for the values here (few significant bits, in range).
__device__ __forceinline__ uint32_t f16x2_to_bf16x2(uint32_t h) {
  uint32_t r;
  asm("{\n\t.reg .b16 lo, hi;\n\t.reg .f32 a, b;\n\tmov.b32 {lo, hi}, %1;\n\t"
      "cvt.f32.f16 a, lo;\n\tcvt.f32.f16 b, hi;\n\tcvt.rn.bf16x2.f32 %0, b, a;\n\t}"
      : "=r"(r) : "r"(h));
  return r;
}

// a * b on f16x2, round to nearest even, subnormals kept (no .ftz).
__device__ __forceinline__ uint32_t mul_f16x2(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

// An f16x2 weight pair in the MMA's type T.
template <typename T>
__device__ __forceinline__ uint32_t to_operand(uint32_t h) {
  if constexpr (T::dtype == PYOPS_DTYPE_BF16) {
    return f16x2_to_bf16x2(h);
  } else {
    return h;
  }
}

// d += A (16 x 16) * B (16 x 8), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (T::dtype == PYOPS_DTYPE_BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// The 16 weight bytes row[b0 .. b0+15], of which the first `valid` (any integer) are used; the
// others read as 0 and are not touched. VEC: row + b0 16-byte aligned and valid >= 16 whenever
// valid > 0.
template <bool VEC>
__device__ __forceinline__ uint4 weight_seg(const uint8_t* row, int64_t b0, int64_t valid) {
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  if (valid <= 0) return r;
  if constexpr (VEC) {
    return ldg_stream16(row + b0);
  } else {
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < 16; ++i)
      if (i < valid) w[i >> 2] |= static_cast<uint32_t>(__ldg(row + b0 + i)) << (8 * (i & 3));
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// NVFP4, element path: zero code `vc` (0 <= vc < 32) of a 32-code segment, the padding nibble
// after an odd K (the element loop above works in bytes). Selects, no dynamic register index.
__device__ __forceinline__ void clear_code(uint4& q, int64_t vc) {
  const uint32_t keep = ~(0xFu << (4 * (vc & 7)));
  const int64_t word = vc >> 3;
  q.x &= word == 0 ? keep : 0xFFFFFFFFu;
  q.y &= word == 1 ? keep : 0xFFFFFFFFu;
  q.z &= word == 2 ? keep : 0xFFFFFFFFu;
  q.w &= word == 3 ? keep : 0xFFFFFFFFu;
}

// EPT x elements (raw 16-bit) of token m from k0 into EPT/2 words, 0 past K or for m >= M.
// VEC: 16-byte aligned rows and K a multiple of EPT.
template <int EPT, bool VEC>
__device__ __forceinline__ void x_seg(const pyops_weight_only_linear_params& p, int64_t m,
                                      int64_t k0, uint32_t (&xw)[EPT / 2]) {
#pragma unroll
  for (int i = 0; i < EPT / 2; ++i) xw[i] = 0u;
  if (m >= p.M || k0 >= p.K) return;
  const uint16_t* src = static_cast<const uint16_t*>(p.x) + m * p.stride_xm + k0;
  if constexpr (VEC) {
#pragma unroll
    for (int i = 0; i < EPT / 8; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(src) + i);
      xw[4 * i] = v.x;
      xw[4 * i + 1] = v.y;
      xw[4 * i + 2] = v.z;
      xw[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < EPT; ++i)
      if (k0 + i < p.K) xw[i >> 1] |= static_cast<uint32_t>(__ldg(src + i)) << (16 * (i & 1));
  }
}

// NVFP4: the two e4m3 scale bytes of blocks b, b+1 of a row (block b in the low byte), 0 for
// blocks >= nb. VEC: b even, row start 2-byte aligned, nb even.
template <bool VEC>
__device__ __forceinline__ uint32_t scale_pair(const uint8_t* srow, int64_t b, int64_t nb) {
  if (b >= nb) return 0u;
  if (VEC) return __ldg(reinterpret_cast<const uint16_t*>(srow + b));
  uint32_t r = __ldg(srow + b);
  if (b + 1 < nb) r |= static_cast<uint32_t>(__ldg(srow + b + 1)) << 8;
  return r;
}

// NVFP4: codes 2i (low nibble of byte i of q) and 2i+1 (high nibble) -> f16x2 of e2m1 * 2^-14.
// w's top nibble of the low half is code 2i (byte 1 = byte i of q << 4), of the high half code
// 2i+1 (byte 3 = byte i of q); sign bit 15 stays, magnitude bits 12..14 move to 9..11.
template <int I>
__device__ __forceinline__ uint32_t e2m1pair_scaled_f16x2(uint32_t q, uint32_t q4) {
  constexpr uint32_t sel = (I << 12) | (I << 8) | ((4 + I) << 4) | (4 + I);
  const uint32_t w = __byte_perm(q, q4, sel);
  return (w & 0x80008000u) | ((w >> 3) & 0x0E000E00u);
}

// The A fragments of one chunk: a[s] for k16-step s (FP8: 4 steps, NVFP4: 8), from the lane's
// weight segments of rows g (wg) and g+8 (wh) and, for NVFP4, their scale-byte pairs.
template <typename T, int FMT>
__device__ __forceinline__ void a_frags(const uint4& wg, const uint4& wh, uint32_t sg,
                                        uint32_t sh, uint32_t (&a)[FMT == PYOPS_WEIGHT_FP8 ? 4 : 8][4]) {
  const uint32_t g4[4] = {wg.x, wg.y, wg.z, wg.w};
  const uint32_t h4[4] = {wh.x, wh.y, wh.z, wh.w};
  if constexpr (FMT == PYOPS_WEIGHT_FP8) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {  // word s = segment bytes 4s .. 4s+3
      a[s][0] = to_operand<T>(fp8pair_to_f16x2<0>(g4[s]));  // row g,   k 4s, 4s+1
      a[s][1] = to_operand<T>(fp8pair_to_f16x2<0>(h4[s]));  // row g+8, k 4s, 4s+1
      a[s][2] = to_operand<T>(fp8pair_to_f16x2<1>(g4[s]));  // row g,   k 4s+2, 4s+3
      a[s][3] = to_operand<T>(fp8pair_to_f16x2<1>(h4[s]));  // row g+8, k 4s+2, 4s+3
    }
  } else {
    constexpr uint32_t kTwo14 = 0x74007400u;  // f16x2 (2^14, 2^14)
    // scale byte pairs -> f16x2 broadcasts: [0] block 0, [1] block 1 (exact)
    const uint32_t bg = __byte_perm(sg, 0u, 0x1100u), bh = __byte_perm(sh, 0u, 0x1100u);
    const uint32_t scg[2] = {fp8pair_to_f16x2<0>(bg), fp8pair_to_f16x2<1>(bg)};
    const uint32_t sch[2] = {fp8pair_to_f16x2<0>(bh), fp8pair_to_f16x2<1>(bh)};
#pragma unroll
    for (int wi = 0; wi < 4; ++wi) {  // word wi = codes 8wi .. 8wi+7 = steps 2wi, 2wi+1
      const uint32_t qg = g4[wi], qh = h4[wi], qg4 = qg << 4, qh4 = qh << 4;
      const uint32_t pg[4] = {e2m1pair_scaled_f16x2<0>(qg, qg4), e2m1pair_scaled_f16x2<1>(qg, qg4),
                              e2m1pair_scaled_f16x2<2>(qg, qg4), e2m1pair_scaled_f16x2<3>(qg, qg4)};
      const uint32_t ph[4] = {e2m1pair_scaled_f16x2<0>(qh, qh4), e2m1pair_scaled_f16x2<1>(qh, qh4),
                              e2m1pair_scaled_f16x2<2>(qh, qh4), e2m1pair_scaled_f16x2<3>(qh, qh4)};
#pragma unroll
      for (int hs = 0; hs < 2; ++hs) {  // step s = 2wi + hs: bytes 2s, 2s+1 = pairs 2hs, 2hs+1
        const int s = 2 * wi + hs, blk = s / 4;
        a[s][0] = to_operand<T>(mul_f16x2(mul_f16x2(pg[2 * hs], kTwo14), scg[blk]));
        a[s][1] = to_operand<T>(mul_f16x2(mul_f16x2(ph[2 * hs], kTwo14), sch[blk]));
        a[s][2] = to_operand<T>(mul_f16x2(mul_f16x2(pg[2 * hs + 1], kTwo14), scg[blk]));
        a[s][3] = to_operand<T>(mul_f16x2(mul_f16x2(ph[2 * hs + 1], kTwo14), sch[blk]));
      }
    }
  }
}

// The finished output value of (m, n) from its unscaled fp32 sum v: v * scale (skipped when
// K == 0), + bias, as fp32 with one rounding each (the caller's store rounds to the out dtype).
__device__ __forceinline__ float finish(const pyops_weight_only_linear_params& p, int64_t n,
                                        float v) {
  if (p.K > 0) {
    const float sc = p.format == PYOPS_WEIGHT_FP8 ? static_cast<const float*>(p.w_scale)[n]
                                                  : p.global_scale[0];
    v = mul_rn(v, sc);
  }
  if (p.bias != nullptr) v = add_rn(v, load_float(p.bias, p.bias_dtype, n));
  return v;
}

// ---- the main kernel ----------------------------------------------------------------------------
template <typename T, int FMT, int NT, bool VEC>
__global__ void __launch_bounds__(kWolThreads, kMinCtas<NT>) wol_kernel(const WolArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  constexpr bool kFp8 = FMT == PYOPS_WEIGHT_FP8;
  constexpr int EPT = kFp8 ? 16 : 32;     // k per lane segment
  constexpr int CK = 4 * EPT;             // k per chunk
  constexpr int STEPS = CK / 16;          // k16 MMA steps per chunk
  __shared__ float red[kWarps][NT * 4][32];
  const pyops_weight_only_linear_params& p = a.p;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t split = blockIdx.y;
  const int64_t c_begin = split * a.per_split;
  const int64_t c_end = c_begin + a.per_split < a.nchunks ? c_begin + a.per_split : a.nchunks;
  // this lane's two weight rows (null when past N: nothing is loaded for them)
  const uint8_t* rg = n0 + g < p.N ? p.w + (n0 + g) * a.row_bytes : nullptr;
  const uint8_t* rh = n0 + g + 8 < p.N ? p.w + (n0 + g + 8) * a.row_bytes : nullptr;
  const uint8_t* sgr = nullptr;
  const uint8_t* shr = nullptr;
  if constexpr (!kFp8) {
    const uint8_t* s8 = static_cast<const uint8_t*>(p.w_scale);
    if (rg != nullptr) sgr = s8 + (n0 + g) * a.nb;
    if (rh != nullptr) shr = s8 + (n0 + g + 8) * a.nb;
  }
  for (int64_t mt = blockIdx.z; mt < a.mtiles; mt += gridDim.z) {  // block-uniform
    const int64_t m0 = mt * kTileM;
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
    // warp w: chunks c_begin + w, + kWarps, ...; kUnroll of them per iteration (warp-uniform)
    for (int64_t c = c_begin + warp; c < c_end; c += kUnroll<FMT, NT> * kWarps) {
      uint4 wg[kUnroll<FMT, NT>], wh[kUnroll<FMT, NT>];
      uint32_t sg[kUnroll<FMT, NT>], sh[kUnroll<FMT, NT>];
#pragma unroll
      for (int u = 0; u < kUnroll<FMT, NT>; ++u) {  // issue every weight load first
        const int64_t cu = c + u * kWarps;
        const int64_t kseg = cu * CK + EPT * t;                      // first k of the segment
        const int64_t valid = cu < c_end ? (p.K - kseg + (kFp8 ? 0 : 1)) / (kFp8 ? 1 : 2) : 0;
        const int64_t b0 = cu * 64 + 16 * t;                         // its first byte in a row
        wg[u] = rg != nullptr ? weight_seg<VEC>(rg, b0, valid) : make_uint4(0u, 0u, 0u, 0u);
        wh[u] = rh != nullptr ? weight_seg<VEC>(rh, b0, valid) : make_uint4(0u, 0u, 0u, 0u);
        sg[u] = sh[u] = 0u;
        if constexpr (!kFp8) {
          if (valid > 0) {
            const int64_t blk = kseg / 16;  // = 8 cu + 2 t
            if (sgr != nullptr) sg[u] = scale_pair<VEC>(sgr, blk, a.nb);
            if (shr != nullptr) sh[u] = scale_pair<VEC>(shr, blk, a.nb);
          }
          // odd K: code K-1 ends the segment in a low nibble; the high one is padding -> 0
          const int64_t vc = p.K - kseg;
          if (!VEC && vc > 0 && vc < EPT && (vc & 1)) {
            clear_code(wg[u], vc);
            clear_code(wh[u], vc);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll<FMT, NT>; ++u) {
        const int64_t cu = c + u * kWarps;
        if (cu >= c_end) break;  // warp-uniform
        uint32_t af[STEPS][4];
        a_frags<T, FMT>(wg[u], wh[u], sg[u], sh[u], af);
        const int64_t kseg = cu * CK + EPT * t;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          uint32_t xw[EPT / 2];  // token m0 + 8j + g: x elements kseg .. kseg + EPT - 1
          x_seg<EPT, VEC>(p, m0 + 8 * j + g, kseg, xw);
#pragma unroll
          for (int s = 0; s < STEPS; ++s) mma_16816<T>(acc[j], af[s], xw[2 * s], xw[2 * s + 1]);
        }
      }
    }
    // sum the warps' tiles in warp order; one output element per (register, lane) pair
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp][4 * j + i][lane] = acc[j][i];
    __syncthreads();
    for (int e = threadIdx.x; e < NT * 4 * 32; e += kWolThreads) {
      const int r = e >> 5, l = e & 31;  // register r = 4 j + i of lane l
      float v = red[0][r][l];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) v = add_rn(v, red[w][r][l]);
      const int j = r >> 2, i = r & 3;
      // D layout: i = 0, 1 -> row l/4, token 2(l%4) + i; i = 2, 3 -> row l/4 + 8, same tokens
      const int64_t n = n0 + (l >> 2) + 8 * (i >> 1);
      const int64_t m = m0 + 8 * j + 2 * (l & 3) + (i & 1);
      if (n >= p.N || m >= p.M) continue;
      if (gridDim.y == 1) {
        store_float(p.out, p.dtype, m * p.N + n, finish(p, n, v));
      } else {
        p.workspace[(split * p.M + m) * p.N + n] = v;
      }
    }
    __syncthreads();  // red is rewritten by the next M tile
  }
#endif
}

// split_k > 1 (nsplit splits) or K == 0 (nsplit 0): out[m][n] = finish(sum_s ws[s][m][n]).
__global__ void __launch_bounds__(kThreads) wol_finalize(const pyops_weight_only_linear_params p,
                                                         int nsplit) {
  const int64_t total = p.M * p.N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < nsplit; ++s) v = add_rn(v, p.workspace[static_cast<int64_t>(s) * total + i]);
    store_float(p.out, p.dtype, i, finish(p, i % p.N, v));
  }
}

template <typename T, int FMT, bool VEC>
cudaError_t launch_nt(const WolArgs& a, dim3 grid, cudaStream_t stream) {
  const int64_t mt = a.p.M < kTileM ? a.p.M : kTileM;  // tokens in the widest tile
  if (mt <= 8) {
    wol_kernel<T, FMT, 1, VEC><<<grid, kWolThreads, 0, stream>>>(a);
  } else if (mt <= 16) {
    wol_kernel<T, FMT, 2, VEC><<<grid, kWolThreads, 0, stream>>>(a);
  } else if (mt <= 32) {
    wol_kernel<T, FMT, 4, VEC><<<grid, kWolThreads, 0, stream>>>(a);
  } else {
    wol_kernel<T, FMT, 8, VEC><<<grid, kWolThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_wol(const WolArgs& a, bool vec, dim3 grid, cudaStream_t stream) {
  if (a.p.format == PYOPS_WEIGHT_FP8)
    return vec ? launch_nt<T, PYOPS_WEIGHT_FP8, true>(a, grid, stream)
               : launch_nt<T, PYOPS_WEIGHT_FP8, false>(a, grid, stream);
  return vec ? launch_nt<T, PYOPS_WEIGHT_NVFP4, true>(a, grid, stream)
             : launch_nt<T, PYOPS_WEIGHT_NVFP4, false>(a, grid, stream);
}

}  // namespace
}  // namespace pyops

extern "C" cudaError_t pyops_weight_only_linear(const pyops_weight_only_linear_params* params,
                                                cudaStream_t stream) {
  using namespace pyops;
  if (params == nullptr) return cudaErrorInvalidValue;
  const pyops_weight_only_linear_params& p = *params;
  const bool fp8 = p.format == PYOPS_WEIGHT_FP8;
  if (p.M < 0 || p.N < 0 || p.K < 0 || (!fp8 && p.format != PYOPS_WEIGHT_NVFP4) ||
      (p.dtype != PYOPS_DTYPE_BF16 && p.dtype != PYOPS_DTYPE_F16) ||
      (p.bias != nullptr && !valid_dtype(p.bias_dtype)) || p.split_k < 1 ||
      (p.M > 1 && p.stride_xm < p.K) || p.stride_xm < 0)
    return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.out == nullptr) return cudaErrorInvalidValue;
  int dev = 0, major = 0, minor = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (e != cudaSuccess) return e;
  if (major * 10 + minor < 89) return cudaErrorNotSupported;  // cvt.rn.f16x2.e4m3x2
  int grid_fin = 0;
  if (p.K == 0) {  // out = bias (or 0)
    if ((e = grid_for(p.M * p.N, kThreads, 8, &grid_fin)) != cudaSuccess) return e;
    wol_finalize<<<grid_fin, kThreads, 0, stream>>>(p, 0);
    return cudaGetLastError();
  }
  if (p.x == nullptr || p.w == nullptr || p.w_scale == nullptr ||
      (!fp8 && p.global_scale == nullptr) || (p.split_k > 1 && p.workspace == nullptr))
    return cudaErrorInvalidValue;
  WolArgs a{p, 0, 0, 0, 0, 0};
  const int64_t chunk_k = fp8 ? PYOPS_WOL_FP8_CHUNK_K : PYOPS_WOL_NVFP4_CHUNK_K;
  a.nb = cdiv(p.K, 16);
  a.row_bytes = fp8 ? p.K : a.nb * 8;
  a.nchunks = cdiv(p.K, chunk_k);
  if (p.split_k > a.nchunks || p.split_k > PYOPS_WOL_MAX_SPLIT_K) return cudaErrorInvalidValue;
  a.per_split = cdiv(a.nchunks, p.split_k);
  a.mtiles = cdiv(p.M, kTileM);
  const int64_t row_tiles = cdiv(p.N, kRows);
  if (row_tiles > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const bool vec = aligned16(p.x) && (p.M <= 1 || p.stride_xm % 8 == 0) && aligned16(p.w) &&
                   p.K % (fp8 ? 16 : 32) == 0 &&
                   (fp8 || reinterpret_cast<uintptr_t>(p.w_scale) % 2 == 0);
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(p.split_k),
                  static_cast<unsigned>(a.mtiles < kMaxGridYZ ? a.mtiles : kMaxGridYZ));
  e = p.dtype == PYOPS_DTYPE_BF16 ? launch_wol<BF16>(a, vec, grid, stream)
                                  : launch_wol<F16>(a, vec, grid, stream);
  if (e != cudaSuccess || p.split_k == 1) return e;
  if ((e = grid_for(p.M * p.N, kThreads, 8, &grid_fin)) != cudaSuccess) return e;
  wol_finalize<<<grid_fin, kThreads, 0, stream>>>(p, p.split_k);
  return cudaGetLastError();
}

// attention.cu - sm_90a attention forward for pyops.attention's "int8" precision (INT8 QK^T
// with wgmma s8.s8 -> s32, FP8 e4m3 PV with wgmma e4m3.e4m3 -> f32, P from registers), and the
// pyops_attention C ABI. Torch-free. Spec: the Triton kernel's int8 path
// (triton_kernels/attention.py) and pyops/reference/attention.py (simulated_attention); ABI and
// arithmetic: pyops/attention.h.
//
// UNVERIFIED ON HARDWARE: written and compiled for sm_90a (ptxas) without a GPU. The GPU tests
// (tests/test_attention_cuda.py) and the benchmark row ("pyops cuda int8") are ready for one.
//
// Design (version 1: correctness first). One CTA = one warpgroup (128 threads) = 64 query rows
// of one (batch, head); warp w owns rows 16w..16w+15. Per CTA:
//   * the Q tile (64 x D int8) is loaded once; K tiles (128 keys x D int8), V^T tiles (D x 128
//     e4m3) and the 128 key scales are double-buffered: cp.async 16-byte copies (zero-filled
//     past the ends: src-size < 16) into shared memory in the wgmma K-major layout with the
//     128-byte (or, for 64-byte rows, 64-byte) swizzle; one commit group per key block.
//   * S = Q K^T: D/32 wgmma.m64n128k32.s32.s8.s8, both operands from shared-memory
//     descriptors; s32 accumulators in registers (64 per thread).
//   * online softmax on the accumulator fragment (thread = 2 rows x 32 columns; row max / sum
//     over the 4 threads of a quad with shuffles), P = e4m3(p * 448) packed in registers.
//   * O_blk = P V: 4 wgmma.m64nDk32.f32.e4m3.e4m3 with A (P) from registers and B = the V^T
//     tile (K-major: keys contiguous, which is why the pre-pass writes V transposed); a fresh
//     fp32 product per key block, then acc = acc * alpha + O_blk in fp32 registers.
// The register layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix ... Register
// Fragments"): the m64nN accumulator gives lane (g = lane/4, t = lane%4) of warp w the elements
// (16w + g + 8r, 8c + 2t + e) in register 4c + 2r + e; the 8-bit A fragment of a k32 step
// holds (16w + g + 8r, 4t + e + 16h) in byte e of register r + 2h. So a thread's accumulator
// columns {8c + 2t, 8c + 2t + 1} (c = 0..3 of a 32-column step) are not the A columns
// {4t..4t+3, 16+4t..16+4t+3} it must supply. Instead of shuffling P between threads, K's rows
// are loaded permuted: shared row n of a key block holds key perm(n), with
// perm(16q + 8h + 2t + e) = 16q + 4t + 2h + e, so accumulator column n is key perm(n) and each
// thread's P registers are already the A fragment in natural key order (V^T stays unpermuted).
// The key scales, the tail mask and the causal mask use perm(n) as the key index.
//
// Memory-proxy ordering: cp.async writes shared memory through the generic proxy and wgmma
// reads it through the async proxy, so every thread runs fence.proxy.async after its copies
// land and before the barrier that precedes the wgmma. wgmma.fence precedes each MMA chain;
// empty asm register "fences" keep the compiler from moving accumulator / P register accesses
// across the asynchronous MMA (the issue -> commit -> wait window).
//
// Architecture guard: wgmma exists on sm_90a only. The kernel body is compiled for
// __CUDA_ARCH__ == 900 with __CUDA_ARCH_FEAT_SM90_ALL; every other device compilation gets a
// stub that writes NaN to its outputs (the host entry refuses devices other than 9.0 first).
//
// Not done yet (measure first): TMA loads, warp specialization / ping-pong, overlap of the
// softmax with the next block's QK^T, more than 2 stages, causal-aware scheduling beyond
// launching the longest row blocks first.
#include "pyops/attention.h"

#include "common.cuh"

namespace pyops {
namespace {

constexpr int kBM = 64;       // query rows per CTA (one warpgroup: 4 warps x 16 rows)
constexpr int kBN = 128;      // keys per block
constexpr int kWG = 128;      // threads per CTA
constexpr float kPScale = 448.0f;                     // P's fixed e4m3 scale (the spec's)
constexpr float kLn2 = 0.693147180559945309417232f;   // ln 2 (rounded to fp32)

struct AttnArgs {
  pyops_attention_params p;
  int64_t group;   // Hq / Hk
  int64_t n_mblk;  // ceil(Sq / 64)
  bool vec_out;    // o_stride_d == 1 and every column pair 4-byte aligned: paired stores
};

// Shared memory of one CTA (byte offsets from a 1024-byte aligned base: the 128-byte swizzle
// repeats every 1024 bytes and the descriptors carry no base offset).
template <int D>
struct Smem {
  static constexpr int kQ = 0;                          // Q tile: 64 rows x D bytes
  static constexpr int kK = kQ + kBM * D;               // 2 K tiles: 128 rows x D bytes
  static constexpr int kV = kK + 2 * kBN * D;           // 2 V^T tiles: D rows x 128 bytes
  static constexpr int kKs = kV + 2 * D * kBN;          // 2 x 128 fp32 key scales
  static constexpr int kBytes = kKs + 2 * kBN * 4;
  static constexpr int kAlloc = kBytes + 1024;          // slack for aligning the base
  static_assert(kK % 1024 == 0 && kV % 1024 == 0 && (kBN * D) % 1024 == 0, "tile alignment");
};

// Key index (within a block) held by shared K row / accumulator column n (see the header).
__host__ __device__ constexpr int perm_key(int n) {
  return (n & ~15) | (((n >> 1) & 3) << 2) | (((n >> 3) & 1) << 1) | (n & 1);
}

// Byte offset of logical byte `lin` (row * W + column byte) of a tile whose rows are W bytes
// (W = 64 or 128), W-byte swizzled: 16-byte chunk index XOR (address bits 7..9 / 7..8).
template <int W>
__host__ __device__ __forceinline__ uint32_t swizzle(uint32_t lin) {
  static_assert(W == 64 || W == 128, "swizzle width");
  constexpr uint32_t mask = W == 128 ? 7u : 3u;
  return lin ^ (((lin >> 7) & mask) << 4);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- PTX wrappers ---------------------------------------------------------------------------
// 16 bytes global -> shared; the first `src_bytes` (0..16) read, the rest zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
// 4 bytes global -> shared (src_bytes 0: zero-filled).
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy writes of this thread (landed cp.async copies) visible to the async proxy.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait0() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// The compiler must treat these registers as read and rewritten here: keeps their producers
// before / consumers after this point (orders register accesses around the async MMAs).
template <int N>
__device__ __forceinline__ void reg_fence(int32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void reg_fence(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// exp2 / log2: hardware approximations written out so that no build flag (-use_fast_math /
// -ftz) changes them (no .ftz: subnormals kept). The Triton kernel (3.9, sm_90 PTX) has
// ex2.approx.ftz.f32 for exp2: the two differ only where a result is below 2^-126 (Triton
// flushes it to 0), which changes no P code (p * 448 < 2^-117 rounds to e4m3 0 either way) and
// no l (from the first block on, l holds about 1: the row max's own p); its log2 is
// libdevice's __nv_log2f, so lse may differ from Triton's in the last bits (as the fp32
// summation order makes it anyway).
__device__ __forceinline__ float exp2_approx(float x) {
  float r;
  asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float log2_approx(float x) {
  float r;
  asm("lg2.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// max(a, b) as PTX max.f32 (IEEE maxNum: a NaN operand is dropped, as Triton's tl.maximum /
// tl.max; a NaN score still poisons its own row through p = exp2(NaN)). Inline asm: without it
// an -ftz build turns a compare-select into max.ftz.f32.
__device__ __forceinline__ float score_max(float a, float b) {
  float r;
  asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// GMMA shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address,
// leading byte offset (unused by swizzled K-major layouts; 16 bytes), stride byte offset (8
// rows x W bytes: the next 8-row core-matrix group), swizzle mode (1: 128 B, 2: 64 B).
// swizzle / make_desc / desc_step are __host__ too: tests/test_attention_cuda.py runs them on
// the CPU and reads the operands back the way the PTX ISA says wgmma does.
template <int W>
__host__ __device__ __forceinline__ uint64_t make_desc(uint32_t saddr) {
  uint64_t d = static_cast<uint64_t>((saddr & 0x3FFFFu) >> 4);
  d |= static_cast<uint64_t>(16 >> 4) << 16;
  d |= static_cast<uint64_t>((8 * W) >> 4) << 32;
  d |= static_cast<uint64_t>(W == 128 ? 1 : 2) << 62;
  return d;
}
// The descriptor of the k-th 32-byte K step of a K-major tile: the start address moves by 32
// bytes inside the swizzle row (the hardware applies the XOR on the address bits).
__host__ __device__ __forceinline__ uint64_t desc_step(uint64_t d, int k) {
  return d + static_cast<uint64_t>((32 * k) >> 4);
}

// Output element (row base `obase`, column col) of type E.
template <typename E>
__device__ __forceinline__ void store_out(const AttnArgs& a, int64_t obase, int64_t col,
                                          float v) {
  static_cast<uint16_t*>(a.p.out)[obase + col * a.p.o_stride_d] = E::from_float(v);
}
// Columns col, col + 1 (col even): one 4-byte store when vec_out.
template <typename E>
__device__ __forceinline__ void store_out_pair(const AttnArgs& a, int64_t obase, int64_t col,
                                               float v0, float v1) {
  if (a.vec_out) {
    const uint32_t w = static_cast<uint32_t>(E::from_float(v0)) |
                       (static_cast<uint32_t>(E::from_float(v1)) << 16);
    *reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(a.p.out) + obase + col) = w;
  } else {
    store_out<E>(a, obase, col, v0);
    store_out<E>(a, obase, col + 1, v1);
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PYOPS_ATTENTION_WGMMA 1
#else
#define PYOPS_ATTENTION_WGMMA 0
#endif

#if PYOPS_ATTENTION_WGMMA
// ---- wgmma (sm_90a): S (64 x 128, s32) += Q (64 x 32 s8) K^T; O (64 x N, f32) += P (64 x 32
// e4m3, registers) V (32 x N e4m3). "first": scale-d 0 (D = A B), "acc": D += A B.
__device__ __forceinline__ void mma_qk_n128_first(int32_t (&d)[64], uint64_t a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, 0;\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]),
        "=r"(d[4]), "=r"(d[5]), "=r"(d[6]), "=r"(d[7]),
        "=r"(d[8]), "=r"(d[9]), "=r"(d[10]), "=r"(d[11]),
        "=r"(d[12]), "=r"(d[13]), "=r"(d[14]), "=r"(d[15]),
        "=r"(d[16]), "=r"(d[17]), "=r"(d[18]), "=r"(d[19]),
        "=r"(d[20]), "=r"(d[21]), "=r"(d[22]), "=r"(d[23]),
        "=r"(d[24]), "=r"(d[25]), "=r"(d[26]), "=r"(d[27]),
        "=r"(d[28]), "=r"(d[29]), "=r"(d[30]), "=r"(d[31]),
        "=r"(d[32]), "=r"(d[33]), "=r"(d[34]), "=r"(d[35]),
        "=r"(d[36]), "=r"(d[37]), "=r"(d[38]), "=r"(d[39]),
        "=r"(d[40]), "=r"(d[41]), "=r"(d[42]), "=r"(d[43]),
        "=r"(d[44]), "=r"(d[45]), "=r"(d[46]), "=r"(d[47]),
        "=r"(d[48]), "=r"(d[49]), "=r"(d[50]), "=r"(d[51]),
        "=r"(d[52]), "=r"(d[53]), "=r"(d[54]), "=r"(d[55]),
        "=r"(d[56]), "=r"(d[57]), "=r"(d[58]), "=r"(d[59]),
        "=r"(d[60]), "=r"(d[61]), "=r"(d[62]), "=r"(d[63])
      : "l"(a), "l"(b));
}

__device__ __forceinline__ void mma_qk_n128_acc(int32_t (&d)[64], uint64_t a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, 1;\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]),
        "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]),
        "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]),
        "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]),
        "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]),
        "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]),
        "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]),
        "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]),
        "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(a), "l"(b));
}

__device__ __forceinline__ void mma_pv_n64_first(float (&d)[32], const uint32_t* a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, "
      "%36, 0, 1, 1;\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]),
        "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]),
        "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]),
        "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]),
        "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]),
        "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]),
        "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]),
        "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

__device__ __forceinline__ void mma_pv_n64_acc(float (&d)[32], const uint32_t* a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, "
      "%36, 1, 1, 1;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
        "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

__device__ __forceinline__ void mma_pv_n128_first(float (&d)[64], const uint32_t* a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, "
      "%68, 0, 1, 1;\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]),
        "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]),
        "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]),
        "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]),
        "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]),
        "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]),
        "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]),
        "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]),
        "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]),
        "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]),
        "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]),
        "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]),
        "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]),
        "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]),
        "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]),
        "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

__device__ __forceinline__ void mma_pv_n128_acc(float (&d)[64], const uint32_t* a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, "
      "%68, 1, 1, 1;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
        "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),
        "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
        "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

template <int N>
__device__ __forceinline__ void mma_pv(float (&d)[N / 2], const uint32_t* a, uint64_t b,
                                       bool first) {
  if constexpr (N == 128) {
    if (first) mma_pv_n128_first(d, a, b); else mma_pv_n128_acc(d, a, b);
  } else {
    if (first) mma_pv_n64_first(d, a, b); else mma_pv_n64_acc(d, a, b);
  }
}

// Issue the cp.async copies of key block `blk` into stage `stage`: K rows permuted (perm_key),
// V^T columns and the key scales in natural order; everything past Sk zero-filled.
template <int D>
__device__ __forceinline__ void load_kv_block(const AttnArgs& a, uint32_t base_s,
                                              const int8_t* kg, const uint8_t* vg,
                                              const float* ksg, int64_t blk, int stage) {
  const pyops_attention_params& p = a.p;
  const int tid = threadIdx.x;
  const int64_t n0 = blk * kBN;
  constexpr int kKChunks = D / 16;  // 16-byte chunks per K row
  const uint32_t sk = base_s + Smem<D>::kK + stage * (kBN * D);
#pragma unroll
  for (int i = 0; i < kBN * kKChunks / kWG; ++i) {
    const int c = tid + i * kWG;
    const int n = c / kKChunks, ch = c % kKChunks;
    const int64_t key = n0 + perm_key(n);
    const bool ok = key < p.Sk;
    cp_async16(sk + swizzle<D>(n * D + ch * 16), kg + (ok ? key * p.k_stride_s + ch * 16 : 0),
               ok ? 16u : 0u);
  }
  constexpr int kVChunks = kBN / 16;  // 16-byte chunks per V^T row
  const uint32_t sv = base_s + Smem<D>::kV + stage * (D * kBN);
#pragma unroll
  for (int i = 0; i < D * kVChunks / kWG; ++i) {
    const int c = tid + i * kWG;
    const int d = c / kVChunks, ch = c % kVChunks;
    const int64_t j0 = n0 + ch * 16;
    const int64_t rem = p.Sk - j0;  // keys of this chunk that exist
    const uint32_t bytes = rem >= 16 ? 16u : (rem > 0 ? static_cast<uint32_t>(rem) : 0u);
    cp_async16(sv + swizzle<128>(d * kBN + ch * 16), vg + (bytes ? d * p.v_stride_d + j0 : 0),
               bytes);
  }
  static_assert(kWG == kBN, "one key scale per thread");
  const int64_t j = n0 + tid;
  const bool ok = j < p.Sk;
  cp_async4(base_s + Smem<D>::kKs + (stage * kBN + tid) * 4, ksg + (ok ? j : 0), ok ? 4u : 0u);
}
#endif  // PYOPS_ATTENTION_WGMMA

template <int D, typename E>
__global__ void __launch_bounds__(kWG, 2) attention_kernel(const AttnArgs a) {
  const pyops_attention_params& p = a.p;
  const int tid = threadIdx.x;
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / a.n_mblk;
  int64_t mb = static_cast<int64_t>(blockIdx.x) - bh * a.n_mblk;
  if (p.causal) mb = a.n_mblk - 1 - mb;  // the longest causal row blocks start first
  const int64_t b = bh / p.Hq, h = bh - b * p.Hq;
  const int64_t m0 = mb * kBM;
  const int64_t obh = b * p.o_stride_b + h * p.o_stride_h;
#if PYOPS_ATTENTION_WGMMA
  extern __shared__ uint8_t smem_raw[];
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t hk = h / a.group;
  const int64_t bhk = b * p.Hk + hk;
  const uint32_t base_s = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const float* ks_s = reinterpret_cast<const float*>(smem_raw + (base_s - smem_addr(smem_raw)) +
                                                     Smem<D>::kKs);
  const int8_t* qg = p.qc + b * p.q_stride_b + h * p.q_stride_h;
  const int8_t* kg = p.kc + b * p.k_stride_b + hk * p.k_stride_h;
  const uint8_t* vg = p.vt + b * p.v_stride_b + hk * p.v_stride_h;
  const float* ksg = p.ks + bhk * p.Sk;
  const int64_t hi = p.causal ? (p.Sk < m0 + kBM ? p.Sk : m0 + kBM) : p.Sk;
  const int64_t nblk = (hi + kBN - 1) / kBN;  // >= 1 (Sk >= 1)

  // Q tile (rows >= Sq zero-filled) and the first two key blocks: commit groups 0 and 1.
  {
    constexpr int kQChunks = D / 16;
    const uint32_t sq = base_s + Smem<D>::kQ;
#pragma unroll
    for (int i = 0; i < kBM * kQChunks / kWG; ++i) {
      const int c = tid + i * kWG;
      const int r = c / kQChunks, ch = c % kQChunks;
      const int64_t row = m0 + r;
      const bool ok = row < p.Sq;
      cp_async16(sq + swizzle<D>(r * D + ch * 16), qg + (ok ? row * p.q_stride_s + ch * 16 : 0),
                 ok ? 16u : 0u);
    }
  }
  load_kv_block<D>(a, base_s, kg, vg, ksg, 0, 0);
  cp_async_commit();
  if (nblk > 1) load_kv_block<D>(a, base_s, kg, vg, ksg, 1, 1);
  cp_async_commit();

  // this thread's two query rows (accumulator rows g and g + 8 of its warp)
  const int64_t row0 = m0 + warp * 16 + g, row1 = row0 + 8;
  const float* qsg = p.qs + bh * p.Sq;
  const float qsc0 = row0 < p.Sq ? __ldg(qsg + row0) : 1.0f;
  const float qsc1 = row1 < p.Sq ? __ldg(qsg + row1) : 1.0f;
  const float kNegInf = __uint_as_float(0xFF800000u);
  float mrow0 = kNegInf, mrow1 = kNegInf, l0 = 0.0f, l1 = 0.0f;
  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.0f;
  const uint64_t dq = make_desc<D>(base_s + Smem<D>::kQ);

  for (int64_t it = 0; it < nblk; ++it) {
    const int stage = static_cast<int>(it & 1);
    const int64_t n0 = it * kBN;
    cp_async_wait<1>();  // this block's group (all but the newest) has landed
    fence_proxy_async();
    __syncthreads();

    // ---- S = Q K^T (s32), columns in perm_key order
    int32_t s[kBN / 2];
    const uint64_t dk = make_desc<D>(base_s + Smem<D>::kK + stage * (kBN * D));
    wgmma_fence();
    mma_qk_n128_first(s, dq, dk);
#pragma unroll
    for (int k = 1; k < D / 32; ++k) mma_qk_n128_acc(s, desc_step(dq, k), desc_step(dk, k));
    wgmma_commit();
    wgmma_wait0();
    reg_fence(s);

    // ---- scores in log2 units (times qs[i] folded into the max and the exp2 argument)
    const float* kss = ks_s + stage * kBN;
    const bool masked = n0 + kBN > p.Sk || (p.causal && n0 + kBN - 1 > m0);
    float f[kBN / 2];
    float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
    for (int c = 0; c < kBN / 8; ++c) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int kj = perm_key(8 * c + 2 * t + e);
        const float ksc = kss[kj];
        float v0 = mul_rn(static_cast<float>(s[4 * c + e]), ksc);
        float v1 = mul_rn(static_cast<float>(s[4 * c + 2 + e]), ksc);
        if (masked) {
          const int64_t key = n0 + kj;
          if (key >= p.Sk || (p.causal && key > row0)) v0 = kNegInf;
          if (key >= p.Sk || (p.causal && key > row1)) v1 = kNegInf;
        }
        f[4 * c + e] = v0;
        f[4 * c + 2 + e] = v1;
        mx0 = score_max(mx0, v0);
        mx1 = score_max(mx1, v1);
      }
    }
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      mx0 = score_max(mx0, __shfl_xor_sync(0xFFFFFFFFu, mx0, o));
      mx1 = score_max(mx1, __shfl_xor_sync(0xFFFFFFFFu, mx1, o));
    }
    const float mn0 = score_max(mrow0, mul_rn(mx0, qsc0));
    const float mn1 = score_max(mrow1, mul_rn(mx1, qsc1));
    const float nm0 = __uint_as_float(__float_as_uint(mn0) ^ 0x80000000u);  // -m' on the bits
    const float nm1 = __uint_as_float(__float_as_uint(mn1) ^ 0x80000000u);
    const float alpha0 = exp2_approx(sub_rn(mrow0, mn0));
    const float alpha1 = exp2_approx(sub_rn(mrow1, mn1));
    float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
    for (int c = 0; c < kBN / 8; ++c) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        f[4 * c + e] = exp2_approx(fma_rn(f[4 * c + e], qsc0, nm0));
        f[4 * c + 2 + e] = exp2_approx(fma_rn(f[4 * c + 2 + e], qsc1, nm1));
        rs0 = add_rn(rs0, f[4 * c + e]);
        rs1 = add_rn(rs1, f[4 * c + 2 + e]);
      }
    }
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      rs0 = add_rn(rs0, __shfl_xor_sync(0xFFFFFFFFu, rs0, o));
      rs1 = add_rn(rs1, __shfl_xor_sync(0xFFFFFFFFu, rs1, o));
    }
    l0 = fma_rn(l0, alpha0, rs0);
    l1 = fma_rn(l1, alpha1, rs1);
    mrow0 = mn0;
    mrow1 = mn1;

    // ---- P = e4m3(p * 448) as the wgmma A fragment: for k step ks (keys 32ks..32ks+31),
    // register 4ks + r + 2hh holds row g + 8r, keys 32ks + 16hh + 4t .. +3 = accumulator chunks
    // c = 4ks + 2hh (bytes 0, 1) and 4ks + 2hh + 1 (bytes 2, 3) of that row.
    uint32_t pa[kBN / 8];
#pragma unroll
    for (int ks = 0; ks < kBN / 32; ++ks) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int c = 4 * ks + 2 * hh;
          const uint32_t lo = e4m3x2(mul_rn(f[4 * c + 2 * r], kPScale),
                                     mul_rn(f[4 * c + 2 * r + 1], kPScale));
          const uint32_t hi2 = e4m3x2(mul_rn(f[4 * (c + 1) + 2 * r], kPScale),
                                      mul_rn(f[4 * (c + 1) + 2 * r + 1], kPScale));
          pa[4 * ks + r + 2 * hh] = lo | (hi2 << 16);
        }
      }
    }

    // ---- O_blk = P V (fresh fp32 product of this key block)
    float o[D / 2];
    const uint64_t dv = make_desc<128>(base_s + Smem<D>::kV + stage * (D * kBN));
    reg_fence(pa);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBN / 32; ++ks) mma_pv<D>(o, pa + 4 * ks, desc_step(dv, ks), ks == 0);
    wgmma_commit();
    wgmma_wait0();
    reg_fence(o);
    reg_fence(pa);

    // every warp is done with this stage: refill it with block it + 2 (an empty group when
    // there is none, so that wait_group<1> always means "block it + 1 has landed")
    __syncthreads();
    if (it + 2 < nblk) load_kv_block<D>(a, base_s, kg, vg, ksg, it + 2, stage);
    cp_async_commit();

#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
      acc[4 * c + 0] = fma_rn(acc[4 * c + 0], alpha0, o[4 * c + 0]);
      acc[4 * c + 1] = fma_rn(acc[4 * c + 1], alpha0, o[4 * c + 1]);
      acc[4 * c + 2] = fma_rn(acc[4 * c + 2], alpha1, o[4 * c + 2]);
      acc[4 * c + 3] = fma_rn(acc[4 * c + 3], alpha1, o[4 * c + 3]);
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: out = acc / l * (vs / 448); lse = (m + log2 l) * ln 2 + qb
  const float* vsg = p.vs + bhk * D;
  const int64_t ob0 = obh + row0 * p.o_stride_s, ob1 = obh + row1 * p.o_stride_s;
#pragma unroll
  for (int c = 0; c < D / 8; ++c) {
    const int col = 8 * c + 2 * t;
    const float vs0 = div_rn(__ldg(vsg + col), kPScale);
    const float vs1 = div_rn(__ldg(vsg + col + 1), kPScale);
    if (row0 < p.Sq)
      store_out_pair<E>(a, ob0, col, mul_rn(div_rn(acc[4 * c + 0], l0), vs0),
                        mul_rn(div_rn(acc[4 * c + 1], l0), vs1));
    if (row1 < p.Sq)
      store_out_pair<E>(a, ob1, col, mul_rn(div_rn(acc[4 * c + 2], l1), vs0),
                        mul_rn(div_rn(acc[4 * c + 3], l1), vs1));
  }
  if (p.lse != nullptr && t == 0) {
    const float* qbg = p.qb + bh * p.Sq;
    if (row0 < p.Sq)
      p.lse[bh * p.Sq + row0] =
          add_rn(mul_rn(add_rn(mrow0, log2_approx(l0)), kLn2), __ldg(qbg + row0));
    if (row1 < p.Sq)
      p.lse[bh * p.Sq + row1] =
          add_rn(mul_rn(add_rn(mrow1, log2_approx(l1)), kLn2), __ldg(qbg + row1));
  }
#else
  // Compiled for an architecture without wgmma: NaN everywhere this CTA would write, so a
  // wrong build can never pass for a result (pyops_attention refuses such devices first).
  const float nan = __uint_as_float(kNanBits);
  for (int i = tid; i < kBM * D; i += kWG) {
    const int64_t row = m0 + i / D;
    if (row < p.Sq) store_out<E>(a, obh + row * p.o_stride_s, i % D, nan);
  }
  if (p.lse != nullptr)
    for (int i = tid; i < kBM; i += kWG)
      if (m0 + i < p.Sq) p.lse[bh * p.Sq + m0 + i] = nan;
#endif
}

template <int D, typename E>
cudaError_t launch_attention(const AttnArgs& a, int64_t grid, cudaStream_t stream) {
  void (*kern)(const AttnArgs) = attention_kernel<D, E>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Smem<D>::kAlloc);
  if (e != cudaSuccess) return e;
  kern<<<static_cast<unsigned>(grid), kWG, Smem<D>::kAlloc, stream>>>(a);
  return cudaGetLastError();
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace
}  // namespace pyops

extern "C" cudaError_t pyops_attention(const pyops_attention_params* params,
                                       cudaStream_t stream) {
  using namespace pyops;
  if (params == nullptr) return cudaErrorInvalidValue;
  const pyops_attention_params& p = *params;
  if ((p.D != 64 && p.D != 128) || p.B < 1 || p.Hq < 1 || p.Hk < 1 || p.Sk < 1 || p.Sq < 0 ||
      p.Hq % p.Hk != 0 || p.Sk_pad < cdiv(p.Sk, 16) * 16 ||
      (p.out_dtype != PYOPS_DTYPE_F16 && p.out_dtype != PYOPS_DTYPE_BF16))
    return cudaErrorInvalidValue;
  const int64_t code_strides[] = {p.q_stride_b, p.q_stride_h, p.q_stride_s,
                                  p.k_stride_b, p.k_stride_h, p.k_stride_s,
                                  p.v_stride_b, p.v_stride_h, p.v_stride_d};
  for (int64_t s : code_strides)
    if (s < 0 || s % 16 != 0) return cudaErrorInvalidValue;
  if (p.o_stride_b < 0 || p.o_stride_h < 0 || p.o_stride_s < 0 || p.o_stride_d < 0)
    return cudaErrorInvalidValue;
  if (p.qc == nullptr || p.qs == nullptr || p.qb == nullptr || p.kc == nullptr ||
      p.ks == nullptr || p.vt == nullptr || p.vs == nullptr || p.out == nullptr)
    return cudaErrorInvalidValue;
  if (!aligned(p.qc, 16) || !aligned(p.kc, 16) || !aligned(p.vt, 16) || !aligned(p.qs, 4) ||
      !aligned(p.qb, 4) || !aligned(p.ks, 4) || !aligned(p.vs, 4) || !aligned(p.out, 2) ||
      (p.lse != nullptr && !aligned(p.lse, 4)))
    return cudaErrorInvalidValue;
  if (p.Sq == 0) return cudaSuccess;
  const int64_t n_mblk = cdiv(p.Sq, kBM);
  constexpr int64_t kMaxGrid = 2147483647;
  if (p.B > kMaxGrid || p.Hq > kMaxGrid || p.B * p.Hq > kMaxGrid / n_mblk)
    return cudaErrorInvalidValue;
  const int64_t grid = p.B * p.Hq * n_mblk;
  int dev = 0, major = 0, minor = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (e != cudaSuccess) return e;
  if (major != 9 || minor != 0) return cudaErrorNotSupported;
  AttnArgs a{};
  a.p = p;
  a.group = p.Hq / p.Hk;
  a.n_mblk = n_mblk;
  a.vec_out = p.o_stride_d == 1 && aligned(p.out, 4) && p.o_stride_s % 2 == 0 &&
              p.o_stride_h % 2 == 0 && p.o_stride_b % 2 == 0;
  const bool bf16 = p.out_dtype == PYOPS_DTYPE_BF16;
  if (p.D == 64)
    return bf16 ? launch_attention<64, BF16>(a, grid, stream)
                : launch_attention<64, F16>(a, grid, stream);
  return bf16 ? launch_attention<128, BF16>(a, grid, stream)
              : launch_attention<128, F16>(a, grid, stream);
}

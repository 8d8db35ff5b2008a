// block_similarity.cu - the fused cache check + the pyops_block_similarity C ABI
// (pyops/block_similarity.h). Spec: pyops/reference/block_similarity.py. Torch-free.
//
// The buffers are seen as rows*chunks contiguous segments of lc = row_len / chunks elements
// (segment (row, c) starts at row*row_len + c*lc); cell (g, c) is the segments of the rows of
// group g in chunk c. Memory-bound; the streaming-reduction design of issue #11 item 4:
//  - check_kernel, ONE launch: every segment is cut into S slices of L elements (plan_of: about
//    one slice per CTA slot, kCtasPerSm CTAs per SM, so the grid is one full wave of equal
//    work; more segments than slots -> one slice per segment), and the CTAs grid-stride over
//    the slices. The dtype is a template parameter; a slice is read in 16-byte chunks
//    (load_chunk of common.cuh), kU chunks of a and kU of ref in flight per thread before any
//    math; the < 8 elements before the first 16-byte boundary are a scalar head, the last
//    partial chunk a masked tail; VEC = false (element loads) when a and ref are not 16-byte
//    aligned at a common element. write_ref == 2 stores a's chunk into ref in the same pass.
//    Per slice, (sum |a-ref|, sum |ref|) goes through a shuffle + shared-memory tree to the
//    workspace, then __threadfence() and a ticket (atomicAdd on the chunk's counter in the
//    workspace). The CTA that takes a chunk's last ticket sums that chunk's partials in a fixed
//    order, makes the decision and updates the state of every group of the chunk (the old
//    finalize kernel's code, same semantics), then puts the counter back to 0: a workspace the
//    caller keeps needs no memset between launches or CUDA-graph replays. No CTA ever waits for
//    another, so residency does not matter.
//  - write_ref_kernel (write_ref == 1 only): ref <- a in the cells that recompute. A second
//    launch because the decision exists only once every slice of the chunk is summed (waiting
//    for that inside check_kernel would be a grid-wide barrier over CTAs that need not be
//    resident). It reads `reuse` on the device (no host sync); a slice of a reused cell is
//    skipped whole. Same slices, same 16-byte chunks.
// Sums are fp32, each addition add_rn (exact helpers of common.cuh: IEEE RNE, subnormals kept in
// any build), in an order fixed by the sizes and the GPU's SM count (deterministic run to run
// on a GPU) that is not the reference's, so m matches it to a few ulps. Indices are int64.
#include "pyops/block_similarity.h"

#include "common.cuh"

namespace pyops {
namespace {

constexpr int kU = 4;                 // chunks of a (and of ref) in flight per thread
constexpr int kCtasPerSm = 4;         // resident CTAs per SM the grid is sized for (<= 64 regs)
constexpr int64_t kMaxSlots = 4096;   // grid cap; the workspace size assumes it (host-only)
constexpr int64_t kMinSlice = 4096;   // elements: a slice is never cut smaller than this
constexpr int64_t kSliceAlign = 8;    // slice lengths are multiples of 8 elements (>= any V)
constexpr int kWarps = kThreads / 32;

// The slices, from the sizes and the number of CTA slots (host and device agree).
struct Plan {
  int64_t lc;       // elements per segment (row_len / chunks)
  int64_t S;        // slices per segment
  int64_t L;        // elements per slice (the last slice of a segment may be shorter)
  int64_t nslices;  // rows * chunks * S
};

// About one slice per CTA slot: S = slots / segments (at least 1, and no slice under kMinSlice
// elements unless the segment is), rounded so that no slice is empty. S never decreases as
// slots grows, so plan_of(.., kMaxSlots) bounds the slices of every launch.
inline Plan plan_of(int64_t rows, int64_t row_len, int64_t chunks, int64_t slots) {
  Plan pl;
  pl.lc = row_len / chunks;
  const int64_t segs = rows * chunks;
  int64_t s = slots / segs;
  const int64_t by_len = cdiv(pl.lc, kMinSlice);
  if (s > by_len) s = by_len;
  if (s < 1) s = 1;
  pl.L = cdiv(cdiv(pl.lc, s), kSliceAlign) * kSliceAlign;
  pl.S = cdiv(pl.lc, pl.L);
  pl.nslices = segs * pl.S;
  return pl;
}

// Raw bits of chunk c -> elements k0 .. k0+V-1 (those < K) of the run at base. VEC: base + k0 is
// 16-byte aligned. (Local: common.cuh has loads of raw chunks but no store of one.)
template <typename E, bool VEC>
__device__ __forceinline__ void put_chunk(void* base, int64_t k0, int64_t K, const uint4& c) {
  using S = typename E::storage;
  S* x = static_cast<S*>(base) + k0;
  if (VEC && k0 + E::V <= K) {
    *reinterpret_cast<uint4*>(x) = c;
    return;
  }
#pragma unroll
  for (int j = 0; j < E::V; ++j)
    if (k0 + j < K) x[j] = chunk_elem<E>(c, j);
}

// load_chunk of common.cuh (same contract, elements >= K read as +0) for a buffer this kernel
// also writes (ref when write_ref == 2): a plain coherent load, because load_chunk's read-only
// path (__ldg, ld.global.nc) is only valid for data no thread writes during the kernel.
template <typename E, bool VEC>
__device__ __forceinline__ uint4 load_chunk_rw(const InView& in, int64_t k0) {
  using S = typename E::storage;
  const S* x = static_cast<const S*>(in.base) + k0;
  if (VEC && k0 + E::V <= in.K) return *reinterpret_cast<const uint4*>(x);
  uint4 c = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int j = 0; j < E::V; ++j)
    if (k0 + j < in.K) chunk_set<E>(c, j, x[j]);
  return c;
}

// d += sum |a-r|, n += sum |r| over one chunk pair: the chunk's V terms by a pairwise tree, then one
// add into the running sums.
template <typename E>
__device__ __forceinline__ void accumulate(const uint4& ca, const uint4& cr, float& d, float& n) {
  float fa[E::V], fr[E::V];
  chunk_to_float<E>(ca, fa);
  chunk_to_float<E>(cr, fr);
#pragma unroll
  for (int j = 0; j < E::V; ++j) {
    fa[j] = abs_rn(sub_rn(fa[j], fr[j]));
    fr[j] = abs_rn(fr[j]);
  }
#pragma unroll
  for (int w = E::V / 2; w > 0; w >>= 1) {
#pragma unroll
    for (int j = 0; j < w; ++j) {
      fa[j] = add_rn(fa[j], fa[j + w]);
      fr[j] = add_rn(fr[j], fr[j + w]);
    }
  }
  d = add_rn(d, fa[0]);
  n = add_rn(n, fr[0]);
}

// Fixed-order sum of (d, n) over the CTA (shuffle tree per warp, then warp 0 over the warps);
// the result is valid in thread 0. Every thread must call; ends with a barrier (reusable).
__device__ __forceinline__ void block_sum2(float& d, float& n) {
  __shared__ float sd[kWarps], sn[kWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    d = add_rn(d, __shfl_down_sync(0xFFFFFFFFu, d, o));
    n = add_rn(n, __shfl_down_sync(0xFFFFFFFFu, n, o));
  }
  if (lane == 0) {
    sd[warp] = d;
    sn[warp] = n;
  }
  __syncthreads();
  if (warp == 0) {
    d = lane < kWarps ? sd[lane] : 0.0f;
    n = lane < kWarps ? sn[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      d = add_rn(d, __shfl_down_sync(0xFFFFFFFFu, d, o));
      n = add_rn(n, __shfl_down_sync(0xFFFFFFFFu, n, o));
    }
  }
  __syncthreads();
}

// Elements before the first 16-byte boundary of the run at `a` (0 when !VEC), at most len.
template <typename E, bool VEC>
__device__ __forceinline__ int64_t head_of(const void* a, int64_t len) {
  if (!VEC) return 0;
  const int64_t h = static_cast<int64_t>(((16u - (reinterpret_cast<uintptr_t>(a) & 15u)) & 15u) /
                                         sizeof(typename E::storage));
  return h < len ? h : len;
}

// The last CTA of chunk c: per group, the partials of its rows' slices in a fixed order
// (thread t takes j = t, t + kThreads, ...; then block_sum2), then the decision and the state
// update exactly as the reference's decide() (thread 0; metric/reuse hold the per-group
// decision before the AND over groups).
__device__ void finalize_chunk(const pyops_block_similarity_params& p, const Plan& pl, int c,
                               const float* part) {
  int cand_all = 1;  // thread 0's AND of the groups' decisions
  const int64_t rpg = p.rows / p.groups;
  const int64_t np = rpg * pl.S;
  for (int g = 0; g < p.groups; ++g) {
    float d = 0.0f, n = 0.0f;
    for (int64_t j0 = threadIdx.x; j0 < np; j0 += kU * kThreads) {
      float pd[kU], pn[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t j = j0 + static_cast<int64_t>(u) * kThreads;
        pd[u] = pn[u] = 0.0f;
        if (j < np) {
          int64_t s;
          const int64_t r = divmod(j, pl.S, s);
          const int64_t cta = ((g * rpg + r) * p.chunks + c) * pl.S + s;
          pd[u] = __ldcg(part + 2 * cta);
          pn[u] = __ldcg(part + 2 * cta + 1);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        d = add_rn(d, pd[u]);
        n = add_rn(n, pn[u]);
      }
    }
    block_sum2(d, n);
    if (threadIdx.x == 0) {
      const int cell = g * p.chunks + c;
      const float m = div_rn(d, max_nan(n, p.eps));  // d / n.clamp_min(eps)
      const float step = p.state[cell * 4], consec = p.state[cell * 4 + 1];
      const float acc = p.state[cell * 4 + 2];
      bool forced = step == 0.f || step < static_cast<float>(p.warmup);
      if (p.num_steps > 0 &&
          step >= static_cast<float>(static_cast<int64_t>(p.num_steps) - p.last_steps))
        forced = true;
      if (p.max_reuse >= 0 && consec >= static_cast<float>(p.max_reuse)) forced = true;
      const bool cand = p.rule == 0 ? (m < p.threshold) : (add_rn(acc, m) < p.threshold);
      const int r = (!forced && cand) ? 1 : 0;
      p.metric[cell] = m;
      p.reuse[cell] = r;
      cand_all &= r;
    }
  }
  if (threadIdx.x != 0) return;
  for (int g = 0; g < p.groups; ++g) {
    const int cell = g * p.chunks + c;
    int r = p.reuse[cell];
    if (p.all_groups && p.groups > 1) r &= cand_all;
    const float m = p.metric[cell];
    float step = p.state[cell * 4], consec = p.state[cell * 4 + 1], acc = p.state[cell * 4 + 2];
    consec = r ? add_rn(consec, 1.f) : 0.f;
    acc = (p.rule == 1 && r) ? add_rn(acc, m) : 0.f;
    step = add_rn(step, 1.f);
    if (p.num_steps > 0 && step >= static_cast<float>(p.num_steps)) step = consec = acc = 0.f;
    p.state[cell * 4] = step;
    p.state[cell * 4 + 1] = consec;
    p.state[cell * 4 + 2] = acc;
    p.state[cell * 4 + 3] = m;
    p.reuse[cell] = r;
  }
}

// Slice i: first element `start`, `len` elements, its row and chunk.
struct SliceOf {
  int64_t start, len, row;
  int c;
  __device__ __forceinline__ SliceOf(const pyops_block_similarity_params& p, const Plan& pl,
                                     int64_t i) {
    int64_t s, cc;
    const int64_t seg = divmod(i, pl.S, s);
    row = divmod(seg, static_cast<int64_t>(p.chunks), cc);
    c = static_cast<int>(cc);
    start = row * p.row_len + cc * pl.lc + s * pl.L;
    const int64_t left = pl.lc - s * pl.L;
    len = left < pl.L ? left : pl.L;
  }
};

// (sum |a-ref|, sum |ref|) over one slice, valid in thread 0; ref <- a there when WRITE.
template <typename E, bool VEC, bool WRITE>
__device__ __forceinline__ void slice_sums(const pyops_block_similarity_params& p,
                                           const SliceOf& sl, float& d, float& n) {
  using S = typename E::storage;
  constexpr int V = E::V;
  const S* a = static_cast<const S*>(p.a) + sl.start;
  S* ref = static_cast<S*>(p.ref) + sl.start;
  const int64_t head = head_of<E, VEC>(a, sl.len);
  d = n = 0.0f;
  if (head > 0 && threadIdx.x == kThreads - 1) {  // the scalar head, < V elements
    const InView ha{a, 1, head, head, 1}, hr{ref, 1, head, head, 1};
    const uint4 ca = load_chunk<E, false>(ha, 0, 0);
    const uint4 cr = WRITE ? load_chunk_rw<E, false>(hr, 0) : load_chunk<E, false>(hr, 0, 0);
    accumulate<E>(ca, cr, d, n);
    if (WRITE) put_chunk<E, false>(ref, 0, head, ca);
  }
  // the body from the 16-byte boundary; its last chunk may be partial (masked in load_chunk)
  const int64_t K = sl.len - head;
  const InView va{a + head, 1, K, K, 1}, vr{ref + head, 1, K, K, 1};
  const int64_t nch = (K + V - 1) / V;
  for (int64_t i0 = threadIdx.x; i0 < nch; i0 += kU * kThreads) {
    uint4 ca[kU], cr[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {  // every load in flight before any math
      const int64_t i = i0 + static_cast<int64_t>(u) * kThreads;
      ca[u] = cr[u] = make_uint4(0u, 0u, 0u, 0u);
      if (i < nch) {
        ca[u] = load_chunk<E, VEC>(va, 0, i * V);
        cr[u] = WRITE ? load_chunk_rw<E, VEC>(vr, i * V) : load_chunk<E, VEC>(vr, 0, i * V);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * kThreads;
      accumulate<E>(ca[u], cr[u], d, n);  // zero chunks past the end add +0
      if (WRITE && i < nch) put_chunk<E, VEC>(ref + head, i * V, K, ca[u]);
    }
  }
  block_sum2(d, n);
}

// grid-stride over the slices. Per slice: its sums -> workspace, then the ticket of its chunk;
// the CTA holding the chunk's last ticket finalizes the chunk and puts the counter back to 0.
template <typename E, bool VEC, bool WRITE>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    check_kernel(const pyops_block_similarity_params p, const Plan pl) {
  __shared__ int last;
  unsigned* counters = reinterpret_cast<unsigned*>(p.workspace);
  float* part = p.workspace + p.chunks;
  const unsigned per_chunk = static_cast<unsigned>(p.rows * pl.S);  // slices (tickets) per chunk
  for (int64_t i = blockIdx.x; i < pl.nslices; i += gridDim.x) {
    const SliceOf sl(p, pl, i);
    float d, n;
    slice_sums<E, VEC, WRITE>(p, sl, d, n);
    if (threadIdx.x == 0) {
      part[2 * i] = d;
      part[2 * i + 1] = n;
      __threadfence();  // the partial is visible device-wide before the ticket is taken
      last = atomicAdd(counters + sl.c, 1u) == per_chunk - 1u;
      if (last) __threadfence();  // and every other slice's partial is visible to this CTA
    }
    __syncthreads();
    if (last) {  // uniform over the CTA
      finalize_chunk(p, pl, sl.c, part);
      if (threadIdx.x == 0) counters[sl.c] = 0u;  // every slice of the chunk took its ticket
    }
    __syncthreads();  // `last` is rewritten by the next slice
  }
}

// grid-stride over the slices: ref <- a over a slice when its cell recomputes (reuse == 0).
template <typename E, bool VEC>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    write_ref_kernel(const pyops_block_similarity_params p, const Plan pl) {
  using S = typename E::storage;
  constexpr int V = E::V;
  const int64_t rpg = p.rows / p.groups;
  for (int64_t si = blockIdx.x; si < pl.nslices; si += gridDim.x) {
    const SliceOf sl(p, pl, si);
    if (p.reuse[(sl.row / rpg) * p.chunks + sl.c] != 0) continue;  // uniform over the CTA
    const S* a = static_cast<const S*>(p.a) + sl.start;
    S* ref = static_cast<S*>(p.ref) + sl.start;
    const int64_t head = head_of<E, VEC>(a, sl.len);
    if (head > 0 && threadIdx.x == kThreads - 1) {
      const InView ha{a, 1, head, head, 1};
      put_chunk<E, false>(ref, 0, head, load_chunk<E, false>(ha, 0, 0));
    }
    const int64_t K = sl.len - head;
    const InView va{a + head, 1, K, K, 1};
    const int64_t nch = (K + V - 1) / V;
    for (int64_t i0 = threadIdx.x; i0 < nch; i0 += kU * kThreads) {
      uint4 ca[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t i = i0 + static_cast<int64_t>(u) * kThreads;
        ca[u] = make_uint4(0u, 0u, 0u, 0u);
        if (i < nch) ca[u] = load_chunk<E, VEC>(va, 0, i * V);
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t i = i0 + static_cast<int64_t>(u) * kThreads;
        if (i < nch) put_chunk<E, VEC>(ref + head, i * V, K, ca[u]);
      }
    }
  }
}

}  // namespace
}  // namespace pyops

extern "C" int64_t pyops_block_similarity_workspace_size(const pyops_block_similarity_params* p) {
  if (p == nullptr || p->rows <= 0 || p->row_len <= 0 || p->chunks <= 0 ||
      p->rows > 0x7fffffff / p->chunks)
    return 0;
  const pyops::Plan pl = pyops::plan_of(p->rows, p->row_len, p->chunks, pyops::kMaxSlots);
  return p->chunks + 2 * pl.nslices;
}

extern "C" cudaError_t pyops_block_similarity(const pyops_block_similarity_params* params,
                                              cudaStream_t stream) {
  using namespace pyops;
  if (params == nullptr) return cudaErrorInvalidValue;
  const pyops_block_similarity_params& p = *params;
  if (p.a == nullptr || p.ref == nullptr || p.state == nullptr || p.metric == nullptr ||
      p.reuse == nullptr || p.workspace == nullptr || !valid_dtype(p.dtype) || p.rows <= 0 ||
      p.row_len <= 0 || p.chunks <= 0 || p.groups <= 0 || p.rows % p.groups != 0 ||
      p.row_len % p.chunks != 0 || p.rule < 0 || p.rule > 1 || p.write_ref < 0 ||
      p.write_ref > 2)
    return cudaErrorInvalidValue;
  // rows*chunks segments (a ticket count per chunk fits 32 bits); cells*4 indexed as int
  if (p.rows > 0x7fffffff / p.chunks) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(p.groups) * p.chunks > 0x7fffffff / 4) return cudaErrorInvalidValue;
  // a and ref aligned to their element (torch's tensors always are), word-aligned fp32/int32
  const uintptr_t esize = static_cast<uintptr_t>(elem_size(p.dtype));
  const uintptr_t ua = reinterpret_cast<uintptr_t>(p.a), ur = reinterpret_cast<uintptr_t>(p.ref);
  if (ua % esize != 0 || ur % esize != 0 || reinterpret_cast<uintptr_t>(p.state) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(p.metric) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(p.reuse) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(p.workspace) % 4 != 0)
    return cudaErrorInvalidValue;
  int slots = 0;  // kCtasPerSm per SM, at most kMaxSlots (device attributes: no sync)
  cudaError_t err = grid_for(kMaxSlots * kThreads, kThreads, kCtasPerSm, &slots);
  if (err != cudaSuccess) return err;
  const Plan pl = plan_of(p.rows, p.row_len, p.chunks, slots);
  const unsigned grid = static_cast<unsigned>(pl.nslices < slots ? pl.nslices : slots);
  // a's and ref's 16-byte chunks line up when both are 16-byte aligned at one common element
  const bool vec = (ua - ur) % 16 == 0;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    if (vec) {
      if (p.write_ref == 2)
        check_kernel<E, true, true><<<grid, kThreads, 0, stream>>>(p, pl);
      else
        check_kernel<E, true, false><<<grid, kThreads, 0, stream>>>(p, pl);
    } else {
      if (p.write_ref == 2)
        check_kernel<E, false, true><<<grid, kThreads, 0, stream>>>(p, pl);
      else
        check_kernel<E, false, false><<<grid, kThreads, 0, stream>>>(p, pl);
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || p.write_ref != 1) return e;
    if (vec)
      write_ref_kernel<E, true><<<grid, kThreads, 0, stream>>>(p, pl);
    else
      write_ref_kernel<E, false><<<grid, kThreads, 0, stream>>>(p, pl);
    return cudaGetLastError();
  });
}

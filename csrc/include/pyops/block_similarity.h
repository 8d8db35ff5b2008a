/*
 * pyops/block_similarity.h - torch-free C ABI of the fused cache check.
 * Spec: pyops/reference/block_similarity.py. Conventions: pyops/common.h.
 *
 * Per cell (group g of the batch rows, token chunk c):
 *   d = sum |a - ref|, n = sum |ref| (fp32), m = d / max(n, eps)
 *   decision (1 = reuse) and state update on the device; ref <- a where write_ref says so.
 * One streaming launch sums each cell in slices, and the CTA that finishes a chunk's last slice
 * makes the decision (a second launch copies ref only for write_ref = 1). The sums are fp32 in
 * an order fixed by the sizes and the device's SM count (deterministic run to run on one GPU;
 * it differs from the reference's, so m matches it to a few fp32 ulps, not bit for bit).
 */
#ifndef PYOPS_BLOCK_SIMILARITY_H_
#define PYOPS_BLOCK_SIMILARITY_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pyops_block_similarity_params {
  const void* a;       /* current feature, contiguous (rows, row_len) */
  void* ref;           /* cached reference, same layout and dtype; written per write_ref */
  float* state;        /* (groups*chunks, 4): step, consecutive reuses, accumulated, last metric */
  float* metric;       /* (groups*chunks,) */
  int32_t* reuse;      /* (groups*chunks,) 1 = reuse, 0 = compute */
  float* workspace;    /* pyops_block_similarity_workspace_size(p) floats, 4-byte aligned:
                          chunks uint32 ticket counters, then 2 floats per slice. The counters
                          must be 0 when a launch starts: zero the workspace once when it is
                          allocated; every launch leaves them 0, so a workspace kept across
                          launches with the same chunks (or across CUDA-graph replays) needs no
                          memset. One launch at a time per workspace. */
  pyops_dtype_t dtype; /* of a and ref */
  int64_t rows, row_len;
  int chunks, groups;
  float threshold, eps;
  int rule;            /* 0 compare with last computed, 1 accumulate until threshold */
  int warmup, max_reuse, num_steps, last_steps;
  int all_groups;      /* AND the decision over the groups */
  int write_ref;       /* 0 never, 1 when recomputed, 2 always */
} pyops_block_similarity_params;

/* Floats of workspace the launch needs for p->rows, p->row_len, p->chunks on any GPU (0 if p is
 * NULL, any of them is <= 0, or rows*chunks > INT_MAX, which the launch refuses). Host-only, no
 * device access. */
int64_t pyops_block_similarity_workspace_size(const pyops_block_similarity_params* p);

/* cudaErrorInvalidValue without launching for a NULL p or pointer, an unknown dtype, sizes that
 * are not positive or do not divide (rows % groups, row_len % chunks), rule / write_ref out of
 * range, rows*chunks > INT_MAX, groups*chunks > INT_MAX / 4, a or ref not aligned to their
 * element size, or state / metric / reuse / workspace not 4-byte aligned. */
cudaError_t pyops_block_similarity(const pyops_block_similarity_params* p, cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_BLOCK_SIMILARITY_H_ */

/*
 * pyops/block_similarity.h - torch-free C ABI of the fused cache check.
 * Spec: pyops/reference/block_similarity.py. Conventions: pyops/common.h.
 *
 * Per cell (group g of the batch rows, token chunk c):
 *   d = sum |a - ref|, n = sum |ref| (fp32), m = d / max(n, eps)
 *   decision (1 = reuse) and state update on the device; ref <- a where write_ref says so.
 * Reductions are two-stage with a fixed order (deterministic run to run; the order differs from
 * the reference's, so m matches it to a few fp32 ulps, not bit for bit).
 */
#ifndef PYOPS_BLOCK_SIMILARITY_H_
#define PYOPS_BLOCK_SIMILARITY_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Elements of one chunk summed by one stage-1 CTA. A chunk (row_len / chunks elements) may span
 * at most 65535 such splits (the grid's y limit). */
#define PYOPS_BLOCK_SIMILARITY_SPLIT 16384

typedef struct pyops_block_similarity_params {
  const void* a;       /* current feature, contiguous (rows, row_len) */
  void* ref;           /* cached reference, same layout and dtype; written per write_ref */
  float* state;        /* (groups*chunks, 4): step, consecutive reuses, accumulated, last metric */
  float* metric;       /* (groups*chunks,) */
  int32_t* reuse;      /* (groups*chunks,) 1 = reuse, 0 = compute */
  float* workspace;    /* pyops_block_similarity_workspace_size(p) floats */
  pyops_dtype_t dtype; /* of a and ref */
  int64_t rows, row_len;
  int chunks, groups;
  float threshold, eps;
  int rule;            /* 0 compare with last computed, 1 accumulate until threshold */
  int warmup, max_reuse, num_steps, last_steps;
  int all_groups;      /* AND the decision over the groups */
  int write_ref;       /* 0 never, 1 when recomputed, 2 always */
} pyops_block_similarity_params;

/* Floats of workspace the launch needs for p->rows, p->row_len, p->chunks (0 if any is <= 0 or
 * p is NULL). Host-only, no device access. */
int64_t pyops_block_similarity_workspace_size(const pyops_block_similarity_params* p);

/* cudaErrorInvalidValue without launching for a NULL p or pointer, an unknown dtype, sizes that
 * are not positive or do not divide (rows % groups, row_len % chunks), rule / write_ref out of
 * range, rows*chunks > INT_MAX or a chunk longer than 65535 splits. */
cudaError_t pyops_block_similarity(const pyops_block_similarity_params* p, cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_BLOCK_SIMILARITY_H_ */

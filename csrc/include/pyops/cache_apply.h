/*
 * pyops/cache_apply.h - torch-free C ABI of the predicated residual apply of the block cache.
 * Spec: pyops/reference/block_similarity.py (cache_apply). Conventions: pyops/common.h.
 *
 *   out = x + residual (fp32 sum, rounded once to out's dtype) in the rows of the groups with
 *   reuse != 0; other rows untouched. All buffers contiguous (rows, row_len); the group of row r
 *   is r / (rows / groups). out may be x or residual exactly (element-wise).
 */
#ifndef PYOPS_CACHE_APPLY_H_
#define PYOPS_CACHE_APPLY_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pyops_cache_apply_params {
  void* out;
  const void* x;
  const void* residual;
  const int32_t* reuse;  /* (groups,) */
  pyops_dtype_t out_dtype, x_dtype, residual_dtype;
  int64_t rows, row_len;
  int groups;
} pyops_cache_apply_params;

/* cudaErrorInvalidValue without launching for a NULL p or pointer, an unknown dtype, sizes that
 * are not positive, rows % groups != 0 or rows > INT_MAX. */
cudaError_t pyops_cache_apply(const pyops_cache_apply_params* p, cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_CACHE_APPLY_H_ */

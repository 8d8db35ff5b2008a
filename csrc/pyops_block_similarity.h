// pyops block_similarity: C ABI of the fused cache check and of the predicated residual apply
// (torch-free). Spec: pyops/reference/block_similarity.py.
//
// Per cell (group g of the batch rows, token chunk c):
//   d = sum |a - ref|, n = sum |ref| (fp32), m = d / max(n, eps)
//   decision (1 = reuse) and state update on the device; ref <- a where write_ref says so.
// Reductions are two-stage with a fixed order (deterministic run to run).
#ifndef PYOPS_BLOCK_SIMILARITY_H_
#define PYOPS_BLOCK_SIMILARITY_H_

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  PYOPS_BS_FLOAT32 = 0,
  PYOPS_BS_BFLOAT16 = 1,
  PYOPS_BS_FLOAT16 = 2,
};

typedef struct {
  const void* a;       // current feature, contiguous (rows, row_len)
  void* ref;           // cached reference, same layout and dtype; written per write_ref
  float* state;        // (groups*chunks, 4): step, consecutive reuses, accumulated, last metric
  float* metric;       // (groups*chunks,)
  int32_t* reuse;      // (groups*chunks,) 1 = reuse, 0 = compute
  float* workspace;    // pyops_block_similarity_workspace() floats
  int dtype;           // of a and ref
  int64_t rows, row_len;
  int chunks, groups;
  float threshold, eps;
  int rule;            // 0 compare with last computed, 1 accumulate until threshold
  int warmup, max_reuse, num_steps, last_steps;
  int all_groups;      // AND the decision over the groups
  int write_ref;       // 0 never, 1 when recomputed, 2 always
} pyops_block_similarity_params;

// Floats of workspace the launch needs for these sizes.
int64_t pyops_block_similarity_workspace(int64_t rows, int64_t row_len, int chunks);

// Launch on `stream` (no sync). Returns cudaSuccess or the error; invalid parameters return
// cudaErrorInvalidValue without launching.
int pyops_block_similarity(const pyops_block_similarity_params* params, cudaStream_t stream);

// out = x + residual (rounded once to out's dtype) in the rows of the groups with reuse != 0;
// other rows untouched. All contiguous (rows, row_len).
typedef struct {
  void* out;
  const void* x;
  const void* residual;
  const int32_t* reuse;  // (groups,)
  int out_dtype, x_dtype, residual_dtype;
  int64_t rows, row_len;
  int groups;
} pyops_cache_apply_params;

int pyops_cache_apply(const pyops_cache_apply_params* params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif  // PYOPS_BLOCK_SIMILARITY_H_

/*
 * pyops/sample_step.h - torch-free C ABI of the fused few-step sampler update.
 * Bit-exact spec: pyops/reference/sample_step.py. Conventions: pyops/common.h.
 *
 *   p      = cond                                  (no CFG)
 *   p      = uncond + guidance * (cond - uncond)   (CFG)
 *   y      = alpha * state + beta * p  [+ zeta * noise]
 *   state <- y (state's dtype),  x_out <- y (x_out's dtype, if given)
 *
 * fp32 math, each operation rounded on its own (no FMA contraction), casts round to nearest
 * even. All buffers are contiguous with n elements; state is updated in place and may not alias
 * x_out. cond/uncond/noise may alias each other, or be state / x_out exactly (element i is read
 * before the same thread writes it). n == 0: nothing to do.
 */
#ifndef PYOPS_SAMPLE_STEP_H_
#define PYOPS_SAMPLE_STEP_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pyops_sample_step_params {
  void* state;          /* read (x) and written (x_next) */
  void* x_out;          /* optional (NULL): x_next again, in its own dtype */
  const void* cond;     /* model output (or the only one without CFG) */
  const void* uncond;   /* optional (NULL): unconditional output for CFG */
  const void* noise;    /* optional (NULL): fresh noise z */
  pyops_dtype_t state_dtype, x_out_dtype, cond_dtype, uncond_dtype, noise_dtype;
  int64_t n;            /* elements in every buffer */
  float alpha, beta, zeta, guidance;
} pyops_sample_step_params;

/* cudaErrorInvalidValue without launching for a NULL p / state / cond, n < 0 or an unknown
 * dtype of a given buffer. */
cudaError_t pyops_sample_step(const pyops_sample_step_params* p, cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_SAMPLE_STEP_H_ */

// pyops sample_step: C ABI of the fused few-step sampler update (torch-free).
//
//   p      = cond                                  (no CFG)
//   p      = uncond + guidance * (cond - uncond)   (CFG)
//   y      = alpha * state + beta * p  [+ zeta * noise]
//   state <- y (state's dtype),  x_out <- y (x_out's dtype, if given)
//
// fp32 math, each operation rounded on its own (no FMA contraction), casts round to nearest
// even: bit-identical to the PyTorch reference pyops/reference/sample_step.py.
// All buffers are contiguous with n elements; state is updated in place and may not alias
// x_out. cond/uncond/noise may alias each other (read only).
#ifndef PYOPS_SAMPLE_STEP_H_
#define PYOPS_SAMPLE_STEP_H_

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types accepted for every buffer.
enum {
  PYOPS_SS_FLOAT32 = 0,
  PYOPS_SS_BFLOAT16 = 1,
  PYOPS_SS_FLOAT16 = 2,
};

typedef struct {
  void* state;          // read (x) and written (x_next)
  void* x_out;          // optional (NULL): x_next again, in its own dtype
  const void* cond;     // model output (or the only one without CFG)
  const void* uncond;   // optional (NULL): unconditional output for CFG
  const void* noise;    // optional (NULL): fresh noise z
  int state_dtype, x_out_dtype, cond_dtype, uncond_dtype, noise_dtype;
  int64_t n;            // elements in every buffer
  float alpha, beta, zeta, guidance;
} pyops_sample_step_params;

// Launch on `stream`. Returns cudaSuccess or the launch error (as an int, cudaError_t value);
// an invalid parameter (unknown dtype, n < 0, NULL required pointer) returns
// cudaErrorInvalidValue without launching.
int pyops_sample_step(const pyops_sample_step_params* params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif  // PYOPS_SAMPLE_STEP_H_

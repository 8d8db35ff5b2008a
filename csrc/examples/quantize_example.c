/* quantize_example.c - the libpyops C ABI from plain C: quantize a small bf16 matrix to FP8
 * (per-row scales) and NVFP4 (computed global scale), then print what came back. Every entry
 * point takes a params struct and a stream: pyops_<op>(const pyops_<op>_params*, cudaStream_t).
 * Without a usable GPU it says so and exits 0. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "pyops.h"

#define ROWS 4
#define COLS 32

static uint16_t to_bf16(float f) { /* round to nearest even */
  uint32_t b;
  memcpy(&b, &f, 4);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return (uint16_t)(b >> 16);
}

#define CHECK(call)                                                                  \
  do {                                                                               \
    cudaError_t e_ = (call);                                                         \
    if (e_ != cudaSuccess) {                                                         \
      fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(e_));             \
      return 1;                                                                      \
    }                                                                                \
  } while (0)

int main(void) {
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    printf("pyops example: no CUDA device available (libpyops built for %s); nothing to run.\n",
           pyops_cuda_archs());
    return 0;
  }
  printf("libpyops built for compute capabilities: %s\n", pyops_cuda_archs());

  uint16_t hx[ROWS * COLS];
  for (int m = 0; m < ROWS; ++m)
    for (int k = 0; k < COLS; ++k)
      hx[m * COLS + k] = to_bf16((float)((k - 16) * (m + 1)) * 0.37f);

  const int nb = (COLS + 15) / 16;
  void* dx = NULL;
  uint8_t *dq = NULL, *ddata = NULL, *dscales = NULL;
  float *dscale = NULL, *dglobal = NULL;
  CHECK(cudaMalloc(&dx, sizeof hx));
  CHECK(cudaMalloc((void**)&dq, ROWS * COLS));
  CHECK(cudaMalloc((void**)&dscale, ROWS * sizeof(float)));
  CHECK(cudaMalloc((void**)&ddata, ROWS * nb * 8));
  CHECK(cudaMalloc((void**)&dscales, ROWS * nb));
  CHECK(cudaMalloc((void**)&dglobal, sizeof(float)));
  CHECK(cudaMemcpy(dx, hx, sizeof hx, cudaMemcpyHostToDevice));

  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  {
    pyops_quantize_fp8_params p;
    memset(&p, 0, sizeof p);
    p.x = dx;
    p.dtype = PYOPS_DTYPE_BF16;
    p.M = ROWS;
    p.K = COLS;
    p.stride_m = COLS; /* row-major, contiguous */
    p.stride_k = 1;
    p.q = dq;
    p.scale = dscale;
    p.granularity = PYOPS_FP8_ROW;
    CHECK(pyops_quantize_fp8(&p, stream));
  }
  {
    pyops_quantize_nvfp4_params p;
    memset(&p, 0, sizeof p);
    p.x = dx;
    p.dtype = PYOPS_DTYPE_BF16;
    p.M = ROWS;
    p.K = COLS;
    p.stride_m = COLS;
    p.stride_k = 1;
    p.data = ddata;
    p.scales = dscales;
    p.global_scale = dglobal;
    p.compute_global = 1;
    p.swizzle = 0;
    CHECK(pyops_quantize_nvfp4(&p, stream));
  }
  CHECK(cudaStreamSynchronize(stream));

  uint8_t q[ROWS * COLS], data[ROWS * 16], scales[ROWS * 2];
  float scale[ROWS], global;
  CHECK(cudaMemcpy(q, dq, sizeof q, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(scale, dscale, sizeof scale, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(data, ddata, (size_t)ROWS * nb * 8, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(scales, dscales, (size_t)ROWS * nb, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(&global, dglobal, sizeof global, cudaMemcpyDeviceToHost));

  for (int m = 0; m < ROWS; ++m) {
    printf("row %d: fp8 scale %.6g, codes", m, scale[m]);
    for (int k = 0; k < 8; ++k) printf(" %02x", q[m * COLS + k]);
    printf(" ...\n");
  }
  printf("nvfp4 global scale %.6g\n", global);
  for (int m = 0; m < ROWS; ++m) {
    printf("row %d: nvfp4 block scales %02x %02x, bytes", m, scales[m * nb], scales[m * nb + 1]);
    for (int i = 0; i < 8; ++i) printf(" %02x", data[m * nb * 8 + i]);
    printf(" ...\n");
  }

  cudaStreamDestroy(stream);
  cudaFree(dx);
  cudaFree(dq);
  cudaFree(dscale);
  cudaFree(ddata);
  cudaFree(dscales);
  cudaFree(dglobal);
  return 0;
}

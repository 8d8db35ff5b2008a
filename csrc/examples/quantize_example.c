/* quantize_example.c - the libpyops C ABI from plain C: quantize a small bf16 matrix to FP8
 * (per-row scales) and NVFP4 (computed global scale), then print what came back.
 * Without a usable GPU it says so and exits 0. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "pyops.h"

#define M 4
#define K 32

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

  uint16_t hx[M * K];
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) hx[m * K + k] = to_bf16((float)((k - 16) * (m + 1)) * 0.37f);

  const int nb = (K + 15) / 16;
  void* dx = NULL;
  uint8_t *dq = NULL, *ddata = NULL, *dscales = NULL;
  float *dscale = NULL, *dglobal = NULL;
  CHECK(cudaMalloc(&dx, sizeof hx));
  CHECK(cudaMalloc((void**)&dq, M * K));
  CHECK(cudaMalloc((void**)&dscale, M * sizeof(float)));
  CHECK(cudaMalloc((void**)&ddata, M * nb * 8));
  CHECK(cudaMalloc((void**)&dscales, M * nb));
  CHECK(cudaMalloc((void**)&dglobal, sizeof(float)));
  CHECK(cudaMemcpy(dx, hx, sizeof hx, cudaMemcpyHostToDevice));

  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  CHECK(pyops_quantize_fp8(dx, PYOPS_DTYPE_BF16, M, K, /*stride_m=*/K, /*stride_k=*/1, dq, dscale,
                           PYOPS_FP8_ROW, stream));
  CHECK(pyops_quantize_nvfp4(dx, PYOPS_DTYPE_BF16, M, K, K, 1, ddata, dscales, dglobal,
                             /*compute_global=*/1, /*swizzle=*/0, stream));
  CHECK(cudaStreamSynchronize(stream));

  uint8_t q[M * K], data[M * 16], scales[M * 2];
  float scale[M], global;
  CHECK(cudaMemcpy(q, dq, sizeof q, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(scale, dscale, sizeof scale, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(data, ddata, (size_t)M * nb * 8, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(scales, dscales, (size_t)M * nb, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(&global, dglobal, sizeof global, cudaMemcpyDeviceToHost));

  for (int m = 0; m < M; ++m) {
    printf("row %d: fp8 scale %.6g, codes", m, scale[m]);
    for (int k = 0; k < 8; ++k) printf(" %02x", q[m * K + k]);
    printf(" ...\n");
  }
  printf("nvfp4 global scale %.6g\n", global);
  for (int m = 0; m < M; ++m) {
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

// binding_utils.h - shared checks for the thin torch bindings (no math here).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "pyops.h"

namespace pyops_bind {

inline pyops_dtype_t input_dtype(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::ScalarType::Float: return PYOPS_DTYPE_F32;
    case at::ScalarType::Half: return PYOPS_DTYPE_F16;
    case at::ScalarType::BFloat16: return PYOPS_DTYPE_BF16;
    default: break;
  }
  TORCH_CHECK(false, op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_cuda(const at::Tensor& t, const at::Tensor& x, const char* op,
                       const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

inline void check_out(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype,
                      const char* op, const char* name) {
  check_cuda(t, x, op, name);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_status(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, " failed: ", cudaGetErrorString(e));
}

}  // namespace pyops_bind

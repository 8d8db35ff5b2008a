// Torch binding of pyops_quantize_nvfp4 (csrc/quantize_nvfp4.cu): checks, then one C ABI call on
// the current stream. Spec: pyops/reference/quantize_nvfp4.py; Python: pyops/ops/quantize_nvfp4.py.
#include <torch/library.h>

#include "binding_utils.h"

namespace {

constexpr const char* kOp = "pyops::_quantize_nvfp4_cuda";

void quantize_nvfp4_cuda(const at::Tensor& x, at::Tensor& data, at::Tensor& scales,
                         at::Tensor& global_scale, bool compute_global, bool swizzle) {
  using namespace pyops_bind;
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D (M, K), got ", x.dim(), " dims");
  const pyops_dtype_t dtype = input_dtype(x, kOp);
  check_out(data, x, at::ScalarType::Byte, kOp, "data");
  check_out(scales, x, at::ScalarType::Byte, kOp, "scales");
  check_out(global_scale, x, at::ScalarType::Float, kOp, "global_scale");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t nb = (K + 15) / 16;
  TORCH_CHECK(data.dim() == 2 && data.size(0) == M && data.size(1) == nb * 8, kOp,
              ": data must have shape (", M, ", ", nb * 8, "), got ", data.sizes());
  const int64_t sm = swizzle ? (M + 127) / 128 * 128 : M;
  const int64_t sn = swizzle ? (nb + 3) / 4 * 4 : nb;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == sm && scales.size(1) == sn, kOp,
              ": scales must have shape (", sm, ", ", sn, ")", swizzle ? " (swizzled)" : "",
              ", got ", scales.sizes());
  TORCH_CHECK(global_scale.numel() == 1, kOp, ": global_scale must hold one float, got ",
              global_scale.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(data.data_ptr()) % 4 == 0, kOp,
              ": data must be 4-byte aligned");
  if (M == 0 || K == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_status(pyops_quantize_nvfp4(x.data_ptr(), dtype, M, K, x.stride(0), x.stride(1),
                                    data.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(),
                                    global_scale.data_ptr<float>(), compute_global ? 1 : 0,
                                    swizzle ? 1 : 0, stream),
               kOp);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def(
      "_quantize_nvfp4_cuda(Tensor x, Tensor(a!) data, Tensor(b!) scales, "
      "Tensor(c!) global_scale, bool compute_global, bool swizzle) -> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("_quantize_nvfp4_cuda", &quantize_nvfp4_cuda);
}

// Torch binding of pyops_quantize_fp8 (csrc/quantize_fp8.cu): checks, then one C ABI call on the
// current stream. Spec: pyops/reference/quantize_fp8.py; Python side: pyops/ops/quantize_fp8.py.
#include <torch/library.h>

#include "binding_utils.h"

namespace {

constexpr const char* kOp = "pyops::_quantize_fp8_cuda";

void quantize_fp8_cuda(const at::Tensor& x, at::Tensor& q, at::Tensor& scale,
                       int64_t granularity) {
  using namespace pyops_bind;
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D (M, K), got ", x.dim(), " dims");
  const pyops_dtype_t dtype = input_dtype(x, kOp);
  TORCH_CHECK(granularity >= 0 && granularity <= 3, kOp,
              ": granularity must be 0 (tensor), 1 (row), 2 (block1x128) or 3 (block128x128), "
              "got ", granularity);
  check_out(q, x, at::ScalarType::Float8_e4m3fn, kOp, "q");
  check_out(scale, x, at::ScalarType::Float, kOp, "scale");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(q.dim() == 2 && q.size(0) == M && q.size(1) == K, kOp, ": q must have shape (",
              M, ", ", K, "), got ", q.sizes());
  const int64_t nk = (K + 127) / 128, nm = (M + 127) / 128;
  int64_t want = 1;
  switch (granularity) {
    case 0: want = 1; break;
    case 1: want = M; break;
    case 2: want = M * nk; break;
    case 3: want = nm * nk; break;
  }
  TORCH_CHECK(scale.numel() == want, kOp, ": scale must hold ", want,
              " floats for granularity ", granularity, " on (", M, ", ", K, "), got ",
              scale.sizes());
  if (M == 0 || K == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_status(pyops_quantize_fp8(x.data_ptr(), dtype, M, K, x.stride(0), x.stride(1),
                                  static_cast<uint8_t*>(q.data_ptr()),
                                  scale.data_ptr<float>(),
                                  static_cast<pyops_fp8_granularity_t>(granularity), stream),
               kOp);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_quantize_fp8_cuda(Tensor x, Tensor(a!) q, Tensor(b!) scale, int granularity) -> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("_quantize_fp8_cuda", &quantize_fp8_cuda);
}

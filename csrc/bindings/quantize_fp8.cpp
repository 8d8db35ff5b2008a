// Torch binding of pyops_quantize_fp8 (csrc/quantize_fp8.cu): checks, then one C ABI call on the
// current stream. Spec: pyops/reference/quantize_fp8.py; Python side: pyops/ops/quantize_fp8.py.
//
// What the kernels touch (so what is checked before the launch):
//   x      read at m*stride(0) + k*stride(1) for m < M, k < K: any 2-D CUDA view (fp32/fp16/bf16);
//   q      written at m*K + k: contiguous float8_e4m3fn (M, K);
//   scale  written at [0, n) with n by granularity (tensor: 1 float, also the atomicMax amax
//          accumulator; row: M; block1x128: M*ceil(K/128); block128x128:
//          ceil(M/128)*ceil(K/128)): contiguous float32 of exactly the op's scale shape
//          (pyops/reference/quantize_fp8.py scale_shape_2d), 4-byte aligned;
//   none of x, q, scale may share memory (q and scale are written while x is read).
#include <torch/library.h>

#include "binding_utils.h"

namespace {

constexpr const char* kOp = "pyops::_quantize_fp8_cuda";

void quantize_fp8_cuda(const at::Tensor& x, at::Tensor& q, at::Tensor& scale,
                       int64_t granularity) {
  using namespace pyops_bind;
  check_input(x, kOp, "x");
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D (M, K), got ", x.dim(), " dims");
  const pyops_dtype_t dtype = dtype_code(x, kOp, "x");
  TORCH_CHECK(granularity >= PYOPS_FP8_TENSOR && granularity <= PYOPS_FP8_BLOCK128X128, kOp,
              ": granularity must be 0 (tensor), 1 (row), 2 (block1x128) or 3 (block128x128), "
              "got ", granularity);
  check_out(q, x, at::ScalarType::Float8_e4m3fn, kOp, "q");
  check_out(scale, x, at::ScalarType::Float, kOp, "scale");
  const int64_t M = x.size(0), K = x.size(1);
  check_shape(q, {M, K}, kOp, "q");
  const int64_t nk = (K + 127) / 128, nm = (M + 127) / 128;
  switch (granularity) {
    case PYOPS_FP8_TENSOR: check_shape(scale, {1}, kOp, "scale (granularity 0, tensor)"); break;
    case PYOPS_FP8_ROW: check_shape(scale, {M}, kOp, "scale (granularity 1, row)"); break;
    case PYOPS_FP8_BLOCK1X128:
      check_shape(scale, {M, nk}, kOp, "scale (granularity 2, block1x128)");
      break;
    default: check_shape(scale, {nm, nk}, kOp, "scale (granularity 3, block128x128)"); break;
  }
  check_aligned(scale, 4, kOp, "scale");
  check_no_overlap_pairwise({{"q", &q}, {"scale", &scale}, {"x", &x}}, kOp);
  if (M == 0 || K == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  pyops_quantize_fp8_params p{};
  p.x = x.data_ptr();
  p.dtype = dtype;
  p.M = M;
  p.K = K;
  p.stride_m = x.stride(0);
  p.stride_k = x.stride(1);
  p.q = static_cast<uint8_t*>(q.data_ptr());
  p.scale = scale.data_ptr<float>();
  p.granularity = static_cast<pyops_fp8_granularity_t>(granularity);
  check_status(pyops_quantize_fp8(&p, stream), kOp);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_quantize_fp8_cuda(Tensor x, Tensor(a!) q, Tensor(b!) scale, int granularity) -> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("_quantize_fp8_cuda", &quantize_fp8_cuda);
}

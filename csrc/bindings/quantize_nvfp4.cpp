// Torch binding of pyops_quantize_nvfp4 (csrc/quantize_nvfp4.cu): checks, then one C ABI call on
// the current stream. Spec: pyops/reference/quantize_nvfp4.py; Python: pyops/ops/quantize_nvfp4.py.
//
// What the kernel touches (so what is checked before the launch), nb = ceil(K/16):
//   x             read at m*stride(0) + k*stride(1): any 2-D CUDA view (fp32/fp16/bf16);
//   data          written at m*nb*8 + j with 2- or 4-byte stores: contiguous uint8 (M, nb*8),
//                 4-byte aligned;
//   scales        written at m*nb + b, or at the 128x4-tile offset inside the padded
//                 (roundup(M,128), roundup(nb,4)) buffer when swizzled: contiguous uint8 of that
//                 shape (the caller zero-fills the swizzled padding: not checkable without a sync);
//   global_scale  one float, read (static) or memset + atomicMax + rewritten (computed):
//                 contiguous float32 with one element, 4-byte aligned;
//   none of x, data, scales, global_scale may share memory.
#include <torch/library.h>

#include "binding_utils.h"

namespace {

constexpr const char* kOp = "pyops::_quantize_nvfp4_cuda";

void quantize_nvfp4_cuda(const at::Tensor& x, at::Tensor& data, at::Tensor& scales,
                         at::Tensor& global_scale, bool compute_global, bool swizzle) {
  using namespace pyops_bind;
  check_input(x, kOp, "x");
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D (M, K), got ", x.dim(), " dims");
  const pyops_dtype_t dtype = dtype_code(x, kOp, "x");
  check_out(data, x, at::ScalarType::Byte, kOp, "data");
  check_out(scales, x, at::ScalarType::Byte, kOp, "scales");
  check_out(global_scale, x, at::ScalarType::Float, kOp, "global_scale");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t nb = (K + 15) / 16;
  check_shape(data, {M, nb * 8}, kOp, "data");
  const int64_t sm = swizzle ? (M + 127) / 128 * 128 : M;
  const int64_t sn = swizzle ? (nb + 3) / 4 * 4 : nb;
  check_shape(scales, {sm, sn}, kOp, swizzle ? "scales (swizzled)" : "scales");
  TORCH_CHECK(global_scale.numel() == 1, kOp, ": global_scale must hold one float, got shape ",
              global_scale.sizes());
  check_aligned(data, 4, kOp, "data");
  check_aligned(global_scale, 4, kOp, "global_scale");
  check_no_overlap_pairwise(
      {{"data", &data}, {"scales", &scales}, {"global_scale", &global_scale}, {"x", &x}}, kOp);
  if (M == 0 || K == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  pyops_quantize_nvfp4_params p{};
  p.x = x.data_ptr();
  p.dtype = dtype;
  p.M = M;
  p.K = K;
  p.stride_m = x.stride(0);
  p.stride_k = x.stride(1);
  p.data = data.data_ptr<uint8_t>();
  p.scales = scales.data_ptr<uint8_t>();
  p.global_scale = global_scale.data_ptr<float>();
  p.compute_global = compute_global ? 1 : 0;
  p.swizzle = swizzle ? 1 : 0;
  check_status(pyops_quantize_nvfp4(&p, stream), kOp);
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

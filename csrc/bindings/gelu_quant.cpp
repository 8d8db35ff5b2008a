// Binding of pyops::_gelu_quant_cuda: tensor checks, then the torch-free launcher on the current
// stream. No math here (spec: pyops/reference/gelu_quant.py).
//
// What the kernel touches (so what is checked before the launch), for x (M, K):
//   x             read at m*stride(0) + k*stride(1): any 2-D CUDA view (fp32/fp16/bf16);
//   q             written at m*K + k: contiguous float8_e4m3fn (M, K);
//   q_scale       written at m: contiguous float32 (M,);
//   y (optional)  written at m*K + k: contiguous (M, K) fp32/fp16/bf16;
//   the outputs share no memory with each other or with x.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "binding_utils.h"

namespace {

constexpr const char* kOp = "pyops.gelu_quant";

void gelu_quant_cuda(const at::Tensor& x, int64_t approximate, at::Tensor q,
                     at::Tensor q_scale, std::optional<at::Tensor> y) {
  using namespace pyops_bind;
  check_input(x, kOp, "x");
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be a 2-D (M, K) view, got ", x.sizes());
  TORCH_CHECK(approximate == PYOPS_GELU_TANH || approximate == PYOPS_GELU_ERF, kOp,
              ": approximate code ", approximate, " is not 0 (tanh) or 1 (none: erf)");
  const int64_t M = x.size(0), K = x.size(1);
  pyops_gelu_quant_params p{};
  p.x_dtype = dtype_code(x, kOp, "x");
  p.M = M;
  p.K = K;
  p.stride_m = x.stride(0);
  p.stride_k = x.stride(1);
  p.approximate = static_cast<pyops_gelu_kind_t>(approximate);
  check_out(q, x, at::kFloat8_e4m3fn, kOp, "q");
  check_shape(q, {M, K}, kOp, "q");
  check_out(q_scale, x, at::kFloat, kOp, "q_scale");
  check_shape(q_scale, {M}, kOp, "q_scale");
  p.q = reinterpret_cast<uint8_t*>(q.data_ptr());
  p.q_scale = q_scale.data_ptr<float>();
  p.y_dtype = PYOPS_DTYPE_F32;
  if (y.has_value()) {
    check_cuda(*y, x, kOp, "y");
    p.y_dtype = dtype_code(*y, kOp, "y");
    check_shape(*y, {M, K}, kOp, "y");
    check_contiguous(*y, kOp, "y");
    check_aligned(*y, static_cast<int64_t>(y->element_size()), kOp, "y");
    p.y = y->data_ptr();
  }
  // Outputs: disjoint from x and from each other.
  const std::pair<const char*, const at::Tensor*> outs[] = {
      {"q", &q}, {"q_scale", &q_scale}, {"y", y.has_value() ? &*y : nullptr}};
  for (const auto& o : outs)
    if (o.second != nullptr) check_no_overlap(*o.second, x, kOp, o.first, "x");
  check_no_overlap_pairwise({outs[0], outs[1], outs[2]}, kOp);
  if (M == 0 || K == 0) return;
  p.x = x.data_ptr();
  const c10::cuda::CUDAGuard guard(x.device());
  check_status(pyops_gelu_quant(&p, c10::cuda::getCurrentCUDAStream().stream()), kOp, "launch");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_gelu_quant_cuda(Tensor x, int approximate, Tensor(a!) q, Tensor(b!) q_scale, "
        "Tensor(c!)? y) -> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("_gelu_quant_cuda", &gelu_quant_cuda);
}

// Binding of pyops::_sample_step_cuda: tensor checks, then the torch-free launcher on the
// current stream. No math here (spec: pyops/reference/sample_step.py).
//
// The kernel reads and writes element i < n = state.numel() of every buffer as a flat array:
//   state          read and written: contiguous fp32/fp16/bf16 CUDA tensor;
//   x_out (opt.)   written: contiguous, state's shape, sharing no memory with state;
//   cond, uncond (opt.), noise (opt.)  read: contiguous, state's shape, on state's device; they
//                  may be state / x_out themselves (element i is read before it is written by
//                  the same thread) but never a shifted view of them.
//   alpha, beta, zeta, guidance are passed on as float32 and must be finite there.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "binding_utils.h"

namespace {

constexpr const char* kOp = "pyops.sample_step";

// A buffer of the step: CUDA on state's device, state's shape, contiguous, element-aligned.
pyops_dtype_t check_like(const at::Tensor& state, const at::Tensor& t, const char* name) {
  using namespace pyops_bind;
  check_cuda(t, state, kOp, name);
  const pyops_dtype_t code = dtype_code(t, kOp, name);
  TORCH_CHECK(t.sizes() == state.sizes(), kOp, ": ", name, " has shape ", t.sizes(),
              ", state has ", state.sizes());
  check_contiguous(t, kOp, name);
  check_aligned(t, static_cast<int64_t>(t.element_size()), kOp, name);
  return code;
}

void sample_step_cuda(at::Tensor state, std::optional<at::Tensor> x_out, at::Tensor cond,
                      std::optional<at::Tensor> uncond, std::optional<at::Tensor> noise,
                      double alpha, double beta, double zeta, double guidance) {
  using namespace pyops_bind;
  check_input(state, kOp, "state");
  pyops_sample_step_params p{};
  p.state_dtype = check_like(state, state, "state");
  p.cond_dtype = check_like(state, cond, "cond");
  if (x_out.has_value()) {
    p.x_out_dtype = check_like(state, *x_out, "x_out");
    check_no_overlap(*x_out, state, kOp, "x_out", "state");
  }
  if (uncond.has_value()) p.uncond_dtype = check_like(state, *uncond, "uncond");
  if (noise.has_value()) p.noise_dtype = check_like(state, *noise, "noise");
  const std::pair<const char*, const at::Tensor*> reads[] = {
      {"cond", &cond},
      {"uncond", uncond.has_value() ? &*uncond : nullptr},
      {"noise", noise.has_value() ? &*noise : nullptr}};
  for (const auto& r : reads) {
    if (r.second == nullptr) continue;
    check_no_partial_overlap(*r.second, state, kOp, r.first, "state");
    if (x_out.has_value()) check_no_partial_overlap(*r.second, *x_out, kOp, r.first, "x_out");
  }
  p.alpha = check_finite_float(alpha, kOp, "alpha");
  p.beta = check_finite_float(beta, kOp, "beta");
  p.zeta = check_finite_float(zeta, kOp, "zeta");
  p.guidance = check_finite_float(guidance, kOp, "guidance");
  p.n = state.numel();
  if (p.n == 0) return;
  p.state = state.data_ptr();
  p.cond = cond.data_ptr();
  if (x_out.has_value()) p.x_out = x_out->data_ptr();
  if (uncond.has_value()) p.uncond = uncond->data_ptr();
  if (noise.has_value()) p.noise = noise->data_ptr();
  const c10::cuda::CUDAGuard guard(state.device());
  check_status(pyops_sample_step(&p, c10::cuda::getCurrentCUDAStream().stream()), kOp, "launch");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_sample_step_cuda(Tensor(a!) state, Tensor(b!)? x_out, Tensor cond, Tensor? uncond, "
        "Tensor? noise, float alpha, float beta, float zeta, float guidance) -> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { m.impl("_sample_step_cuda", &sample_step_cuda); }

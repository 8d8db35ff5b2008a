// Binding of pyops::_sample_step_cuda: tensor checks, then the torch-free launcher on the
// current stream. No math here (spec: pyops/reference/sample_step.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../pyops_sample_step.h"

namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return PYOPS_SS_FLOAT32;
    case at::kBFloat16: return PYOPS_SS_BFLOAT16;
    case at::kHalf: return PYOPS_SS_FLOAT16;
    default: TORCH_CHECK(false, "pyops.sample_step: ", name, " has dtype ", t.scalar_type(),
                         "; supported: float32, bfloat16, float16");
  }
  return -1;
}

void check_like(const at::Tensor& state, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "pyops.sample_step: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == state.device(), "pyops.sample_step: ", name, " is on ", t.device(),
              " but state is on ", state.device());
  TORCH_CHECK(t.numel() == state.numel(), "pyops.sample_step: ", name, " has ", t.numel(),
              " elements, state has ", state.numel());
  TORCH_CHECK(t.is_contiguous(), "pyops.sample_step: ", name, " must be contiguous");
}

void sample_step_cuda(at::Tensor state, std::optional<at::Tensor> x_out, at::Tensor cond,
                      std::optional<at::Tensor> uncond, std::optional<at::Tensor> noise,
                      double alpha, double beta, double zeta, double guidance) {
  TORCH_CHECK(state.is_cuda(), "pyops.sample_step: state must be a CUDA tensor");
  TORCH_CHECK(state.is_contiguous(), "pyops.sample_step: state must be contiguous");
  check_like(state, cond, "cond");
  pyops_sample_step_params p{};
  p.state = state.data_ptr();
  p.state_dtype = dtype_code(state, "state");
  p.cond = cond.data_ptr();
  p.cond_dtype = dtype_code(cond, "cond");
  if (x_out.has_value()) {
    check_like(state, *x_out, "x_out");
    TORCH_CHECK(x_out->data_ptr() != state.data_ptr(),
                "pyops.sample_step: x_out must not alias state");
    p.x_out = x_out->data_ptr();
    p.x_out_dtype = dtype_code(*x_out, "x_out");
  }
  if (uncond.has_value()) {
    check_like(state, *uncond, "uncond");
    p.uncond = uncond->data_ptr();
    p.uncond_dtype = dtype_code(*uncond, "uncond");
  }
  if (noise.has_value()) {
    check_like(state, *noise, "noise");
    p.noise = noise->data_ptr();
    p.noise_dtype = dtype_code(*noise, "noise");
  }
  p.n = state.numel();
  p.alpha = static_cast<float>(alpha);
  p.beta = static_cast<float>(beta);
  p.zeta = static_cast<float>(zeta);
  p.guidance = static_cast<float>(guidance);
  const c10::cuda::CUDAGuard guard(state.device());
  const int err = pyops_sample_step(&p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "pyops.sample_step: launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_sample_step_cuda(Tensor(a!) state, Tensor(b!)? x_out, Tensor cond, Tensor? uncond, "
        "Tensor? noise, float alpha, float beta, float zeta, float guidance) -> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { m.impl("_sample_step_cuda", &sample_step_cuda); }

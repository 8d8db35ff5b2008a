// Binding of pyops::_norm_modulate_quant_cuda: tensor checks, then the torch-free launcher on the
// current stream. No math here (spec: pyops/reference/norm_modulate_quant.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../pyops_norm_modulate_quant.h"

namespace {

constexpr const char* kOp = "pyops.norm_modulate_quant";

pyops_dtype_t dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return PYOPS_DTYPE_F32;
    case at::kHalf: return PYOPS_DTYPE_F16;
    case at::kBFloat16: return PYOPS_DTYPE_BF16;
    default:
      TORCH_CHECK(false, kOp, ": ", name, " has dtype ", t.scalar_type(),
                  "; supported: float32, float16, bfloat16");
  }
  return PYOPS_DTYPE_F32;
}

void check_on(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), kOp, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

void norm_modulate_quant_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& shift,
                              const std::optional<at::Tensor>& scale, int64_t norm, double eps,
                              at::Tensor q, at::Tensor q_scale, std::optional<at::Tensor> y) {
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be a 2-D (M, D) view, got ", x.sizes());
  TORCH_CHECK(norm == PYOPS_NORM_LAYER || norm == PYOPS_NORM_RMS, kOp, ": norm code ", norm,
              " is not 0 (layer) or 1 (rms)");
  TORCH_CHECK(eps >= 0.0, kOp, ": eps must be >= 0");
  const int64_t M = x.size(0), D = x.size(1);
  pyops_norm_modulate_quant_params p{};
  p.x = x.data_ptr();
  p.x_dtype = dtype_code(x, "x");
  p.M = M;
  p.D = D;
  p.stride_m = x.stride(0);
  p.stride_d = x.stride(1);
  p.norm = static_cast<pyops_norm_kind_t>(norm);
  p.eps = static_cast<float>(eps);
  p.rows_per_mod = M > 0 ? M : 1;
  p.param_dtype = PYOPS_DTYPE_F32;
  std::optional<at::ScalarType> pdt;
  auto param_dtype = [&](const at::Tensor& t, const char* name) {
    check_on(x, t, name);
    if (pdt.has_value()) {
      TORCH_CHECK(t.scalar_type() == *pdt, kOp, ": weight/bias/shift/scale must share one dtype, ",
                  name, " is ", t.scalar_type(), " and another is ", *pdt);
    }
    pdt = t.scalar_type();
    p.param_dtype = dtype_code(t, name);
  };
  if (weight.has_value()) {
    param_dtype(*weight, "weight");
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == D && weight->is_contiguous(), kOp,
                ": weight must be contiguous (", D, ",), got ", weight->sizes());
    p.weight = weight->data_ptr();
  }
  if (bias.has_value()) {
    param_dtype(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == D && bias->is_contiguous(), kOp,
                ": bias must be contiguous (", D, ",), got ", bias->sizes());
    p.bias = bias->data_ptr();
  }
  int64_t mod_rows = 1;
  auto modulation = [&](const at::Tensor& t, const char* name, int64_t* stride) {
    param_dtype(t, name);
    TORCH_CHECK(t.dim() == 2 && t.size(1) == D && (t.stride(1) == 1 || D == 1), kOp, ": ", name,
                " must be (Bm, ", D, ") with unit stride along D, got sizes ", t.sizes(),
                " strides ", t.strides());
    const int64_t bm = t.size(0);
    TORCH_CHECK(bm >= 1 && M % bm == 0, kOp, ": ", name, " has ", bm,
                " rows, which do not divide the ", M, " rows of x");
    if (bm > 1) {
      TORCH_CHECK(mod_rows == 1 || mod_rows == bm, kOp,
                  ": shift and scale must have the same number of rows (or one)");
      mod_rows = bm;
    }
    *stride = bm > 1 ? t.stride(0) : 0;
    return t.data_ptr();
  };
  if (shift.has_value()) p.shift = modulation(*shift, "shift", &p.shift_stride);
  if (scale.has_value()) p.scale = modulation(*scale, "scale", &p.scale_stride);
  if (M > 0) p.rows_per_mod = M / mod_rows;

  check_on(x, q, "q");
  TORCH_CHECK(q.scalar_type() == at::kFloat8_e4m3fn && q.dim() == 2 && q.size(0) == M &&
                  q.size(1) == D && q.is_contiguous(),
              kOp, ": q must be contiguous float8_e4m3fn (", M, ", ", D, ")");
  check_on(x, q_scale, "q_scale");
  TORCH_CHECK(q_scale.scalar_type() == at::kFloat && q_scale.numel() == M &&
                  q_scale.is_contiguous(),
              kOp, ": q_scale must be contiguous float32 with ", M, " elements");
  p.q = reinterpret_cast<uint8_t*>(q.data_ptr());
  p.q_scale = q_scale.data_ptr<float>();
  if (y.has_value()) {
    check_on(x, *y, "y");
    TORCH_CHECK(y->dim() == 2 && y->size(0) == M && y->size(1) == D && y->is_contiguous(), kOp,
                ": y must be contiguous (", M, ", ", D, ")");
    p.y = y->data_ptr();
    p.y_dtype = dtype_code(*y, "y");
  }
  if (M == 0 || D == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err =
      pyops_norm_modulate_quant(&p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_norm_modulate_quant_cuda(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, "
        "Tensor? scale, int norm, float eps, Tensor(a!) q, Tensor(b!) q_scale, Tensor(c!)? y) "
        "-> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("_norm_modulate_quant_cuda", &norm_modulate_quant_cuda);
}

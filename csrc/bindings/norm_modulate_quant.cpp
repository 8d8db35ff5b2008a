// Binding of pyops::_norm_modulate_quant_cuda: tensor checks, then the torch-free launcher on the
// current stream. No math here (spec: pyops/reference/norm_modulate_quant.py).
//
// What the kernel touches (so what is checked before the launch), for x (M, D):
//   x             read at m*stride(0) + d*stride(1): any 2-D CUDA view (fp32/fp16/bf16);
//   weight, bias  read at [0, D): contiguous (D,);
//   shift, scale  row r = m / (M / Bm) read at r*stride(0) + d: (Bm, D) with unit stride along D,
//                 Bm dividing M (stride(0) passed as 0 when Bm == 1); both with the same Bm
//                 when both have more than one row; weight/bias/shift/scale of one float dtype;
//   q             written at m*D + d: contiguous float8_e4m3fn (M, D);
//   q_scale       written at m: contiguous float32 (M,);
//   y (optional)  written at m*D + d: contiguous (M, D) fp32/fp16/bf16;
//   the outputs share no memory with each other or with any input.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "binding_utils.h"

namespace {

constexpr const char* kOp = "pyops.norm_modulate_quant";

void norm_modulate_quant_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& shift,
                              const std::optional<at::Tensor>& scale, int64_t norm, double eps,
                              at::Tensor q, at::Tensor q_scale, std::optional<at::Tensor> y) {
  using namespace pyops_bind;
  check_input(x, kOp, "x");
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be a 2-D (M, D) view, got ", x.sizes());
  TORCH_CHECK(norm == PYOPS_NORM_LAYER || norm == PYOPS_NORM_RMS, kOp, ": norm code ", norm,
              " is not 0 (layer) or 1 (rms)");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, kOp, ": eps must be finite and >= 0, got ", eps);
  const int64_t M = x.size(0), D = x.size(1);
  pyops_norm_modulate_quant_params p{};
  p.x_dtype = dtype_code(x, kOp, "x");
  p.M = M;
  p.D = D;
  p.stride_m = x.stride(0);
  p.stride_d = x.stride(1);
  p.norm = static_cast<pyops_norm_kind_t>(norm);
  p.eps = static_cast<float>(eps);
  p.rows_per_mod = M > 0 ? M : 1;
  p.param_dtype = PYOPS_DTYPE_F32;
  std::optional<at::ScalarType> pdt;
  auto param = [&](const at::Tensor& t, const char* name) {
    check_cuda(t, x, kOp, name);
    p.param_dtype = dtype_code(t, kOp, name);
    if (pdt.has_value()) {
      TORCH_CHECK(t.scalar_type() == *pdt, kOp, ": weight/bias/shift/scale must share one dtype, ",
                  name, " is ", t.scalar_type(), " and another is ", *pdt);
    }
    pdt = t.scalar_type();
  };
  auto vector = [&](const at::Tensor& t, const char* name) {
    param(t, name);
    check_shape(t, {D}, kOp, name);
    check_contiguous(t, kOp, name);
    return t.data_ptr();
  };
  if (weight.has_value()) p.weight = vector(*weight, "weight");
  if (bias.has_value()) p.bias = vector(*bias, "bias");
  int64_t mod_rows = 1;
  auto modulation = [&](const at::Tensor& t, const char* name, int64_t* stride) {
    param(t, name);
    TORCH_CHECK(t.dim() == 2 && t.size(1) == D && (t.stride(1) == 1 || D <= 1), kOp, ": ", name,
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

  check_out(q, x, at::kFloat8_e4m3fn, kOp, "q");
  check_shape(q, {M, D}, kOp, "q");
  check_out(q_scale, x, at::kFloat, kOp, "q_scale");
  check_shape(q_scale, {M}, kOp, "q_scale");
  p.q = reinterpret_cast<uint8_t*>(q.data_ptr());
  p.q_scale = q_scale.data_ptr<float>();
  if (y.has_value()) {
    check_cuda(*y, x, kOp, "y");
    p.y_dtype = dtype_code(*y, kOp, "y");
    check_shape(*y, {M, D}, kOp, "y");
    check_contiguous(*y, kOp, "y");
    check_aligned(*y, static_cast<int64_t>(y->element_size()), kOp, "y");
    p.y = y->data_ptr();
  }
  // Outputs: disjoint from every input and from each other.
  const std::pair<const char*, const at::Tensor*> ins[] = {
      {"x", &x},
      {"weight", weight.has_value() ? &*weight : nullptr},
      {"bias", bias.has_value() ? &*bias : nullptr},
      {"shift", shift.has_value() ? &*shift : nullptr},
      {"scale", scale.has_value() ? &*scale : nullptr}};
  const std::pair<const char*, const at::Tensor*> outs[] = {
      {"q", &q}, {"q_scale", &q_scale}, {"y", y.has_value() ? &*y : nullptr}};
  for (const auto& o : outs) {
    if (o.second == nullptr) continue;
    for (const auto& i : ins)
      if (i.second != nullptr) check_no_overlap(*o.second, *i.second, kOp, o.first, i.first);
  }
  check_no_overlap_pairwise({outs[0], outs[1], outs[2]}, kOp);
  if (M == 0 || D == 0) return;
  p.x = x.data_ptr();
  const c10::cuda::CUDAGuard guard(x.device());
  check_status(pyops_norm_modulate_quant(&p, c10::cuda::getCurrentCUDAStream().stream()), kOp,
               "launch");
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

// Binding of pyops::_cache_apply_cuda: tensor checks, then the torch-free launcher
// (pyops/cache_apply.h) on the current stream. No math here
// (spec: pyops/reference/block_similarity.py, cache_apply).
//
// cache_apply touches out/x/residual flat [0, rows*row_len) (contiguous, one shape) and
// reuse[row / (rows/groups)] (contiguous int32 (groups,)); grid.x = rows <= INT_MAX.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_utils.h"

namespace {

void cache_apply_cuda(at::Tensor out, at::Tensor x, at::Tensor residual, at::Tensor reuse,
                      int64_t groups) {
  using namespace pyops_bind;
  const char* op = "pyops.cache_apply";
  check_input(out, op, "out");
  check_flat(out, out, op, "out");
  check_flat(x, out, op, "x");
  check_flat(residual, out, op, "residual");
  check_flat(reuse, out, op, "reuse");
  const pyops_dtype_t out_dtype = dtype_code(out, op, "out");
  const pyops_dtype_t x_dtype = dtype_code(x, op, "x");
  const pyops_dtype_t residual_dtype =
      dtype_code(residual, op, "residual");
  TORCH_CHECK(x.sizes() == out.sizes() && residual.sizes() == out.sizes(), op,
              ": x and residual must have out's shape ", out.sizes(), ", got ", x.sizes(),
              " and ", residual.sizes());
  TORCH_CHECK(out.dim() >= 1 && out.numel() > 0, op, ": out is empty (shape ", out.sizes(), ")");
  check_int(groups, 1, kIntMax, op, "groups");
  check_dtype(reuse, at::kInt, op, "reuse");
  check_shape(reuse, {groups}, op, "reuse");
  const int64_t rows = out.size(0);
  TORCH_CHECK(rows % groups == 0, op, ": batch ", rows, " is not divisible by groups=", groups);
  TORCH_CHECK(rows <= kIntMax, op, ": batch ", rows, " exceeds the grid limit ", kIntMax);
  // out = x + residual element by element: out may be x or residual itself, never a shifted view.
  check_no_partial_overlap(out, x, op, "out", "x");
  check_no_partial_overlap(out, residual, op, "out", "residual");
  check_no_overlap(out, reuse, op, "out", "reuse");
  pyops_cache_apply_params p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.residual = residual.data_ptr();
  p.reuse = reuse.data_ptr<int32_t>();
  p.out_dtype = out_dtype;
  p.x_dtype = x_dtype;
  p.residual_dtype = residual_dtype;
  p.rows = rows;
  p.row_len = out.numel() / rows;
  p.groups = static_cast<int>(groups);
  const c10::cuda::CUDAGuard guard(out.device());
  check_status(pyops_cache_apply(&p, c10::cuda::getCurrentCUDAStream().stream()), op, "launch");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_cache_apply_cuda(Tensor(a!) out, Tensor x, Tensor residual, Tensor reuse, int groups) "
        "-> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { m.impl("_cache_apply_cuda", &cache_apply_cuda); }

// Binding of pyops::_block_similarity_cuda and pyops::_cache_apply_cuda: tensor checks, then the
// torch-free launchers on the current stream. No math here
// (spec: pyops/reference/block_similarity.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../pyops_block_similarity.h"

namespace {

int dtype_code(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return PYOPS_BS_FLOAT32;
    case at::kBFloat16: return PYOPS_BS_BFLOAT16;
    case at::kHalf: return PYOPS_BS_FLOAT16;
    default: TORCH_CHECK(false, "pyops.", op, ": ", name, " has dtype ", t.scalar_type(),
                         "; supported: float32, bfloat16, float16");
  }
  return -1;
}

void check_cuda(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), "pyops.", op, ": ", name,
              " must be a CUDA tensor on ", ref.device());
  TORCH_CHECK(t.is_contiguous(), "pyops.", op, ": ", name, " must be contiguous");
}

void block_similarity_cuda(at::Tensor a, at::Tensor ref, at::Tensor state, at::Tensor metric,
                           at::Tensor reuse, double threshold, double eps, int64_t rule,
                           int64_t warmup, int64_t max_reuse, int64_t num_steps,
                           int64_t last_steps, int64_t chunks, int64_t groups, bool all_groups,
                           int64_t write_ref) {
  const char* op = "block_similarity";
  TORCH_CHECK(a.is_cuda(), "pyops.block_similarity: a must be a CUDA tensor");
  check_cuda(a, a, op, "a");
  check_cuda(a, ref, op, "ref");
  check_cuda(a, state, op, "state");
  check_cuda(a, metric, op, "metric");
  check_cuda(a, reuse, op, "reuse");
  TORCH_CHECK(a.sizes() == ref.sizes() && a.scalar_type() == ref.scalar_type(),
              "pyops.block_similarity: ref must match a in shape and dtype");
  TORCH_CHECK(a.dim() >= 1 && a.numel() > 0, "pyops.block_similarity: a is empty");
  TORCH_CHECK(groups >= 1 && chunks >= 1, "pyops.block_similarity: groups, chunks must be >= 1");
  const int64_t cells = groups * chunks;
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.numel() == cells * 4,
              "pyops.block_similarity: state must be (", cells, ", 4) float32");
  TORCH_CHECK(metric.scalar_type() == at::kFloat && metric.numel() == cells,
              "pyops.block_similarity: metric must be (", cells, ",) float32");
  TORCH_CHECK(reuse.scalar_type() == at::kInt && reuse.numel() == cells,
              "pyops.block_similarity: reuse must be (", cells, ",) int32");
  const int64_t rows = a.size(0), row_len = a.numel() / rows;
  TORCH_CHECK(rows % groups == 0 && row_len % chunks == 0,
              "pyops.block_similarity: batch must divide by groups and rows by chunks");
  const int64_t ws = pyops_block_similarity_workspace(rows, row_len, static_cast<int>(chunks));
  at::Tensor workspace = at::empty({ws}, a.options().dtype(at::kFloat));
  pyops_block_similarity_params p{};
  p.a = a.data_ptr();
  p.ref = ref.data_ptr();
  p.state = state.data_ptr<float>();
  p.metric = metric.data_ptr<float>();
  p.reuse = reuse.data_ptr<int32_t>();
  p.workspace = workspace.data_ptr<float>();
  p.dtype = dtype_code(a, op, "a");
  p.rows = rows;
  p.row_len = row_len;
  p.chunks = static_cast<int>(chunks);
  p.groups = static_cast<int>(groups);
  p.threshold = static_cast<float>(threshold);
  p.eps = static_cast<float>(eps);
  p.rule = static_cast<int>(rule);
  p.warmup = static_cast<int>(warmup);
  p.max_reuse = static_cast<int>(max_reuse);
  p.num_steps = static_cast<int>(num_steps);
  p.last_steps = static_cast<int>(last_steps);
  p.all_groups = all_groups ? 1 : 0;
  p.write_ref = static_cast<int>(write_ref);
  const c10::cuda::CUDAGuard guard(a.device());
  const int err = pyops_block_similarity(&p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "pyops.block_similarity: launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void cache_apply_cuda(at::Tensor out, at::Tensor x, at::Tensor residual, at::Tensor reuse,
                      int64_t groups) {
  const char* op = "cache_apply";
  TORCH_CHECK(out.is_cuda(), "pyops.cache_apply: out must be a CUDA tensor");
  check_cuda(out, out, op, "out");
  check_cuda(out, x, op, "x");
  check_cuda(out, residual, op, "residual");
  check_cuda(out, reuse, op, "reuse");
  TORCH_CHECK(x.sizes() == out.sizes() && residual.sizes() == out.sizes(),
              "pyops.cache_apply: x and residual must have out's shape");
  TORCH_CHECK(reuse.scalar_type() == at::kInt && reuse.numel() == groups,
              "pyops.cache_apply: reuse must be (", groups, ",) int32");
  TORCH_CHECK(out.dim() >= 1 && out.numel() > 0 && out.size(0) % groups == 0,
              "pyops.cache_apply: batch must divide by groups");
  pyops_cache_apply_params p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.residual = residual.data_ptr();
  p.reuse = reuse.data_ptr<int32_t>();
  p.out_dtype = dtype_code(out, op, "out");
  p.x_dtype = dtype_code(x, op, "x");
  p.residual_dtype = dtype_code(residual, op, "residual");
  p.rows = out.size(0);
  p.row_len = out.numel() / p.rows;
  p.groups = static_cast<int>(groups);
  const c10::cuda::CUDAGuard guard(out.device());
  const int err = pyops_cache_apply(&p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "pyops.cache_apply: launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_block_similarity_cuda(Tensor a, Tensor(a!) ref, Tensor(b!) state, Tensor(c!) metric, "
        "Tensor(d!) reuse, float threshold, float eps, int rule, int warmup, int max_reuse, "
        "int num_steps, int last_steps, int chunks, int groups, bool all_groups, int write_ref) "
        "-> ()");
  m.def("_cache_apply_cuda(Tensor(a!) out, Tensor x, Tensor residual, Tensor reuse, int groups) "
        "-> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("_block_similarity_cuda", &block_similarity_cuda);
  m.impl("_cache_apply_cuda", &cache_apply_cuda);
}

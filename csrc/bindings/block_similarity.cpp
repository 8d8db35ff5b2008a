// Binding of pyops::_block_similarity_cuda: tensor checks, then the torch-free launcher
// (pyops/block_similarity.h) on the current stream. No math here
// (spec: pyops/reference/block_similarity.py).
//
// block_similarity touches, for a viewed as (rows = a.size(0), row_len = a.numel() / rows) and
// cells = groups * chunks:
//   a            read flat [0, rows*row_len): contiguous fp32/fp16/bf16, not empty;
//   ref          read and written flat at the same offsets: contiguous, a's shape and dtype,
//                sharing no memory with a;
//   state        (cells, 4) float32, metric (cells,) float32, reuse (cells,) int32: contiguous,
//                indexed with int arithmetic when the chunk is finalized (cells * 4 <= INT_MAX);
//   slices       at least rows*chunks (one per segment, the count of a chunk's ticket is 32-bit):
//                rows*chunks <= INT_MAX;
//   workspace    allocated here per call (pyops_block_similarity_workspace_size floats) and its
//                chunks ticket counters zeroed on the stream before the launch: memory from the
//                caching allocator (or a graph's pool, shared with later allocations of the same
//                capture) holds anything, so the counters the kernel leaves at 0 cannot be
//                relied on across calls; the memset is a 4*chunks-byte node in a captured graph;
//   rule 0/1, write_ref 0/1/2; warmup, max_reuse, num_steps, last_steps are narrowed to int.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_utils.h"

namespace {

void block_similarity_cuda(at::Tensor a, at::Tensor ref, at::Tensor state, at::Tensor metric,
                           at::Tensor reuse, double threshold, double eps, int64_t rule,
                           int64_t warmup, int64_t max_reuse, int64_t num_steps,
                           int64_t last_steps, int64_t chunks, int64_t groups, bool all_groups,
                           int64_t write_ref) {
  using namespace pyops_bind;
  const char* op = "pyops.block_similarity";
  check_input(a, op, "a");
  check_flat(a, a, op, "a");
  check_flat(ref, a, op, "ref");
  check_flat(state, a, op, "state");
  check_flat(metric, a, op, "metric");
  check_flat(reuse, a, op, "reuse");
  const pyops_dtype_t dtype = dtype_code(a, op, "a");
  TORCH_CHECK(a.sizes() == ref.sizes() && a.scalar_type() == ref.scalar_type(), op,
              ": ref must match a in shape and dtype, got ", ref.sizes(), " ", ref.scalar_type(),
              " vs ", a.sizes(), " ", a.scalar_type());
  TORCH_CHECK(a.dim() >= 1 && a.numel() > 0, op, ": a is empty (shape ", a.sizes(), ")");
  check_int(groups, 1, kIntMax, op, "groups");
  check_int(chunks, 1, kIntMax, op, "chunks");
  const int64_t rows = a.size(0), row_len = a.numel() / rows;
  TORCH_CHECK(rows % groups == 0, op, ": batch ", rows, " is not divisible by groups=", groups);
  TORCH_CHECK(row_len % chunks == 0, op, ": row length ", row_len,
              " is not divisible by chunks=", chunks);
  // groups <= rows and chunks <= row_len now, so these products cannot overflow int64.
  const int64_t cells = groups * chunks;
  TORCH_CHECK(cells <= kIntMax / 4, op, ": groups*chunks = ", cells, " cells is too many (max ",
              kIntMax / 4, ")");
  TORCH_CHECK(rows * chunks <= kIntMax, op, ": rows*chunks = ", rows * chunks,
              " exceeds the grid limit ", kIntMax);
  check_dtype(state, at::kFloat, op, "state");
  check_shape(state, {cells, 4}, op, "state");
  check_dtype(metric, at::kFloat, op, "metric");
  check_shape(metric, {cells}, op, "metric");
  check_dtype(reuse, at::kInt, op, "reuse");
  check_shape(reuse, {cells}, op, "reuse");
  const int rule_i = check_int(rule, 0, 1, op, "rule");
  const int write_ref_i = check_int(write_ref, 0, 2, op, "write_ref");
  const int warmup_i = check_int(warmup, kIntMin, kIntMax, op, "warmup");
  const int max_reuse_i = check_int(max_reuse, kIntMin, kIntMax, op, "max_reuse");
  const int num_steps_i = check_int(num_steps, kIntMin, kIntMax, op, "num_steps");
  const int last_steps_i = check_int(last_steps, kIntMin, kIntMax, op, "last_steps");
  TORCH_CHECK(threshold >= 0.0, op, ": threshold must be >= 0, got ", threshold);
  TORCH_CHECK(eps > 0.0 && static_cast<float>(eps) > 0.0f, op,
              ": eps must be > 0 (as a float32), got ", eps);
  check_no_overlap_pairwise(
      {{"a", &a}, {"ref", &ref}, {"state", &state}, {"metric", &metric}, {"reuse", &reuse}}, op);
  pyops_block_similarity_params p{};
  p.a = a.data_ptr();
  p.ref = ref.data_ptr();
  p.state = state.data_ptr<float>();
  p.metric = metric.data_ptr<float>();
  p.reuse = reuse.data_ptr<int32_t>();
  p.dtype = dtype;
  p.rows = rows;
  p.row_len = row_len;
  p.chunks = static_cast<int>(chunks);
  p.groups = static_cast<int>(groups);
  p.threshold = static_cast<float>(threshold);
  p.eps = static_cast<float>(eps);
  p.rule = rule_i;
  p.warmup = warmup_i;
  p.max_reuse = max_reuse_i;
  p.num_steps = num_steps_i;
  p.last_steps = last_steps_i;
  p.all_groups = all_groups ? 1 : 0;
  p.write_ref = write_ref_i;
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor workspace =
      at::empty({pyops_block_similarity_workspace_size(&p)}, a.options().dtype(at::kFloat));
  p.workspace = workspace.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_status(cudaMemsetAsync(p.workspace, 0, sizeof(uint32_t) * p.chunks, stream), op,
               "workspace memset");
  check_status(pyops_block_similarity(&p, stream), op, "launch");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_block_similarity_cuda(Tensor a, Tensor(a!) ref, Tensor(b!) state, Tensor(c!) metric, "
        "Tensor(d!) reuse, float threshold, float eps, int rule, int warmup, int max_reuse, "
        "int num_steps, int last_steps, int chunks, int groups, bool all_groups, int write_ref) "
        "-> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("_block_similarity_cuda", &block_similarity_cuda);
}

// Binding of pyops::_graph_set_conditional: checks, then the torch-free launcher on the current
// stream (spec: pyops/graphs.py). No logic here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../pyops_graph_conditional.h"

namespace {

void graph_set_conditional(const at::Tensor& flag, int64_t index, int64_t handle, bool invert) {
  TORCH_CHECK(flag.is_cuda(), "pyops.graphs: the condition flag must be a CUDA tensor");
  TORCH_CHECK(flag.scalar_type() == at::kInt && flag.is_contiguous(),
              "pyops.graphs: the condition flag must be contiguous int32");
  TORCH_CHECK(index >= 0 && index < flag.numel(), "pyops.graphs: flag index ", index,
              " out of range for ", flag.numel(), " elements");
  const c10::cuda::CUDAGuard guard(flag.device());
  const int err = pyops_graph_set_conditional(static_cast<uint64_t>(handle),
                                              flag.data_ptr<int32_t>(), index, invert ? 1 : 0,
                                              c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "pyops.graphs: conditional setter launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_graph_set_conditional(Tensor flag, int index, int handle, bool invert) -> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { m.impl("_graph_set_conditional", &graph_set_conditional); }

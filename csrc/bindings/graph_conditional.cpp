// Binding of pyops::_graph_set_conditional: checks, then the torch-free launcher on the current
// stream (Python wrapper: pyops/ops/graph_conditional.py, used by pyops/graphs.py). No logic
// here.
//
// The one-thread kernel reads flag[index] and calls cudaGraphSetConditional(handle, ...), which
// is only defined for a kernel captured into the graph that owns the handle: so flag must be a
// contiguous int32 CUDA tensor with index in range, and the current stream must be capturing.
// The handle itself is opaque (any 64-bit pattern; Python passes it as a signed int64) and
// cannot be validated here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_utils.h"

namespace {

constexpr const char* kOp = "pyops.graphs._graph_set_conditional";

void graph_set_conditional(const at::Tensor& flag, int64_t index, int64_t handle, bool invert) {
  using namespace pyops_bind;
  check_input(flag, kOp, "flag (the condition flag)");
  check_dtype(flag, at::kInt, kOp, "flag");
  check_contiguous(flag, kOp, "flag");
  check_aligned(flag, 4, kOp, "flag");
  TORCH_CHECK(index >= 0 && index < flag.numel(), kOp, ": flag index ", index,
              " out of range for ", flag.numel(), " elements");
  const c10::cuda::CUDAGuard guard(flag.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t qe = cudaStreamIsCapturing(stream, &capture);
  TORCH_CHECK(qe == cudaSuccess, kOp, ": cannot query the capture status of the current stream: ",
              cudaGetErrorString(qe));
  TORCH_CHECK(capture == cudaStreamCaptureStatusActive, kOp,
              ": must be called while the current stream is being captured into the graph that "
              "owns the conditional handle (the setter kernel is only valid inside that graph)");
  pyops_graph_set_conditional_params p{};
  p.handle = static_cast<uint64_t>(handle);
  p.flag = flag.data_ptr<int32_t>();
  p.index = index;
  p.invert = invert ? 1 : 0;
  check_status(pyops_graph_set_conditional(&p, stream), kOp, "conditional setter launch");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_graph_set_conditional(Tensor flag, int index, int handle, bool invert) -> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { m.impl("_graph_set_conditional", &graph_set_conditional); }

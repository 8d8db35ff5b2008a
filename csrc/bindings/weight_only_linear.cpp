// Binding of pyops::_weight_only_linear_cuda: tensor checks, then the torch-free launcher on the
// current stream. No math here (spec: pyops/reference/weight_only_linear.py; kernel:
// csrc/weight_only_linear.cu; Python: pyops/ops/weight_only_linear.py).
//
// What the kernel touches (so what is checked before the launch), x (M, K), N = w.size(0),
// nb = ceil(K/16), nchunks = ceil(K / chunk) (chunk 64 FP8, 128 NVFP4):
//   x             read at m*stride(0) + k: bf16/fp16 (M, K) with stride(1) == 1 and
//                 stride(0) >= K (any when M <= 1);
//   w             read as bytes: FP8 float8_e4m3fn/uint8 (N, K), NVFP4 uint8 (N, nb*8); contiguous;
//   w_scale       FP8 float32 (N,); NVFP4 uint8/float8_e4m3fn (N, nb); contiguous;
//   global_scale  NVFP4: float32, one element (read on the device); FP8: None;
//   bias          None or contiguous (N,) float32/bf16/fp16;
//   out           written at m*N + n: contiguous (M, N) of x's dtype;
//   workspace     split_k > 1: written and read, contiguous float32 (split_k, M, N);
//   split_k       in [1, min(nchunks, 65535)] (any >= 1 when K == 0);
//   out and workspace share no memory with each other or with any input.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "binding_utils.h"

namespace {

constexpr const char* kOp = "pyops.weight_only_linear";

// A read-only byte buffer: uint8 or float8_e4m3fn, contiguous, of `shape`.
void check_bytes(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
                 const char* name) {
  using namespace pyops_bind;
  check_flat(t, x, kOp, name);
  TORCH_CHECK(t.scalar_type() == at::kByte || t.scalar_type() == at::kFloat8_e4m3fn, kOp, ": ",
              name, " must be Byte or Float8_e4m3fn, got ", t.scalar_type());
  check_shape(t, shape, kOp, name);
}

void weight_only_linear_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                             const std::optional<at::Tensor>& global_scale, int64_t format,
                             const std::optional<at::Tensor>& bias, int64_t split_k,
                             at::Tensor out, std::optional<at::Tensor> workspace) {
  using namespace pyops_bind;
  check_input(x, kOp, "x");
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be a 2-D (M, K) view, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, kOp,
              ": x has dtype ", x.scalar_type(), "; supported: bfloat16, float16");
  TORCH_CHECK(format == PYOPS_WEIGHT_FP8 || format == PYOPS_WEIGHT_NVFP4, kOp, ": format code ",
              format, " is not 0 (fp8) or 1 (nvfp4)");
  const bool fp8 = format == PYOPS_WEIGHT_FP8;
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(x.stride(1) == 1 || K <= 1, kOp, ": x must have unit stride along K, got strides ",
              x.strides());
  TORCH_CHECK(M <= 1 || x.stride(0) >= K, kOp, ": x rows overlap (stride(0) ", x.stride(0),
              " < K ", K, ")");
  check_aligned(x, 2, kOp, "x");
  TORCH_CHECK(w.dim() == 2, kOp, ": w must be 2-D (N, ...), got ", w.sizes());
  const int64_t N = w.size(0), nb = (K + 15) / 16;
  const int64_t chunk = fp8 ? PYOPS_WOL_FP8_CHUNK_K : PYOPS_WOL_NVFP4_CHUNK_K;
  const int64_t nchunks = (K + chunk - 1) / chunk;
  if (fp8) {
    check_bytes(w, x, {N, K}, "w (fp8)");
    check_flat(w_scale, x, kOp, "w_scale");
    check_dtype(w_scale, at::kFloat, kOp, "w_scale");
    check_shape(w_scale, {N}, kOp, "w_scale");
    TORCH_CHECK(!global_scale.has_value(), kOp, ": global_scale must be None for format 0 (fp8)");
  } else {
    TORCH_CHECK(w.scalar_type() == at::kByte, kOp, ": w (nvfp4) must be Byte, got ",
                w.scalar_type());
    check_bytes(w, x, {N, nb * 8}, "w (nvfp4)");
    check_bytes(w_scale, x, {N, nb}, "w_scale (nvfp4)");
    TORCH_CHECK(global_scale.has_value(), kOp, ": global_scale is required for format 1 (nvfp4)");
    check_flat(*global_scale, x, kOp, "global_scale");
    check_dtype(*global_scale, at::kFloat, kOp, "global_scale");
    TORCH_CHECK(global_scale->numel() == 1, kOp, ": global_scale must hold one float, got shape ",
                global_scale->sizes());
  }
  pyops_weight_only_linear_params p{};
  p.bias_dtype = PYOPS_DTYPE_F32;
  if (bias.has_value()) {
    check_flat(*bias, x, kOp, "bias");
    p.bias_dtype = dtype_code(*bias, kOp, "bias");
    check_shape(*bias, {N}, kOp, "bias");
  }
  check_out(out, x, x.scalar_type(), kOp, "out");
  check_shape(out, {M, N}, kOp, "out");
  const int64_t max_split = K == 0 ? kIntMax : std::min<int64_t>(nchunks, PYOPS_WOL_MAX_SPLIT_K);
  p.split_k = check_int(split_k, 1, max_split, kOp, "split_k");
  if (split_k > 1) {
    TORCH_CHECK(workspace.has_value(), kOp, ": workspace is required when split_k > 1");
    check_out(*workspace, x, at::kFloat, kOp, "workspace");
    check_shape(*workspace, {split_k, M, N}, kOp, "workspace");
    check_no_overlap(*workspace, out, kOp, "workspace", "out");
  }
  // Written buffers: disjoint from every input and from each other (checked above).
  const std::pair<const char*, const at::Tensor*> ins[] = {
      {"x", &x}, {"w", &w}, {"w_scale", &w_scale},
      {"global_scale", global_scale.has_value() ? &*global_scale : nullptr},
      {"bias", bias.has_value() ? &*bias : nullptr}};
  const at::Tensor* ws = split_k > 1 ? &*workspace : nullptr;
  for (const auto& in : ins) {
    if (in.second == nullptr) continue;
    check_no_overlap(out, *in.second, kOp, "out", in.first);
    if (ws != nullptr) check_no_overlap(*ws, *in.second, kOp, "workspace", in.first);
  }
  if (M == 0 || N == 0) return;
  p.x = x.data_ptr();
  p.dtype = dtype_code(x, kOp, "x");
  p.M = M;
  p.N = N;
  p.K = K;
  p.stride_xm = x.stride(0);
  p.w = static_cast<const uint8_t*>(w.data_ptr());
  p.format = static_cast<pyops_weight_format_t>(format);
  p.w_scale = w_scale.data_ptr();
  p.global_scale = fp8 ? nullptr : global_scale->data_ptr<float>();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.workspace = ws != nullptr ? ws->data_ptr<float>() : nullptr;
  const c10::cuda::CUDAGuard guard(x.device());
  check_status(pyops_weight_only_linear(&p, c10::cuda::getCurrentCUDAStream().stream()), kOp,
               "launch");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_weight_only_linear_cuda(Tensor x, Tensor w, Tensor w_scale, Tensor? global_scale, "
        "int format, Tensor? bias, int split_k, Tensor(a!) out, Tensor(b!)? workspace) -> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("_weight_only_linear_cuda", &weight_only_linear_cuda);
}

// Binding of pyops::_attention_cuda: tensor checks, then the torch-free sm_90a attention kernel
// (pyops/attention.h) on the current stream. No math here (spec: the Triton kernel's int8 path,
// triton_kernels/attention.py, and pyops/reference/attention.py). UNVERIFIED on hardware.
//
// The inputs are the "int8" pre-pass buffers of triton_kernels/attention_quant.py
// (quantize_qkv); what the kernel touches, so what is checked before the launch:
//   qc  (B, Hq, Sq, D) int8, D 64 or 128: read in 16-byte chunks at b*s0 + h*s1 + i*s2 + d:
//       stride(3) == 1, strides 0..2 multiples of 16, data_ptr 16-byte aligned;
//   kc  (B, Hk, Sk, D) int8, same rules; Hq a multiple of Hk; Sk >= 1;
//   vt  (B, Hk, D, Sk_pad) uint8 (or float8_e4m3fn) e4m3 codes of V transposed, Sk_pad >= Sk
//       rounded up to 16: stride(3) == 1, strides 0..2 multiples of 16, 16-byte aligned;
//   qs, qb (B, Hq, Sq), ks (B, Hk, Sk), vs (B, Hk, D): float32, contiguous;
//   out (B, Hq, Sq, D) bfloat16/float16, any strides; lse (B, Hq, Sq) float32 contiguous or
//       absent; written, so sharing no memory with any input or with each other;
//   the grid: B * Hq * ceil(Sq / 64) <= INT_MAX; the device: compute capability 9.0 exactly.
// Sq == 0 (nothing to write) returns after the checks without a launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "binding_utils.h"

namespace {

constexpr const char* kOp = "pyops.attention";

// A code buffer the kernel reads with 16-byte cp.async: 4-D, dtype, unit last stride, every
// other stride a multiple of 16 bytes (one-byte elements), data_ptr 16-byte aligned.
void check_codes(const at::Tensor& t, const at::Tensor& x, const char* name) {
  using namespace pyops_bind;
  check_cuda(t, x, kOp, name);
  TORCH_CHECK(t.dim() == 4, kOp, ": ", name, " must be 4-D, got shape ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, kOp, ": ", name,
              " must have unit stride along its last dimension, got strides ", t.strides());
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(t.stride(d) % 16 == 0, kOp, ": ", name,
                " strides 0..2 must be multiples of 16 bytes, got strides ", t.strides());
  check_aligned(t, 16, kOp, name);
}

void check_scales(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
                  const char* name) {
  using namespace pyops_bind;
  check_cuda(t, x, kOp, name);
  check_dtype(t, at::kFloat, kOp, name);
  check_shape(t, shape, kOp, name);
  check_contiguous(t, kOp, name);
  check_aligned(t, 4, kOp, name);
}

void attention_cuda(const at::Tensor& qc, const at::Tensor& qs, const at::Tensor& qb,
                    const at::Tensor& kc, const at::Tensor& ks, const at::Tensor& vt,
                    const at::Tensor& vs, at::Tensor out, std::optional<at::Tensor> lse,
                    bool causal) {
  using namespace pyops_bind;
  check_input(qc, kOp, "qc");
  check_dtype(qc, at::kChar, kOp, "qc");
  check_codes(qc, qc, "qc");
  const int64_t B = qc.size(0), Hq = qc.size(1), Sq = qc.size(2), D = qc.size(3);
  TORCH_CHECK(D == 64 || D == 128, kOp, ": the CUDA kernel supports head_dim 64 and 128, got ",
              D);
  TORCH_CHECK(B >= 1 && Hq >= 1, kOp, ": qc must have batch and heads >= 1, got shape ",
              qc.sizes());
  const int64_t n_mblk = (Sq + 63) / 64;
  TORCH_CHECK(n_mblk == 0 || B * Hq <= kIntMax / n_mblk, kOp, ": B * Hq * ceil(Sq / 64) = ",
              B, " * ", Hq, " * ", n_mblk, " exceeds the grid limit ", kIntMax);
  check_dtype(kc, at::kChar, kOp, "kc");
  check_codes(kc, qc, "kc");
  const int64_t Hk = kc.size(1), Sk = kc.size(2);
  TORCH_CHECK(kc.size(0) == B && kc.size(3) == D && Hk >= 1, kOp, ": kc must be (", B,
              ", Hk, Sk, ", D, ") with Hk >= 1, got ", kc.sizes());
  TORCH_CHECK(Hq % Hk == 0, kOp, ": query heads (", Hq, ") must be a multiple of kv heads (",
              Hk, ")");
  TORCH_CHECK(Sk >= 1, kOp, ": kc holds no keys (Sk = 0)");
  TORCH_CHECK(vt.scalar_type() == at::kByte || vt.scalar_type() == at::kFloat8_e4m3fn, kOp,
              ": vt must be Byte or Float8_e4m3fn (e4m3 codes), got ", vt.scalar_type());
  check_codes(vt, qc, "vt");
  const int64_t sk_pad = (Sk + 15) / 16 * 16;
  TORCH_CHECK(vt.size(0) == B && vt.size(1) == Hk && vt.size(2) == D && vt.size(3) >= sk_pad,
              kOp, ": vt must be (", B, ", ", Hk, ", ", D, ", Sk_pad >= ", sk_pad, "), got ",
              vt.sizes());
  check_scales(qs, qc, {B, Hq, Sq}, "qs");
  check_scales(qb, qc, {B, Hq, Sq}, "qb");
  check_scales(ks, qc, {B, Hk, Sk}, "ks");
  check_scales(vs, qc, {B, Hk, D}, "vs");
  check_cuda(out, qc, kOp, "out");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf, kOp,
              ": out must be BFloat16 or Half, got ", out.scalar_type());
  check_shape(out, {B, Hq, Sq, D}, kOp, "out");
  check_aligned(out, 2, kOp, "out");
  if (lse.has_value()) check_scales(*lse, qc, {B, Hq, Sq}, "lse");
  const std::pair<const char*, const at::Tensor*> ins[] = {
      {"qc", &qc}, {"qs", &qs}, {"qb", &qb}, {"kc", &kc}, {"ks", &ks}, {"vt", &vt}, {"vs", &vs}};
  const std::pair<const char*, const at::Tensor*> outs[] = {
      {"out", &out}, {"lse", lse.has_value() ? &*lse : nullptr}};
  for (const auto& o : outs) {
    if (o.second == nullptr) continue;
    for (const auto& i : ins) check_no_overlap(*o.second, *i.second, kOp, o.first, i.first);
  }
  check_no_overlap_pairwise({outs[0], outs[1]}, kOp);
  const c10::cuda::CUDAGuard guard(qc.device());
  int major = 0, minor = 0;
  check_status(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                      qc.device().index()),
               kOp, "device query");
  check_status(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor,
                                      qc.device().index()),
               kOp, "device query");
  TORCH_CHECK(major == 9 && minor == 0, kOp, ": the CUDA kernel needs compute capability 9.0 "
              "(sm_90a wgmma), device ", qc.device(), " is sm_", major, minor);
  if (Sq == 0) return;
  pyops_attention_params p{};
  p.qc = static_cast<const int8_t*>(qc.data_ptr());
  p.qs = qs.data_ptr<float>();
  p.qb = qb.data_ptr<float>();
  p.kc = static_cast<const int8_t*>(kc.data_ptr());
  p.ks = ks.data_ptr<float>();
  p.vt = static_cast<const uint8_t*>(vt.data_ptr());
  p.vs = vs.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  p.out_dtype = dtype_code(out, kOp, "out");
  p.B = B;
  p.Hq = Hq;
  p.Hk = Hk;
  p.Sq = Sq;
  p.Sk = Sk;
  p.D = D;
  p.Sk_pad = vt.size(3);
  p.q_stride_b = qc.stride(0);
  p.q_stride_h = qc.stride(1);
  p.q_stride_s = qc.stride(2);
  p.k_stride_b = kc.stride(0);
  p.k_stride_h = kc.stride(1);
  p.k_stride_s = kc.stride(2);
  p.v_stride_b = vt.stride(0);
  p.v_stride_h = vt.stride(1);
  p.v_stride_d = vt.stride(2);
  p.o_stride_b = out.stride(0);
  p.o_stride_h = out.stride(1);
  p.o_stride_s = out.stride(2);
  p.o_stride_d = out.stride(3);
  p.causal = causal ? 1 : 0;
  check_status(pyops_attention(&p, c10::cuda::getCurrentCUDAStream().stream()), kOp, "launch");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_attention_cuda(Tensor qc, Tensor qs, Tensor qb, Tensor kc, Tensor ks, Tensor vt, "
        "Tensor vs, Tensor(a!) out, Tensor(b!)? lse, bool causal) -> ()");
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("_attention_cuda", &attention_cuda);
}

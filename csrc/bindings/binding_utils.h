// binding_utils.h - shared checks for the thin torch bindings (no math here).
//
// Every binding validates every tensor it hands to a launcher (defined, CUDA, on the primary
// input's device, dtype, shape, the contiguity and alignment the kernel relies on, no overlap
// between what it writes and anything else it touches) and every integer it narrows, BEFORE any
// launch or allocation. A failed check is a TORCH_CHECK (c10::Error -> Python RuntimeError) whose
// message starts with the op's name; the launchers' own cudaErrorInvalidValue checks stay as a
// second line of defence for C callers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <utility>

#include "pyops.h"

namespace pyops_bind {

// The one fp32 / fp16 / bf16 -> pyops_dtype_t mapping of the bindings; anything else is a
// TORCH_CHECK error naming the tensor, worded as the Python-side checks word it
// ("<op>: <name> has dtype <dtype>; supported: float32, bfloat16, float16").
inline pyops_dtype_t dtype_code(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::ScalarType::Float: return PYOPS_DTYPE_F32;
    case at::ScalarType::Half: return PYOPS_DTYPE_F16;
    case at::ScalarType::BFloat16: return PYOPS_DTYPE_BF16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " has dtype ", t.scalar_type(),
              "; supported: float32, bfloat16, float16");
  return PYOPS_DTYPE_F32;  // not reached
}

// The primary input (named `xname`): a defined CUDA tensor. Checked first; every other tensor is
// compared against its device.
inline void check_input(const at::Tensor& x, const char* op, const char* xname) {
  TORCH_CHECK(x.defined(), op, ": ", xname, " is an undefined tensor");
  TORCH_CHECK(x.is_cuda(), op, ": ", xname, " must be a CUDA tensor, got ", x.device());
}

// t is a defined CUDA tensor on the primary input x's device.
inline void check_cuda(const at::Tensor& t, const at::Tensor& x, const char* op,
                       const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
              " but the input is on ", x.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op,
                        const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got sizes ", t.sizes(),
              " strides ", t.strides());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* op,
                        const char* name) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ",
              t.sizes());
}

// data_ptr aligned to `bytes` (the kernels' word stores and atomics need more than the element
// alignment torch guarantees for its own allocations; external memory may not even have that).
inline void check_aligned(const at::Tensor& t, int64_t bytes, const char* op, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % static_cast<uintptr_t>(bytes) == 0,
              op, ": ", name, " must be ", bytes, "-byte aligned (data_ptr ", t.data_ptr(), ")");
}

// A buffer indexed flat: CUDA on x's device, contiguous, element-aligned (any dtype).
inline void check_flat(const at::Tensor& t, const at::Tensor& x, const char* op,
                       const char* name) {
  check_cuda(t, x, op, name);
  check_contiguous(t, op, name);
  check_aligned(t, static_cast<int64_t>(t.element_size()), op, name);
}

// A destination buffer: CUDA on x's device, `dtype`, contiguous, element-aligned.
inline void check_out(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype,
                      const char* op, const char* name) {
  check_cuda(t, x, op, name);
  check_dtype(t, dtype, op, name);
  check_contiguous(t, op, name);
  check_aligned(t, static_cast<int64_t>(t.element_size()), op, name);
}

// [first, last) byte range spanned by t's elements (strides are >= 0 in torch); empty if numel 0.
inline void byte_span(const at::Tensor& t, uintptr_t* lo, uintptr_t* hi) {
  *lo = *hi = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (t.numel() == 0) return;
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  *hi = *lo + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size()));
}

// Whether the byte spans of a and b intersect (conservative: spans, not elements; distinct
// allocations never share addresses, so no storage comparison is needed).
inline bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  uintptr_t a0, a1, b0, b1;
  byte_span(a, &a0, &a1);
  byte_span(b, &b0, &b1);
  return a0 < b1 && b0 < a1;
}

// a and b are exactly the same elements: same address, element size, sizes and strides.
inline bool same_memory(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.element_size() == b.element_size() &&
         a.sizes() == b.sizes() && a.strides() == b.strides();
}

// A written buffer must not share memory with anything else the launch touches.
inline void check_no_overlap(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* na, const char* nb) {
  TORCH_CHECK(!overlaps(a, b), op, ": ", na, " and ", nb, " overlap in memory");
}

// No two of `bufs` (name, tensor; a null tensor, i.e. an absent optional, is skipped) share
// memory; pairs are checked in list order.
inline void check_no_overlap_pairwise(
    std::initializer_list<std::pair<const char*, const at::Tensor*>> bufs, const char* op) {
  for (auto i = bufs.begin(); i != bufs.end(); ++i)
    for (auto j = std::next(i); j != bufs.end(); ++j)
      if (i->second != nullptr && j->second != nullptr)
        check_no_overlap(*i->second, *j->second, op, i->first, j->first);
}

// For element-wise kernels (element i read and written by the same thread): an exact alias is
// fine, a partial overlap is a race.
inline void check_no_partial_overlap(const at::Tensor& a, const at::Tensor& b, const char* op,
                                     const char* na, const char* nb) {
  TORCH_CHECK(same_memory(a, b) || !overlaps(a, b), op, ": ", na, " and ", nb,
              " partially overlap in memory (only the very same tensor is allowed)");
}

// An int64 schema argument narrowed to the int the C ABI takes: must lie in [lo, hi].
inline int check_int(int64_t v, int64_t lo, int64_t hi, const char* op, const char* name) {
  TORCH_CHECK(v >= lo && v <= hi, op, ": ", name, " must be in [", lo, ", ", hi, "], got ", v);
  return static_cast<int>(v);
}

constexpr int64_t kIntMin = std::numeric_limits<int>::min();
constexpr int64_t kIntMax = std::numeric_limits<int>::max();

// A double schema argument passed on as a float: finite as a float.
inline float check_finite_float(double v, const char* op, const char* name) {
  const float f = static_cast<float>(v);
  TORCH_CHECK(std::isfinite(f), op, ": ", name, " must be finite (as a float32), got ", v);
  return f;
}

// The C ABI's return value. The two wordings are the ones the bindings always used:
// "<op> failed: <error>" (quantizers) and "<op>: <what> failed: <error>" (the others).
inline void check_status(cudaError_t e, const char* op, const char* what = nullptr) {
  if (e == cudaSuccess) return;
  if (what == nullptr) TORCH_CHECK(false, op, " failed: ", cudaGetErrorString(e));
  TORCH_CHECK(false, op, ": ", what, " failed: ", cudaGetErrorString(e));
}

}  // namespace pyops_bind

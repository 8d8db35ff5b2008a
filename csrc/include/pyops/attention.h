/*
 * pyops/attention.h - torch-free C ABI of the sm_90a attention forward kernel for the "int8"
 * precision (INT8 QK^T via wgmma s8.s8 -> s32, FP8 e4m3 PV via wgmma e4m3.e4m3 -> f32).
 *
 * UNVERIFIED ON HARDWARE: written and compiled for sm_90a without a GPU; pyops.attention keeps
 * the Triton kernel as its automatic choice until a measurement shows this one faster.
 *
 * Inputs are exactly the buffers of the Triton pre-pass for precision "int8"
 * (triton_kernels/attention_quant.py, quantize_qkv; spec pyops/reference/attention.py):
 *   qc (B, Hq, Sq, D) int8 codes;  qs, qb (B, Hq, Sq) fp32: Q's per-token scale (already times
 *   sm_scale * log2 e) and the lse correction (natural log);  kc (B, Hk, Sk, D) int8 codes;
 *   ks (B, Hk, Sk) fp32;  vt (B, Hk, D, Sk_pad) e4m3 bytes of V transposed (columns >= Sk may
 *   hold anything: they are never used);  vs (B, Hk, D) fp32 per-channel V scales.
 * Outputs: out (B, Hq, Sq, D) fp16 or bf16 (any strides), lse (B, Hq, Sq) fp32 or NULL.
 *
 * Arithmetic (the Triton kernel's int8 path, triton_kernels/attention.py), per query row i of
 * head h (kv head h / (Hq / Hk)), key blocks of 128 keys in order:
 *   s_j = float(qc_i . kc_j) * ks[j]  (-inf for j >= Sk and, causal (top-left), j > i)
 *   m'  = max(m, max_j(s_j) * qs[i]);  p_j = exp2(s_j * qs[i] - m');  alpha = exp2(m - m')
 *   l   = l * alpha + sum_j p_j;  P_j = e4m3(p_j * 448)
 *   acc = acc * alpha + (P . V^T codes of the block)   (a fresh fp32 MMA product per block)
 *   out = acc / l * (vs / 448);  lse = (m + log2 l) * ln 2 + qb[i]
 * exp2 / log2 are the hardware approximations ex2.approx.f32 / lg2.approx.f32 (Triton's sm_90
 * code: ex2.approx.ftz.f32, equal above 2^-126, and libdevice log2f); fp32 summation orders
 * and the last bits of the output division and of lse differ from the Triton kernel's. NaN/inf
 * scales propagate to the rows that use them (a NaN query row stays in its row).
 *
 * Requirements (else cudaErrorInvalidValue, nothing enqueued):
 *   D in {64, 128}; B, Hq, Hk, Sk >= 1, Sq >= 0, Hq a multiple of Hk; Sk_pad >= Sk rounded up
 *   to 16; all strides >= 0;
 *   qc, kc, vt: unit stride along their last dimension, base 16-byte aligned and every other
 *   stride a multiple of 16 (elements are bytes);
 *   qs, qb, ks, vs, lse: contiguous, 4-byte aligned;
 *   out: out_dtype F16 or BF16, 2-byte aligned (any strides);
 *   (B * Hq) * ceil(Sq / 64) <= 2^31 - 1 (the grid).
 * The current device must have compute capability exactly 9.0 (H100/H200) and the library must
 * hold sm_90a code, else cudaErrorNotSupported (wgmma exists on sm_90a only). A build that
 * compiled this file for another architecture only (e.g. plain sm_90 without the "a"
 * features) has a stub kernel that writes NaN to every output element and lse.
 *
 * Conventions: pyops/common.h (int64 sizes/strides in elements, device pointers, enqueued on
 * `stream` only, no host sync, capturable). Sq == 0 is a no-op.
 */
#ifndef PYOPS_ATTENTION_H_
#define PYOPS_ATTENTION_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pyops_attention_params {
  /* inputs (the int8 pre-pass buffers) */
  const int8_t* qc;  /* (b, h, i, d) at qc + b*q_stride_b + h*q_stride_h + i*q_stride_s + d */
  const float* qs;   /* (b, h, i) at (b*Hq + h)*Sq + i */
  const float* qb;   /* same layout as qs */
  const int8_t* kc;  /* (b, g, j, d) at kc + b*k_stride_b + g*k_stride_h + j*k_stride_s + d */
  const float* ks;   /* (b, g, j) at (b*Hk + g)*Sk + j */
  const uint8_t* vt; /* (b, g, d, j) at vt + b*v_stride_b + g*v_stride_h + d*v_stride_d + j */
  const float* vs;   /* (b, g, d) at (b*Hk + g)*D + d */
  /* outputs */
  void* out;         /* (b, h, i, d) at out + b*o_stride_b + h*o_stride_h + i*o_stride_s +
                        d*o_stride_d, elements of out_dtype */
  float* lse;        /* (b, h, i) at (b*Hq + h)*Sq + i, or NULL */
  pyops_dtype_t out_dtype; /* PYOPS_DTYPE_F16 or PYOPS_DTYPE_BF16 */
  int64_t B, Hq, Hk, Sq, Sk, D, Sk_pad;
  int64_t q_stride_b, q_stride_h, q_stride_s;
  int64_t k_stride_b, k_stride_h, k_stride_s;
  int64_t v_stride_b, v_stride_h, v_stride_d;
  int64_t o_stride_b, o_stride_h, o_stride_s, o_stride_d;
  int32_t causal; /* 0: full attention; 1: causal, top-left aligned (key j <= query i) */
} pyops_attention_params;

cudaError_t pyops_attention(const pyops_attention_params* p, cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYOPS_ATTENTION_H_ */

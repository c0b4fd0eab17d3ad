// Internals of jitrope::qk_norm_rope, shared by its host wrapper (ops/qk_norm_rope.cpp) and its
// launchers (cpu/qk_norm_rope_cpu.cpp, cuda/qk_norm_rope_cuda.cu). Not installed: the C++ API is
// ops/qk_norm_rope.h. The wrapper checks the arguments, converts the tables to the accumulation
// dtype, allocates every output and scratch tensor and handles the empty case; a launcher fills
// what it is given.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace jitrope {
namespace detail {

// Where the rows of qk live, for the CPU and CUDA kernels: element (s, b, h, n, d) is at
// s*ss + b*sb + h*sh + n*sn + d*sd.
struct QkLayout {
  int64_t B, H, N, D;
  int64_t ss, sb, sh, sn, sd;
};

inline QkLayout qk_layout(const at::Tensor& qk) {
  return {qk.size(1),   qk.size(2),   qk.size(3),   qk.size(4),  qk.stride(0),
          qk.stride(1), qk.stride(2), qk.stride(3), qk.stride(4)};
}

}  // namespace detail

// The norm weights and the rotation of both passes, in the accumulation dtype (float32; float64 for
// float64 qk), contiguous.
struct QkNormRopeParams {
  at::Tensor weight;         // [2, D]
  at::Tensor coords, freqs;  // [N, 2], [F * Hf, 2, D/2] (F = 1 without freqs_index); undefined: no rotation
  at::Tensor index;          // freqs_index [N], or undefined
  bool per_head;             // Hf = H (else 1)
  bool interleaved;
  double eps;

  bool rotate() const {
    return coords.defined();
  }
};

// out = RMSNorm(qk) * weight, rotated. qk has at least one element.
struct QkNormRopeForward {
  at::Tensor qk;  // [2, B, H, N, D], any strides
  detail::QkLayout L;
  QkNormRopeParams p;
  at::Tensor out;  // contiguous [2, B, H, N, D]
};

// grad_qk, grad_weight and (freqs_grad) grad_freqs of qk_norm_rope, the parameter gradients through
// the fixed chunking and order of math/qk_norm_rope_math.h. qk has at least one element.
struct QkNormRopeBackward {
  at::Tensor grad_out;  // contiguous [2, B, H, N, D]
  at::Tensor qk;        // [2, B, H, N, D], any strides
  detail::QkLayout L;
  QkNormRopeParams p;
  bool freqs_grad;
  int64_t chunks, rows_per_chunk;
  at::Tensor run_table;    // int64 [chunks, runs] on qk's device with freqs_grad and freqs_index, else undefined
  at::Tensor wpart;        // scratch [2, H, chunks, D], accumulation dtype
  at::Tensor fpart;        // scratch [2, H, chunks, runs, D] (runs = 1 without run_table), with freqs_grad
  at::Tensor grad_qk;      // contiguous [2, B, H, N, D]
  at::Tensor grad_weight;  // [2, D], accumulation dtype
  at::Tensor grad_freqs;   // [F * Hf, D] (y-axis then x-axis halves), accumulation dtype, with freqs_grad
};

namespace cpu {
void qk_norm_rope_forward(const QkNormRopeForward& a);
void qk_norm_rope_backward(const QkNormRopeBackward& a);
}  // namespace cpu

namespace cuda {
void qk_norm_rope_forward(const QkNormRopeForward& a);
void qk_norm_rope_backward(const QkNormRopeBackward& a);
}  // namespace cuda

}  // namespace jitrope

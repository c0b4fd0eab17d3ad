// Internals of jitrope::qk_norm_rope shared by its CPU and CUDA kernels: the argument check, the
// row layout of qk and the last step of the parameter gradients. Not installed: the C++ API is
// ops/qk_norm_rope.h.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace jitrope {

// The one argument check of the qk_norm_rope kernels (CPU and CUDA, forward and backward); with
// grad_out, the backward's checks too. Throws c10::Error naming the argument, the shape it got and
// the shape it wanted.
void check_qk_norm_rope_args(
    const char* op,
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    const at::Tensor* grad_out = nullptr,
    bool freqs_grad = false,
    const std::optional<at::Tensor>& freqs_index = std::nullopt);

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

// The backward's (grad_weight, grad_freqs) from the kernels' sums in the accumulation dtype:
// grad_weight [2, D] in weight's dtype; grad_freqs ([Hf, D] sums) in freqs' shape and dtype when
// freqs_grad, else an empty tensor.
std::tuple<at::Tensor, at::Tensor> finish_param_grads(
    const at::Tensor& grad_weight_acc,
    const at::Tensor& grad_freqs_acc,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& freqs,
    bool freqs_grad);

// The runs of the backward's chunks with freqs_index (math/qk_norm_rope_math.h): run_table [chunks,
// runs] int64 on the CPU, runs being the most any chunk has. Reads the index on the host.
at::Tensor chunk_run_table(const at::Tensor& index, int64_t B, int64_t N, int64_t chunks, int64_t rows_per_chunk);

}  // namespace detail

}  // namespace jitrope

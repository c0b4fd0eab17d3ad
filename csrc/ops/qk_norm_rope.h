// C++ API of jitrope::qk_norm_rope (docs/ops.md): RMSNorm of q and k over head_dim (weight [2, D],
// float32 statistics) followed by rope2d's rotation, in one pass over qk: [2, B, H, N, D] (any
// strides: the q/k view of a fused qkv projection is read in place). The result is a new contiguous
// [2, B, H, N, D] tensor. Each function calls the registered operator through the dispatcher, so
// LibTorch code gets the same kernels and autograd as torch.ops.jitrope.* in Python.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace jitrope {

// coords [N, 2] and freqs [2, D/2] or [H, 2, D/2] as in rope2d, or both nullopt (normalize only);
// with freqs_index, freqs [F, 2, D/2] or [F, H, 2, D/2] as in rope2d. Differentiable in qk, weight
// and freqs.
at::Tensor qk_norm_rope(
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords = std::nullopt,
    const std::optional<at::Tensor>& freqs = std::nullopt,
    double eps = 1e-6,
    bool interleaved = true,
    const std::optional<at::Tensor>& freqs_index = std::nullopt);

// (grad_qk [2, B, H, N, D] contiguous, grad_weight [2, D] in weight's dtype, grad_freqs in freqs'
// shape and dtype when freqs_grad (per table with freqs_index), else an empty tensor). The weight and freqs gradients
// are summed in float32 (float64 for float64 qk) in a fixed order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward(
    const at::Tensor& grad_out,
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    bool interleaved,
    bool freqs_grad,
    const std::optional<at::Tensor>& freqs_index = std::nullopt);

}  // namespace jitrope

// C++ API of jitrope::rope2d (docs/ops.md): fused 2D rotary embedding of x: [..., H, N, D] by per-token
// coordinates coords: [N, 2] and frequencies freqs: [2, D/2] or [H, 2, D/2]. With freqs_index
// (int64 [N], packed batches) freqs has a leading table dim ([F, 2, D/2] or [F, H, 2, D/2]) and token n
// turns by table freqs_index[n]. Each function calls the registered operator through the
// dispatcher, so LibTorch code gets the same CPU/CUDA kernels and autograd as torch.ops.jitrope.*
// in Python.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace jitrope {

// Rotated copy of x (a new tensor shaped like x; x may be any strided view, e.g. q and k of a fused
// qkv projection as one [2, B, H, N, D] view). Differentiable in x and freqs.
at::Tensor rope2d(
    const at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    bool interleaved = true,
    const std::optional<at::Tensor>& freqs_index = std::nullopt);

// In-place rope2d for inference (no gradient); returns x.
at::Tensor& rope2d_(
    at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    bool interleaved = true,
    const std::optional<at::Tensor>& freqs_index = std::nullopt);

// Gradients of rope2d: grad_x = grad_out rotated by -phi, and, when the forward input x is given,
// grad_freqs (freqs' shape and dtype, per table with freqs_index, reduced in float32 / float64,
// deterministically); without x grad_freqs is an empty tensor.
std::tuple<at::Tensor, at::Tensor> rope2d_backward(
    const at::Tensor& grad_out,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const std::optional<at::Tensor>& x,
    bool interleaved = true,
    const std::optional<at::Tensor>& freqs_index = std::nullopt);

}  // namespace jitrope

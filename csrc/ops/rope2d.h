// C++ API of jitrope::rope2d (SPEC §2): fused 2D rotary embedding of x: [..., H, N, D] by per-token
// coordinates coords: [N, 2] and frequencies freqs: [2, D/2] or [H, 2, D/2]. Each function calls
// the registered operator through the dispatcher, so LibTorch code gets the same CPU/CUDA kernels
// and autograd as torch.ops.jitrope.* in Python.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "math/rope2d_math.h"

namespace jitrope {

// Rotated copy of x (a new tensor shaped like x; x may be any strided view, e.g. q and k of a fused
// qkv projection as one [2, B, H, N, D] view). Differentiable in x and freqs.
at::Tensor rope2d(
    const at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs, bool interleaved = true);

// In-place rope2d for inference (no gradient); returns x.
at::Tensor& rope2d_(at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs, bool interleaved = true);

// Gradients of rope2d: grad_x = grad_out rotated by -phi, and, when the forward input x is given,
// grad_freqs (freqs' shape and dtype, reduced in float32 / float64, deterministically); without x
// grad_freqs is an empty tensor.
std::tuple<at::Tensor, at::Tensor> rope2d_backward(
    const at::Tensor& grad_out,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const std::optional<at::Tensor>& x,
    bool interleaved = true);

// The one argument check of every rope2d kernel (CPU and CUDA, forward and backward). `x_name`
// names the [..., H, N, D] tensor in messages ("x" or "grad_out"); `fwd_x` is the forward input a
// backward gets; `inplace` adds the checks of rope2d_. Throws c10::Error naming the argument, the
// shape it got and the shape it wanted.
void check_rope2d_args(
    const char* op,
    const char* x_name,
    const at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const at::Tensor* fwd_x = nullptr,
    bool inplace = false);

namespace detail {

// coords and freqs in the accumulation dtype, contiguous, freqs as [Hf, 2, D/2].
std::tuple<at::Tensor, at::Tensor> rope2d_acc_tables(
    const at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs);

// Geometry of tensors of x's shape (tensor 0 gives the shape; 1 and 2 may differ in strides):
// frequency groups, and each group's planes coalesced into at most kMaxPlaneDims dims. Returns
// false when the leading dims cannot be coalesced that far (the kernels then work on contiguous
// copies).
bool make_rope2d_geometry(
    std::initializer_list<const at::Tensor*> tensors, bool per_head, rope2d_math::Rope2dGeometry& geo);

}  // namespace detail
}  // namespace jitrope

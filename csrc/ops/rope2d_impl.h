// Internals of jitrope::rope2d shared by its CPU and CUDA kernels and by qk_norm_rope: the argument
// check, the accumulation-type tables and the plane geometry. Not installed: the C++ API is
// ops/rope2d.h.
#pragma once

#include <initializer_list>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "math/rope2d_math.h"

namespace jitrope {

// The one argument check of every rope2d kernel (CPU and CUDA, forward and backward). `x_name`
// names the [..., H, N, D] tensor in messages ("x" or "grad_out"); `fwd_x` is the forward input a
// backward gets; `inplace` adds the checks of rope2d_; `freqs_index` (SPEC §10) is checked down to
// its values (on CUDA that waits for the device), so that no kernel reads a table out of bounds.
// Throws c10::Error naming the argument, the shape it got and the shape it wanted.
void check_rope2d_args(
    const char* op,
    const char* x_name,
    const at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const at::Tensor* fwd_x = nullptr,
    bool inplace = false,
    const std::optional<at::Tensor>& freqs_index = std::nullopt);

// Whether freqs has one row per head: [H, 2, D/2], or [F, H, 2, D/2] with freqs_index.
inline bool rope2d_per_head(const at::Tensor& freqs, const std::optional<at::Tensor>& freqs_index) {
  return freqs.dim() == (freqs_index.has_value() && freqs_index->defined() ? 4 : 3);
}

namespace detail {

// coords and freqs in the accumulation dtype, contiguous, freqs as [F * Hf, 2, D/2] (F = 1 without
// freqs_index): the table of group g for token n is row freqs_index[n] * Hf + g.
std::tuple<at::Tensor, at::Tensor> rope2d_acc_tables(
    const at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs);

// freqs_index contiguous, or an undefined tensor without it.
inline at::Tensor rope2d_index(const std::optional<at::Tensor>& freqs_index) {
  return freqs_index.has_value() && freqs_index->defined() ? freqs_index->contiguous() : at::Tensor();
}

// Geometry of tensors of x's shape (tensor 0 gives the shape; 1 and 2 may differ in strides):
// frequency groups, and each group's planes coalesced into at most kMaxPlaneDims dims. Returns
// false when the leading dims cannot be coalesced that far (the kernels then work on contiguous
// copies).
bool make_rope2d_geometry(
    std::initializer_list<const at::Tensor*> tensors, bool per_head, rope2d_math::Rope2dGeometry& geo);

}  // namespace detail
}  // namespace jitrope

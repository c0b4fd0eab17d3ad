// C++ API of jitrope::pos2d_add (docs/ops.md): the same operators torch.ops.jitrope.* exposes to
// Python, called through the dispatcher so that autograd, CPU and CUDA kernels are picked as they
// are from Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <tuple>

namespace jitrope {

// out[b, t] = x[b, t] + pos_h[row_offset + i] + pos_w[col_offset + j] for the gh*gw grid tokens
// t = token_offset + i*gw + j of x: [B, N, D]; every other token is copied. Differentiable in x,
// pos_h and pos_w (and twice: the backward is linear).
at::Tensor pos2d_add(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset = 0,
    int64_t row_offset = 0,
    int64_t col_offset = 0);

// In-place twin for inference (no autograd); returns x.
at::Tensor& pos2d_add_(
    at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset = 0,
    int64_t row_offset = 0,
    int64_t col_offset = 0);

// (grad_pos_h [max_h, D], grad_pos_w [max_w, D]) of pos2d_add given grad_out [B, N, D]; rows the
// grid does not use are zero. Summed in float32 (float64 for float64) in a fixed order.
std::tuple<at::Tensor, at::Tensor> pos2d_add_backward(
    const at::Tensor& grad_out,
    at::IntArrayRef grid,
    int64_t max_h,
    int64_t max_w,
    int64_t token_offset = 0,
    int64_t row_offset = 0,
    int64_t col_offset = 0);

// The same with symbolic table sizes, for autograd under torch.compile's dynamic shapes.
std::tuple<at::Tensor, at::Tensor> pos2d_add_backward_symint(
    const at::Tensor& grad_out,
    at::IntArrayRef grid,
    c10::SymInt max_h,
    c10::SymInt max_w,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset);

}  // namespace jitrope

// C++ API of jitrope::pos2d_add_indexed (docs/ops.md): the factorized 2D position table on packed
// tokens, each token with its own (row, column). Dispatcher calls, as from Python, so that
// autograd, CPU and CUDA kernels are picked the same way.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <tuple>

namespace jitrope {

// out[..., n, :] = x[..., n, :] + pos_h[rows[n]] + pos_w[cols[n]] for x: [..., N, D] (any leading
// dims, any strides), pos_h: [max_h, D], pos_w: [max_w, D], rows, cols: int64 [N]; rows[n] = -1
// (cols[n] = -1) leaves pos_h (pos_w) out for token n. Differentiable in x, pos_h and pos_w.
at::Tensor pos2d_add_indexed(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    const at::Tensor& rows,
    const at::Tensor& cols);

// (grad_pos_h [max_h, D], grad_pos_w [max_w, D]) given grad_out [..., N, D]: grad_pos_h[r] is the
// sum over the leading dims and the tokens n with rows[n] == r of grad_out[..., n, :], pos_w
// likewise; rows no token uses are zero. Summed in float32 (float64 for float64), deterministic.
std::tuple<at::Tensor, at::Tensor> pos2d_add_indexed_backward(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols, int64_t max_h, int64_t max_w);

// The same with symbolic table sizes, for autograd under torch.compile's dynamic shapes.
std::tuple<at::Tensor, at::Tensor> pos2d_add_indexed_backward_symint(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols, c10::SymInt max_h, c10::SymInt max_w);

}  // namespace jitrope

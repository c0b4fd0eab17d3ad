// Internals of jitrope::pos2d_add shared by its CPU and CUDA kernels: the argument checks. Not
// installed: the C++ API is ops/pos2d_add.h.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace jitrope {

// Argument checks every pos2d_add / pos2d_add_ kernel (CPU, CUDA) runs first. Each message names
// the operator, the argument, what it got and what it wanted. The in-place twin also refuses an x
// that overlaps itself or the tables.
void check_pos2d_add_args(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset,
    bool inplace);

// The same checks for pos2d_add_backward, which knows the tables only by their row counts.
void check_pos2d_add_backward_args(
    const at::Tensor& grad_out,
    at::IntArrayRef grid,
    int64_t max_h,
    int64_t max_w,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset);

}  // namespace jitrope

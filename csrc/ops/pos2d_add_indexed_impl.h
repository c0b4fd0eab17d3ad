// Internals of jitrope::pos2d_add_indexed shared by its CPU and CUDA kernels: the argument checks
// and the leading-dims helper. Not installed: the C++ API is ops/pos2d_add_indexed.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "math/pos2d_add_indexed_math.h"

namespace jitrope {

// Argument checks every pos2d_add_indexed kernel (CPU, CUDA) runs first; each message names the
// argument, what it got and what it wanted. The index values are checked too (on a CUDA device
// with one synchronizing read of their minima and maxima), so no kernel reads out of bounds.
void check_pos2d_add_indexed_args(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    const at::Tensor& rows,
    const at::Tensor& cols);

// The same checks for pos2d_add_indexed_backward, which knows the tables only by their row counts.
void check_pos2d_add_indexed_backward_args(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols, int64_t max_h, int64_t max_w);

namespace detail {

// x's leading dims merged for pos2d_add_indexed_math::LeadingDims, or false when more than
// kMaxLeadingDims remain (the kernels then read a contiguous copy).
bool leading_dims(const at::Tensor& x, pos2d_add_indexed_math::LeadingDims& lead);

}  // namespace detail
}  // namespace jitrope

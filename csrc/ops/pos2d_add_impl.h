// Internals of jitrope::pos2d_add, shared by its host wrapper (ops/pos2d_add.cpp) and its launchers
// (cpu/pos2d_add_cpu.cpp, cuda/pos2d_add_cuda.cu), and the row layout pos2d_add_indexed shares.
// Not installed: the C++ API is ops/pos2d_add.h. The wrapper checks the arguments, allocates every
// output and scratch tensor and handles the empty case; a launcher fills what it is given.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "math/pos2d_add_math.h"

namespace jitrope {

// pos2d_add / pos2d_add_: out[b, t] = x[b, t] + pos_h[row_offset + i] + pos_w[col_offset + j] for
// grid token t = token_offset + i*gw + j, x[b, t] for every other token; with grid_rows_only
// (the in-place twin, out is x) only the grid's tokens are visited. x and out have unit channel
// stride and at least one element.
struct Pos2dAddForward {
  at::Tensor x;             // [B, N, D]
  at::Tensor out;           // [B, N, D]: contiguous, or x itself
  at::Tensor pos_h, pos_w;  // contiguous [max_h, D], [max_w, D], x's dtype
  int64_t gh, gw, token_offset, row_offset, col_offset;
  bool grid_rows_only;
};

// pos2d_add_backward: grad_h and grad_w filled (zero on rows the grid does not use), summed in the
// order of math/pos2d_add_math.h through `partials`, scratch [chunks.count, gh*gw, D] in the
// accumulation dtype. grad_out has unit channel stride, at least one element and gh*gw >= 1 cells.
struct Pos2dAddBackward {
  at::Tensor grad_out;               // [B, N, D]
  pos2d_add_math::LeadingDims lead;  // its batch dim (none when B = 1)
  at::Tensor grad_h, grad_w;         // contiguous [max_h, D], [max_w, D], grad_out's dtype
  at::Tensor partials;
  pos2d_add_math::BatchChunks chunks;
  int64_t gh, gw, token_offset, row_offset, col_offset;
};

namespace cpu {
void pos2d_add_forward(const Pos2dAddForward& a);
void pos2d_add_backward(const Pos2dAddBackward& a);
}  // namespace cpu

namespace cuda {
void pos2d_add_forward(const Pos2dAddForward& a);
void pos2d_add_backward(const Pos2dAddBackward& a);
}  // namespace cuda

namespace detail {

// t ([..., N, D]) as the pos2d_add and pos2d_add_indexed kernels read it: unit channel stride and
// leading dims that LeadingDims can describe (merged into `lead`); else a contiguous copy.
at::Tensor kernel_layout(const at::Tensor& t, pos2d_add_math::LeadingDims& lead);

// The product of t's leading dims (all but the last two).
int64_t leading_count(const at::Tensor& t);

}  // namespace detail
}  // namespace jitrope

// Internals of jitrope::pos2d_add_indexed, shared by its host wrapper (ops/pos2d_add_indexed.cpp) and
// its launchers (cpu/pos2d_add_indexed_cpu.cpp, cuda/pos2d_add_indexed_cuda.cu). Not installed: the
// C++ API is ops/pos2d_add_indexed.h. The wrapper checks the arguments (index values included),
// lays x out with pos2d_add's kernel_layout (ops/pos2d_add_impl.h), allocates every output and
// handles the empty case; a launcher fills what it is given.
#pragma once

#include <ATen/core/Tensor.h>

#include "math/pos2d_add_indexed_math.h"
#include "math/pos2d_add_math.h"

namespace jitrope {

// out[b, n] = x[b, n] + pos_h[rows[n]] + pos_w[cols[n]] (-1 leaving a table out), b over the
// leading dims; x has at least one element.
struct Pos2dAddIndexedForward {
  at::Tensor x;                      // [..., N, D], kernel layout
  pos2d_add_math::LeadingDims lead;  // x's leading dims
  int64_t B;                         // the product of x's leading dims
  at::Tensor out;                    // contiguous, x's shape
  at::Tensor pos_h, pos_w;           // contiguous [max_h, D], [max_w, D]
  at::Tensor rows, cols;             // contiguous int64 [N], values checked
};

// grad_h, grad_w filled in the order of math/pos2d_add_indexed_math.h; partials is the stage-1
// scratch [chunks.count, N, D] in the accumulation dtype when B > 1 (undefined for B = 1). grad_out
// has at least one element and max_h + max_w >= 1.
struct Pos2dAddIndexedBackward {
  at::Tensor grad_out;               // [..., N, D], kernel layout
  pos2d_add_math::LeadingDims lead;  // its leading dims
  int64_t B;                         // the product of its leading dims
  at::Tensor rows, cols;             // contiguous int64 [N], values checked
  at::Tensor grad_h, grad_w;         // contiguous [max_h, D], [max_w, D]
  at::Tensor partials;
  pos2d_add_math::BatchChunks chunks;
};

namespace cpu {
void pos2d_add_indexed_forward(const Pos2dAddIndexedForward& a);
void pos2d_add_indexed_backward(const Pos2dAddIndexedBackward& a);
}  // namespace cpu

namespace cuda {
void pos2d_add_indexed_forward(const Pos2dAddIndexedForward& a);
void pos2d_add_indexed_backward(const Pos2dAddIndexedBackward& a);
}  // namespace cuda

}  // namespace jitrope

// Stage 1 of the pos2d_add and pos2d_add_indexed backward on the CPU (math/pos2d_add_math.h): the
// gradient rows of each token summed over fixed batch chunks, one copy for both ops.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>

#include "common/op_utils.h"
#include "math/pos2d_add_math.h"

namespace jitrope::cpu {

// acc[d] += src[d] in the compute type (float32 for float16/bfloat16 sources). A plain loop: GCC
// vectorizes it for float32, float64 and bfloat16 (widening is a shift) with the baseline ISA an
// extension is built for.
template <typename scalar_t, typename acc_t>
inline void accumulate_row(acc_t* __restrict__ acc, const scalar_t* __restrict__ src, int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    acc[d] += static_cast<acc_t>(src[d]);
  }
}

// partials[k][t][d] = sum of g[b, first_token + t, d] over the k-th batch chunk, b ascending, for
// the `tokens` tokens from first_token; row (b, n) of g starts at lead.offset(b) + n * token_stride
// (unit channel stride). One task per (chunk, token): the order of every sum is fixed by the
// shapes, whatever the thread count.
template <typename scalar_t>
void sum_batch_chunks(
    const scalar_t* g,
    const pos2d_add_math::LeadingDims& lead,
    int64_t token_stride,
    int64_t first_token,
    int64_t tokens,
    int64_t B,
    int64_t D,
    const pos2d_add_math::BatchChunks& chunks,
    acc_type<scalar_t>* partials) {
  using acc_t = acc_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(chunks.size * D, 1));
  at::parallel_for(0, chunks.count * tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / tokens;
      const int64_t t = task - k * tokens;
      acc_t* s = partials + task * D;
      std::fill(s, s + D, acc_t(0));
      const scalar_t* src = g + (first_token + t) * token_stride;
      const int64_t b_end = std::min(B, (k + 1) * chunks.size);
      for (int64_t b = k * chunks.size; b < b_end; ++b) {
        accumulate_row(s, src + lead.offset(b), D);
      }
    }
  });
}

}  // namespace jitrope::cpu

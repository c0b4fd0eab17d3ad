// Stage 1 of the pos2d_add and pos2d_add_indexed backward on the CPU (math/pos2d_add_math.h): the
// gradient rows of each token summed over fixed batch chunks, one copy for both ops.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>

#include "common/op_utils.h"
#include "cpu/isa.h"
#include "cpu/rows.h"
#include "math/pos2d_add_math.h"

namespace jitrope::cpu {

// acc[d] += src[d] in the compute type (float32 for float16/bfloat16 sources). A plain loop that
// GCC vectorizes for float32, float64 and bfloat16 (widening is a shift, cpu/rows.h).
template <typename scalar_t, typename acc_t>
inline void accumulate_row(acc_t* __restrict__ acc, const scalar_t* __restrict__ src, int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    acc[d] += to_acc<acc_t>(src[d]);
  }
}

// Tokens whose partial rows one task keeps (about kBlockBytes of accumulators, in L1/L2) while its
// chunk's batch rows stream through in memory order.
constexpr int64_t kBlockBytes = 32768;

// partials[k][t][d] = sum of g[b, first_token + t, d] over the k-th batch chunk, b ascending, for
// the `tokens` tokens from first_token; row (b, n) of g starts at lead.offset(b) + n * token_stride
// (unit channel stride). One task per (chunk, block of tokens), reading for each batch row of its
// chunk the block's token rows (contiguous for a contiguous g): the order of every sum is fixed by
// the shapes, whatever the thread count.
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
  const int64_t block = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, D * int64_t{sizeof(acc_t)}));
  const int64_t blocks = (tokens + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(chunks.size * block * D, 1));
  at::parallel_for(0, chunks.count * blocks, grain, [&](int64_t begin, int64_t end) {
    run_isa([&] {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k = task / blocks;
        const int64_t t0 = (task - k * blocks) * block, t1 = std::min(tokens, t0 + block);
        acc_t* s = partials + (k * tokens + t0) * D;
        std::fill(s, s + (t1 - t0) * D, acc_t(0));
        const int64_t b_end = std::min(B, (k + 1) * chunks.size);
        for (int64_t b = k * chunks.size; b < b_end; ++b) {
          const scalar_t* src = g + lead.offset(b) + (first_token + t0) * token_stride;
          for (int64_t t = 0; t < t1 - t0; ++t) {
            accumulate_row(s + t * D, src + t * token_stride, D);
          }
        }
      }
    });
  });
}

}  // namespace jitrope::cpu

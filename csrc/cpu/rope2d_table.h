// The cos/sin table of rope2d's CPU kernels, shared by every CPU kernel that rotates channel pairs
// (rope2d, qk_norm_rope): each token's angles are computed once per call and reused by every head
// (shared freqs) and every leading index.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "math/rope2d_math.h"

namespace jitrope::cpu {

constexpr int64_t kTableGrainElems = 32768;  // table entries per parallel task, at least

// cos/sin of every (group, token, pair): table[0] is cos, table[1] is sin (-sin when `inverse`, the
// rotation of the backward), each [Hf, N, D/2]. freqs is [F * Hf, 2, D/2]: token n of group g uses
// row index[n] * Hf + g (row g without an index). The angles come from the shared math; their sin
// and cos from ATen's vectorized (1-ulp) kernels: with per-head freqs the table has H * N * D/2
// entries and scalar libm calls would cost more than the rotation itself.
template <typename acc_t>
inline at::Tensor angle_table(
    const at::Tensor& coords,
    const at::Tensor& freqs,
    int64_t groups,
    int64_t n_tokens,
    int64_t half,
    bool inverse,
    const int64_t* index = nullptr) {
  auto phi = at::empty({groups, n_tokens, half}, coords.options());
  const acc_t* c = coords.const_data_ptr<acc_t>();
  const acc_t* f = freqs.const_data_ptr<acc_t>();
  acc_t* phi_p = phi.mutable_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, kTableGrainElems / std::max<int64_t>(1, half));
  at::parallel_for(0, groups * n_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t g = r / n_tokens, n = r % n_tokens;
      const int64_t row = (index != nullptr ? index[n] * groups : 0) + g;
      const acc_t* fy = f + (2 * row) * half;
      const acc_t* fx = fy + half;
      for (int64_t m = 0; m < half; ++m) {
        phi_p[r * half + m] = rope2d_math::angle(c[2 * n], c[2 * n + 1], fy[m], fx[m]);
      }
    }
  });
  auto table = at::empty({2, groups, n_tokens, half}, coords.options());
  auto cos_t = table.select(0, 0), sin_t = table.select(0, 1);
  at::cos_out(cos_t, phi);
  at::sin_out(sin_t, phi);
  if (inverse) {
    sin_t.neg_();
  }
  return table;
}

}  // namespace jitrope::cpu

// Per-element math of jitrope::qk_norm_rope (docs/ops.md), shared by the CPU and the CUDA kernels:
// the RMS statistic, the normalized and scaled channel, its gradient, and the chunking and order of
// the deterministic weight / freqs gradient reduction. The rotation, the angle and its gradient are
// rope2d's (math/rope2d_math.h), so both ops turn a pair by the same arithmetic.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <c10/macros/Macros.h>

#include "math/rope2d_math.h"

namespace jitrope::qk_norm_rope_math {

using rope2d_math::add_rn;
using rope2d_math::mul_rn;

// 1 / sqrt(sum_sq / D + eps), each step rounded once (no rsqrt approximation, no FMA), so that the
// CPU and the GPU turn the same sum into the same factor.
template <typename T>
C10_HOST_DEVICE inline T inv_rms(T sum_sq, int64_t D, T eps) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(sum_sq, static_cast<float>(D)), eps)));
  } else {
    return __ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(__ddiv_rn(sum_sq, static_cast<double>(D)), eps)));
  }
#else
  return T(1) / std::sqrt(sum_sq / static_cast<T>(D) + eps);
#endif
}

// y = (x * r) * w: RMSNorm of one channel in the accumulation type, as the published module
// computes it (normalize, then scale by the weight).
template <typename T>
C10_HOST_DEVICE inline T normalize(T x, T r, T w) {
  return mul_rn(mul_rn(x, r), w);
}

// Input gradient of one channel of RMSNorm: with xhat = x * r and gxhat = dL/dxhat = dL/dy * w,
// dL/dx = r * (gxhat - xhat * mean(gxhat * xhat)), mean over the D channels of the row.
template <typename T>
C10_HOST_DEVICE inline T norm_input_grad(T gxhat, T xhat, T r, T mean_dot) {
  return mul_rn(r, add_rn(gxhat, -mul_rn(xhat, mean_dot)));
}

// The backward reduction. The rows of one (s, h) plane of qk (s: q or k, h: head) are its B * N
// tokens (b, n), split into chunks of rows_per_chunk rows; each (s, h, chunk) writes one partial
// of the weight gradient (D values: sum over its rows of dL/dy * xhat) and, with learned freqs, one
// of the freqs gradient (2 * D/2 values: sum over its rows of y_n * dL/dphi and x_n * dL/dphi).
// Partials are laid out [2, H, chunks, D]. The chunking depends on the shapes only (never on thread
// or SM counts), and the partials are summed in the fixed order below, so every run gives the same
// bits.
inline int64_t rows_per_chunk(int64_t rows_per_plane) {
  constexpr int64_t kRows = 64;
  return rows_per_plane < kRows ? (rows_per_plane > 0 ? rows_per_plane : 1) : kRows;
}

inline int64_t chunk_count(int64_t rows_per_plane) {
  const int64_t r = rows_per_chunk(rows_per_plane);
  return (rows_per_plane + r - 1) / r;
}

// grad_weight[s][d]: heads outer, chunks inner, ascending.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sum_weight_partials(
    const acc_t* part, int64_t s, int64_t d, int64_t H, int64_t chunks, int64_t D) {
  acc_t sum = acc_t(0);
  for (int64_t h = 0; h < H; ++h) {
    const acc_t* p = part + ((s * H + h) * chunks) * D + d;
    for (int64_t k = 0; k < chunks; ++k) {
      sum += p[k * D];
    }
  }
  return sum;
}

// grad_freqs[g][e] (e = axis * D/2 + pair): q then k, then the heads of group g (all heads for
// shared freqs, head g for per-head freqs), chunks inner, ascending.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sum_freqs_partials(
    const acc_t* part, int64_t g, int64_t e, int64_t H, int64_t chunks, int64_t D, bool per_head) {
  acc_t sum = acc_t(0);
  const int64_t h0 = per_head ? g : 0, h1 = per_head ? g + 1 : H;
  for (int64_t s = 0; s < 2; ++s) {
    for (int64_t h = h0; h < h1; ++h) {
      const acc_t* p = part + ((s * H + h) * chunks) * D + e;
      for (int64_t k = 0; k < chunks; ++k) {
        sum += p[k * D];
      }
    }
  }
  return sum;
}

// With freqs_index (packed batches) the rows of a chunk are split further into runs: maximal stretches of
// consecutive rows whose tokens use one table. Each (s, h, chunk, run) writes its own freqs partial,
// laid out [2, H, chunks, runs, D] (runs = the most any chunk has), and run_table[chunk * runs + r]
// holds the table of run r (-1 past the chunk's last run). A chunk of one table is one run, so with
// a single table the partials and their sum below are those of the plain op, bit for bit.
// run_end: the row after the run that starts at row r0 (rows are b * N + n, the chunk ends at row1).
C10_HOST_DEVICE inline int64_t run_end(const int64_t* index, int64_t r0, int64_t row1, int64_t N) {
  const int64_t table = index[r0 % N];
  int64_t r = r0 + 1;
  while (r < row1 && index[r % N] == table) {
    ++r;
  }
  return r;
}

// grad_freqs[f][g][e]: sum_freqs_partials' order (q then k, heads of group g, chunks ascending) over
// the runs of table f, runs of a chunk ascending.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sum_indexed_freqs_partials(
    const acc_t* part,
    const int64_t* run_table,
    int64_t f,
    int64_t g,
    int64_t e,
    int64_t H,
    int64_t chunks,
    int64_t runs,
    int64_t D,
    bool per_head) {
  acc_t sum = acc_t(0);
  const int64_t h0 = per_head ? g : 0, h1 = per_head ? g + 1 : H;
  for (int64_t s = 0; s < 2; ++s) {
    for (int64_t h = h0; h < h1; ++h) {
      const acc_t* p = part + ((s * H + h) * chunks) * runs * D + e;
      for (int64_t k = 0; k < chunks; ++k) {
        for (int64_t r = 0; r < runs; ++r) {
          if (run_table[k * runs + r] == f) {
            sum += p[(k * runs + r) * D];
          }
        }
      }
    }
  }
  return sum;
}

}  // namespace jitrope::qk_norm_rope_math

// Per-element arithmetic of jitrope::pos2d_add_indexed (docs/ops.md), shared by the CPU and the CUDA
// kernels: the position sum of a token whose row and/or column may be -1, the offset of a leading
// index of x, and the order of every sum of the backward. Both devices therefore add the same
// numbers in the same order and give the same bits, and the CPU tests exercise what the GPU runs.
//
// Backward order. Every (table, token) pair with an index >= 0 is an entry: entries of pos_h are
// (rows[n], n), entries of pos_w are (max_h + cols[n], n), one combined table of max_h + max_w
// rows. A stable sort by table row lists each row's tokens in ascending n; each row's list is cut
// into segments of kSegment tokens (the last one shorter). Then
//   stage 1 (B > 1 only): partials[k][n][d] = sum of grad_out[b, n, d] over the k-th batch chunk
//     (pos2d_add_math::batch_chunks), b ascending;
//   stage 2: seg[s][d] = sum over chunks k (outer) and the segment's tokens n (inner, ascending)
//     of partials[k][n][d] (grad_out[0, n, d] itself when B = 1);
//   stage 3: grad[row][d] = sum of the row's segments in order, rounded once to the table dtype.
// Sums are in float32 (float64 for float64). The chunking depends on the shapes and the indices
// only, never on thread or SM counts.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "math/pos2d_add_math.h"

namespace jitrope::pos2d_add_indexed_math {

// Tokens per segment of a table row in the backward: long enough that a segment sum is a few
// coalesced loads per thread, short enough that a packed batch (B = 1, T up to 256k) has tens of
// thousands of segments to spread over a GPU.
constexpr int64_t kSegment = 64;

// Segments of a table row that `count` tokens use.
C10_HOST_DEVICE inline int64_t segments(int64_t count) {
  return (count + kSegment - 1) / kSegment;
}

// An upper bound of the segments of all rows, known from the shapes alone (the CUDA kernels size
// their buffer with it without reading the indices back): each row's last segment may be short,
// and a segment holds at least one of the `entries` entries.
inline int64_t max_segments(int64_t entries, int64_t table_rows) {
  const int64_t bound = (entries + table_rows * (kSegment - 1)) / kSegment;
  return bound < entries ? bound : entries;
}

// One element of token n, in the compute type; the caller rounds it once to x's dtype. With both
// tables the table sum comes first, as in pos2d_add (and jitrope.reference.pos2d_add_indexed_ref);
// with one table only that row is added; with none the caller copies x unchanged.
template <typename T>
C10_HOST_DEVICE inline T add_positions(const T& x, const T& ph, const T& pw) {
  return pos2d_add_math::add_position(x, ph, pw);
}

template <typename T>
C10_HOST_DEVICE inline T add_position(const T& x, const T& p) {
  return x + p;
}

// The leading dims of x ([..., N, D]): pos2d_add_math's, shared with pos2d_add.
using pos2d_add_math::kMaxLeadingDims;
using pos2d_add_math::LeadingDims;

// The table row of segment s: the last row r < rows whose first segment seg_begin[r] <= s (rows
// without tokens have no segments, so that row's segments are the ones holding s).
C10_HOST_DEVICE inline int64_t segment_row(const int64_t* seg_begin, int64_t rows, int64_t s) {
  int64_t lo = 0, hi = rows - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (seg_begin[mid] <= s) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Stage 2 for `width` adjacent channels: s[w] = sum over `chunks` chunks (k outer, chunk_stride
// apart) and the `count` tokens tokens[0..count) (inner, token_stride apart) of p[...][w], in the
// compute type acc_t. p is partials (acc_t) or grad_out (its own dtype, one chunk).
template <typename acc_t, typename src_t>
C10_HOST_DEVICE inline void sum_segment(
    acc_t* __restrict__ s,
    const src_t* __restrict__ p,
    int64_t width,
    int64_t chunks,
    int64_t chunk_stride,
    const int64_t* __restrict__ tokens,
    int64_t count,
    int64_t token_stride) {
  for (int64_t w = 0; w < width; ++w) {
    s[w] = acc_t(0);
  }
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < count; ++c) {
      const src_t* q = p + k * chunk_stride + tokens[c] * token_stride;
      for (int64_t w = 0; w < width; ++w) {
        s[w] += static_cast<acc_t>(q[w]);
      }
    }
  }
}

// Stage 3 for `width` adjacent channels: s[w] = sum of the `count` segment sums starting at seg,
// `step` apart, in order.
template <typename acc_t>
C10_HOST_DEVICE inline void sum_segments(
    acc_t* __restrict__ s, const acc_t* __restrict__ seg, int64_t width, int64_t count, int64_t step) {
  pos2d_add_math::sum_partials(s, seg, width, /*chunks=*/1, /*chunk_stride=*/0, count, step);
}

}  // namespace jitrope::pos2d_add_indexed_math

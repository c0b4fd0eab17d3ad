// Per-element arithmetic of jitrope::pos2d_add, shared by the CPU and the CUDA kernels (and by
// pos2d_add_indexed's): the position sum, the grid cell of a token, the offset of a leading index,
// and the batch chunking and summation order of the backward reduction. Both devices therefore run the same arithmetic
// in the same order and give the same bits, and the CPU tests exercise what the GPU runs.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace jitrope::pos2d_add_math {

// One element of a grid token, in the compute type; the caller rounds it once to x's dtype. The
// table sum comes first, as in jitrope.reference.pos2d_add_ref, so float32/float64 results match
// the reference bit for bit. T is a scalar or an at::vec::Vectorized of the compute type.
template <typename T>
C10_HOST_DEVICE inline T add_position(const T& x, const T& ph, const T& pw) {
  return x + (ph + pw);
}

// Table rows of token t: true when t is one of the grid's `cells` = gh*gw tokens starting at
// token_offset; then (row, col) is its grid row and column, row-major (before row/col offsets).
// Tested before dividing, so gw = 0 (an empty grid) never divides.
template <typename index_t>
C10_HOST_DEVICE inline bool grid_cell(
    index_t t, index_t token_offset, index_t cells, index_t gw, index_t& row, index_t& col) {
  if (t < token_offset || t - token_offset >= cells) {
    return false;
  }
  const index_t cell = t - token_offset;
  row = cell / gw;
  col = cell - row * gw;
  return true;
}

// The leading dims of a [..., N, D] tensor after merging the dims that step as one, outermost
// first: leading index b (row-major over the leading sizes) starts at offset(b) elements. pos2d_add's
// [B, N, D] has at most one; pos2d_add_indexed takes up to kMaxLeadingDims.
constexpr int kMaxLeadingDims = 4;

struct LeadingDims {
  int ndim = 0;
  int64_t size[kMaxLeadingDims] = {};
  int64_t stride[kMaxLeadingDims] = {};

  // The outermost dim takes what is left of b, so one merged dim (the common case) divides never.
  C10_HOST_DEVICE inline int64_t offset(int64_t b) const {
    int64_t off = 0;
    for (int i = ndim - 1; i > 0; --i) {
      const int64_t q = b / size[i];
      off += (b - q * size[i]) * stride[i];
      b = q;
    }
    return ndim > 0 ? off + b * stride[0] : off;
  }
};

// Backward reduction, stage 1: partials[k][cell][d] = sum of grad_out[b, token_offset + cell, d]
// over the k-th chunk of the batch, b ascending from 0. Stage 2: grad_pos_h[row_offset + i][d] =
// sum over k (outer) and j (inner, ascending) of partials[k][i*gw + j][d], grad_pos_w likewise
// over k and i. The chunking depends on the shapes only (never on thread or SM counts), so every
// run and both devices add in the same order. Chunks are sized so that stage 1 has about
// kTargetPartials independent sums (enough to fill a GPU) with at least kMinChunk rows each.
struct BatchChunks {
  int64_t size;   // batch rows per chunk (>= 1)
  int64_t count;  // number of chunks, ceil(B / size); 0 when B = 0
};

inline BatchChunks batch_chunks(int64_t batch, int64_t cell_elems) {
  constexpr int64_t kTargetPartials = int64_t{1} << 18;
  constexpr int64_t kMinChunk = 4;
  const int64_t per_chunk = cell_elems > 0 ? cell_elems : 1;
  const int64_t want_chunks = (kTargetPartials + per_chunk - 1) / per_chunk;
  int64_t size = (batch + want_chunks - 1) / want_chunks;
  size = size < kMinChunk ? kMinChunk : size;
  return {size, (batch + size - 1) / size};
}

// Stage 2 for `width` adjacent output elements (one per CUDA thread; a row of D on the CPU, where
// the innermost loop vectorizes): s[w] = sum over `chunks` chunks (stride chunk_stride) of `count`
// partials spaced `step` apart, in the order fixed above. `p` points at the first partial of s[0].
template <typename acc_t>
C10_HOST_DEVICE inline void sum_partials(
    acc_t* __restrict__ s,
    const acc_t* __restrict__ p,
    int64_t width,
    int64_t chunks,
    int64_t chunk_stride,
    int64_t count,
    int64_t step) {
  for (int64_t w = 0; w < width; ++w) {
    s[w] = acc_t(0);
  }
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < count; ++c) {
      const acc_t* q = p + k * chunk_stride + c * step;
      for (int64_t w = 0; w < width; ++w) {
        s[w] += q[w];
      }
    }
  }
}

}  // namespace jitrope::pos2d_add_math

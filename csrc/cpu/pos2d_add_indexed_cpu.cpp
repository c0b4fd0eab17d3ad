// CPU launchers of jitrope::pos2d_add_indexed (ops/pos2d_add_indexed_impl.h; the host wrapper is
// ops/pos2d_add_indexed.cpp). Layout: x and grad_out are read as rows of D channels through their
// (merged) leading strides and token stride (the wrapper copies a strided channel dim, or more than
// kMaxLeadingDims unmergeable leading dims, to contiguous first); tables and indices are
// contiguous; outputs are contiguous. Forward: at::parallel_for over (leading index, token)
// rows, each row one vectorized pass of x + (pos_h[r] + pos_w[c]), x + one table row, or a memcpy:
// the bytes of a copy of x plus cache-resident table rows. Backward: a stable counting sort lists
// each table row's tokens in ascending order, then the three stages of math/pos2d_add_indexed_math.h
// (batch chunks when B > 1, cpu/batch_chunks.h shared with pos2d_add; segments of kSegment tokens, per-row sums of the
// segments), each an at::parallel_for over independent sums; the order of every sum is fixed there, independent of the
// thread count, and the CUDA kernels add in the same order.
#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/op_utils.h"
#include "cpu/batch_chunks.h"
#include "cpu/isa.h"
#include "cpu/rows.h"
#include "math/pos2d_add_indexed_math.h"
#include "ops/pos2d_add_indexed_impl.h"

namespace jitrope::cpu {
namespace {

namespace math = pos2d_add_indexed_math;

// One row of the forward in the compute type, rounded once. Plain loops that GCC vectorizes (as in
// pos2d_add_cpu.cpp: baseline and AVX2 builds, cpu/isa.h); the case is picked once per row.
template <typename scalar_t>
void add_both(
    scalar_t* out, const scalar_t* x, const scalar_t* __restrict__ ph, const scalar_t* __restrict__ pw, int64_t D) {
  using acc = acc_type<scalar_t>;
  for (int64_t d = 0; d < D; ++d) {
    out[d] = from_acc<scalar_t>(math::add_positions(to_acc<acc>(x[d]), to_acc<acc>(ph[d]), to_acc<acc>(pw[d])));
  }
}

template <typename scalar_t>
void add_one(scalar_t* out, const scalar_t* x, const scalar_t* __restrict__ p, int64_t D) {
  using acc = acc_type<scalar_t>;
  for (int64_t d = 0; d < D; ++d) {
    out[d] = from_acc<scalar_t>(math::add_position(to_acc<acc>(x[d]), to_acc<acc>(p[d])));
  }
}

template <typename scalar_t>
void forward_kernel(const Pos2dAddIndexedForward& a) {
  const at::Tensor& x = a.x;
  const math::LeadingDims& lead = a.lead;
  const int64_t B = a.B, N = x.size(-2), D = x.size(-1);
  const int64_t x_st = x.stride(-2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = a.out.mutable_data_ptr<scalar_t>();
  const scalar_t* ph = a.pos_h.const_data_ptr<scalar_t>();
  const scalar_t* pw = a.pos_w.const_data_ptr<scalar_t>();
  const int64_t* r = a.rows.const_data_ptr<int64_t>();
  const int64_t* c = a.cols.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    run_isa([&] {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / N;
        const int64_t n = row - b * N;
        const scalar_t* src = xp + lead.offset(b) + n * x_st;
        scalar_t* dst = op + row * D;
        const int64_t i = r[n], j = c[n];
        if (i >= 0 && j >= 0) {
          add_both(dst, src, ph + i * D, pw + j * D, D);
        } else if (i >= 0) {
          add_one(dst, src, ph + i * D, D);
        } else if (j >= 0) {
          add_one(dst, src, pw + j * D, D);
        } else {
          std::memcpy(dst, src, D * sizeof(scalar_t));
        }
      }
    });
  });
}

// The entries of the combined table of max_h + max_w rows (pos_h's, then pos_w's) sorted stably by
// row: row q's tokens are tokens[start[q] : start[q + 1]], ascending. A counting sort, O(N + rows).
struct SortedTokens {
  std::vector<int64_t> start;   // [rows + 1]
  std::vector<int64_t> tokens;  // [entries]
};

SortedTokens sort_tokens(const at::Tensor& rows, const at::Tensor& cols, int64_t max_h, int64_t max_w) {
  const int64_t N = rows.numel(), R = max_h + max_w;
  const int64_t* r = rows.const_data_ptr<int64_t>();
  const int64_t* c = cols.const_data_ptr<int64_t>();
  SortedTokens s{std::vector<int64_t>(R + 1, 0), {}};
  for (int64_t n = 0; n < N; ++n) {
    s.start[r[n] + 1] += r[n] >= 0;
    s.start[max_h + c[n] + 1] += c[n] >= 0;
  }
  for (int64_t q = 0; q < R; ++q) {
    s.start[q + 1] += s.start[q];
  }
  s.tokens.resize(s.start[R]);
  std::vector<int64_t> next(s.start.begin(), s.start.end() - 1);
  for (int64_t n = 0; n < N; ++n) {
    if (r[n] >= 0) {
      s.tokens[next[r[n]]++] = n;
    }
    if (c[n] >= 0) {
      s.tokens[next[max_h + c[n]]++] = n;
    }
  }
  return s;
}

template <typename scalar_t>
void backward_kernel(const Pos2dAddIndexedBackward& a) {
  using acc = acc_type<scalar_t>;
  const at::Tensor& g = a.grad_out;
  const int64_t B = a.B, N = g.size(-2), D = g.size(-1), g_st = g.stride(-2);
  const int64_t max_h = a.grad_h.size(0), max_w = a.grad_w.size(0), R = max_h + max_w;
  const SortedTokens sorted = sort_tokens(a.rows, a.cols, max_h, max_w);
  const int64_t* tokens = sorted.tokens.data();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const pos2d_add_math::BatchChunks& chunks = a.chunks;

  // Stage 1 (B > 1): partials [chunks, N, D], one task per (chunk, token).
  if (B > 1) {
    sum_batch_chunks<scalar_t>(gp, a.lead, g_st, 0, N, B, D, chunks, a.partials.mutable_data_ptr<acc>());
  }

  // Stage 2: one task per segment of kSegment tokens of a row.
  std::vector<int64_t> seg_begin(R + 1, 0);
  for (int64_t q = 0; q < R; ++q) {
    seg_begin[q + 1] = seg_begin[q] + math::segments(sorted.start[q + 1] - sorted.start[q]);
  }
  const int64_t S = seg_begin[R];
  std::vector<acc> seg(S * D);
  const int64_t grain2 = std::max<int64_t>(
      1, at::internal::GRAIN_SIZE / std::max<int64_t>(math::kSegment * std::max<int64_t>(chunks.count, 1) * D, 1));
  at::parallel_for(0, S, grain2, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t q = math::segment_row(seg_begin.data(), R, s);
      const int64_t first = sorted.start[q] + (s - seg_begin[q]) * math::kSegment;
      const int64_t count = std::min(math::kSegment, sorted.start[q + 1] - first);
      if (B > 1) {
        math::sum_segment(
            seg.data() + s * D, a.partials.const_data_ptr<acc>(), D, chunks.count, N * D, tokens + first, count, D);
      } else {
        // B = 1: one chunk whose partials are grad_out's rows themselves.
        math::sum_segment(seg.data() + s * D, gp, D, 1, 0, tokens + first, count, g_st);
      }
    }
  });

  // Stage 3: one task per table row.
  scalar_t* out_h = a.grad_h.mutable_data_ptr<scalar_t>();
  scalar_t* out_w = a.grad_w.mutable_data_ptr<scalar_t>();
  const int64_t row_work = D * (S / std::max<int64_t>(R, 1) + 1);
  const int64_t grain3 = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(row_work, 1));
  at::parallel_for(0, R, grain3, [&](int64_t begin, int64_t end) {
    std::vector<acc> s(D);
    for (int64_t q = begin; q < end; ++q) {
      scalar_t* out = q < max_h ? out_h + q * D : out_w + (q - max_h) * D;
      math::sum_segments(s.data(), seg.data() + seg_begin[q] * D, D, seg_begin[q + 1] - seg_begin[q], D);
      for (int64_t d = 0; d < D; ++d) {
        out[d] = from_acc<scalar_t>(s[d]);
      }
    }
  });
}

}  // namespace

void pos2d_add_indexed_forward(const Pos2dAddIndexedForward& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x.scalar_type(), "pos2d_add_indexed_cpu", [&] { forward_kernel<scalar_t>(a); });
}

void pos2d_add_indexed_backward(const Pos2dAddIndexedBackward& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.grad_out.scalar_type(), "pos2d_add_indexed_backward_cpu",
      [&] { backward_kernel<scalar_t>(a); });
}

}  // namespace jitrope::cpu

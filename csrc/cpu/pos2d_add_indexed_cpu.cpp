// CPU launchers of jitrope::pos2d_add_indexed (ops/pos2d_add_indexed_impl.h; the host wrapper is
// ops/pos2d_add_indexed.cpp). Layout: x and grad_out are read as rows of D channels through their
// (merged) leading strides and token stride (the wrapper copies a strided channel dim, or more than
// kMaxLeadingDims unmergeable leading dims, to contiguous first); tables and indices are
// contiguous; outputs are contiguous. Forward: at::parallel_for over (leading index, token)
// rows, each row one vectorized pass of x + (pos_h[r] + pos_w[c]), x + one table row, or a plain copy:
// the bytes of a copy of x plus cache-resident table rows. Backward: the three stages of
// math/pos2d_add_indexed_math.h (batch chunks when B > 1, cpu/batch_chunks.h shared with pos2d_add;
// segments of kSegment tokens of each table row, filled in one pass over the tokens that reads each
// gradient row once for both tables; per-row sums of the segments), each an at::parallel_for over
// independent sums; the order of every sum is fixed there, independent of the thread count, and
// the CUDA kernels add in the same order.
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
// pos2d_add_cpu.cpp: baseline and AVX2 builds, cpu/isa.h); the case is picked once per row. The
// table rows are in the compute type already (forward_kernel converts the tables once).
template <typename scalar_t, typename acc = acc_type<scalar_t>>
void add_both(scalar_t* out, const scalar_t* x, const acc* __restrict__ ph, const acc* __restrict__ pw, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    out[d] = from_acc<scalar_t>(math::add_positions(to_acc<acc>(x[d]), to_acc<acc>(ph[d]), to_acc<acc>(pw[d])));
  }
}

template <typename scalar_t, typename acc = acc_type<scalar_t>>
void add_one(scalar_t* out, const scalar_t* x, const acc* __restrict__ p, int64_t D) {
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
  // bfloat16 / float16 tables converted once to the compute type (a few rows, read for every
  // token): the rows then convert only x, and the sums are the same.
  using acc = acc_type<scalar_t>;
  const at::Tensor ph_acc = a.pos_h.to(acc_dtype(a.x.scalar_type()));
  const at::Tensor pw_acc = a.pos_w.to(acc_dtype(a.x.scalar_type()));
  const acc* ph = ph_acc.const_data_ptr<acc>();
  const acc* pw = pw_acc.const_data_ptr<acc>();
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
          copy_bytes(dst, src, D * sizeof(scalar_t));
        }
      }
    });
  });
}

// Where each entry of the backward goes (math/pos2d_add_indexed_math.h): the combined table of
// max_h + max_w rows (pos_h's, then pos_w's), each row's tokens in ascending order cut into
// segments of kSegment; row q's segments are seg_begin[q] .. seg_begin[q + 1), and token n's entry
// of pos_h lies in segment seg_of[2 n], its entry of pos_w in seg_of[2 n + 1] (-1: no entry).
// O(N + rows).
struct EntrySegments {
  std::vector<int64_t> seg_begin;  // [rows + 1]
  std::vector<int64_t> seg_of;     // [2 N]
};

EntrySegments entry_segments(const at::Tensor& rows, const at::Tensor& cols, int64_t max_h, int64_t max_w) {
  const int64_t N = rows.numel(), R = max_h + max_w;
  const int64_t* r = rows.const_data_ptr<int64_t>();
  const int64_t* c = cols.const_data_ptr<int64_t>();
  // The combined row of token n's entry in table t (0: pos_h, 1: pos_w), or -1.
  auto row_of = [&](int64_t n, int t) { return t == 0 ? r[n] : (c[n] >= 0 ? max_h + c[n] : -1); };
  std::vector<int64_t> count(R, 0);
  for (int64_t n = 0; n < N; ++n) {
    for (int t = 0; t < 2; ++t) {
      const int64_t q = row_of(n, t);
      if (q >= 0) {
        ++count[q];
      }
    }
  }
  EntrySegments e{std::vector<int64_t>(R + 1, 0), std::vector<int64_t>(2 * N, -1)};
  for (int64_t q = 0; q < R; ++q) {
    e.seg_begin[q + 1] = e.seg_begin[q] + math::segments(count[q]);
  }
  std::fill(count.begin(), count.end(), 0);  // now: the entries of each row seen so far
  for (int64_t n = 0; n < N; ++n) {
    for (int t = 0; t < 2; ++t) {
      const int64_t q = row_of(n, t);
      if (q >= 0) {
        e.seg_of[2 * n + t] = e.seg_begin[q] + count[q]++ / math::kSegment;
      }
    }
  }
  return e;
}

template <typename scalar_t>
void backward_kernel(const Pos2dAddIndexedBackward& a) {
  using acc = acc_type<scalar_t>;
  const at::Tensor& g = a.grad_out;
  const int64_t B = a.B, N = g.size(-2), D = g.size(-1), g_st = g.stride(-2);
  const int64_t max_h = a.grad_h.size(0), max_w = a.grad_w.size(0), R = max_h + max_w;
  const EntrySegments e = entry_segments(a.rows, a.cols, max_h, max_w);
  const int64_t* seg_of = e.seg_of.data();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const pos2d_add_math::BatchChunks& chunks = a.chunks;

  // Stage 1 (B > 1): partials [chunks, N, D], one task per (chunk, token).
  if (B > 1) {
    sum_batch_chunks<scalar_t>(gp, a.lead, g_st, 0, N, B, D, chunks, a.partials.mutable_data_ptr<acc>());
  }

  // Stage 2 in one pass over the tokens: token n's row (of stage 1's partials, or of grad_out when
  // B = 1) is added to the segment of its pos_h entry and to that of its pos_w entry, chunks outer
  // and tokens ascending inside, which is the order of math::sum_segment (each segment starts at
  // zero and takes its tokens in ascending order), so the sums have its bits; the rows are read once
  // and in memory order, not once per table in each table row's order. Tasks are slices of
  // channels, whose sums are independent, so every thread reads its slice of every row.
  const int64_t S = e.seg_begin[R];
  std::vector<acc> seg(S * D, acc(0));
  const int64_t passes = B > 1 ? chunks.count : 1;
  const int64_t grain2 = std::max<int64_t>(16, at::internal::GRAIN_SIZE / std::max<int64_t>(passes * N, 1));
  at::parallel_for(0, D, grain2, [&](int64_t d0, int64_t d1) {
    run_isa([&] {
      auto add_rows = [&](const auto* src, int64_t chunk_stride, int64_t token_stride) {
        for (int64_t k = 0; k < passes; ++k) {
          for (int64_t n = 0; n < N; ++n) {
            const auto* q = src + k * chunk_stride + n * token_stride + d0;
            for (int t = 0; t < 2; ++t) {
              if (seg_of[2 * n + t] >= 0) {
                accumulate_row(seg.data() + seg_of[2 * n + t] * D + d0, q, d1 - d0);
              }
            }
          }
        }
      };
      if (B > 1) {
        add_rows(a.partials.const_data_ptr<acc>(), N * D, D);
      } else {
        add_rows(gp, 0, g_st);
      }
    });
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
      math::sum_segments(s.data(), seg.data() + e.seg_begin[q] * D, D, e.seg_begin[q + 1] - e.seg_begin[q], D);
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

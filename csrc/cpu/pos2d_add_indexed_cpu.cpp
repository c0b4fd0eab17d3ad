// CPU kernels of jitrope::pos2d_add_indexed. Layout: x and grad_out are read as rows of D channels
// through their (merged) leading strides and token stride (only a strided channel dim, or more than
// kMaxLeadingDims unmergeable leading dims, is copied to contiguous first); tables and indices are
// made contiguous; outputs are contiguous. Forward: at::parallel_for over (leading index, token)
// rows, each row one vectorized pass of x + (pos_h[r] + pos_w[c]), x + one table row, or a memcpy:
// the bytes of a copy of x plus cache-resident table rows. Backward: a stable counting sort lists
// each table row's tokens in ascending order, then the three stages of math/pos2d_add_indexed_math.h
// (batch chunks when B > 1, segments of kSegment tokens, per-row sums of the segments), each an
// at::parallel_for over independent sums; the order of every sum is fixed there, independent of
// the thread count, and the CUDA kernels add in the same order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/op_utils.h"
#include "math/pos2d_add_indexed_math.h"
#include "ops/pos2d_add_indexed.h"
#include "ops/pos2d_add_indexed_impl.h"

namespace jitrope {
namespace {

namespace math = pos2d_add_indexed_math;

// The kernels need unit channel stride and leading dims that LeadingDims can describe.
at::Tensor kernel_layout(const at::Tensor& t, math::LeadingDims& lead) {
  const bool unit_channels = t.size(-1) <= 1 || t.stride(-1) == 1;
  if (unit_channels && detail::leading_dims(t, lead)) {
    return t;
  }
  at::Tensor c = t.contiguous();
  TORCH_INTERNAL_ASSERT(detail::leading_dims(c, lead));
  return c;
}

int64_t leading_count(const at::Tensor& t) {
  int64_t B = 1;
  for (int64_t d = 0; d < t.dim() - 2; ++d) {
    B *= t.size(d);
  }
  return B;
}

// One row of the forward in the compute type, rounded once. Plain loops that GCC vectorizes (as in
// pos2d_add_cpu.cpp); the case is picked once per row.
template <typename scalar_t>
void add_both(
    scalar_t* out, const scalar_t* x, const scalar_t* __restrict__ ph, const scalar_t* __restrict__ pw, int64_t D) {
  using acc = acc_type<scalar_t>;
  for (int64_t d = 0; d < D; ++d) {
    out[d] = static_cast<scalar_t>(
        math::add_positions(static_cast<acc>(x[d]), static_cast<acc>(ph[d]), static_cast<acc>(pw[d])));
  }
}

template <typename scalar_t>
void add_one(scalar_t* out, const scalar_t* x, const scalar_t* __restrict__ p, int64_t D) {
  using acc = acc_type<scalar_t>;
  for (int64_t d = 0; d < D; ++d) {
    out[d] = static_cast<scalar_t>(math::add_position(static_cast<acc>(x[d]), static_cast<acc>(p[d])));
  }
}

template <typename scalar_t>
void forward_kernel(
    const at::Tensor& x,
    const math::LeadingDims& lead,
    at::Tensor& out,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    const at::Tensor& rows,
    const at::Tensor& cols) {
  const int64_t B = leading_count(x), N = x.size(-2), D = x.size(-1);
  const int64_t x_st = x.stride(-2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const scalar_t* ph = pos_h.const_data_ptr<scalar_t>();
  const scalar_t* pw = pos_w.const_data_ptr<scalar_t>();
  const int64_t* r = rows.const_data_ptr<int64_t>();
  const int64_t* c = cols.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
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
}

at::Tensor pos2d_add_indexed_cpu(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    const at::Tensor& rows,
    const at::Tensor& cols) {
  check_pos2d_add_indexed_args(x, pos_h, pos_w, rows, cols);
  math::LeadingDims lead;
  const at::Tensor xr = kernel_layout(x, lead);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const at::Tensor ph = pos_h.contiguous(), pw = pos_w.contiguous();
  const at::Tensor r = rows.contiguous(), c = cols.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pos2d_add_indexed_cpu", [&] {
    forward_kernel<scalar_t>(xr, lead, out, ph, pw, r, c);
  });
  return out;
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
void backward_kernel(
    const at::Tensor& g,
    const math::LeadingDims& lead,
    const at::Tensor& rows,
    const at::Tensor& cols,
    at::Tensor& grad_h,
    at::Tensor& grad_w) {
  using acc = acc_type<scalar_t>;
  const int64_t B = leading_count(g), N = g.size(-2), D = g.size(-1), g_st = g.stride(-2);
  const int64_t max_h = grad_h.size(0), max_w = grad_w.size(0), R = max_h + max_w;
  const SortedTokens sorted = sort_tokens(rows, cols, max_h, max_w);
  const int64_t* tokens = sorted.tokens.data();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();

  // Stage 1 (B > 1): partials [chunks, N, D], one task per (chunk, token).
  const pos2d_add_math::BatchChunks chunks = pos2d_add_math::batch_chunks(B, N * D);
  at::Tensor partials_t;
  if (B > 1) {
    partials_t = at::empty({chunks.count, N, D}, g.options().dtype(c10::CppTypeToScalarType<acc>::value));
    acc* partials = partials_t.mutable_data_ptr<acc>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(chunks.size * D, 1));
    at::parallel_for(0, chunks.count * N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k = task / N, n = task - k * N;
        acc* s = partials + task * D;
        std::fill(s, s + D, acc(0));
        const int64_t b_end = std::min(B, (k + 1) * chunks.size);
        for (int64_t b = k * chunks.size; b < b_end; ++b) {
          const scalar_t* src = gp + lead.offset(b) + n * g_st;
          for (int64_t d = 0; d < D; ++d) {
            s[d] += static_cast<acc>(src[d]);
          }
        }
      }
    });
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
            seg.data() + s * D, partials_t.const_data_ptr<acc>(), D, chunks.count, N * D, tokens + first, count, D);
      } else {
        // B = 1: one chunk whose partials are grad_out's rows themselves; B = 0: no chunk, zeros.
        math::sum_segment(seg.data() + s * D, gp, D, B, 0, tokens + first, count, g_st);
      }
    }
  });

  // Stage 3: one task per table row.
  scalar_t* out_h = grad_h.mutable_data_ptr<scalar_t>();
  scalar_t* out_w = grad_w.mutable_data_ptr<scalar_t>();
  const int64_t row_work = D * (S / std::max<int64_t>(R, 1) + 1);
  const int64_t grain3 = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(row_work, 1));
  at::parallel_for(0, R, grain3, [&](int64_t begin, int64_t end) {
    std::vector<acc> s(D);
    for (int64_t q = begin; q < end; ++q) {
      scalar_t* out = q < max_h ? out_h + q * D : out_w + (q - max_h) * D;
      math::sum_segments(s.data(), seg.data() + seg_begin[q] * D, D, seg_begin[q + 1] - seg_begin[q], D);
      for (int64_t d = 0; d < D; ++d) {
        out[d] = static_cast<scalar_t>(s[d]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_indexed_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols, int64_t max_h, int64_t max_w) {
  check_pos2d_add_indexed_backward_args(grad_out, rows, cols, max_h, max_w);
  math::LeadingDims lead;
  const at::Tensor g = kernel_layout(grad_out, lead);
  const int64_t D = g.size(-1);
  at::Tensor grad_h = at::empty({max_h, D}, g.options());
  at::Tensor grad_w = at::empty({max_w, D}, g.options());
  const at::Tensor r = rows.contiguous(), c = cols.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pos2d_add_indexed_backward_cpu", [&] {
    backward_kernel<scalar_t>(g, lead, r, c, grad_h, grad_w);
  });
  return {grad_h, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(jitrope, CPU, m) {
  m.impl("pos2d_add_indexed", &pos2d_add_indexed_cpu);
  m.impl("pos2d_add_indexed_backward", &pos2d_add_indexed_backward_cpu);
}

}  // namespace jitrope

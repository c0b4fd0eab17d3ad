// CPU kernels of jitrope::pos2d_add. Layout: x and grad_out are read row by row ((b, t) rows of D
// channels through their batch and token strides; only a strided channel dim is copied to
// contiguous first), the tables are made contiguous, outputs are contiguous. Forward: at::parallel_for
// over rows, each row one vectorized pass x + (pos_h[row] + pos_w[col]) or a memcpy, so it moves
// the bytes of a copy of x plus the (cache-resident) table rows; the in-place twin visits only
// the grid's rows. Backward: stage 1 sums grad_out over fixed batch chunks, one task per
// (chunk, grid cell), into float32 (float64 for float64) partials [chunks, gh*gw, D] (one read of the grid's part of
// grad_out); stage 2 sums the partials per table row, one task per output row. The order of every
// sum is fixed by math/pos2d_add_math.h, independent of the thread count, and the CUDA kernels use
// the same order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/op_utils.h"
#include "math/pos2d_add_math.h"
#include "ops/pos2d_add_impl.h"

namespace jitrope {
namespace {

// Rows are addressed through the batch and token strides; the kernels need unit channel stride.
at::Tensor with_unit_channel_stride(const at::Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) ? t : t.contiguous();
}

template <typename scalar_t>
struct RowsArgs {
  const scalar_t* x;
  int64_t x_sb, x_st;
  scalar_t* out;
  int64_t out_sb, out_st;
  const scalar_t* pos_h;  // contiguous [max_h, D]
  const scalar_t* pos_w;  // contiguous [max_w, D]
  int64_t B, D;
  int64_t t_begin, t_end;  // the token range visited
  int64_t token_offset, cells, gw, row_offset, col_offset;
};

// out[d] = x[d] + (ph[d] + pw[d]) in the compute type, rounded once. A plain loop: GCC vectorizes
// it for float32, float64 and bfloat16 (widening is a shift) with the baseline ISA an extension is
// built for, where at::vec's generic reduced-type conversions are scalar calls.
template <typename scalar_t>
void add_position_row(
    scalar_t* out, const scalar_t* x, const scalar_t* __restrict__ ph, const scalar_t* __restrict__ pw, int64_t D) {
  using acc = acc_type<scalar_t>;
  for (int64_t d = 0; d < D; ++d) {
    out[d] = static_cast<scalar_t>(
        pos2d_add_math::add_position(static_cast<acc>(x[d]), static_cast<acc>(ph[d]), static_cast<acc>(pw[d])));
  }
}

template <typename scalar_t>
void forward_rows(const RowsArgs<scalar_t>& a) {
  const int64_t tokens = a.t_end - a.t_begin;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(a.D, 1));
  at::parallel_for(0, a.B * tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / tokens;
      const int64_t t = a.t_begin + (r - b * tokens);
      const scalar_t* x = a.x + b * a.x_sb + t * a.x_st;
      scalar_t* out = a.out + b * a.out_sb + t * a.out_st;
      int64_t i = 0, j = 0;
      if (pos2d_add_math::grid_cell<int64_t>(t, a.token_offset, a.cells, a.gw, i, j)) {
        add_position_row(out, x, a.pos_h + (a.row_offset + i) * a.D, a.pos_w + (a.col_offset + j) * a.D, a.D);
      } else if (out != x) {
        std::memcpy(out, x, a.D * sizeof(scalar_t));
      }
    }
  });
}

at::Tensor& launch_forward(
    const at::Tensor& x,
    at::Tensor& out,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset,
    bool grid_rows_only) {
  const at::Tensor ph = pos_h.contiguous();
  const at::Tensor pw = pos_w.contiguous();
  const int64_t cells = grid[0] * grid[1];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pos2d_add_cpu", [&] {
    RowsArgs<scalar_t> a{
        x.const_data_ptr<scalar_t>(),
        x.stride(0),
        x.stride(1),
        out.data_ptr<scalar_t>(),
        out.stride(0),
        out.stride(1),
        ph.const_data_ptr<scalar_t>(),
        pw.const_data_ptr<scalar_t>(),
        x.size(0),
        x.size(2),
        grid_rows_only ? token_offset : 0,
        grid_rows_only ? token_offset + cells : x.size(1),
        token_offset,
        cells,
        grid[1],
        row_offset,
        col_offset};
    forward_rows(a);
  });
  return out;
}

at::Tensor pos2d_add_cpu(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  check_pos2d_add_args(x, pos_h, pos_w, grid, token_offset, row_offset, col_offset, /*inplace=*/false);
  const at::Tensor xr = with_unit_channel_stride(x);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  return launch_forward(xr, out, pos_h, pos_w, grid, token_offset, row_offset, col_offset, false);
}

at::Tensor& pos2d_add__cpu(
    at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  check_pos2d_add_args(x, pos_h, pos_w, grid, token_offset, row_offset, col_offset, /*inplace=*/true);
  if (x.size(2) <= 1 || x.stride(2) == 1) {
    launch_forward(x, x, pos_h, pos_w, grid, token_offset, row_offset, col_offset, true);
  } else {
    at::Tensor xc = x.contiguous();
    launch_forward(xc, xc, pos_h, pos_w, grid, token_offset, row_offset, col_offset, true);
    x.copy_(xc);
  }
  return x;
}

// acc[d] += src[d] in the compute type (float32 for float16/bfloat16 sources); vectorized by the
// compiler like add_position_row.
template <typename scalar_t, typename acc_type>
void accumulate(acc_type* __restrict__ acc, const scalar_t* __restrict__ src, int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    acc[d] += static_cast<acc_type>(src[d]);
  }
}

// Stage 1: partials[k][cell][d] = sum of grad_out[b, token_offset + cell, d] over batch chunk k, b
// ascending; one task per (chunk, cell).
template <typename scalar_t>
void sum_batch_chunks(
    const at::Tensor& g,
    int64_t token_offset,
    int64_t cells,
    const pos2d_add_math::BatchChunks& chunks,
    acc_type<scalar_t>* partials) {
  using acc = acc_type<scalar_t>;
  const int64_t B = g.size(0), D = g.size(2);
  const int64_t g_sb = g.stride(0), g_st = g.stride(1);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(chunks.size * D, 1));
  at::parallel_for(0, chunks.count * cells, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / cells;
      const int64_t cell = task - k * cells;
      acc* s = partials + task * D;
      std::fill(s, s + D, acc(0));
      const scalar_t* src = gp + (token_offset + cell) * g_st;
      const int64_t b_end = std::min(B, (k + 1) * chunks.size);
      for (int64_t b = k * chunks.size; b < b_end; ++b) {
        accumulate(s, src + b * g_sb, D);
      }
    }
  });
}

// Stage 2: each table row of grad_h then grad_w sums its cells' partials (zero for rows the grid
// does not use); one task per output row.
template <typename scalar_t>
void sum_table_rows(
    const acc_type<scalar_t>* partials,
    int64_t chunk_count,
    int64_t gh,
    int64_t gw,
    int64_t row_offset,
    int64_t col_offset,
    at::Tensor& grad_h,
    at::Tensor& grad_w) {
  using acc = acc_type<scalar_t>;
  const int64_t D = grad_h.size(1), cells = gh * gw;
  const int64_t max_h = grad_h.size(0), max_w = grad_w.size(0);
  scalar_t* out_h = grad_h.data_ptr<scalar_t>();
  scalar_t* out_w = grad_w.data_ptr<scalar_t>();
  const int64_t work = std::max<int64_t>(chunk_count * std::max(gh, gw) * D, D);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work, 1));
  at::parallel_for(0, max_h + max_w, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc> s(D);
    for (int64_t r = begin; r < end; ++r) {
      const bool is_h = r < max_h;
      scalar_t* out = is_h ? out_h + r * D : out_w + (r - max_h) * D;
      // Grid row i sums cells i*gw + j over j; grid column j sums cells i*gw + j over i.
      const int64_t line = is_h ? r - row_offset : r - max_h - col_offset;
      const int64_t lines = is_h ? gh : gw;
      if (line < 0 || line >= lines) {
        std::fill(out, out + D, scalar_t(0));
        continue;
      }
      const int64_t count = is_h ? gw : gh;
      const int64_t first = is_h ? line * gw : line;
      const int64_t step = is_h ? 1 : gw;
      pos2d_add_math::sum_partials(s.data(), partials + first * D, D, chunk_count, cells * D, count, step * D);
      for (int64_t d = 0; d < D; ++d) {
        out[d] = static_cast<scalar_t>(s[d]);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(
    const at::Tensor& g,
    at::Tensor& grad_h,
    at::Tensor& grad_w,
    int64_t gh,
    int64_t gw,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  using acc = acc_type<scalar_t>;
  const int64_t B = g.size(0), D = g.size(2);
  const int64_t cells = gh * gw;
  const pos2d_add_math::BatchChunks chunks = pos2d_add_math::batch_chunks(B, cells * D);
  at::Tensor partials = at::empty({chunks.count, cells, D}, g.options().dtype(c10::CppTypeToScalarType<acc>::value));
  sum_batch_chunks<scalar_t>(g, token_offset, cells, chunks, partials.data_ptr<acc>());
  sum_table_rows<scalar_t>(
      partials.const_data_ptr<acc>(), chunks.count, gh, gw, row_offset, col_offset, grad_h, grad_w);
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_backward_cpu(
    const at::Tensor& grad_out,
    at::IntArrayRef grid,
    int64_t max_h,
    int64_t max_w,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  check_pos2d_add_backward_args(grad_out, grid, max_h, max_w, token_offset, row_offset, col_offset);
  const at::Tensor g = with_unit_channel_stride(grad_out);
  const int64_t D = g.size(2);
  at::Tensor grad_h = at::empty({max_h, D}, g.options());
  at::Tensor grad_w = at::empty({max_w, D}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pos2d_add_backward_cpu", [&] {
    backward_kernel<scalar_t>(g, grad_h, grad_w, grid[0], grid[1], token_offset, row_offset, col_offset);
  });
  return {grad_h, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(jitrope, CPU, m) {
  m.impl("pos2d_add", &pos2d_add_cpu);
  m.impl("pos2d_add_", &pos2d_add__cpu);
  m.impl("pos2d_add_backward", &pos2d_add_backward_cpu);
}

}  // namespace jitrope

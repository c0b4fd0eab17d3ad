// CPU launchers of jitrope::pos2d_add (ops/pos2d_add_impl.h; the host wrapper is ops/pos2d_add.cpp).
// Layout: x and grad_out are read row by row ((b, t) rows of D channels through their batch and
// token strides, unit channel stride), the tables are contiguous, outputs are contiguous. Forward:
// at::parallel_for over rows, each row one vectorized pass x + (pos_h[row] + pos_w[col]) or a
// plain copy, so it moves the bytes of a copy of x plus the (cache-resident) table rows; the in-place
// twin visits only the grid's rows. Backward: stage 1 sums grad_out over fixed batch chunks, one
// task per (chunk, grid cell), into float32 (float64 for float64) partials [chunks, gh*gw, D] (one
// read of the grid's part of grad_out; cpu/batch_chunks.h, shared with pos2d_add_indexed); stage 2
// sums the partials per table row, one task per output row. The order of every sum is fixed by
// math/pos2d_add_math.h, independent of the thread count, and the CUDA kernels use the same order.
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
#include "math/pos2d_add_math.h"
#include "ops/pos2d_add_impl.h"

namespace jitrope::cpu {
namespace {

// out[d] = x[d] + (ph[d] + pw[d]) in the compute type, rounded once. A plain loop that GCC
// vectorizes for float32, float64 and bfloat16 (cpu/rows.h's conversions, branch-free), in the
// baseline and the AVX2 build (cpu/isa.h), where at::vec's generic reduced-type conversions are
// scalar calls. The table rows are in the compute type already (forward_rows converts the tables
// once).
template <typename scalar_t, typename acc = acc_type<scalar_t>>
void add_position_row(
    scalar_t* out, const scalar_t* x, const acc* __restrict__ ph, const acc* __restrict__ pw, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    out[d] =
        from_acc<scalar_t>(pos2d_add_math::add_position(to_acc<acc>(x[d]), to_acc<acc>(ph[d]), to_acc<acc>(pw[d])));
  }
}

template <typename scalar_t>
void forward_rows(const Pos2dAddForward& a) {
  const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
  scalar_t* op = a.out.mutable_data_ptr<scalar_t>();
  // bfloat16 / float16 tables converted once to the compute type (they are a few rows, read for
  // every token): the rows then convert only x, and the sums are the same.
  using acc = acc_type<scalar_t>;
  const at::Tensor ph_acc = a.pos_h.to(acc_dtype(a.x.scalar_type()));
  const at::Tensor pw_acc = a.pos_w.to(acc_dtype(a.x.scalar_type()));
  const acc* ph = ph_acc.const_data_ptr<acc>();
  const acc* pw = pw_acc.const_data_ptr<acc>();
  const int64_t x_sb = a.x.stride(0), x_st = a.x.stride(1), out_sb = a.out.stride(0), out_st = a.out.stride(1);
  const int64_t D = a.x.size(2), cells = a.gh * a.gw;
  // The token range visited: the grid's tokens for the in-place twin, else every token.
  const int64_t t_begin = a.grid_rows_only ? a.token_offset : 0;
  const int64_t tokens = a.grid_rows_only ? cells : a.x.size(1);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1));
  at::parallel_for(0, a.x.size(0) * tokens, grain, [&](int64_t begin, int64_t end) {
    run_isa([&] {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / tokens;
        const int64_t t = t_begin + (r - b * tokens);
        const scalar_t* x = xp + b * x_sb + t * x_st;
        scalar_t* out = op + b * out_sb + t * out_st;
        int64_t i = 0, j = 0;
        if (pos2d_add_math::grid_cell<int64_t>(t, a.token_offset, cells, a.gw, i, j)) {
          add_position_row(out, x, ph + (a.row_offset + i) * D, pw + (a.col_offset + j) * D, D);
        } else if (out != x) {
          copy_bytes(out, x, D * sizeof(scalar_t));
        }
      }
    });
  });
}

// Stage 2: each table row of grad_h then grad_w sums its cells' partials (zero for rows the grid
// does not use); one task per output row.
template <typename scalar_t>
void sum_table_rows(const Pos2dAddBackward& a) {
  using acc = acc_type<scalar_t>;
  const int64_t D = a.grad_h.size(1), gh = a.gh, gw = a.gw, cells = gh * gw;
  const int64_t max_h = a.grad_h.size(0), max_w = a.grad_w.size(0);
  const acc* partials = a.partials.const_data_ptr<acc>();
  scalar_t* out_h = a.grad_h.mutable_data_ptr<scalar_t>();
  scalar_t* out_w = a.grad_w.mutable_data_ptr<scalar_t>();
  const int64_t work = std::max<int64_t>(a.chunks.count * std::max(gh, gw) * D, D);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work, 1));
  at::parallel_for(0, max_h + max_w, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc> s(D);
    for (int64_t r = begin; r < end; ++r) {
      const bool is_h = r < max_h;
      scalar_t* out = is_h ? out_h + r * D : out_w + (r - max_h) * D;
      // Grid row i sums cells i*gw + j over j; grid column j sums cells i*gw + j over i.
      const int64_t line = is_h ? r - a.row_offset : r - max_h - a.col_offset;
      const int64_t lines = is_h ? gh : gw;
      if (line < 0 || line >= lines) {
        std::fill(out, out + D, scalar_t(0));
        continue;
      }
      const int64_t count = is_h ? gw : gh;
      const int64_t first = is_h ? line * gw : line;
      const int64_t step = is_h ? 1 : gw;
      pos2d_add_math::sum_partials(s.data(), partials + first * D, D, a.chunks.count, cells * D, count, step * D);
      for (int64_t d = 0; d < D; ++d) {
        out[d] = from_acc<scalar_t>(s[d]);
      }
    }
  });
}

}  // namespace

void pos2d_add_forward(const Pos2dAddForward& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x.scalar_type(), "pos2d_add_cpu", [&] { forward_rows<scalar_t>(a); });
}

void pos2d_add_backward(const Pos2dAddBackward& a) {
  const at::Tensor& g = a.grad_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pos2d_add_backward_cpu", [&] {
    sum_batch_chunks<scalar_t>(
        g.const_data_ptr<scalar_t>(), a.lead, g.stride(1), a.token_offset, a.gh * a.gw, g.size(0), g.size(2), a.chunks,
        a.partials.mutable_data_ptr<acc_type<scalar_t>>());
    sum_table_rows<scalar_t>(a);
  });
}

}  // namespace jitrope::cpu

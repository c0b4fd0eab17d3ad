// CPU launcher of jitrope::rope2d, rope2d_ and rope2d_backward (ops/rope2d_impl.h; the host wrapper
// is ops/rope2d.cpp). x is [..., H, N, D] with any strides.
// A first pass fills a cos/sin table [Hf, N, D/2] in the accumulation type (float32; float64 for
// float64 x), so each token's angles are computed once and reused by every head (Hf = 1) and every
// leading index. The rotation is an at::parallel_for over the rows of D channels walked in x's
// memory order (dims sorted by stride, as a copy walks them: B, N, then q/k and heads for a qkv
// view), rows prefetched ahead; a float32 or bfloat16 row with channel stride 1 and D a multiple
// of 16 is rotated eight lanes at a time in the AVX2 build (cpu/vec8.h, cpu/isa.h), other rows by
// loops the compiler vectorizes where it can: the same bits either way. Traffic: x read once, the
// result written once; the table, 1/(leading * H / Hf) of x, stays in cache. The freqs gradient
// runs in parallel over tokens: each thread owns its tokens' rows of dL/dphi [Hf, N, D/2] and
// sums the planes ([N, D] matrices) into them in plane order, then
// the rows are contracted with coords in token order, so the result has the same bits for any
// thread count. With freqs_index (packed batches) the table rows of token n come from table freqs_index[n]
// and the contraction adds each token into its table, tokens still in order (one table: the plain
// op's bits).
#include <algorithm>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "common/op_utils.h"
#include "common/static_switch.h"
#include "cpu/isa.h"
#include "cpu/rope2d_table.h"
#include "cpu/rows.h"
#include "cpu/vec8.h"
#include "math/rope2d_math.h"
#include "ops/rope2d_impl.h"

namespace jitrope::cpu {
namespace {

using rope2d_math::kMaxTensors;
using rope2d_math::Rope2dGeometry;

constexpr int64_t kGrainElems = 32768;  // elements of x per parallel task, at least
// Rows are prefetched this far ahead of the walk: a qkv view reads q and k and skips v, a gap the
// hardware prefetcher does not bridge (the walk then runs 2x slower than a copy of the view).
constexpr int64_t kPrefetchBytes = 8192;

// One row of D channels rotated pair by pair: out = R(phi) in with (c, s) = (cos, sin) of the row's
// angles. Three forms of the same loop, so that the compiler vectorizes the contiguous ones without
// run-time alias checks: distinct contiguous rows, one contiguous row in place, any strides.
template <bool kInterleaved, typename scalar_t, typename acc_t>
inline void rotate_row(
    const scalar_t* __restrict__ in,
    scalar_t* __restrict__ out,
    const acc_t* __restrict__ c,
    const acc_t* __restrict__ s,
    int64_t half) {
  for (int64_t m = 0; m < half; ++m) {
    const int64_t ia = rope2d_math::channel_a<kInterleaved>(m, half),
                  ib = rope2d_math::channel_b<kInterleaved>(m, half);
    acc_t oa, ob;
    rope2d_math::rotate(to_acc<acc_t>(in[ia]), to_acc<acc_t>(in[ib]), c[m], s[m], oa, ob);
    out[ia] = from_acc<scalar_t>(oa);
    out[ib] = from_acc<scalar_t>(ob);
  }
}

template <bool kInterleaved, typename scalar_t, typename acc_t>
inline void rotate_row_in_place(scalar_t* io, const acc_t* __restrict__ c, const acc_t* __restrict__ s, int64_t half) {
  for (int64_t m = 0; m < half; ++m) {
    const int64_t ia = rope2d_math::channel_a<kInterleaved>(m, half),
                  ib = rope2d_math::channel_b<kInterleaved>(m, half);
    acc_t oa, ob;
    rope2d_math::rotate(to_acc<acc_t>(io[ia]), to_acc<acc_t>(io[ib]), c[m], s[m], oa, ob);
    io[ia] = from_acc<scalar_t>(oa);
    io[ib] = from_acc<scalar_t>(ob);
  }
}

template <bool kInterleaved, typename scalar_t, typename acc_t>
inline void rotate_row_strided(
    const scalar_t* in, int64_t in_cs, scalar_t* out, int64_t out_cs, const acc_t* c, const acc_t* s, int64_t half) {
  for (int64_t m = 0; m < half; ++m) {
    const int64_t ia = rope2d_math::channel_a<kInterleaved>(m, half),
                  ib = rope2d_math::channel_b<kInterleaved>(m, half);
    acc_t oa, ob;
    rope2d_math::rotate(to_acc<acc_t>(in[ia * in_cs]), to_acc<acc_t>(in[ib * in_cs]), c[m], s[m], oa, ob);
    out[ia * out_cs] = from_acc<scalar_t>(oa);
    out[ib * out_cs] = from_acc<scalar_t>(ob);
  }
}

// One row of the backward with the angle gradient: gx = R(-phi) g (s holds -sin), dphi += dL/dphi.
template <bool kInterleaved, bool kContig, typename scalar_t, typename acc_t>
inline void rotate_row_angle_grad(
    const scalar_t* __restrict__ g,
    int64_t g_cs,
    const scalar_t* __restrict__ x,
    int64_t x_cs,
    scalar_t* __restrict__ gx,
    int64_t gx_cs,
    const acc_t* __restrict__ c,
    const acc_t* __restrict__ s,
    acc_t* __restrict__ dphi,
    int64_t half) {
  if constexpr (kContig) {
    g_cs = x_cs = gx_cs = 1;
  }
  for (int64_t m = 0; m < half; ++m) {
    const int64_t ia = rope2d_math::channel_a<kInterleaved>(m, half),
                  ib = rope2d_math::channel_b<kInterleaved>(m, half);
    acc_t oa, ob;
    rope2d_math::rotate(to_acc<acc_t>(g[ia * g_cs]), to_acc<acc_t>(g[ib * g_cs]), c[m], s[m], oa, ob);
    dphi[m] += rope2d_math::angle_grad(to_acc<acc_t>(x[ia * x_cs]), to_acc<acc_t>(x[ib * x_cs]), oa, ob);
    gx[ia * gx_cs] = from_acc<scalar_t>(oa);
    gx[ib * gx_cs] = from_acc<scalar_t>(ob);
  }
}

// The rows above eight lanes at a time where vec8::use_rows says so: the same operations in the
// same order, hence the same bits (interleaved pairs by vec8::rotate_pairs, half-split rows in pair
// order). Every load of a block comes before its stores, so out may be in.
template <bool kInterleaved, typename scalar_t>
inline void rotate_row_v8(const scalar_t* in, scalar_t* out, const float* c, const float* s, int64_t half) {
  using namespace vec8;
  if constexpr (kInterleaved) {
    for (int64_t d = 0; d < 2 * half; d += 16) {
      const F8 y0 = load(in + d), y1 = load(in + d + 8);
      const F8 cv = load(c + d / 2), sv = load(s + d / 2);
      store(out + d, rotate_pairs(y0, dup_lo(cv), dup_lo(sv)));
      store(out + d + 8, rotate_pairs(y1, dup_hi(cv), dup_hi(sv)));
    }
  } else {
    for (int64_t m = 0; m < half; m += 8) {
      F8 a = load(in + m), b = load(in + half + m);
      rotate_split(a, b, load(c + m), load(s + m));
      store(out + m, a);
      store(out + half + m, b);
    }
  }
}

// rotate_row_angle_grad's row: gx = R(-phi) g (s holds -sin) and dphi += gb * xa - ga * xb.
template <bool kInterleaved, typename scalar_t>
inline void rotate_row_angle_grad_v8(
    const scalar_t* g, const scalar_t* x, scalar_t* gx, const float* c, const float* s, float* dphi, int64_t half) {
  using namespace vec8;
  if constexpr (kInterleaved) {
    for (int64_t d = 0; d < 2 * half; d += 16) {
      const F8 g0 = load(g + d), g1 = load(g + d + 8);
      const F8 cv = load(c + d / 2), sv = load(s + d / 2);
      const F8 o0 = rotate_pairs(g0, dup_lo(cv), dup_lo(sv));
      const F8 o1 = rotate_pairs(g1, dup_hi(cv), dup_hi(sv));
      const F8 t0 = swap_pairs(o0) * load(x + d), t1 = swap_pairs(o1) * load(x + d + 8);
      store(dphi + d / 2, load(dphi + d / 2) + (even_lanes(t0, t1) - odd_lanes(t0, t1)));
      store(gx + d, o0);
      store(gx + d + 8, o1);
    }
  } else {
    for (int64_t m = 0; m < half; m += 8) {
      F8 oa = load(g + m), ob = load(g + half + m);
      rotate_split(oa, ob, load(c + m), load(s + m));
      store(dphi + m, load(dphi + m) + (ob * load(x + m) - oa * load(x + half + m)));
      store(gx + m, oa);
      store(gx + half + m, ob);
    }
  }
}

// Offsets of plane q of group g for every tensor.
inline void plane_offsets(const Rope2dGeometry& geo, int64_t g, int64_t q, int64_t (&off)[kMaxTensors]) {
  geo.planes.offsets(static_cast<uint32_t>(q), off);
  for (int t = 0; t < kMaxTensors; ++t) {
    off[t] += g * geo.group_stride[t];
  }
}

// The rows of D channels of x (every index but the last) as dims sorted by in's strides, outermost
// first, then coalesced, so that a walk over rows follows memory (B, N, 2, H for a qkv view) like a
// copy would. Each dim steps in, out and the row of the cos/sin table ((group * N + n) * D/2).
struct RowWalk {
  struct Dim {
    int64_t size;
    int64_t stride[3];  // in, out, table
  };
  std::vector<Dim> dims;
  int64_t rows = 1;
};

RowWalk make_row_walk(const at::Tensor& in, const at::Tensor& out, bool per_head) {
  const int64_t nd = in.dim(), n_tokens = in.size(-2), half = in.size(-1) / 2;
  std::vector<RowWalk::Dim> dims;
  for (int64_t d = 0; d < nd - 1; ++d) {
    const int64_t table = d == nd - 2 ? half : (d == nd - 3 && per_head ? n_tokens * half : 0);
    if (in.size(d) != 1) {
      dims.push_back({in.size(d), {in.stride(d), out.stride(d), table}});
    }
  }
  std::stable_sort(dims.begin(), dims.end(), [](const RowWalk::Dim& a, const RowWalk::Dim& b) {
    return a.stride[0] != b.stride[0] ? a.stride[0] > b.stride[0] : a.stride[1] > b.stride[1];
  });
  RowWalk walk;
  for (const auto& dim : dims) {
    walk.rows *= dim.size;
    bool merge = !walk.dims.empty();
    for (int t = 0; merge && t < 3; ++t) {
      merge = walk.dims.back().stride[t] == dim.stride[t] * dim.size;
    }
    if (merge) {
      walk.dims.back().size *= dim.size;
      std::copy(dim.stride, dim.stride + 3, walk.dims.back().stride);
    } else {
      walk.dims.push_back(dim);
    }
  }
  return walk;
}

// Position in a RowWalk: split once per parallel task, then stepped row by row.
struct RowCursor {
  const RowWalk& walk;
  std::vector<int64_t> index;
  int64_t off[3] = {0, 0, 0};

  RowCursor(const RowWalk& w, int64_t row) : walk(w), index(w.dims.size(), 0) {
    for (int64_t d = static_cast<int64_t>(w.dims.size()) - 1; d >= 0; --d) {
      index[d] = row % w.dims[d].size;
      row /= w.dims[d].size;
      for (int t = 0; t < 3; ++t) {
        off[t] += index[d] * w.dims[d].stride[t];
      }
    }
  }

  void next() {
    for (int64_t d = static_cast<int64_t>(walk.dims.size()) - 1; d >= 0; --d) {
      const auto& dim = walk.dims[d];
      for (int t = 0; t < 3; ++t) {
        off[t] += dim.stride[t];
      }
      if (++index[d] < dim.size) {
        return;
      }
      for (int t = 0; t < 3; ++t) {
        off[t] -= dim.size * dim.stride[t];
      }
      index[d] = 0;
    }
  }
};

// The rotation of every row of a RowWalk by its cos/sin table row: out = R(phi) in, out may be in.
template <bool kInterleaved, typename scalar_t, typename acc_t>
void rotate_rows(
    const RowWalk& walk,
    const scalar_t* in_p,
    int64_t in_cs,
    scalar_t* out_p,
    int64_t out_cs,
    const acc_t* cos_t,
    const acc_t* sin_t,
    int64_t half) {
  const bool in_place = in_p == out_p;
  const bool contig = in_cs == 1 && out_cs == 1;
  const bool vec = vec8::use_rows<scalar_t>(contig, 2 * half);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (2 * half));
  const int64_t row_bytes = 2 * half * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t prefetch_rows = std::max<int64_t>(4, kPrefetchBytes / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, walk.rows, grain, [&](int64_t begin, int64_t end) {
    run_isa([&] {
      RowCursor row(walk, begin);
      RowCursor ahead(walk, std::min(begin + prefetch_rows, walk.rows - 1));
      for (int64_t r = begin; r < end; ++r, row.next(), ahead.next()) {
        if (contig && r + prefetch_rows < end) {
          prefetch_bytes(in_p + ahead.off[0], row_bytes);
        }
        const acc_t* cr = cos_t + row.off[2];
        const acc_t* sr = sin_t + row.off[2];
        if (vec) {
          if constexpr (vec8::kType<scalar_t>) {
            rotate_row_v8<kInterleaved>(in_p + row.off[0], out_p + row.off[1], cr, sr, half);
          }
        } else if (contig && in_place) {
          rotate_row_in_place<kInterleaved>(out_p + row.off[1], cr, sr, half);
        } else if (contig) {
          rotate_row<kInterleaved>(in_p + row.off[0], out_p + row.off[1], cr, sr, half);
        } else {
          rotate_row_strided<kInterleaved>(in_p + row.off[0], in_cs, out_p + row.off[1], out_cs, cr, sr, half);
        }
      }
    });
  });
}

// Pointer to the contiguous freqs_index, or null without one.
inline const int64_t* index_ptr(const at::Tensor& index) {
  return index.defined() ? index.const_data_ptr<int64_t>() : nullptr;
}

// out = in rotated by phi (or -phi when `inverse`); out may be in (rope2d_).
void rotate(const Rope2dLaunch& a) {
  const at::Tensor& in = a.in;
  const int64_t N = a.geo.n_tokens, half = a.geo.half, groups = a.geo.groups;
  const RowWalk walk = make_row_walk(in, a.out, /*per_head=*/groups > 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "rope2d_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor table = angle_table<acc_t>(a.coords, a.freqs, groups, N, half, a.inverse, index_ptr(a.index));
    const acc_t* cos_t = table.const_data_ptr<acc_t>();
    const acc_t* sin_t = cos_t + groups * N * half;
    JITROPE_BOOL_SWITCH(a.interleaved, kInterleaved, [&] {
      rotate_rows<kInterleaved>(
          walk, in.const_data_ptr<scalar_t>(), in.stride(-1), a.out.mutable_data_ptr<scalar_t>(), a.out.stride(-1),
          cos_t, sin_t, half);
    });
  });
}

// Step 1 of the backward with freqs: grad_x = R(-phi) grad_out for every row, and the angle
// gradient dphi [Hf, N, D/2] (zeroed by the caller) summed over each group's planes in plane order.
// In parallel over tokens: each thread owns its tokens' rows of dphi.
template <bool kInterleaved, typename scalar_t, typename acc_t>
void rotate_back_with_angle_grad(
    const Rope2dGeometry& geo,
    const scalar_t* g_p,
    const scalar_t* x_p,
    scalar_t* gx_p,
    const acc_t* cos_t,
    const acc_t* sin_t,
    acc_t* dphi_p) {
  const int64_t N = geo.n_tokens, half = geo.half, P = geo.planes_per_group, groups = geo.groups;
  const bool contig = geo.channel_stride[0] == 1 && geo.channel_stride[1] == 1 && geo.channel_stride[2] == 1;
  const bool vec = vec8::use_rows<scalar_t>(contig, 2 * half);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, 2 * half * groups * P));
  const int64_t row_bytes = 2 * half * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t prefetch_rows = std::max<int64_t>(4, kPrefetchBytes / std::max<int64_t>(1, row_bytes));
  auto row = [&](int64_t g, int64_t n, const int64_t (&off)[kMaxTensors]) {
    const scalar_t* gr = g_p + off[0] + n * geo.token_stride[0];
    scalar_t* gxr = gx_p + off[1] + n * geo.token_stride[1];
    const scalar_t* xr = x_p + off[2] + n * geo.token_stride[2];
    const int64_t t = (g * N + n) * half;
    if (vec) {
      if constexpr (vec8::kType<scalar_t>) {
        rotate_row_angle_grad_v8<kInterleaved>(gr, xr, gxr, cos_t + t, sin_t + t, dphi_p + t, half);
      }
    } else if (contig) {
      rotate_row_angle_grad<kInterleaved, true>(gr, 1, xr, 1, gxr, 1, cos_t + t, sin_t + t, dphi_p + t, half);
    } else {
      rotate_row_angle_grad<kInterleaved, false>(
          gr, geo.channel_stride[0], xr, geo.channel_stride[2], gxr, geo.channel_stride[1], cos_t + t, sin_t + t,
          dphi_p + t, half);
    }
  };
  // Either loop order sums each (group, token) row over the planes in plane order; take the one
  // closer to memory order (tokens outermost for a [B, N, 3, H, D] qkv view).
  int64_t inner_plane_stride = std::numeric_limits<int64_t>::max();
  if (geo.planes.ndim > 0) {
    inner_plane_stride = std::abs(geo.planes.strides[0][0]);
  }
  if (groups > 1) {
    inner_plane_stride = std::min(inner_plane_stride, std::abs(geo.group_stride[0]));
  }
  const bool tokens_outer = std::abs(geo.token_stride[0]) > inner_plane_stride;
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    run_isa([&] {
      int64_t off[kMaxTensors];
      if (tokens_outer) {
        for (int64_t n = n0; n < n1; ++n) {
          for (int64_t g = 0; g < groups; ++g) {
            for (int64_t q = 0; q < P; ++q) {
              plane_offsets(geo, g, q, off);
              row(g, n, off);
            }
          }
        }
        return;
      }
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t q = 0; q < P; ++q) {
          plane_offsets(geo, g, q, off);
          for (int64_t n = n0; n < n1; ++n) {
            if (contig && n + prefetch_rows < n1) {
              prefetch_bytes(g_p + off[0] + (n + prefetch_rows) * geo.token_stride[0], row_bytes);
              prefetch_bytes(x_p + off[2] + (n + prefetch_rows) * geo.token_stride[2], row_bytes);
            }
            row(g, n, off);
          }
        }
      }
    });
  });
}

// Step 2: grad_freqs[g, 0, m] = sum_n y_n dphi[g, n, m], grad_freqs[g, 1, m] = sum_n x_n dphi[g, n, m],
// tokens in order, into `out` [Hf, 2, D/2] (zeroed by the caller); with freqs_index, token n adds
// into table index[n] of `out` [F, Hf, 2, D/2] (each table's tokens still in order).
template <typename acc_t>
void reduce_freqs_grad(
    const acc_t* c_p, const acc_t* dphi_p, const int64_t* index, int64_t groups, int64_t N, int64_t half, acc_t* out) {
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t n = 0; n < N; ++n) {
      acc_t* gy = out + 2 * ((index != nullptr ? index[n] * groups : 0) + g) * half;
      acc_t* gxx = gy + half;
      const acc_t* d = dphi_p + (g * N + n) * half;
      const acc_t y = c_p[2 * n], xc = c_p[2 * n + 1];
      for (int64_t m = 0; m < half; ++m) {
        gy[m] += y * d[m];
        gxx[m] += xc * d[m];
      }
    }
  }
}

// grad_x (a.out) = grad_out (a.in) rotated by -phi and grad_freqs from x (the forward input).
void backward_with_freqs(const Rope2dLaunch& a) {
  const Rope2dGeometry& geo = a.geo;
  const int64_t N = geo.n_tokens, half = geo.half, groups = geo.groups;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.in.scalar_type(), "rope2d_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor table = angle_table<acc_t>(a.coords, a.freqs, groups, N, half, a.inverse, index_ptr(a.index));
    const acc_t* cos_t = table.const_data_ptr<acc_t>();
    at::Tensor dphi = at::zeros({groups, N, half}, a.coords.options());
    JITROPE_BOOL_SWITCH(a.interleaved, kInterleaved, [&] {
      rotate_back_with_angle_grad<kInterleaved>(
          geo, a.in.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(), a.out.mutable_data_ptr<scalar_t>(),
          cos_t, cos_t + groups * N * half, dphi.mutable_data_ptr<acc_t>());
    });
    a.grad_freqs.zero_();
    reduce_freqs_grad(
        a.coords.const_data_ptr<acc_t>(), dphi.const_data_ptr<acc_t>(), index_ptr(a.index), groups, N, half,
        a.grad_freqs.mutable_data_ptr<acc_t>());
  });
}

}  // namespace

void rope2d_rotate(const Rope2dLaunch& a) {
  if (a.x.defined()) {
    backward_with_freqs(a);
  } else {
    rotate(a);
  }
}

}  // namespace jitrope::cpu

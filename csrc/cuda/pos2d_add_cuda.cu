// CUDA kernels and launchers of jitrope::pos2d_add (ops/pos2d_add_impl.h; the host wrapper with the
// checks and allocations is ops/pos2d_add.cpp). Layout: x and grad_out are read as (b, t) rows of D
// channels through their batch and token strides (unit channel stride), tables are contiguous
// [rows, D], outputs contiguous. Forward: a grid-stride loop over
// (b, t, channel pack) items, a pack being 16 bytes (V = 16 / itemsize elements) when D, the
// strides and every pointer allow aligned vector loads and stores, one element otherwise; 32-bit
// item indices when they fit. Each item reads its x pack and, for a grid token, two table packs
// (cached: the tables are small and reused by every batch row), and writes one pack: the traffic
// of a copy of x. The in-place twin visits only the grid's tokens. Backward, deterministic and
// without atomics: stage 1, one thread per (batch chunk, grid cell, channel pack) sums grad_out
// over the chunk's rows in ascending order into float32 partials [chunks, gh*gw, D] (coalesced
// along channels; one read of the grid's part of grad_out); stage 2, one thread per output
// element sums its partials in the fixed order of math/pos2d_add_math.h and writes zeros for
// table rows the grid does not use. The CPU kernels add in the same order, so both give the same
// bits. Math is float32 (float64 for float64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/op_utils.h"
#include "cuda/vector_pack.cuh"
#include "math/pos2d_add_math.h"
#include "ops/pos2d_add_impl.h"

namespace jitrope::cuda {
namespace {

constexpr int kThreads = 256;

using vector_pack::load_pack;
using vector_pack::Pack;
using vector_pack::pack_width;
using vector_pack::store_pack;

int64_t grid_blocks(int64_t items) {
  return vector_pack::grid_blocks(items, kThreads);
}

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* x;
  int64_t x_sb, x_st;
  scalar_t* out;
  int64_t out_sb, out_st;
  const scalar_t* pos_h;
  const scalar_t* pos_w;
  int64_t D;
  int64_t t_begin;  // first token visited
  int64_t token_offset, cells, gw, row_offset, col_offset;
};

// items = B * tokens * (D / V); item -> (row = (b, t_begin + tt), pack dv). Token and grid
// arithmetic runs in index_t (32-bit when every value fits), addresses in 64-bit.
template <typename scalar_t, int V, typename index_t>
__global__ void __launch_bounds__(kThreads) pos2d_add_forward_kernel(
    const ForwardArgs<scalar_t> a, const index_t items, const index_t tokens, const index_t packs) {
  using acc = acc_type<scalar_t>;
  const index_t t0 = static_cast<index_t>(a.token_offset);
  const index_t cells = static_cast<index_t>(a.cells);
  const index_t gw = static_cast<index_t>(a.gw);
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < items; idx += stride) {
    const index_t row = idx / packs;
    const index_t d = (idx - row * packs) * V;
    const index_t b = row / tokens;
    const index_t t = static_cast<index_t>(a.t_begin) + (row - b * tokens);
    Pack<scalar_t, V> v = load_pack<scalar_t, V>(a.x + b * a.x_sb + int64_t{t} * a.x_st + d);
    index_t i, j;
    if (pos2d_add_math::grid_cell<index_t>(t, t0, cells, gw, i, j)) {
      const Pack<scalar_t, V> h = load_pack<scalar_t, V>(a.pos_h + (a.row_offset + i) * a.D + d);
      const Pack<scalar_t, V> w = load_pack<scalar_t, V>(a.pos_w + (a.col_offset + j) * a.D + d);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v.v[k] = static_cast<scalar_t>(pos2d_add_math::add_position<acc>(
            static_cast<acc>(v.v[k]), static_cast<acc>(h.v[k]), static_cast<acc>(w.v[k])));
      }
    }
    store_pack<scalar_t, V>(a.out + b * a.out_sb + int64_t{t} * a.out_st + d, v);
  }
}

template <typename scalar_t, int V>
void launch_forward_packed(const ForwardArgs<scalar_t>& a, int64_t B, int64_t tokens, int64_t N) {
  const int64_t packs = a.D / V;
  const int64_t items = B * tokens * packs;
  if (items == 0) {
    return;
  }
  const int64_t blocks = grid_blocks(items);
  const auto stream = at::cuda::getCurrentCUDAStream();
  // 32-bit indices leave headroom for idx + stride and cover every token index t < N.
  constexpr int64_t kInt32Safe = int64_t{1} << 30;
  if (items < kInt32Safe && N < kInt32Safe) {
    pos2d_add_forward_kernel<scalar_t, V, int32_t><<<blocks, kThreads, 0, stream>>>(
        a, static_cast<int32_t>(items), static_cast<int32_t>(tokens), static_cast<int32_t>(packs));
  } else {
    pos2d_add_forward_kernel<scalar_t, V, int64_t><<<blocks, kThreads, 0, stream>>>(a, items, tokens, packs);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Stage 1: item = (chunk k, cell, pack dv), in that order from slowest to fastest, so that
// partials[item * V + lane] is partials[k][cell][dv * V + lane].
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) pos2d_add_partials_kernel(
    const scalar_t* __restrict__ g,
    const int64_t g_sb,
    const int64_t g_st,
    const int64_t B,
    const int64_t token_offset,
    const int64_t cells,
    const int64_t packs,
    const int64_t chunk,
    const int64_t items,
    acc_type<scalar_t>* __restrict__ partials) {
  using acc = acc_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < items; idx += stride) {
    const int64_t dv = idx % packs;
    const int64_t kc = idx / packs;
    const int64_t cell = kc % cells;
    const int64_t k = kc / cells;
    const int64_t b_end = (k + 1) * chunk < B ? (k + 1) * chunk : B;
    const scalar_t* src = g + (token_offset + cell) * g_st + dv * V;
    acc s[V];
#pragma unroll
    for (int lane = 0; lane < V; ++lane) {
      s[lane] = acc(0);
    }
    // Unrolled so that several rows' loads are in flight; each lane still adds in row order.
#pragma unroll 4
    for (int64_t b = k * chunk; b < b_end; ++b) {
      const Pack<scalar_t, V> v = load_pack<scalar_t, V>(src + b * g_sb);
#pragma unroll
      for (int lane = 0; lane < V; ++lane) {
        s[lane] += static_cast<acc>(v.v[lane]);
      }
    }
#pragma unroll
    for (int lane = 0; lane < V; ++lane) {
      partials[idx * V + lane] = s[lane];
    }
  }
}

// Stage 2: item = (table row r over pos_h then pos_w, channel d); adjacent threads take adjacent
// channels, so both the partials they read and the gradients they write are coalesced.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) pos2d_add_table_grads_kernel(
    const acc_type<scalar_t>* __restrict__ partials,
    const int64_t chunks,
    const int64_t gh,
    const int64_t gw,
    const int64_t D,
    const int64_t max_h,
    const int64_t max_w,
    const int64_t row_offset,
    const int64_t col_offset,
    scalar_t* __restrict__ grad_h,
    scalar_t* __restrict__ grad_w) {
  using acc = acc_type<scalar_t>;
  const int64_t items = (max_h + max_w) * D;
  const int64_t chunk_stride = gh * gw * D;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < items; idx += stride) {
    const int64_t r = idx / D;
    const int64_t d = idx - r * D;
    acc s = acc(0);
    if (r < max_h) {
      const int64_t i = r - row_offset;
      if (i >= 0 && i < gh) {
        pos2d_add_math::sum_partials(&s, partials + i * gw * D + d, 1, chunks, chunk_stride, gw, D);
      }
      grad_h[idx] = static_cast<scalar_t>(s);
    } else {
      const int64_t j = r - max_h - col_offset;
      if (j >= 0 && j < gw) {
        pos2d_add_math::sum_partials(&s, partials + j * D + d, 1, chunks, chunk_stride, gh, gw * D);
      }
      grad_w[idx - max_h * D] = static_cast<scalar_t>(s);
    }
  }
}

template <typename scalar_t, int V>
void launch_partials(
    const at::Tensor& g,
    int64_t token_offset,
    int64_t cells,
    const pos2d_add_math::BatchChunks& chunks,
    acc_type<scalar_t>* partials) {
  const int64_t packs = g.size(2) / V;
  const int64_t items = chunks.count * cells * packs;
  if (items == 0) {
    return;
  }
  pos2d_add_partials_kernel<scalar_t, V><<<grid_blocks(items), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      g.const_data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.size(0), token_offset, cells, packs, chunks.size, items,
      partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void pos2d_add_forward(const Pos2dAddForward& f) {
  const at::Tensor& x = f.x;
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t cells = f.gh * f.gw;
  const int64_t t_begin = f.grid_rows_only ? f.token_offset : 0;
  const int64_t tokens = f.grid_rows_only ? cells : N;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pos2d_add_cuda", [&] {
    const ForwardArgs<scalar_t> a{
        x.const_data_ptr<scalar_t>(),
        x.stride(0),
        x.stride(1),
        f.out.mutable_data_ptr<scalar_t>(),
        f.out.stride(0),
        f.out.stride(1),
        f.pos_h.const_data_ptr<scalar_t>(),
        f.pos_w.const_data_ptr<scalar_t>(),
        D,
        t_begin,
        f.token_offset,
        cells,
        f.gw,
        f.row_offset,
        f.col_offset};
    const int V = pack_width<scalar_t>(D, {a.x_sb, a.x_st, a.out_sb, a.out_st}, {a.x, a.out, a.pos_h, a.pos_w});
    if (V > 1) {
      launch_forward_packed<scalar_t, 16 / sizeof(scalar_t)>(a, B, tokens, N);
    } else {
      launch_forward_packed<scalar_t, 1>(a, B, tokens, N);
    }
  });
}

void pos2d_add_backward(const Pos2dAddBackward& b) {
  const at::Tensor& g = b.grad_out;
  const int64_t D = g.size(2), cells = b.gh * b.gw;
  const int64_t max_h = b.grad_h.size(0), max_w = b.grad_w.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pos2d_add_backward_cuda", [&] {
    using acc = acc_type<scalar_t>;
    acc* partials = b.partials.mutable_data_ptr<acc>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    if (pack_width<scalar_t>(D, {g.stride(0), g.stride(1)}, {gp}) > 1) {
      launch_partials<scalar_t, 16 / sizeof(scalar_t)>(g, b.token_offset, cells, b.chunks, partials);
    } else {
      launch_partials<scalar_t, 1>(g, b.token_offset, cells, b.chunks, partials);
    }
    const int64_t items = (max_h + max_w) * D;
    if (items > 0) {
      pos2d_add_table_grads_kernel<scalar_t><<<grid_blocks(items), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          partials, b.chunks.count, b.gh, b.gw, D, max_h, max_w, b.row_offset, b.col_offset,
          b.grad_h.mutable_data_ptr<scalar_t>(), b.grad_w.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace jitrope::cuda

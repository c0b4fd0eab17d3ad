// CUDA kernels and launchers of jitrope::pos2d_add_indexed (ops/pos2d_add_indexed_impl.h; the host
// wrapper with the checks and allocations is ops/pos2d_add_indexed.cpp). Layout: x and grad_out are
// read as rows of D channels through their (merged) leading strides and token stride (the wrapper
// copies a strided channel dim, or more than kMaxLeadingDims unmergeable leading dims, to contiguous
// first); tables and indices are contiguous; outputs are contiguous. Forward: a grid-stride loop over (leading index,
// token, channel pack) items, a pack being 16 bytes when D, the strides and every pointer allow it, one element
// otherwise; 32-bit item indices when they fit. Each item reads its x pack, the token's two indices and up to two table
// packs (cached: tables are small and shared by every token), and writes one pack: the traffic of a copy of x.
// Backward, deterministic and without atomics, in the order of math/pos2d_add_indexed_math.h: a stable at::sort of the
// (table row, token) entries (ascending tokens within a row) and at::searchsorted give each row's token list; stage 1
// (B > 1) sums grad_out over fixed batch chunks into float32 partials [chunks, N, D]; stage 2, one thread per (segment,
// channel), sums a segment's kSegment tokens (adjacent threads read adjacent channels of the same token: coalesced);
// stage 3, one thread per (table row, channel), sums the row's segments. No value is read back to the host: the segment
// buffer is sized by a bound that depends on the shapes only. The CPU kernels add in the same order, so both give the
// same bits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

#include "common/op_utils.h"
#include "cuda/vector_pack.cuh"
#include "math/pos2d_add_indexed_math.h"
#include "ops/pos2d_add_indexed_impl.h"

namespace jitrope::cuda {
namespace {

namespace math = pos2d_add_indexed_math;
using vector_pack::load_pack;
using vector_pack::Pack;
using vector_pack::pack_width;
using vector_pack::store_pack;

constexpr int kThreads = 256;

int64_t grid_blocks(int64_t items) {
  return vector_pack::grid_blocks(items, kThreads);
}

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* x;
  math::LeadingDims lead;
  int64_t x_st;
  scalar_t* out;  // contiguous [B * N, D]
  const scalar_t* pos_h;
  const scalar_t* pos_w;
  const int64_t* rows;
  const int64_t* cols;
  int64_t D;
};

// items = B * N * (D / V); item -> (row = (b, n), pack). Token arithmetic runs in index_t (32-bit
// when every value fits), addresses in 64-bit.
template <typename scalar_t, int V, typename index_t>
__global__ void __launch_bounds__(kThreads) pos2d_add_indexed_forward_kernel(
    const ForwardArgs<scalar_t> a, const index_t items, const index_t N, const index_t packs) {
  using acc = acc_type<scalar_t>;
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < items; idx += stride) {
    const index_t row = idx / packs;
    const index_t d = (idx - row * packs) * V;
    const index_t b = row / N;
    const index_t n = row - b * N;
    Pack<scalar_t, V> v = load_pack<scalar_t, V>(a.x + a.lead.offset(b) + int64_t{n} * a.x_st + d);
    const int64_t i = a.rows[n], j = a.cols[n];
    if (i >= 0 && j >= 0) {
      const Pack<scalar_t, V> h = load_pack<scalar_t, V>(a.pos_h + i * a.D + d);
      const Pack<scalar_t, V> w = load_pack<scalar_t, V>(a.pos_w + j * a.D + d);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v.v[k] = static_cast<scalar_t>(
            math::add_positions<acc>(static_cast<acc>(v.v[k]), static_cast<acc>(h.v[k]), static_cast<acc>(w.v[k])));
      }
    } else if (i >= 0 || j >= 0) {
      const Pack<scalar_t, V> p = load_pack<scalar_t, V>(i >= 0 ? a.pos_h + i * a.D + d : a.pos_w + j * a.D + d);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v.v[k] = static_cast<scalar_t>(math::add_position<acc>(static_cast<acc>(v.v[k]), static_cast<acc>(p.v[k])));
      }
    }
    store_pack<scalar_t, V>(a.out + int64_t{row} * a.D + d, v);
  }
}

template <typename scalar_t, int V>
void launch_forward(const ForwardArgs<scalar_t>& a, int64_t B, int64_t N) {
  const int64_t packs = a.D / V;
  const int64_t items = B * N * packs;
  if (items == 0) {
    return;
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  // 32-bit indices leave headroom for idx + stride.
  constexpr int64_t kInt32Safe = int64_t{1} << 30;
  if (items < kInt32Safe) {
    pos2d_add_indexed_forward_kernel<scalar_t, V, int32_t><<<grid_blocks(items), kThreads, 0, stream>>>(
        a, static_cast<int32_t>(items), static_cast<int32_t>(N), static_cast<int32_t>(packs));
  } else {
    pos2d_add_indexed_forward_kernel<scalar_t, V, int64_t>
        <<<grid_blocks(items), kThreads, 0, stream>>>(a, items, N, packs);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Stage 1: item = (chunk k, token n, channel d), slowest to fastest: partials[k][n][d].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) pos2d_add_indexed_partials_kernel(
    const scalar_t* __restrict__ g,
    const math::LeadingDims lead,
    const int64_t g_st,
    const int64_t B,
    const int64_t N,
    const int64_t D,
    const int64_t chunk,
    const int64_t items,
    acc_type<scalar_t>* __restrict__ partials) {
  using acc = acc_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < items; idx += stride) {
    const int64_t d = idx % D;
    const int64_t kn = idx / D;
    const int64_t n = kn % N;
    const int64_t k = kn / N;
    const int64_t b_end = (k + 1) * chunk < B ? (k + 1) * chunk : B;
    acc s = acc(0);
    for (int64_t b = k * chunk; b < b_end; ++b) {
      s += static_cast<acc>(g[lead.offset(b) + n * g_st + d]);
    }
    partials[idx] = s;
  }
}

// Stage 2: item = (segment s, channel d), over a bound of the segment count; the true count is
// seg_begin[R], read on the device.
template <typename acc_t, typename src_t>
__global__ void __launch_bounds__(kThreads) pos2d_add_indexed_segments_kernel(
    const src_t* __restrict__ p,
    const int64_t chunks,
    const int64_t chunk_stride,
    const int64_t token_stride,
    const int64_t* __restrict__ tokens,
    const int64_t* __restrict__ start,
    const int64_t* __restrict__ seg_begin,
    const int64_t R,
    const int64_t D,
    const int64_t items,
    acc_t* __restrict__ seg) {
  const int64_t S = seg_begin[R];
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < items; idx += stride) {
    const int64_t s = idx / D;
    if (s >= S) {
      break;  // idx only grows
    }
    const int64_t d = idx - s * D;
    const int64_t q = math::segment_row(seg_begin, R, s);
    const int64_t first = start[q] + (s - seg_begin[q]) * math::kSegment;
    const int64_t count = start[q + 1] - first < math::kSegment ? start[q + 1] - first : math::kSegment;
    acc_t v;
    math::sum_segment(&v, p + d, 1, chunks, chunk_stride, tokens + first, count, token_stride);
    seg[idx] = v;
  }
}

// Stage 3: item = (table row q over pos_h then pos_w, channel d); adjacent threads take adjacent
// channels, so the segment sums they read and the gradients they write are coalesced.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) pos2d_add_indexed_table_grads_kernel(
    const acc_type<scalar_t>* __restrict__ seg,
    const int64_t* __restrict__ seg_begin,
    const int64_t max_h,
    const int64_t R,
    const int64_t D,
    scalar_t* __restrict__ grad_h,
    scalar_t* __restrict__ grad_w) {
  using acc = acc_type<scalar_t>;
  const int64_t items = R * D;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < items; idx += stride) {
    const int64_t q = idx / D;
    const int64_t d = idx - q * D;
    acc s;
    math::sum_segments(&s, seg + seg_begin[q] * D + d, 1, seg_begin[q + 1] - seg_begin[q], D);
    if (q < max_h) {
      grad_h[idx] = static_cast<scalar_t>(s);
    } else {
      grad_w[idx - max_h * D] = static_cast<scalar_t>(s);
    }
  }
}

}  // namespace

void pos2d_add_indexed_forward(const Pos2dAddIndexedForward& f) {
  const at::Tensor& x = f.x;
  const math::LeadingDims& lead = f.lead;
  const int64_t N = x.size(-2), D = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pos2d_add_indexed_cuda", [&] {
    const ForwardArgs<scalar_t> a{
        x.const_data_ptr<scalar_t>(),
        lead,
        x.stride(-2),
        f.out.mutable_data_ptr<scalar_t>(),
        f.pos_h.const_data_ptr<scalar_t>(),
        f.pos_w.const_data_ptr<scalar_t>(),
        f.rows.const_data_ptr<int64_t>(),
        f.cols.const_data_ptr<int64_t>(),
        D};
    const int V = pack_width<scalar_t>(
        D, {lead.stride[0], lead.stride[1], lead.stride[2], lead.stride[3], a.x_st}, {a.x, a.out, a.pos_h, a.pos_w});
    if (V > 1) {
      launch_forward<scalar_t, 16 / sizeof(scalar_t)>(a, f.B, N);
    } else {
      launch_forward<scalar_t, 1>(a, f.B, N);
    }
  });
}

void pos2d_add_indexed_backward(const Pos2dAddIndexedBackward& a) {
  const at::Tensor& g = a.grad_out;
  const int64_t B = a.B, N = g.size(-2), D = g.size(-1);
  const int64_t max_h = a.grad_h.size(0), R = max_h + a.grad_w.size(0);
  const at::Tensor& rows = a.rows;
  const at::Tensor& cols = a.cols;
  // Entries (table row, token): pos_h's rows, then pos_w's shifted by max_h; -1 sorts first and is
  // skipped by start[0]. The stable sort keeps each row's tokens ascending.
  const at::Tensor keys = at::cat({rows, at::where(cols >= 0, cols + max_h, cols)});
  const auto [sorted, perm] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor start = at::searchsorted(sorted, at::arange(R + 1, keys.options()));
  const at::Tensor tokens = at::remainder(perm, N);
  const at::Tensor seg_begin = at::cat(
      {at::zeros({1}, keys.options()),
       at::div(at::diff(start) + (math::kSegment - 1), math::kSegment, "floor").cumsum(0)});
  const int64_t seg_bound = math::max_segments(2 * N, R);
  const pos2d_add_math::BatchChunks& chunks = a.chunks;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pos2d_add_indexed_backward_cuda", [&] {
    using acc = acc_type<scalar_t>;
    at::Tensor seg = at::empty({seg_bound, D}, g.options().dtype(c10::CppTypeToScalarType<acc>::value));
    const int64_t seg_items = seg_bound * D;
    const int64_t* tok = tokens.const_data_ptr<int64_t>();
    const int64_t* st = start.const_data_ptr<int64_t>();
    const int64_t* sb = seg_begin.const_data_ptr<int64_t>();
    if (B > 1) {
      const int64_t items = chunks.count * N * D;
      pos2d_add_indexed_partials_kernel<scalar_t><<<grid_blocks(items), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), a.lead, g.stride(-2), B, N, D, chunks.size, items,
          a.partials.mutable_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      pos2d_add_indexed_segments_kernel<acc, acc><<<grid_blocks(seg_items), kThreads, 0, stream>>>(
          a.partials.const_data_ptr<acc>(), chunks.count, N * D, D, tok, st, sb, R, D, seg_items,
          seg.mutable_data_ptr<acc>());
    } else {
      // B = 1: one chunk whose partials are grad_out's rows themselves.
      pos2d_add_indexed_segments_kernel<acc, scalar_t><<<grid_blocks(seg_items), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), B, 0, g.stride(-2), tok, st, sb, R, D, seg_items, seg.mutable_data_ptr<acc>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pos2d_add_indexed_table_grads_kernel<scalar_t><<<grid_blocks(R * D), kThreads, 0, stream>>>(
        seg.const_data_ptr<acc>(), sb, max_h, R, D, a.grad_h.mutable_data_ptr<scalar_t>(),
        a.grad_w.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace jitrope::cuda

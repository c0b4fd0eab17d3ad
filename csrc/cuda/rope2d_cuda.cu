// CUDA kernels and launcher of jitrope::rope2d, rope2d_ and rope2d_backward (ops/rope2d_impl.h; the
// host wrapper with the checks, allocations and layout fallback is ops/rope2d.cpp). x is
// [..., H, N, D] with any strides:
// the leading dims (and H when freqs is shared) are walked as "planes" of [N, D] by a coalesced
// multi-dim indexer with 64-bit offsets, so q and k of a qkv projection go in one launch as one
// [2, B, H, N, D] view without a copy. A thread owns one token and a few channel pairs (one 16-byte
// vector when the channel stride is 1 and every offset is 16-byte aligned, else one pair through
// scalar loads); it computes their sin/cos once (sincosf, float32; float64 for float64 x) and
// rotates them in every plane of its block's chunk of planes (kUnroll rows in flight). Blocks are
// (token tile) x (plane chunk) x (frequency group: 1, or one per head). Traffic: x read once, the
// result written once; sin/cos costs one evaluation per pair per chunk of >= 4 planes. The freqs
// gradient needs no atomics: each thread sums dL/dphi over its planes, a block sums its tokens
// (times their coordinates) in a fixed order into a partial [chunk, group, token tile, 2, D/2], and
// a second kernel reduces the partials in a fixed order; the launch shape does not depend on the
// device, so the bits are the same on every run and every GPU. With freqs_index (packed batches) a token
// reads table freqs_index[n], and a block splits its tokens into runs of one table, each with its
// own partial; the second kernel adds, per table, the runs of that table in the same fixed order
// (one table: the plain op's terms in its order, hence its bits).
#include <algorithm>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "common/op_utils.h"
#include "common/static_switch.h"
#include "math/rope2d_math.h"
#include "ops/rope2d_impl.h"

namespace jitrope::cuda {
namespace {

using rope2d_math::kMaxTensors;
using rope2d_math::Rope2dGeometry;

constexpr int kThreads = 256;
constexpr int64_t kTargetBlocks = 2048;
constexpr int64_t kMinPlanesPerBlock = 4;
constexpr int64_t kMinPlanesPerBlockAngleGrad = 16;
constexpr int64_t kMaxGridY = 65535;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// The channel pairs one thread handles in one row: with vector access, the kVec / 2 pairs of one
// 16-byte vector (interleaved) or kVec pairs from one vector of a-channels and one of b-channels
// (half-split); without, one pair through two scalar loads at any channel stride.
template <typename scalar_t, bool kVectorized, bool kInterleaved>
struct PairItem {
  using acc_t = acc_type<scalar_t>;
  static constexpr int kVec = kVectorized ? static_cast<int>(16 / sizeof(scalar_t)) : 1;
  static constexpr int kPairs = kVectorized ? (kInterleaved ? kVec / 2 : kVec) : 1;
  static constexpr int kLoads = (kVectorized && kInterleaved) ? 1 : 2;
  using V = Vec<scalar_t, kVec>;
  V raw[kLoads];

  // Element offset, from the row start, of load l of item j.
  __device__ static int64_t offset(int l, int64_t j, int64_t half, int64_t channel_stride) {
    if constexpr (kVectorized) {
      return (kInterleaved || l == 0) ? j * kVec : half + j * kVec;
    } else {
      return (l == 0 ? rope2d_math::channel_a<kInterleaved>(j, half) : rope2d_math::channel_b<kInterleaved>(j, half)) *
          channel_stride;
    }
  }

  __device__ void load(const scalar_t* row, int64_t j, int64_t half, int64_t channel_stride) {
    JITROPE_UNROLL
    for (int l = 0; l < kLoads; ++l) {
      raw[l] = *reinterpret_cast<const V*>(row + offset(l, j, half, channel_stride));
    }
  }

  __device__ void store(scalar_t* row, int64_t j, int64_t half, int64_t channel_stride) const {
    JITROPE_UNROLL
    for (int l = 0; l < kLoads; ++l) {
      *reinterpret_cast<V*>(row + offset(l, j, half, channel_stride)) = raw[l];
    }
  }

  __device__ acc_t a(int t) const {
    if constexpr (kLoads == 1) {
      return static_cast<acc_t>(raw[0].v[2 * t]);
    } else {
      return static_cast<acc_t>(raw[0].v[t]);
    }
  }

  __device__ acc_t b(int t) const {
    if constexpr (kLoads == 1) {
      return static_cast<acc_t>(raw[0].v[2 * t + 1]);
    } else {
      return static_cast<acc_t>(raw[1].v[t]);
    }
  }

  __device__ void set(int t, acc_t a, acc_t b) {
    if constexpr (kLoads == 1) {
      raw[0].v[2 * t] = static_cast<scalar_t>(a);
      raw[0].v[2 * t + 1] = static_cast<scalar_t>(b);
    } else {
      raw[0].v[t] = static_cast<scalar_t>(a);
      raw[1].v[t] = static_cast<scalar_t>(b);
    }
  }
};

// The freqs partials of one block: red[r * bdx + x] holds token r's (y * dL/dphi, x * dL/dphi) for
// the kPairs pairs of item j; thread (x, 0) sums the tile's tokens for its item in token order into
// tile [2, D/2].
template <typename acc_t, int kPairs>
__device__ void sum_tile_in_order(const acc_t (*red)[2 * kPairs], int64_t j, int64_t half, acc_t* tile) {
  acc_t sy[kPairs], sx[kPairs];
  JITROPE_UNROLL
  for (int t = 0; t < kPairs; ++t) {
    sy[t] = 0;
    sx[t] = 0;
  }
  for (int r = 0; r < static_cast<int>(blockDim.y); ++r) {
    const int src = r * blockDim.x + threadIdx.x;
    JITROPE_UNROLL
    for (int t = 0; t < kPairs; ++t) {
      sy[t] += red[src][t];
      sx[t] += red[src][kPairs + t];
    }
  }
  JITROPE_UNROLL
  for (int t = 0; t < kPairs; ++t) {
    tile[j * kPairs + t] = sy[t];
    tile[half + j * kPairs + t] = sx[t];
  }
}

// The same with freqs_index: the tile's tokens split into runs of one table, each run summed in
// token order into its own slot of tile [bdy, 2, D/2] (a tile of one table gives the sum above).
// `run_table` (one thread per tile) gets each slot's table, -1 past the last run.
template <typename acc_t, int kPairs>
__device__ void sum_tile_runs_in_order(
    const acc_t (*red)[2 * kPairs],
    int64_t j,
    int64_t half,
    const int64_t* index,
    int64_t n_tokens,
    acc_t* tile,
    int64_t* run_table) {
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * blockDim.y;
  const int rows = static_cast<int>(min(static_cast<int64_t>(blockDim.y), n_tokens - n0));
  acc_t sy[kPairs], sx[kPairs];
  JITROPE_UNROLL
  for (int t = 0; t < kPairs; ++t) {
    sy[t] = 0;
    sx[t] = 0;
  }
  int slot = 0;
  for (int r = 0; r < rows; ++r) {
    const int src = r * blockDim.x + threadIdx.x;
    JITROPE_UNROLL
    for (int t = 0; t < kPairs; ++t) {
      sy[t] += red[src][t];
      sx[t] += red[src][kPairs + t];
    }
    if (r + 1 < rows && index[n0 + r + 1] == index[n0 + r]) {
      continue;
    }
    acc_t* dst = tile + slot * 2 * half;
    JITROPE_UNROLL
    for (int t = 0; t < kPairs; ++t) {
      dst[j * kPairs + t] = sy[t];
      dst[half + j * kPairs + t] = sx[t];
      sy[t] = 0;
      sx[t] = 0;
    }
    if (run_table != nullptr) {
      run_table[n0 + slot] = index[n0 + r];
    }
    ++slot;
  }
  if (run_table != nullptr) {
    for (int r = slot; r < static_cast<int>(blockDim.y); ++r) {
      run_table[n0 + r] = -1;
    }
  }
}

// Block (bdx, bdy) = (pair items of a row, tokens); grid = (token tiles, plane chunks, groups).
// Tensor 0 is read (x, or grad_out in the backward), tensor 1 written (may be tensor 0 for
// rope2d_), tensor 2 is the forward input x when kAngleGrad. With freqs_index (`index`), token n
// of group g uses table row index[n] * groups + g of freqs, and the freqs partials are split by
// runs of the tile's tokens with one table (see rope2d_indexed_freqs_grad_kernel).
template <typename scalar_t, bool kVectorized, bool kInterleaved, bool kAngleGrad>
__global__ void __launch_bounds__(kThreads) rope2d_cuda_kernel(
    const scalar_t* in,
    scalar_t* out,
    const scalar_t* x,
    const acc_type<scalar_t>* coords,
    const acc_type<scalar_t>* freqs,
    acc_type<scalar_t>* partial,
    const int64_t* index,
    int64_t* run_table,
    const Rope2dGeometry geo,
    const int64_t planes_per_block,
    const bool inverse) {
  using acc_t = acc_type<scalar_t>;
  using Item = PairItem<scalar_t, kVectorized, kInterleaved>;
  constexpr int kPairs = Item::kPairs;
  constexpr int kUnroll = kAngleGrad ? 2 : 4;

  const int64_t half = geo.half;
  const int64_t items = half / kPairs;
  const int64_t g = blockIdx.z;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * planes_per_block;
  const int64_t q1 = q0 + planes_per_block < geo.planes_per_group ? q0 + planes_per_block : geo.planes_per_group;
  const bool token_ok = n < geo.n_tokens;
  const acc_t cy = token_ok ? coords[2 * n] : acc_t(0);
  const acc_t cx = token_ok ? coords[2 * n + 1] : acc_t(0);
  const int64_t table = (index != nullptr && token_ok ? index[n] * gridDim.z : 0) + g;
  const acc_t* fy = freqs + 2 * table * half;
  const acc_t* fx = fy + half;
  int64_t row0[kMaxTensors];
  JITROPE_UNROLL
  for (int t = 0; t < kMaxTensors; ++t) {
    row0[t] = n * geo.token_stride[t] + g * geo.group_stride[t];
  }

  // Every thread runs the same number of j0 steps: the angle-gradient path synchronizes the block.
  for (int64_t j0 = 0; j0 < items; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    acc_t dphi[kPairs];
    JITROPE_UNROLL
    for (int t = 0; t < kPairs; ++t) {
      dphi[t] = 0;
    }
    if (token_ok && j < items) {
      acc_t c[kPairs], s[kPairs];
      JITROPE_UNROLL
      for (int t = 0; t < kPairs; ++t) {
        const int64_t m = j * kPairs + t;
        rope2d_math::sin_cos(rope2d_math::angle(cy, cx, fy[m], fx[m]), &s[t], &c[t]);
        s[t] = inverse ? -s[t] : s[t];
      }
      for (int64_t q = q0; q < q1; q += kUnroll) {
        Item it[kUnroll];
        Item xi[kAngleGrad ? kUnroll : 1];
        scalar_t* dst[kUnroll];
        JITROPE_UNROLL
        for (int u = 0; u < kUnroll; ++u) {
          if (q + u < q1) {
            int64_t off[kMaxTensors];
            geo.planes.offsets(static_cast<uint32_t>(q + u), off);
            it[u].load(in + row0[0] + off[0], j, half, geo.channel_stride[0]);
            dst[u] = out + row0[1] + off[1];
            if constexpr (kAngleGrad) {
              xi[u].load(x + row0[2] + off[2], j, half, geo.channel_stride[2]);
            }
          }
        }
        JITROPE_UNROLL
        for (int u = 0; u < kUnroll; ++u) {
          if (q + u < q1) {
            JITROPE_UNROLL
            for (int t = 0; t < kPairs; ++t) {
              acc_t oa, ob;
              rope2d_math::rotate(it[u].a(t), it[u].b(t), c[t], s[t], oa, ob);
              if constexpr (kAngleGrad) {
                dphi[t] += rope2d_math::angle_grad(xi[u].a(t), xi[u].b(t), oa, ob);
              }
              it[u].set(t, oa, ob);
            }
            it[u].store(dst[u], j, half, geo.channel_stride[1]);
          }
        }
      }
    }
    if constexpr (kAngleGrad) {
      // Sum the block's tokens, times their coordinates, in token order.
      __shared__ acc_t red[kThreads][2 * kPairs];
      const int tid = threadIdx.y * blockDim.x + threadIdx.x;
      JITROPE_UNROLL
      for (int t = 0; t < kPairs; ++t) {
        red[tid][t] = cy * dphi[t];
        red[tid][kPairs + t] = cx * dphi[t];
      }
      __syncthreads();
      if (threadIdx.y == 0 && j < items) {
        acc_t* tile = partial +
            ((static_cast<int64_t>(blockIdx.y) * gridDim.z + g) * gridDim.x + blockIdx.x) *
                (index != nullptr ? blockDim.y : 1) * 2 * half;
        if (index == nullptr) {
          sum_tile_in_order<acc_t, kPairs>(red, j, half, tile);
        } else {
          sum_tile_runs_in_order<acc_t, kPairs>(
              red, j, half, index, geo.n_tokens, tile,
              j0 == 0 && threadIdx.x == 0 && blockIdx.y == 0 && g == 0 ? run_table : nullptr);
        }
      }
      __syncthreads();
    }
  }
}

// Block sum of `v` over the threads: a fixed tree, so the order never depends on the device.
template <typename acc_t>
__device__ acc_t block_sum_in_order(acc_t v) {
  __shared__ acc_t red[kThreads];
  red[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (static_cast<int>(threadIdx.x) < w) {
      red[threadIdx.x] += red[threadIdx.x + w];
    }
    __syncthreads();
  }
  return red[0];
}

// grad[g, k, m] = sum over (chunk, token tile) of partial[chunk, g, tile, k, m]: one block per output,
// a fixed strided split over the threads, then a fixed tree.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) rope2d_freqs_grad_kernel(
    const acc_t* partial, acc_t* grad, int64_t chunks, int64_t groups, int64_t token_tiles, int64_t half) {
  const int64_t o = blockIdx.x;
  const int64_t g = o / (2 * half);
  const int64_t km = o % (2 * half);
  const int64_t terms = chunks * token_tiles;
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < terms; i += kThreads) {
    const int64_t c = i / token_tiles, b = i % token_tiles;
    sum += partial[((c * groups + g) * token_tiles + b) * 2 * half + km];
  }
  sum = block_sum_in_order(sum);
  if (threadIdx.x == 0) {
    grad[o] = sum;
  }
}

// With freqs_index: grad[f, g, k, m] = sum over (chunk, token tile) and the tile's runs of table f of
// partial[chunk, g, tile, run, k, m], split over the threads as above; a single table gives the
// plain kernel's terms in its order, hence its bits.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) rope2d_indexed_freqs_grad_kernel(
    const acc_t* partial,
    const int64_t* run_table,
    acc_t* grad,
    int64_t chunks,
    int64_t groups,
    int64_t token_tiles,
    int64_t slots,
    int64_t half) {
  const int64_t o = blockIdx.x;
  const int64_t f = o / (groups * 2 * half);
  const int64_t g = (o / (2 * half)) % groups;
  const int64_t km = o % (2 * half);
  const int64_t terms = chunks * token_tiles;
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < terms; i += kThreads) {
    const int64_t c = i / token_tiles, b = i % token_tiles;
    for (int64_t r = 0; r < slots; ++r) {
      const int64_t table = run_table[b * slots + r];
      if (table < 0) {
        break;
      }
      if (table == f) {
        sum += partial[(((c * groups + g) * token_tiles + b) * slots + r) * 2 * half + km];
      }
    }
  }
  sum = block_sum_in_order(sum);
  if (threadIdx.x == 0) {
    grad[o] = sum;
  }
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// How rope2d_rotate launches the main kernel: block (bdx, bdy) = (pair items of a row, tokens), grid
// (token tiles, plane chunks, groups). Fixed numbers, not the device's SM count, so that the
// freqs-gradient reduction order is device-independent.
struct LaunchShape {
  bool vectorized;
  int bdx, bdy;
  int64_t token_tiles, planes_per_block, chunks;
};

// Vector access needs channel stride 1, pairs split evenly into 16-byte vectors and every row
// start aligned, in every tensor the kernel touches.
template <typename scalar_t>
LaunchShape launch_shape(
    const Rope2dGeometry& geo,
    const scalar_t* const (&ptrs)[kMaxTensors],
    int n_ptrs,
    bool interleaved,
    bool angle_grad) {
  constexpr int64_t kVec = 16 / sizeof(scalar_t);
  const int64_t half = geo.half, groups = geo.groups, planes = geo.planes_per_group;
  LaunchShape ls{};
  ls.vectorized = interleaved ? (2 * half) % kVec == 0 : half % kVec == 0;
  for (int t = 0; t < n_ptrs; ++t) {
    ls.vectorized = ls.vectorized && geo.channel_stride[t] == 1 && reinterpret_cast<uintptr_t>(ptrs[t]) % 16 == 0 &&
        geo.token_stride[t] % kVec == 0 && geo.group_stride[t] % kVec == 0;
    for (int d = 0; d < geo.planes.ndim; ++d) {
      ls.vectorized = ls.vectorized && geo.planes.strides[d][t] % kVec == 0;
    }
  }
  const int64_t pairs_per_item = ls.vectorized ? (interleaved ? kVec / 2 : kVec) : 1;
  const int64_t items = half / pairs_per_item;
  ls.bdx = static_cast<int>(std::min<int64_t>(items, kThreads));
  ls.bdy = kThreads / ls.bdx;
  ls.token_tiles = ceil_div(geo.n_tokens, ls.bdy);
  // Enough blocks to fill any GPU, each reusing its sin/cos over a few planes.
  ls.planes_per_block = ceil_div(planes * ls.token_tiles * groups, kTargetBlocks);
  ls.planes_per_block =
      std::max(ls.planes_per_block, std::min(planes, angle_grad ? kMinPlanesPerBlockAngleGrad : kMinPlanesPerBlock));
  ls.planes_per_block = std::max(ls.planes_per_block, ceil_div(planes, kMaxGridY));
  ls.chunks = ceil_div(planes, ls.planes_per_block);
  return ls;
}

// The freqs partials of the angle-gradient launch: [chunk, group, token tile, 2, D/2], or with
// freqs_index [chunk, group, token tile, run slot, 2, D/2] and the slots' tables [token tile, slot].
struct FreqsPartials {
  at::Tensor partial, run_table;
};

// Step 1: the rotation (and, with x, the per-block freqs partials).
template <typename scalar_t>
void launch_rotate(
    const Rope2dGeometry& geo,
    const LaunchShape& ls,
    const scalar_t* in,
    scalar_t* out,
    const scalar_t* x,
    const acc_type<scalar_t>* c,
    const acc_type<scalar_t>* f,
    const int64_t* index,
    FreqsPartials* parts,
    bool interleaved,
    bool inverse) {
  using acc_t = acc_type<scalar_t>;
  const dim3 grid(
      static_cast<unsigned>(ls.token_tiles), static_cast<unsigned>(ls.chunks), static_cast<unsigned>(geo.groups));
  const dim3 block(ls.bdx, ls.bdy);
  const auto stream = at::cuda::getCurrentCUDAStream();
  acc_t* partial = parts != nullptr ? parts->partial.mutable_data_ptr<acc_t>() : nullptr;
  int64_t* run_table =
      parts != nullptr && parts->run_table.defined() ? parts->run_table.mutable_data_ptr<int64_t>() : nullptr;
  JITROPE_BOOL_SWITCH3(ls.vectorized, kVectorized, interleaved, kInterleaved, x != nullptr, kAngleGrad, [&] {
    rope2d_cuda_kernel<scalar_t, kVectorized, kInterleaved, kAngleGrad>
        <<<grid, block, 0, stream>>>(in, out, x, c, f, partial, index, run_table, geo, ls.planes_per_block, inverse);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Step 2: the partials to the freqs gradient `grad` [F * Hf, 2, D/2] in the accumulation dtype (F = 1
// without freqs_index).
template <typename acc_t>
void reduce_freqs_grad(
    const FreqsPartials& parts,
    int64_t tables,
    const Rope2dGeometry& geo,
    const LaunchShape& ls,
    const at::Tensor& grad) {
  const int64_t blocks = tables * geo.groups * 2 * geo.half;
  if (blocks == 0) {
    return;
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (!parts.run_table.defined()) {
    rope2d_freqs_grad_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        parts.partial.const_data_ptr<acc_t>(), grad.mutable_data_ptr<acc_t>(), ls.chunks, geo.groups, ls.token_tiles,
        geo.half);
  } else {
    rope2d_indexed_freqs_grad_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        parts.partial.const_data_ptr<acc_t>(), parts.run_table.const_data_ptr<int64_t>(),
        grad.mutable_data_ptr<acc_t>(), ls.chunks, geo.groups, ls.token_tiles, ls.bdy, geo.half);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Rotates a.in into a.out by phi (or -phi when `inverse`); with the forward input a.x, rotates by
// -phi and fills a.grad_freqs.
void rope2d_rotate(const Rope2dLaunch& a) {
  const Rope2dGeometry& geo = a.geo;
  const at::Tensor& in = a.in;
  TORCH_CHECK(
      geo.groups <= kMaxGridY, "rope2d: the CUDA kernel takes at most 65535 heads with per-head freqs, got ",
      geo.groups);
  const bool angle_grad = a.x.defined();
  const int64_t* ip = a.index.defined() ? a.index.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "rope2d_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* ptrs[kMaxTensors] = {
        in.const_data_ptr<scalar_t>(), a.out.const_data_ptr<scalar_t>(),
        angle_grad ? a.x.const_data_ptr<scalar_t>() : nullptr};
    const LaunchShape ls = launch_shape<scalar_t>(geo, ptrs, angle_grad ? 3 : 2, a.interleaved, angle_grad);
    const acc_t* c = a.coords.const_data_ptr<acc_t>();
    const acc_t* f = a.freqs.const_data_ptr<acc_t>();
    if (!angle_grad) {
      launch_rotate<scalar_t>(
          geo, ls, ptrs[0], a.out.mutable_data_ptr<scalar_t>(), nullptr, c, f, ip, nullptr, a.interleaved, a.inverse);
      return;
    }
    FreqsPartials parts;
    if (a.index.defined()) {
      parts.partial = at::empty({ls.chunks, geo.groups, ls.token_tiles, ls.bdy, 2, geo.half}, a.coords.options());
      parts.run_table = at::empty({ls.token_tiles, ls.bdy}, a.index.options());
    } else {
      parts.partial = at::empty({ls.chunks, geo.groups, ls.token_tiles, 2, geo.half}, a.coords.options());
    }
    launch_rotate<scalar_t>(
        geo, ls, ptrs[0], a.out.mutable_data_ptr<scalar_t>(), ptrs[2], c, f, ip, &parts, a.interleaved, a.inverse);
    reduce_freqs_grad<acc_t>(parts, a.freqs.size(0) / geo.groups, geo, ls, a.grad_freqs);
  });
}

}  // namespace jitrope::cuda

// CUDA kernels and launchers of jitrope::qk_norm_rope and qk_norm_rope_backward
// (ops/qk_norm_rope_impl.h; the host wrapper with the checks and allocations is
// ops/qk_norm_rope.cpp). qk is [2, B, H, N, D] with any strides (the q/k view of a qkv projection is read in place);
// the outputs are contiguous. One warp per row (one (s, b, h, n) token): lane l owns the channel pairs m = l + 32k, k <
// kPairs (D <= 64
// * kPairs), loads them once, sums their squares in float32 (float64 for float64) and reduces over
// the warp with an xor butterfly (every lane ends with the same sum), then normalizes, scales,
// rotates (sincos of rope2d's angle) and stores: qk read once, the result written once. The
// backward reads qk and grad_out once and writes grad_qk once; it needs no atomics: a block owns
// one (s, h, chunk of B*N rows) of the fixed chunking of math/qk_norm_rope_math.h, its warps
// accumulate weight (and freqs) gradients per lane in registers, the block adds its warps in
// order into one partial, and a second kernel sums the partials in the fixed order of the math
// header. The launch shapes depend on the tensor shapes only, so every run gives the same bits.
// No host synchronization and no allocation outside PyTorch's caching allocator (CUDA-graph safe),
// except with freqs_index (packed batches): its values are checked on the host, and for the gradient of
// indexed freqs the chunks' runs of rows with one table (math/qk_norm_rope_math.h) are found there.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "common/op_utils.h"
#include "common/static_switch.h"
#include "math/qk_norm_rope_math.h"
#include "math/rope2d_math.h"
#include "ops/qk_norm_rope_impl.h"

namespace jitrope::cuda {
namespace {

namespace qm = qk_norm_rope_math;
namespace rm = rope2d_math;
using detail::QkLayout;

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxPairsPerLane = 8;
constexpr int64_t kMaxD = 2 * kWarpSize * kMaxPairsPerLane;  // 512
constexpr int64_t kMaxBlocks = 65535LL * 1024;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  JITROPE_UNROLL
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// Angle tables and weights are in the accumulation type; coords/freqs are null without rotation.
template <typename acc_t>
struct Tables {
  const acc_t* weight;  // [2, D]
  const acc_t* coords;  // [N, 2]
  const acc_t* freqs;   // [F * Hf, 2, D/2] (F = 1 without freqs_index)
  bool per_head;
  acc_t eps;
  const int64_t* index;  // freqs_index [N], null without it
};

template <typename acc_t>
__device__ __forceinline__ void pair_sin_cos(
    const Tables<acc_t>& t, int64_t h, int64_t n, int64_t m, int64_t half, int64_t groups, acc_t& c, acc_t& s) {
  const int64_t table = (t.index != nullptr ? t.index[n] * groups : 0) + (t.per_head ? h : 0);
  const acc_t* fy = t.freqs + 2 * table * half;
  rm::sin_cos(rm::angle(t.coords[2 * n], t.coords[2 * n + 1], fy[m], fy[half + m]), &s, &c);
}

template <typename scalar_t, int kPairs, bool kRotate, bool kInterleaved>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_cuda_kernel(
    const scalar_t* __restrict__ qk,
    const QkLayout L,
    scalar_t* __restrict__ out,
    const Tables<acc_type<scalar_t>> t,
    const int64_t rows) {
  using acc_t = acc_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t half = L.D / 2;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    int64_t q = r;
    const int64_t n = q % L.N;
    q /= L.N;
    const int64_t h = q % L.H;
    q /= L.H;
    const int64_t b = q % L.B;
    const int64_t s = q / L.B;
    const scalar_t* x = qk + s * L.ss + b * L.sb + h * L.sh + n * L.sn;
    acc_t xa[kPairs], xb[kPairs];
    acc_t ss = 0;
    JITROPE_UNROLL
    for (int k = 0; k < kPairs; ++k) {
      const int64_t m = lane + kWarpSize * k;
      xa[k] = xb[k] = 0;
      if (m < half) {
        xa[k] = static_cast<acc_t>(x[rm::channel_a<kInterleaved>(m, half) * L.sd]);
        xb[k] = static_cast<acc_t>(x[rm::channel_b<kInterleaved>(m, half) * L.sd]);
      }
      ss += xa[k] * xa[k] + xb[k] * xb[k];
    }
    const acc_t inv = qm::inv_rms(warp_sum(ss), L.D, t.eps);
    const acc_t* ws = t.weight + s * L.D;
    scalar_t* o = out + r * L.D;
    JITROPE_UNROLL
    for (int k = 0; k < kPairs; ++k) {
      const int64_t m = lane + kWarpSize * k;
      if (m < half) {
        const int64_t ia = rm::channel_a<kInterleaved>(m, half), ib = rm::channel_b<kInterleaved>(m, half);
        acc_t ya = qm::normalize(xa[k], inv, ws[ia]);
        acc_t yb = qm::normalize(xb[k], inv, ws[ib]);
        if constexpr (kRotate) {
          acc_t c, sn, oa, ob;
          pair_sin_cos(t, h, n, m, half, t.per_head ? L.H : 1, c, sn);
          rm::rotate(ya, yb, c, sn, oa, ob);
          ya = oa;
          yb = ob;
        }
        o[ia] = static_cast<scalar_t>(ya);
        o[ib] = static_cast<scalar_t>(yb);
      }
    }
  }
}

// Block (chunk, h, s); warp w takes rows w, w + kWarps, ... of the chunk. Partials [2, H, chunks, D]:
// wpart gets sum dL/dy * xhat per channel; fpart (kFreqsGrad, [2, H, chunks, runs, D]) sum y_n dL/dphi
// then x_n dL/dphi per run of rows with one table (math/qk_norm_rope_math.h; the whole chunk is one
// run without freqs_index, and the warps take its rows w, w + kWarps, ... from the run's start).
template <typename scalar_t, int kPairs, bool kRotate, bool kInterleaved, bool kFreqsGrad>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_backward_cuda_kernel(
    const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ qk,
    const QkLayout L,
    scalar_t* __restrict__ gx,
    const Tables<acc_type<scalar_t>> t,
    const int64_t chunks,
    const int64_t rpc,
    const int64_t runs,
    acc_type<scalar_t>* __restrict__ wpart,
    acc_type<scalar_t>* __restrict__ fpart) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t red[kWarps][kMaxD];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t k = blockIdx.x, h = blockIdx.y, s = blockIdx.z;
  const int64_t half = L.D / 2, BN = L.B * L.N;
  const int64_t row0 = k * rpc, row1 = min(BN, row0 + rpc);
  const acc_t* ws = t.weight + s * L.D;
  acc_t wa[kPairs], wb[kPairs], fy[kPairs], fx[kPairs];
  JITROPE_UNROLL
  for (int j = 0; j < kPairs; ++j) {
    wa[j] = wb[j] = fy[j] = fx[j] = 0;
  }
  int64_t slot = 0;
  for (int64_t r0 = row0; r0 < row1; ++slot) {
    const int64_t r1 = kFreqsGrad && t.index != nullptr ? qm::run_end(t.index, r0, row1, L.N) : row1;
    for (int64_t bn = r0 + warp; bn < r1; bn += kWarps) {
      const int64_t b = bn / L.N, n = bn % L.N;
      const scalar_t* x = qk + s * L.ss + b * L.sb + h * L.sh + n * L.sn;
      const int64_t orow = ((s * L.B + b) * L.H + h) * L.N + n;
      const scalar_t* gr = g + orow * L.D;
      scalar_t* gxr = gx + orow * L.D;
      acc_t xa[kPairs], xb[kPairs], ga[kPairs], gb[kPairs];
      acc_t ss = 0;
      JITROPE_UNROLL
      for (int j = 0; j < kPairs; ++j) {
        const int64_t m = lane + kWarpSize * j;
        xa[j] = xb[j] = ga[j] = gb[j] = 0;
        if (m < half) {
          const int64_t ia = rm::channel_a<kInterleaved>(m, half), ib = rm::channel_b<kInterleaved>(m, half);
          xa[j] = static_cast<acc_t>(x[ia * L.sd]);
          xb[j] = static_cast<acc_t>(x[ib * L.sd]);
          ga[j] = static_cast<acc_t>(gr[ia]);
          gb[j] = static_cast<acc_t>(gr[ib]);
        }
        ss += xa[j] * xa[j] + xb[j] * xb[j];
      }
      const acc_t inv = qm::inv_rms(warp_sum(ss), L.D, t.eps);
      acc_t dot = 0;
      JITROPE_UNROLL
      for (int j = 0; j < kPairs; ++j) {
        const int64_t m = lane + kWarpSize * j;
        if (m < half) {
          const int64_t ia = rm::channel_a<kInterleaved>(m, half), ib = rm::channel_b<kInterleaved>(m, half);
          if constexpr (kRotate) {
            acc_t c, sn, ra, rb;
            pair_sin_cos(t, h, n, m, half, t.per_head ? L.H : 1, c, sn);
            rm::rotate(ga[j], gb[j], c, -sn, ra, rb);  // dL/dy = R(-phi) dL/dout
            if constexpr (kFreqsGrad) {
              const acc_t dphi =
                  rm::angle_grad(qm::normalize(xa[j], inv, ws[ia]), qm::normalize(xb[j], inv, ws[ib]), ra, rb);
              fy[j] += rm::mul_rn(t.coords[2 * n], dphi);
              fx[j] += rm::mul_rn(t.coords[2 * n + 1], dphi);
            }
            ga[j] = ra;
            gb[j] = rb;
          }
          // From here xa/xb hold xhat and ga/gb hold gxhat = dL/dy * w.
          xa[j] = rm::mul_rn(xa[j], inv);
          xb[j] = rm::mul_rn(xb[j], inv);
          wa[j] += rm::mul_rn(ga[j], xa[j]);
          wb[j] += rm::mul_rn(gb[j], xb[j]);
          ga[j] = rm::mul_rn(ga[j], ws[ia]);
          gb[j] = rm::mul_rn(gb[j], ws[ib]);
          dot += rm::mul_rn(ga[j], xa[j]) + rm::mul_rn(gb[j], xb[j]);
        }
      }
      const acc_t mean_dot = warp_sum(dot) / static_cast<acc_t>(L.D);
      JITROPE_UNROLL
      for (int j = 0; j < kPairs; ++j) {
        const int64_t m = lane + kWarpSize * j;
        if (m < half) {
          gxr[rm::channel_a<kInterleaved>(m, half)] =
              static_cast<scalar_t>(qm::norm_input_grad(ga[j], xa[j], inv, mean_dot));
          gxr[rm::channel_b<kInterleaved>(m, half)] =
              static_cast<scalar_t>(qm::norm_input_grad(gb[j], xb[j], inv, mean_dot));
        }
      }
    }
    if constexpr (kFreqsGrad) {
      // The run's freqs partial: warps in order.
      __syncthreads();
      JITROPE_UNROLL
      for (int j = 0; j < kPairs; ++j) {
        const int64_t m = lane + kWarpSize * j;
        if (m < half) {
          red[warp][m] = fy[j];
          red[warp][half + m] = fx[j];
        }
        fy[j] = fx[j] = 0;
      }
      __syncthreads();
      acc_t* dst = fpart + (((s * L.H + h) * chunks + k) * runs + slot) * L.D;
      for (int64_t e = threadIdx.x; e < L.D; e += kThreads) {
        acc_t sum = 0;
        for (int w = 0; w < kWarps; ++w) {
          sum += red[w][e];
        }
        dst[e] = sum;
      }
      __syncthreads();
    }
    r0 = r1;
  }
  // Warps' weight partials to the block's, warps in order.
  const int64_t pidx = ((s * L.H + h) * chunks + k) * L.D;
  JITROPE_UNROLL
  for (int j = 0; j < kPairs; ++j) {
    const int64_t m = lane + kWarpSize * j;
    if (m < half) {
      red[warp][rm::channel_a<kInterleaved>(m, half)] = wa[j];
      red[warp][rm::channel_b<kInterleaved>(m, half)] = wb[j];
    }
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < L.D; d += kThreads) {
    acc_t sum = 0;
    for (int w = 0; w < kWarps; ++w) {
      sum += red[w][d];
    }
    wpart[pidx + d] = sum;
  }
}

// Partials to gradients: item i < 2D is grad_weight[i / D][i % D], then tables * groups * D freqs
// entries (tables = F with freqs_index and its run_table [chunks, runs], else 1).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_reduce_kernel(
    const acc_t* __restrict__ wpart,
    const acc_t* __restrict__ fpart,
    const int64_t* __restrict__ run_table,
    acc_t* __restrict__ gw,
    acc_t* __restrict__ gf,
    const int64_t H,
    const int64_t chunks,
    const int64_t runs,
    const int64_t D,
    const int64_t tables,
    const int64_t groups,
    const bool per_head) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < 2 * D) {
    gw[i] = qm::sum_weight_partials(wpart, i / D, i % D, H, chunks, D);
  } else if (fpart != nullptr && i < 2 * D + tables * groups * D) {
    const int64_t e = i - 2 * D;
    const int64_t fg = e / D;
    gf[e] = run_table == nullptr ? qm::sum_freqs_partials(fpart, fg, e % D, H, chunks, D, per_head)
                                 : qm::sum_indexed_freqs_partials(
                                       fpart, run_table, fg / groups, fg % groups, e % D, H, chunks, runs, D, per_head);
  }
}

// kPairs, the channel pairs per lane, for rows of HALF pairs: the smallest of 1, 2, 4, 8 that covers
// them (D <= kMaxD is checked first). The body is a lambda, as in common/static_switch.h.
#define QK_PAIRS_SWITCH(HALF, NAME, ...)                            \
  [&] {                                                             \
    const int64_t per_lane_ = ((HALF) + kWarpSize - 1) / kWarpSize; \
    if (per_lane_ <= 1) {                                           \
      constexpr int NAME = 1;                                       \
      return __VA_ARGS__();                                         \
    } else if (per_lane_ <= 2) {                                    \
      constexpr int NAME = 2;                                       \
      return __VA_ARGS__();                                         \
    } else if (per_lane_ <= 4) {                                    \
      constexpr int NAME = 4;                                       \
      return __VA_ARGS__();                                         \
    }                                                               \
    constexpr int NAME = 8;                                         \
    return __VA_ARGS__();                                           \
  }()

void check_cuda_head_dim(const char* op, const at::Tensor& qk) {
  TORCH_CHECK(
      qk.size(4) <= kMaxD, op, ": the CUDA kernel takes head dims D <= ", kMaxD, ", got D = ", qk.size(4),
      " in qk of shape ", qk.sizes());
  TORCH_CHECK(qk.size(2) <= 65535, op, ": the CUDA kernel takes at most 65535 heads, got H = ", qk.size(2));
}

// The Tables view of the accumulation-type tables.
template <typename acc_t>
Tables<acc_t> tables_view(const QkNormRopeParams& p) {
  return Tables<acc_t>{
      p.weight.const_data_ptr<acc_t>(),
      p.rotate() ? p.coords.const_data_ptr<acc_t>() : nullptr,
      p.rotate() ? p.freqs.const_data_ptr<acc_t>() : nullptr,
      p.per_head,
      static_cast<acc_t>(p.eps),
      p.index.defined() ? p.index.const_data_ptr<int64_t>() : nullptr};
}

template <typename scalar_t, bool kRotate, bool kInterleaved>
void launch_forward(
    const at::Tensor& qk, const QkLayout& L, const at::Tensor& out, const Tables<acc_type<scalar_t>>& t) {
  const int64_t rows = 2 * L.B * L.H * L.N;
  const int64_t blocks = std::min<int64_t>((rows + kWarps - 1) / kWarps, kMaxBlocks);
  QK_PAIRS_SWITCH(L.D / 2, kPairs, [&] {
    qk_norm_rope_cuda_kernel<scalar_t, kPairs, kRotate, kInterleaved>
        <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            qk.const_data_ptr<scalar_t>(), L, out.mutable_data_ptr<scalar_t>(), t, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Step 1 of the backward: grad_qk, the [2, H, chunks, D] weight partials and the [2, H, chunks, runs,
// D] freqs partials.
template <typename scalar_t, bool kRotate, bool kInterleaved, bool kFreqsGrad>
void launch_backward(
    const at::Tensor& g,
    const at::Tensor& qk,
    const QkLayout& L,
    const at::Tensor& grad_qk,
    const Tables<acc_type<scalar_t>>& t,
    int64_t chunks,
    int64_t rpc,
    int64_t runs,
    const at::Tensor& wpart,
    const at::Tensor& fpart) {
  using acc_t = acc_type<scalar_t>;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(L.H), 2);
  QK_PAIRS_SWITCH(L.D / 2, kPairs, [&] {
    qk_norm_rope_backward_cuda_kernel<scalar_t, kPairs, kRotate, kInterleaved, kFreqsGrad>
        <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            g.const_data_ptr<scalar_t>(), qk.const_data_ptr<scalar_t>(), L, grad_qk.mutable_data_ptr<scalar_t>(), t,
            chunks, rpc, runs, wpart.mutable_data_ptr<acc_t>(), kFreqsGrad ? fpart.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Step 2: the partials to grad_weight [2, D] and grad_freqs [tables * Hf, D] (when fpart is defined),
// in the accumulation dtype and the fixed order of the math header. run_table [chunks, runs] is
// defined with freqs_index (on the device).
template <typename acc_t>
void reduce_partials(
    const at::Tensor& wpart,
    const at::Tensor& fpart,
    const at::Tensor& run_table,
    const at::Tensor& gw,
    const at::Tensor& gf,
    int64_t tables,
    int64_t groups,
    bool per_head) {
  const int64_t H = wpart.size(1), chunks = wpart.size(2), D = wpart.size(3);
  const bool freqs_grad = fpart.defined();
  const int64_t items = 2 * D + (freqs_grad ? tables * groups * D : 0);
  if (items == 0) {
    return;
  }
  qk_norm_rope_reduce_kernel<acc_t>
      <<<static_cast<unsigned>((items + kThreads - 1) / kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          wpart.const_data_ptr<acc_t>(), freqs_grad ? fpart.const_data_ptr<acc_t>() : nullptr,
          run_table.defined() ? run_table.const_data_ptr<int64_t>() : nullptr, gw.mutable_data_ptr<acc_t>(),
          freqs_grad ? gf.mutable_data_ptr<acc_t>() : nullptr, H, chunks, freqs_grad ? fpart.size(3) : 1, D, tables,
          groups, per_head);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void qk_norm_rope_forward(const QkNormRopeForward& a) {
  check_cuda_head_dim("qk_norm_rope", a.qk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.qk.scalar_type(), "qk_norm_rope_cuda", [&] {
    const auto t = tables_view<acc_type<scalar_t>>(a.p);
    JITROPE_BOOL_SWITCH2(a.p.rotate(), kRotate, a.p.interleaved, kInterleaved, [&] {
      launch_forward<scalar_t, kRotate, kInterleaved>(a.qk, a.L, a.out, t);
    });
  });
}

void qk_norm_rope_backward(const QkNormRopeBackward& a) {
  check_cuda_head_dim("qk_norm_rope_backward", a.qk);
  const QkNormRopeParams& p = a.p;
  const int64_t runs = a.run_table.defined() ? a.run_table.size(1) : 1;
  const int64_t groups = p.per_head ? a.L.H : 1;
  const int64_t tables = a.freqs_grad ? a.grad_freqs.size(0) / groups : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.qk.scalar_type(), "qk_norm_rope_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto t = tables_view<acc_t>(p);
    JITROPE_BOOL_SWITCH3(p.rotate(), kRotate, p.interleaved, kInterleaved, a.freqs_grad, kFreqsGrad, [&] {
      // The check refuses freqs_grad without rotation.
      if constexpr (kRotate || !kFreqsGrad) {
        launch_backward<scalar_t, kRotate, kInterleaved, kFreqsGrad>(
            a.grad_out, a.qk, a.L, a.grad_qk, t, a.chunks, a.rows_per_chunk, runs, a.wpart, a.fpart);
      }
    });
    reduce_partials<acc_t>(a.wpart, a.fpart, a.run_table, a.grad_weight, a.grad_freqs, tables, groups, p.per_head);
  });
}

}  // namespace jitrope::cuda

// CPU launchers of jitrope::qk_norm_rope and qk_norm_rope_backward (ops/qk_norm_rope_impl.h; the
// host wrapper is ops/qk_norm_rope.cpp). qk is [2, B, H, N, D] with any strides (the q/k view of a qkv projection is
// read in place); the outputs are contiguous. A row is one (s, b, h, n) token of D channels: its sum of squares
// (float32; float64 for float64), then each channel pair normalized, scaled by weight[s] and rotated by the cos/sin
// table of rope2d's CPU kernel (cpu/rope2d_table.h), all in registers, and rounded once. Traffic: qk read once (the row
// is re-read from L1), the result written once; the table and the weights stay in cache. Forward: at::parallel_for over
// rows. Backward: one task per (s, h, chunk of B*N rows) of the fixed chunking of math/qk_norm_rope_math.h; each task
// writes grad_qk for its rows and one weight (and freqs) partial, and the partials are summed in a fixed order, so the
// gradients have the same bits for any thread count. With freqs_index (SPEC §10) the freqs partial is split by the
// chunk's runs of rows with one table (math/qk_norm_rope_math.h).
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/op_utils.h"
#include "common/static_switch.h"
#include "cpu/rope2d_table.h"
#include "math/qk_norm_rope_math.h"
#include "math/rope2d_math.h"
#include "ops/qk_norm_rope_impl.h"

namespace jitrope::cpu {
namespace {

namespace qm = qk_norm_rope_math;
namespace rm = rope2d_math;
using detail::QkLayout;

constexpr int64_t kGrainElems = 32768;  // elements of qk per parallel task, at least

// Sum of squares of one row in a fixed order: 8 running sums over channels d = l (mod 8), added
// pairwise at the end, so that the loop vectorizes for contiguous rows and the result does not
// depend on how the rows are split over threads.
template <bool kContig, typename scalar_t, typename acc_t>
inline acc_t sum_squares(const scalar_t* x, int64_t sd, int64_t D) {
  if constexpr (kContig) {
    sd = 1;
  }
  acc_t lanes[8] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int l = 0; l < 8; ++l) {
      const acc_t v = static_cast<acc_t>(x[(d + l) * sd]);
      lanes[l] += v * v;
    }
  }
  for (int l = 0; d < D; ++d, ++l) {
    const acc_t v = static_cast<acc_t>(x[d * sd]);
    lanes[l] += v * v;
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// The cos/sin table (cos [Hf, N, D/2] then sin, -sin when `inverse`), or an undefined tensor
// without rotation.
template <typename acc_t>
at::Tensor rotation_table(const QkNormRopeParams& p, const QkLayout& L, bool inverse) {
  if (!p.rotate()) {
    return at::Tensor();
  }
  const int64_t* ip = p.index.defined() ? p.index.const_data_ptr<int64_t>() : nullptr;
  return angle_table<acc_t>(p.coords, p.freqs, p.per_head ? L.H : 1, L.N, L.D / 2, inverse, ip);
}

template <typename scalar_t, bool kRotate, bool kInterleaved, bool kContig>
void forward_kernel(
    const scalar_t* qk,
    const QkLayout& L,
    scalar_t* out,
    const acc_type<scalar_t>* w,
    const acc_type<scalar_t>* cos_t,
    const acc_type<scalar_t>* sin_t,
    bool per_head,
    acc_type<scalar_t> eps) {
  using acc_t = acc_type<scalar_t>;
  const int64_t D = L.D, half = D / 2, rows = 2 * L.B * L.H * L.N;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, D));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // r enumerates (s, b, h, n) in the output's (contiguous) order; split once per task, then
    // stepped, so that no row pays for four 64-bit divisions.
    int64_t t = begin;
    int64_t n = t % L.N;
    t /= L.N;
    int64_t h = t % L.H;
    t /= L.H;
    int64_t b = t % L.B;
    int64_t s = t / L.B;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x = qk + s * L.ss + b * L.sb + h * L.sh + n * L.sn;
      const int64_t sd = kContig ? 1 : L.sd;
      scalar_t* o = out + r * D;
      const acc_t inv = qm::inv_rms(sum_squares<kContig, scalar_t, acc_t>(x, sd, D), D, eps);
      const acc_t* ws = w + s * D;
      const int64_t trow = ((per_head ? h : 0) * L.N + n) * half;
      for (int64_t m = 0; m < half; ++m) {
        const int64_t ia = rm::channel_a<kInterleaved>(m, half), ib = rm::channel_b<kInterleaved>(m, half);
        acc_t ya = qm::normalize(static_cast<acc_t>(x[ia * sd]), inv, ws[ia]);
        acc_t yb = qm::normalize(static_cast<acc_t>(x[ib * sd]), inv, ws[ib]);
        if constexpr (kRotate) {
          acc_t oa, ob;
          rm::rotate(ya, yb, cos_t[trow + m], sin_t[trow + m], oa, ob);
          ya = oa;
          yb = ob;
        }
        o[ia] = static_cast<scalar_t>(ya);
        o[ib] = static_cast<scalar_t>(yb);
      }
      if (++n == L.N) {
        n = 0;
        if (++h == L.H) {
          h = 0;
          if (++b == L.B) {
            b = 0;
            ++s;
          }
        }
      }
    }
  });
}

// What the backward's tasks read and write; the partials are [2, H, chunks, D] and, for the freqs,
// [2, H, chunks, runs, D] (math header; runs = 1 without freqs_index).
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* g;  // grad_out, contiguous
  const scalar_t* qk;
  QkLayout L;
  scalar_t* gx;         // grad_qk, contiguous
  const acc_t* w;       // [2, D]
  const acc_t* cos_t;   // [Hf, N, D/2], null without rotation
  const acc_t* nsin_t;  // -sin, same layout
  const acc_t* coords;  // [N, 2] when the freqs gradient is wanted, else null
  bool per_head;
  acc_t eps;
  int64_t chunks, rpc;
  acc_t* wpart;
  acc_t* fpart;          // null without the freqs gradient
  const int64_t* index;  // freqs_index, null without it
  int64_t runs;
};

// One (s, h, chunk) task of the backward: grad_qk for its rows, and its weight partial wp[D] and,
// with kFreqsGrad, its freqs partials fp[runs][2 * D/2] (y-axis then x-axis), one per run of rows
// with one table (the whole chunk without freqs_index).
template <typename scalar_t, bool kRotate, bool kInterleaved, bool kFreqsGrad, bool kContig>
void backward_task(
    const BackwardArgs<scalar_t>& a,
    int64_t s,
    int64_t h,
    int64_t row0,
    int64_t row1,
    acc_type<scalar_t>* wp,
    acc_type<scalar_t>* fp,
    std::vector<acc_type<scalar_t>>& scratch) {
  using acc_t = acc_type<scalar_t>;
  const QkLayout& L = a.L;
  const int64_t D = L.D, half = D / 2;
  const acc_t* ws = a.w + s * D;
  std::fill(wp, wp + D, acc_t(0));
  // scratch: xhat [D], gxhat [D] of the current row.
  acc_t* xhat = scratch.data();
  acc_t* gxhat = xhat + D;
  const int64_t sd = kContig ? 1 : L.sd;
  int64_t b = row0 / L.N, n = row0 % L.N;
  int64_t run1 = row1;  // end of the current run
  for (int64_t bn = row0; bn < row1; ++bn) {
    if (kFreqsGrad && (bn == row0 || bn == run1)) {
      if (bn != row0) {
        fp += D;
      }
      std::fill(fp, fp + D, acc_t(0));
      run1 = a.index != nullptr ? qm::run_end(a.index, bn, row1, L.N) : row1;
    }
    const scalar_t* x = a.qk + s * L.ss + b * L.sb + h * L.sh + n * L.sn;
    const int64_t orow = ((s * L.B + b) * L.H + h) * L.N + n;  // row of the contiguous g and gx
    const scalar_t* gr = a.g + orow * D;
    scalar_t* gxr = a.gx + orow * D;
    const acc_t inv = qm::inv_rms(sum_squares<kContig, scalar_t, acc_t>(x, sd, D), D, a.eps);
    const int64_t trow = ((a.per_head ? h : 0) * L.N + n) * half;
    acc_t cy = 0, cx = 0;
    if constexpr (kFreqsGrad) {
      cy = a.coords[2 * n];
      cx = a.coords[2 * n + 1];
    }
    acc_t dot = 0;
    for (int64_t m = 0; m < half; ++m) {
      const int64_t ia = rm::channel_a<kInterleaved>(m, half), ib = rm::channel_b<kInterleaved>(m, half);
      const acc_t xa = static_cast<acc_t>(x[ia * sd]), xb = static_cast<acc_t>(x[ib * sd]);
      acc_t ga = static_cast<acc_t>(gr[ia]), gb = static_cast<acc_t>(gr[ib]);
      if constexpr (kRotate) {
        acc_t ra, rb;
        rm::rotate(ga, gb, a.cos_t[trow + m], a.nsin_t[trow + m], ra, rb);  // dL/dy = R(-phi) dL/dout
        if constexpr (kFreqsGrad) {
          const acc_t dphi = rm::angle_grad(qm::normalize(xa, inv, ws[ia]), qm::normalize(xb, inv, ws[ib]), ra, rb);
          fp[m] += rm::mul_rn(cy, dphi);
          fp[half + m] += rm::mul_rn(cx, dphi);
        }
        ga = ra;
        gb = rb;
      }
      const acc_t ha = rm::mul_rn(xa, inv), hb = rm::mul_rn(xb, inv);
      wp[ia] += rm::mul_rn(ga, ha);
      wp[ib] += rm::mul_rn(gb, hb);
      xhat[ia] = ha;
      xhat[ib] = hb;
      gxhat[ia] = rm::mul_rn(ga, ws[ia]);
      gxhat[ib] = rm::mul_rn(gb, ws[ib]);
    }
    for (int64_t d = 0; d < D; ++d) {
      dot += rm::mul_rn(gxhat[d], xhat[d]);
    }
    const acc_t mean_dot = dot / static_cast<acc_t>(D);
    for (int64_t d = 0; d < D; ++d) {
      gxr[d] = static_cast<scalar_t>(qm::norm_input_grad(gxhat[d], xhat[d], inv, mean_dot));
    }
    if (++n == L.N) {
      n = 0;
      ++b;
    }
  }
}

// Step 1 of the backward: every (s, h, chunk) task, in parallel; task = (s * H + h) * chunks + k is
// also the index of its partials.
template <typename scalar_t, bool kRotate, bool kInterleaved, bool kFreqsGrad, bool kContig>
void run_backward_tasks(const BackwardArgs<scalar_t>& a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t D = a.L.D, BN = a.L.B * a.L.N;
  const int64_t tasks = 2 * a.L.H * a.chunks;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, a.rpc * D));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task % a.chunks, sh = task / a.chunks;
      const int64_t h = sh % a.L.H, s = sh / a.L.H;
      backward_task<scalar_t, kRotate, kInterleaved, kFreqsGrad, kContig>(
          a, s, h, k * a.rpc, std::min(BN, (k + 1) * a.rpc), a.wpart + task * D,
          kFreqsGrad ? a.fpart + task * a.runs * D : nullptr, scratch);
    }
  });
}

// Step 2: the partials to grad_weight [2, D] and (with the freqs gradient) grad_freqs [F * Hf, D],
// in the accumulation dtype and the fixed order of the math header; with freqs_index (run_table
// defined) F = the number of tables, else 1.
void reduce_partials(const QkNormRopeBackward& a) {
  const int64_t chunks = a.chunks, D = a.L.D, H = a.L.H;
  const bool per_head = a.p.per_head;
  AT_DISPATCH_FLOATING_TYPES(a.wpart.scalar_type(), "qk_norm_rope_backward_cpu_reduce", [&] {
    const scalar_t* wp = a.wpart.const_data_ptr<scalar_t>();
    scalar_t* gwp = a.grad_weight.mutable_data_ptr<scalar_t>();
    for (int64_t s = 0; s < 2; ++s) {
      for (int64_t d = 0; d < D; ++d) {
        gwp[s * D + d] = qm::sum_weight_partials(wp, s, d, H, chunks, D);
      }
    }
    if (!a.freqs_grad) {
      return;
    }
    const int64_t groups = per_head ? H : 1;
    const scalar_t* fpp = a.fpart.const_data_ptr<scalar_t>();
    scalar_t* gfp = a.grad_freqs.mutable_data_ptr<scalar_t>();
    if (!a.run_table.defined()) {
      for (int64_t grp = 0; grp < groups; ++grp) {
        for (int64_t e = 0; e < D; ++e) {
          gfp[grp * D + e] = qm::sum_freqs_partials(fpp, grp, e, H, chunks, D, per_head);
        }
      }
      return;
    }
    const int64_t* rt = a.run_table.const_data_ptr<int64_t>();
    const int64_t runs = a.run_table.size(1);
    const int64_t F = a.grad_freqs.size(0) / groups;
    for (int64_t f = 0; f < F; ++f) {
      for (int64_t grp = 0; grp < groups; ++grp) {
        for (int64_t e = 0; e < D; ++e) {
          gfp[(f * groups + grp) * D + e] =
              qm::sum_indexed_freqs_partials(fpp, rt, f, grp, e, H, chunks, runs, D, per_head);
        }
      }
    }
  });
}

}  // namespace

void qk_norm_rope_forward(const QkNormRopeForward& a) {
  const at::Tensor& qk = a.qk;
  const QkLayout& L = a.L;
  const QkNormRopeParams& p = a.p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qk.scalar_type(), "qk_norm_rope_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor table = rotation_table<acc_t>(p, L, /*inverse=*/false);
    const acc_t* cos_t = p.rotate() ? table.const_data_ptr<acc_t>() : nullptr;
    const acc_t* sin_t = p.rotate() ? cos_t + table.numel() / 2 : nullptr;
    JITROPE_BOOL_SWITCH3(p.rotate(), kRotate, p.interleaved, kInterleaved, L.sd == 1, kContig, [&] {
      forward_kernel<scalar_t, kRotate, kInterleaved, kContig>(
          qk.const_data_ptr<scalar_t>(), L, a.out.mutable_data_ptr<scalar_t>(), p.weight.const_data_ptr<acc_t>(), cos_t,
          sin_t, p.per_head, static_cast<acc_t>(p.eps));
    });
  });
}

void qk_norm_rope_backward(const QkNormRopeBackward& a) {
  const QkNormRopeParams& p = a.p;
  const bool rotate = p.rotate(), freqs_grad = a.freqs_grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.qk.scalar_type(), "qk_norm_rope_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor table = rotation_table<acc_t>(p, a.L, /*inverse=*/true);
    const acc_t* cos_t = rotate ? table.const_data_ptr<acc_t>() : nullptr;
    const BackwardArgs<scalar_t> args{
        a.grad_out.const_data_ptr<scalar_t>(),
        a.qk.const_data_ptr<scalar_t>(),
        a.L,
        a.grad_qk.mutable_data_ptr<scalar_t>(),
        p.weight.const_data_ptr<acc_t>(),
        cos_t,
        rotate ? cos_t + table.numel() / 2 : nullptr,
        freqs_grad ? p.coords.const_data_ptr<acc_t>() : nullptr,
        p.per_head,
        static_cast<acc_t>(p.eps),
        a.chunks,
        a.rows_per_chunk,
        a.wpart.mutable_data_ptr<acc_t>(),
        freqs_grad ? a.fpart.mutable_data_ptr<acc_t>() : nullptr,
        p.index.defined() ? p.index.const_data_ptr<int64_t>() : nullptr,
        a.run_table.defined() ? a.run_table.size(1) : 1};
    JITROPE_BOOL_SWITCH4(
        rotate, kRotate, p.interleaved, kInterleaved, freqs_grad, kFreqsGrad, a.L.sd == 1, kContig, [&] {
          // The check refuses freqs_grad without rotation.
          if constexpr (kRotate || !kFreqsGrad) {
            run_backward_tasks<scalar_t, kRotate, kInterleaved, kFreqsGrad, kContig>(args);
          }
        });
  });
  reduce_partials(a);
}

}  // namespace jitrope::cpu

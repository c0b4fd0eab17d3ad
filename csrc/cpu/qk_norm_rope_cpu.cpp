// CPU launchers of jitrope::qk_norm_rope and qk_norm_rope_backward (ops/qk_norm_rope_impl.h; the
// host wrapper is ops/qk_norm_rope.cpp). qk is [2, B, H, N, D] with any strides (the q/k view of a
// qkv projection is read in place); the outputs are contiguous. A row is one (s, b, h, n) token of
// D channels, computed in float32 (float64 for float64) and rounded once: its sum of squares, then
// each channel pair normalized, scaled by weight[s] and rotated by the cos/sin table of rope2d's CPU
// kernel (cpu/rope2d_table.h; computed once per call, reused by every row of a token).
//
// Memory. Forward: a qkv view is walked token by token, q's and k's heads inside (the view's memory
// order; the rows a few tokens ahead are prefetched, since the skipped v rows break the hardware
// prefetcher's stream), any other layout in the output's order. Backward: rows (s, h)-major, so
// grad_out and grad_qk are sequential streams; a qkv view is taken chunk by chunk of tokens, the
// next chunk's rows prefetched in memory order while one computes; the rows of other strided
// layouts are prefetched kPrefetchBytes ahead. Traffic: qk (and grad_out) read once, the result
// written once; tables and weights stay in cache.
//
// Compute. float32 and bfloat16 rows with unit channel stride and D a multiple of 16 run eight
// lanes at a time (cpu/vec8.h) in the AVX2 build (cpu/isa.h), kRowBlock rows at a time; other rows
// run the scalar loops (vectorized by the compiler where it can) through a float scratch row
// (cpu/rows.h: bfloat16 converts through its bits). Both forms do the same operations in the same
// order and give the same bits, as do the ISA builds.
//
// Order of the sums. A row's sum of squares and its dot product sum(dL/dxhat * xhat) are summed
// over 8 lanes (channel d in lane d mod 8, lanes added pairwise). The backward's tasks are the
// (s, h, chunk of B*N rows) of the fixed chunking of math/qk_norm_rope_math.h; each writes grad_qk
// for its rows and one weight (and freqs) partial, summing its rows in order, and the partials are
// summed in a fixed order, so the gradients have the same bits for any thread count, layout or ISA.
// With freqs_index (packed batches) the freqs partial is split by the chunk's runs of rows with one table
// (math/qk_norm_rope_math.h).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/op_utils.h"
#include "common/static_switch.h"
#include "cpu/isa.h"
#include "cpu/rope2d_table.h"
#include "cpu/rows.h"
#include "cpu/vec8.h"
#include "math/qk_norm_rope_math.h"
#include "math/rope2d_math.h"
#include "ops/qk_norm_rope_impl.h"

namespace jitrope::cpu {
namespace {

namespace qm = qk_norm_rope_math;
namespace rm = rope2d_math;
using detail::QkLayout;

constexpr int64_t kGrainElems = 32768;    // elements of qk per parallel task, at least
constexpr int64_t kPrefetchBytes = 8192;  // how far ahead the rows of a strided qk are prefetched
constexpr int kLanes = 8;

// sum_d a[d] * b[d] in a fixed order: kLanes running sums over channels d = l (mod kLanes), added
// pairwise at the end, so that the loop vectorizes and the result does not depend on the ISA, the
// layout or how rows are split over threads.
template <typename acc_t>
inline acc_t lane_dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t D) {
  acc_t lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] += a[d + l] * b[d + l];
    }
  }
  for (int l = 0; d < D; ++d, ++l) {
    lanes[l] += a[d] * b[d];
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

// Position (s, b, h, n) of a row in the output's order, stepped row by row, with qk's offset of it.
struct RowCursor {
  const QkLayout& L;
  int64_t s, b, h, n, off;

  RowCursor(const QkLayout& layout, int64_t row) : L(layout) {
    n = row % L.N;
    row /= L.N;
    h = row % L.H;
    row /= L.H;
    b = row % L.B;
    s = row / L.B;
    off = s * L.ss + b * L.sb + h * L.sh + n * L.sn;
  }

  void next() {
    off += L.sn;
    if (++n < L.N) {
      return;
    }
    off -= L.N * L.sn;
    n = 0;
    off += L.sh;
    if (++h < L.H) {
      return;
    }
    off -= L.H * L.sh;
    h = 0;
    off += L.sb;
    if (++b < L.B) {
      return;
    }
    off -= L.B * L.sb;
    b = 0;
    off += L.ss;
    ++s;
  }
};

// Rows of qk ahead of the walk to prefetch (0: qk's rows follow one another in memory).
inline int64_t prefetch_rows(const QkLayout& L, int64_t elem_bytes) {
  const int64_t row_bytes = L.D * elem_bytes;
  const bool sequential = L.sn == L.D && L.sd == 1;
  return sequential ? 0 : std::max<int64_t>(4, kPrefetchBytes / std::max<int64_t>(1, row_bytes));
}

// One row of the forward: y = RMSNorm(x) * w, pairs rotated by (c, s). x and y are contiguous rows
// in the accumulation type (y may be the output itself for float32).
template <bool kRotate, bool kInterleaved, typename acc_t>
inline void forward_row(
    const acc_t* __restrict__ x,
    acc_t* __restrict__ y,
    const acc_t* __restrict__ w,
    const acc_t* __restrict__ c,
    const acc_t* __restrict__ s,
    int64_t D,
    acc_t eps) {
  const int64_t half = D / 2;
  const acc_t inv = qm::inv_rms(lane_dot(x, x, D), D, eps);
  for (int64_t m = 0; m < half; ++m) {
    const int64_t ia = rm::channel_a<kInterleaved>(m, half), ib = rm::channel_b<kInterleaved>(m, half);
    acc_t ya = qm::normalize(x[ia], inv, w[ia]);
    acc_t yb = qm::normalize(x[ib], inv, w[ib]);
    if constexpr (kRotate) {
      acc_t oa, ob;
      rm::rotate(ya, yb, c[m], s[m], oa, ob);
      ya = oa;
      yb = ob;
    }
    y[ia] = ya;
    y[ib] = yb;
  }
}

// The same rows eight lanes at a time where vec8::use_rows says so: the same operations in the same
// order, hence the same bits (interleaved pairs by vec8::rotate_pairs, half-split rows in pair
// order).
//
// A row's scale 1 / rms waits on its whole sum of squares, a chain of D / 8 dependent adds, then a
// sqrt and a division; every other operation of the row waits on the scale. One row at a time, the
// CPU's scheduler fills with the row's waiting work and the next row's sum does not start, so the
// rows are taken kRowBlock at a time: their sums are interleaved (independent chains), then each
// row is finished with its scale.
constexpr int kRowBlock = 4;
// Scratch values per channel of a backward task: 5 rows for the scalar form, 2 * kRowBlock for the
// vector rows (backward_task).
constexpr int64_t kBackwardScratch = std::max<int64_t>(5, 2 * kRowBlock);

// f(D) with D = 64 (JiT's head size) as a compile-time constant, so that the vector rows' loops
// unroll completely; f(D) as given otherwise.
template <typename F>
inline void with_row_length(int64_t D, const F& f) {
  if (D == 64) {
    f(std::integral_constant<int64_t, 64>{});
  } else {
    f(D);
  }
}

static_assert(kRowBlock == 4, "the row blocks' sums are taken four at a time (vec8::sum_lanes)");

// qm::inv_rms of four sums at once: the same IEEE operations lane by lane, hence the same bits,
// with one division unit pass for four rows.
inline vec8::F4 inv_rms4(vec8::F4 sum_sq, int64_t D, float eps) {
  const vec8::F4 m = sum_sq / static_cast<float>(D) + eps;
#if defined(__SSE__)
  const vec8::F4 r = __builtin_ia32_sqrtps(m);
#else
  const vec8::F4 r{std::sqrt(m[0]), std::sqrt(m[1]), std::sqrt(m[2]), std::sqrt(m[3])};
#endif
  return 1.0f / r;
}

// inv[k] = 1 / rms of row x[k] for k < kRowBlock (rows given twice are computed twice). With xs,
// the rows converted to float32 are also written to xs + k * D (for bfloat16 rows read again).
template <typename scalar_t>
inline void inv_rms_rows_v8(const scalar_t* const* x, int64_t D, float eps, float* inv, float* xs = nullptr) {
  using namespace vec8;
  F8 acc[kRowBlock] = {};
  for (int64_t d = 0; d < D; d += 8) {
    for (int k = 0; k < kRowBlock; ++k) {
      const F8 v = load(x[k] + d);
      if (xs != nullptr) {
        store(xs + k * D + d, v);
      }
      acc[k] += v * v;
    }
  }
  const F4 v = inv_rms4(sum_lanes(acc[0], acc[1], acc[2], acc[3]), D, eps);
  for (int k = 0; k < kRowBlock; ++k) {
    inv[k] = v[k];
  }
}

// One forward row given its scale. w: the weight row; for bfloat16 rows of interleaved pairs,
// w_eo is the same row as its even channels then its odd channels (vec8::load_even_odd's lanes).
template <bool kRotate, bool kInterleaved, typename scalar_t>
inline void forward_row_v8(
    const scalar_t* __restrict__ x,
    scalar_t* __restrict__ y,
    const float* __restrict__ w,
    const float* __restrict__ w_eo,
    const float* __restrict__ c,
    const float* __restrict__ s,
    int64_t D,
    float inv) {
  using namespace vec8;
  if constexpr (kInterleaved && std::is_same_v<scalar_t, c10::BFloat16>) {
    // Pairs (a, b) as the even and odd lanes of 16 channels: no shuffles (vec8::load_even_odd).
    const int64_t half = D / 2;
    for (int64_t d = 0; d < D; d += 16) {
      F8 a, b;
      load_even_odd(x + d, a, b);
      a = (a * inv) * load(w_eo + d / 2);
      b = (b * inv) * load(w_eo + half + d / 2);
      if constexpr (kRotate) {  // rotate_pairs's bits
        rotate_split(a, b, load(c + d / 2), load(s + d / 2));
      }
      store_even_odd(y + d, a, b);
    }
  } else if constexpr (kInterleaved) {
    for (int64_t d = 0; d < D; d += 16) {
      F8 y0 = (load(x + d) * inv) * load(w + d);
      F8 y1 = (load(x + d + 8) * inv) * load(w + d + 8);
      if constexpr (kRotate) {
        const F8 cv = load(c + d / 2), sv = load(s + d / 2);
        y0 = rotate_pairs(y0, dup_lo(cv), dup_lo(sv));
        y1 = rotate_pairs(y1, dup_hi(cv), dup_hi(sv));
      }
      store(y + d, y0, y1);
    }
  } else {
    const int64_t half = D / 2;
    for (int64_t m = 0; m < half; m += 8) {
      F8 a = (load(x + m) * inv) * load(w + m);
      F8 b = (load(x + half + m) * inv) * load(w + half + m);
      if constexpr (kRotate) {
        rotate_split(a, b, load(c + m), load(s + m));
      }
      store(y + m, a);
      store(y + half + m, b);
    }
  }
}

// The backward row of backward_row in two steps, given the row's scale (inv_rms_rows_v8), so that
// kRowBlock rows can take each step in turn (the second waits on the first's sum, as the first
// on the scale). backward_grads_v8: adds the row's terms to the partials, writes gxhat = dL/dxhat
// and returns the lanes of sum(gxhat * xhat) (summed, four rows at once, by the caller);
// backward_input_v8: dL/dx from them.
// x: the row of qk in float32 (bfloat16 rows converted once, by inv_rms_rows_v8).
template <bool kRotate, bool kInterleaved, bool kFreqsGrad, typename scalar_t>
inline vec8::F8 backward_grads_v8(
    const float* __restrict__ x,
    const scalar_t* __restrict__ g,
    const float* __restrict__ w,
    const float* __restrict__ c,
    const float* __restrict__ ns,
    float cy,
    float cx,
    float* __restrict__ wp,
    float* __restrict__ fy,
    float* __restrict__ fx,
    float* __restrict__ gxhat,
    int64_t D,
    float inv) {
  using namespace vec8;
  F8 dot{};
  if constexpr (kInterleaved) {
    for (int64_t d = 0; d < D; d += 16) {
      const F8 x0 = load(x + d), x1 = load(x + d + 8);
      const F8 w0 = load(w + d), w1 = load(w + d + 8);
      F8 r0 = load(g + d), r1 = load(g + d + 8);
      if constexpr (kRotate) {  // dL/dy = R(-phi) dL/dout; ns holds -sin
        const F8 cv = load(c + d / 2), nv = load(ns + d / 2);
        r0 = rotate_pairs(r0, dup_lo(cv), dup_lo(nv));
        r1 = rotate_pairs(r1, dup_hi(cv), dup_hi(nv));
        if constexpr (kFreqsGrad) {  // dL/dphi = rb * ya - ra * yb per pair
          const F8 t0 = swap_pairs(r0) * ((x0 * inv) * w0), t1 = swap_pairs(r1) * ((x1 * inv) * w1);
          const F8 dphi = even_lanes(t0, t1) - odd_lanes(t0, t1);
          store(fy + d / 2, load(fy + d / 2) + cy * dphi);
          store(fx + d / 2, load(fx + d / 2) + cx * dphi);
        }
      }
      const F8 h0 = x0 * inv, h1 = x1 * inv;
      store(wp + d, load(wp + d) + r0 * h0);
      store(wp + d + 8, load(wp + d + 8) + r1 * h1);
      const F8 q0 = r0 * w0, q1 = r1 * w1;
      store(gxhat + d, q0);
      store(gxhat + d + 8, q1);
      dot += q0 * h0;
      dot += q1 * h1;
    }
  } else {
    const int64_t half = D / 2;
    for (int64_t m = 0; m < half; m += 8) {
      const F8 xa = load(x + m), xb = load(x + half + m);
      const F8 wa = load(w + m), wb = load(w + half + m);
      F8 ra = load(g + m), rb = load(g + half + m);
      if constexpr (kRotate) {
        rotate_split(ra, rb, load(c + m), load(ns + m));
        if constexpr (kFreqsGrad) {
          const F8 dphi = rb * ((xa * inv) * wa) - ra * ((xb * inv) * wb);
          store(fy + m, load(fy + m) + cy * dphi);
          store(fx + m, load(fx + m) + cx * dphi);
        }
      }
      const F8 ha = xa * inv, hb = xb * inv;
      store(wp + m, load(wp + m) + ra * ha);
      store(wp + half + m, load(wp + half + m) + rb * hb);
      store(gxhat + m, ra * wa);
      store(gxhat + half + m, rb * wb);
    }
    // The dot product in channel order (lane d mod 8, d ascending), as the scalar row sums it.
    for (int64_t d = 0; d < D; d += 8) {
      dot += load(gxhat + d) * (load(x + d) * inv);
    }
  }
  return dot;
}

template <typename scalar_t>
inline void backward_input_v8(
    const float* __restrict__ x,
    scalar_t* __restrict__ gx,
    const float* __restrict__ gxhat,
    int64_t D,
    float inv,
    float mean_dot) {
  using namespace vec8;
  for (int64_t d = 0; d < D; d += 16) {
    store(
        gx + d, inv * (load(gxhat + d) - (load(x + d) * inv) * mean_dot),
        inv * (load(gxhat + d + 8) - (load(x + d + 8) * inv) * mean_dot));
  }
}

// Whether qk's tokens lie farther apart than its q/k and head rows, as in a qkv view ([B, N, 3, H, D]
// in memory): then rows are walked token by token with q's and k's heads inside, memory's order.
inline bool tokens_outer(const QkLayout& L) {
  return std::abs(L.sn) > std::abs(L.ss) && std::abs(L.sn) > std::abs(L.sh);
}

// Tokens ahead of a token-by-token walk whose rows are prefetched: about kPrefetchBytes of qk.
inline int64_t prefetch_tokens(const QkLayout& L, int64_t elem_bytes) {
  return std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(1, 2 * L.H * L.D * elem_bytes));
}

template <typename scalar_t, bool kRotate, bool kInterleaved, bool kContig>
void forward_kernel(const QkNormRopeForward& a, const acc_type<scalar_t>* cos_t, const acc_type<scalar_t>* sin_t) {
  using acc_t = acc_type<scalar_t>;
  // float32 / float64 rows with unit channel stride are read and written in place.
  constexpr bool kDirect = kContig && std::is_same_v<scalar_t, acc_t>;
  const QkLayout& L = a.L;
  const int64_t D = L.D, half = D / 2, rows = 2 * L.B * L.H * L.N;
  const scalar_t* qk = a.qk.const_data_ptr<scalar_t>();
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  const acc_t* w = a.p.weight.const_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(a.p.eps);
  const bool per_head = a.p.per_head;
  // Rows of whole pairs of eight lanes in the AVX2 build: the vector row (cpu/vec8.h), kRowBlock
  // rows at a time. w_eo: for bfloat16 rows of interleaved pairs, the weight rows as even then odd
  // channels (forward_row_v8); empty otherwise.
  const bool vec = vec8::use_rows<scalar_t>(kContig, D);
  std::vector<acc_t> w_eo;
  if (vec && std::is_same_v<scalar_t, c10::BFloat16> && kInterleaved) {
    w_eo.resize(2 * D);
    for (int64_t s = 0; s < 2; ++s) {
      for (int64_t m = 0; m < half; ++m) {
        w_eo[s * D + m] = w[s * D + 2 * m];
        w_eo[s * D + half + m] = w[s * D + 2 * m + 1];
      }
    }
  }
  // Row (s, b, h, n): x at qk + x_off, out row r = ((s * B + b) * H + h) * N + n.
  struct Row {
    int64_t x_off, r, s, h, n;
  };
  auto table_row = [&](const Row& q) { return ((per_head ? q.h : 0) * L.N + q.n) * half; };
  // Rows rs[0..count) (count <= kRowBlock) in the form the layout and the build allow.
  auto run_rows = [&](const Row* rs, int count, acc_t* scratch) {
    if (vec) {
      if constexpr (vec8::kType<scalar_t> && kContig) {
        const scalar_t* xk[kRowBlock];
        float inv[kRowBlock];
        for (int k = 0; k < kRowBlock; ++k) {
          xk[k] = qk + rs[std::min(k, count - 1)].x_off;
        }
        with_row_length(D, [&](auto Dc) {
          inv_rms_rows_v8(xk, Dc, eps, inv);
          for (int k = 0; k < count; ++k) {
            const int64_t t = table_row(rs[k]);
            forward_row_v8<kRotate, kInterleaved>(
                xk[k], out + rs[k].r * D, w + rs[k].s * D, w_eo.empty() ? nullptr : w_eo.data() + rs[k].s * D,
                kRotate ? cos_t + t : nullptr, kRotate ? sin_t + t : nullptr, Dc, inv[k]);
          }
        });
      }
      return;
    }
    for (int k = 0; k < count; ++k) {
      const Row& q = rs[k];
      const scalar_t* x = qk + q.x_off;
      scalar_t* o = out + q.r * D;
      const int64_t t = table_row(q);
      const acc_t* c = kRotate ? cos_t + t : nullptr;
      const acc_t* sn = kRotate ? sin_t + t : nullptr;
      if constexpr (kDirect) {
        forward_row<kRotate, kInterleaved>(x, o, w + q.s * D, c, sn, D, eps);
      } else {
        load_row<kContig>(x, L.sd, scratch, D);
        forward_row<kRotate, kInterleaved>(scratch, scratch + D, w + q.s * D, c, sn, D, eps);
        store_row(scratch + D, o, D);
      }
    }
  };
  if (tokens_outer(L)) {
    const int64_t BN = L.B * L.N, ahead = prefetch_tokens(L, sizeof(scalar_t));
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, 2 * L.H * D));
    at::parallel_for(0, BN, grain, [&](int64_t begin, int64_t end) {
      run_isa([&] {
        std::vector<acc_t> scratch(2 * D);
        Row block[kRowBlock];
        int count = 0;
        for (int64_t bn = begin; bn < end; ++bn) {
          const int64_t b = bn / L.N, n = bn - b * L.N;
          const int64_t pb = (bn + ahead) / L.N, pn = (bn + ahead) - pb * L.N;
          for (int64_t s = 0; s < 2; ++s) {
            for (int64_t h = 0; h < L.H; ++h) {
              if (bn + ahead < end) {
                prefetch_bytes(qk + s * L.ss + pb * L.sb + h * L.sh + pn * L.sn, D * sizeof(scalar_t));
              }
              block[count++] = {
                  s * L.ss + b * L.sb + h * L.sh + n * L.sn, ((s * L.B + b) * L.H + h) * L.N + n, s, h, n};
              if (count == kRowBlock) {
                run_rows(block, count, scratch.data());
                count = 0;
              }
            }
          }
        }
        if (count > 0) {
          run_rows(block, count, scratch.data());
        }
      });
    });
    return;
  }
  // Otherwise in the output's order; rows of qk that do not follow one another are prefetched.
  const int64_t ahead = prefetch_rows(L, sizeof(scalar_t));
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, D));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    run_isa([&] {
      std::vector<acc_t> scratch(2 * D);
      Row block[kRowBlock];
      int count = 0;
      RowCursor cur(L, begin);
      RowCursor next(L, std::min(begin + ahead, rows - 1));
      for (int64_t r = begin; r < end; ++r, cur.next()) {
        if (ahead > 0 && r + ahead < end) {
          prefetch_bytes(qk + next.off, D * sizeof(scalar_t));
          next.next();
        }
        block[count++] = {cur.off, r, cur.s, cur.h, cur.n};
        if (count == kRowBlock || r + 1 == end) {
          run_rows(block, count, scratch.data());
          count = 0;
        }
      }
    });
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

// One row of the backward, in the accumulation type: x the forward input, g = dL/dout, gx = dL/dx
// (contiguous rows; gx may be the output itself). Adds the row's terms to the weight partial wp[D]
// and, with kFreqsGrad, to the freqs partials fy[D/2], fx[D/2]; xhat and gxhat are scratch rows.
template <bool kRotate, bool kInterleaved, bool kFreqsGrad, typename acc_t>
inline void backward_row(
    const acc_t* __restrict__ x,
    const acc_t* __restrict__ g,
    acc_t* __restrict__ gx,
    const acc_t* __restrict__ w,
    const acc_t* __restrict__ c,
    const acc_t* __restrict__ ns,
    acc_t cy,
    acc_t cx,
    acc_t* __restrict__ wp,
    acc_t* __restrict__ fy,
    acc_t* __restrict__ fx,
    acc_t* __restrict__ xhat,
    acc_t* __restrict__ gxhat,
    int64_t D,
    acc_t eps) {
  const int64_t half = D / 2;
  const acc_t inv = qm::inv_rms(lane_dot(x, x, D), D, eps);
  for (int64_t m = 0; m < half; ++m) {
    const int64_t ia = rm::channel_a<kInterleaved>(m, half), ib = rm::channel_b<kInterleaved>(m, half);
    const acc_t xa = x[ia], xb = x[ib];
    acc_t ga = g[ia], gb = g[ib];
    if constexpr (kRotate) {
      acc_t ra, rb;
      rm::rotate(ga, gb, c[m], ns[m], ra, rb);  // dL/dy = R(-phi) dL/dout
      if constexpr (kFreqsGrad) {
        const acc_t dphi = rm::angle_grad(qm::normalize(xa, inv, w[ia]), qm::normalize(xb, inv, w[ib]), ra, rb);
        fy[m] += rm::mul_rn(cy, dphi);
        fx[m] += rm::mul_rn(cx, dphi);
      }
      ga = ra;
      gb = rb;
    }
    const acc_t ha = rm::mul_rn(xa, inv), hb = rm::mul_rn(xb, inv);
    wp[ia] += rm::mul_rn(ga, ha);
    wp[ib] += rm::mul_rn(gb, hb);
    xhat[ia] = ha;
    xhat[ib] = hb;
    gxhat[ia] = rm::mul_rn(ga, w[ia]);
    gxhat[ib] = rm::mul_rn(gb, w[ib]);
  }
  const acc_t mean_dot = lane_dot(gxhat, xhat, D) / static_cast<acc_t>(D);
  for (int64_t d = 0; d < D; ++d) {
    gx[d] = qm::norm_input_grad(gxhat[d], xhat[d], inv, mean_dot);
  }
}

// Offset in qk of row i of the (s, h)-major order: i = (s * H + h) * B * N + b * N + n.
inline int64_t plane_row_offset(const QkLayout& L, int64_t i) {
  const int64_t bn = i % (L.B * L.N), sh = i / (L.B * L.N);
  const int64_t b = bn / L.N;
  return (sh / L.H) * L.ss + (sh % L.H) * L.sh + b * L.sb + (bn - b * L.N) * L.sn;
}

// One row of the backward in the scalar form (the vector rows: backward_task): row (s, b, h, n) of
// qk at x, of grad_out and grad_qk at row orow; adds to the partials wp and fp (fp: the row's run,
// [2 * D/2]). scratch: 5 * D values.
template <typename scalar_t, bool kRotate, bool kInterleaved, bool kFreqsGrad, bool kContig>
inline void backward_one_row(
    const BackwardArgs<scalar_t>& a,
    const scalar_t* x,
    int64_t orow,
    int64_t s,
    int64_t h,
    int64_t n,
    acc_type<scalar_t>* wp,
    acc_type<scalar_t>* fp,
    acc_type<scalar_t>* scratch) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kDirect = kContig && std::is_same_v<scalar_t, acc_t>;
  const QkLayout& L = a.L;
  const int64_t D = L.D, half = D / 2;
  acc_t* xhat = scratch;
  acc_t* gxhat = xhat + D;
  acc_t* xs = gxhat + D;
  acc_t* gs = xs + D;
  acc_t* gxs = gs + D;
  const scalar_t* gr = a.g + orow * D;
  scalar_t* gxr = a.gx + orow * D;
  const acc_t* ws = a.w + s * D;
  const int64_t trow = ((a.per_head ? h : 0) * L.N + n) * half;
  const acc_t* c = kRotate ? a.cos_t + trow : nullptr;
  const acc_t* ns = kRotate ? a.nsin_t + trow : nullptr;
  const acc_t cy = kFreqsGrad ? a.coords[2 * n] : acc_t(0);
  const acc_t cx = kFreqsGrad ? a.coords[2 * n + 1] : acc_t(0);
  acc_t* fy = kFreqsGrad ? fp : nullptr;
  acc_t* fx = kFreqsGrad ? fp + half : nullptr;
  if constexpr (kDirect) {
    backward_row<kRotate, kInterleaved, kFreqsGrad>(x, gr, gxr, ws, c, ns, cy, cx, wp, fy, fx, xhat, gxhat, D, a.eps);
  } else {
    load_row<kContig>(x, L.sd, xs, D);
    load_row<true>(gr, 1, gs, D);
    backward_row<kRotate, kInterleaved, kFreqsGrad>(xs, gs, gxs, ws, c, ns, cy, cx, wp, fy, fx, xhat, gxhat, D, a.eps);
    store_row(gxs, gxr, D);
  }
}

// Task (s, h, k) of step 1: zeroes its partials, then adds its rows (b, n), row0 <= b * N + n < row1,
// in ascending order. x_at(bn, b, n) is the task's row bn of qk (in qk itself or in a copy);
// before_row() runs before each row (the walks' prefetches).
template <
    typename scalar_t,
    bool kRotate,
    bool kInterleaved,
    bool kFreqsGrad,
    bool kContig,
    typename XAt,
    typename BeforeRow>
inline void backward_task(
    const BackwardArgs<scalar_t>& a,
    bool vec,
    int64_t s,
    int64_t h,
    int64_t k,
    const XAt& x_at,
    const BeforeRow& before_row,
    acc_type<scalar_t>* scratch) {
  using acc_t = acc_type<scalar_t>;
  const QkLayout& L = a.L;
  const int64_t D = L.D, H = L.H, task = (s * H + h) * a.chunks + k;
  const int64_t row0 = k * a.rpc, row1 = std::min(L.B * L.N, row0 + a.rpc);
  acc_t* wp = a.wpart + task * D;
  acc_t* fp = kFreqsGrad ? a.fpart + task * a.runs * D : nullptr;
  std::fill(wp, wp + D, acc_t(0));
  if constexpr (kFreqsGrad) {
    std::fill(fp, fp + a.runs * D, acc_t(0));
  }
  int64_t run1 = row1;  // end of the current run
  if constexpr (kFreqsGrad) {
    run1 = a.index != nullptr ? qm::run_end(a.index, row0, row1, L.N) : row1;
  }
  int64_t b = row0 / L.N, n = row0 - b * L.N;
  // The row at bn: its run (moving fp to the next run where one starts) and its place (b, n).
  auto next_row = [&](int64_t bn) {
    if (kFreqsGrad && bn == run1) {
      fp += D;
      run1 = qm::run_end(a.index, bn, row1, L.N);
    }
    const int64_t rb = b, rn = n;
    if (++n == L.N) {
      n = 0;
      ++b;
    }
    return std::pair<int64_t, int64_t>(rb, rn);
  };
  auto out_row = [&](int64_t rb, int64_t rn) { return ((s * L.B + rb) * H + h) * L.N + rn; };
  if (vec) {
    // Vector rows kRowBlock at a time, each step for every row of the block in turn (the rows
    // still add to the partials in ascending order).
    if constexpr (vec8::kType<scalar_t> && kContig) {
      // gxhat of row j at scratch + j * D; bfloat16 rows in float32 at xs + j * D.
      float* xs = scratch + kRowBlock * D;
      const int64_t half = D / 2;
      with_row_length(D, [&](auto Dc) {
        for (int64_t bn0 = row0; bn0 < row1; bn0 += kRowBlock) {
          const int count = static_cast<int>(std::min<int64_t>(kRowBlock, row1 - bn0));
          const scalar_t* xk[kRowBlock];
          int64_t orow[kRowBlock];
          float inv[kRowBlock];
          vec8::F8 dot[kRowBlock] = {};
          for (int j = 0; j < kRowBlock; ++j) {
            const int64_t bj = std::min<int64_t>(bn0 + j, row1 - 1), bb = bj / L.N;
            xk[j] = x_at(bj, bb, bj - bb * L.N);
          }
          const float* xf[kRowBlock];
          if constexpr (std::is_same_v<scalar_t, float>) {
            inv_rms_rows_v8(xk, Dc, a.eps, inv);
            std::copy(xk, xk + kRowBlock, xf);
          } else {
            inv_rms_rows_v8(xk, Dc, a.eps, inv, xs);
            for (int j = 0; j < kRowBlock; ++j) {
              xf[j] = xs + j * D;
            }
          }
          for (int j = 0; j < count; ++j) {
            before_row();
            const auto [rb, rn] = next_row(bn0 + j);
            orow[j] = out_row(rb, rn);
            const int64_t trow = ((a.per_head ? h : 0) * L.N + rn) * half;
            dot[j] = backward_grads_v8<kRotate, kInterleaved, kFreqsGrad>(
                xf[j], a.g + orow[j] * D, a.w + s * D, kRotate ? a.cos_t + trow : nullptr,
                kRotate ? a.nsin_t + trow : nullptr, kFreqsGrad ? a.coords[2 * rn] : 0.0f,
                kFreqsGrad ? a.coords[2 * rn + 1] : 0.0f, wp, kFreqsGrad ? fp : nullptr,
                kFreqsGrad ? fp + half : nullptr, scratch + j * D, Dc, inv[j]);
          }
          const vec8::F4 mean_dot = vec8::sum_lanes(dot[0], dot[1], dot[2], dot[3]) / static_cast<float>(D);
          for (int j = 0; j < count; ++j) {
            backward_input_v8(xf[j], a.gx + orow[j] * D, scratch + j * D, Dc, inv[j], mean_dot[j]);
          }
        }
      });
    }
    return;
  }
  for (int64_t bn = row0; bn < row1; ++bn) {
    before_row();
    const auto [rb, rn] = next_row(bn);
    backward_one_row<scalar_t, kRotate, kInterleaved, kFreqsGrad, kContig>(
        a, x_at(bn, rb, rn), out_row(rb, rn), s, h, rn, wp, fp, scratch);
  }
}

// Step 1 of the backward, in one of two walks that give the same bits. Task (s, h, k) of the math
// header's chunking owns the partials at index (s * H + h) * chunks + k: wp[D] and, with
// kFreqsGrad, fp[runs][2 * D/2] (y-axis then x-axis), one per run of rows with one table (the
// whole chunk without freqs_index), each the sum of the chunk's rows (b, n) in ascending order.
//
// run_backward_planes: one parallel task per (s, h, chunk), rows walked (s, h)-major, so that
// grad_out and grad_qk are sequential streams and a contiguous qk is too; the qk rows of other
// strided layouts are prefetched `ahead` rows in advance, continuously across a thread's tasks.
template <typename scalar_t, bool kRotate, bool kInterleaved, bool kFreqsGrad, bool kContig>
void run_backward_planes(const BackwardArgs<scalar_t>& a, bool vec) {
  using acc_t = acc_type<scalar_t>;
  const QkLayout& L = a.L;
  const int64_t D = L.D, H = L.H, BN = L.B * L.N, chunks = a.chunks;
  const int64_t ahead = prefetch_rows(L, sizeof(scalar_t));
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, a.rpc * D));
  at::parallel_for(0, 2 * H * chunks, grain, [&](int64_t begin, int64_t end) {
    run_isa([&] {
      std::vector<acc_t> scratch(kBackwardScratch * D);
      // The prefetched rows: from the first task's first row + ahead to the last task's last row.
      const int64_t last = (end - 1) / chunks * BN + std::min(BN, ((end - 1) % chunks + 1) * a.rpc);
      int64_t next = begin / chunks * BN + (begin % chunks) * a.rpc;
      for (const int64_t stop = ahead > 0 ? std::min(last, next + ahead) : next; next < stop; ++next) {
        prefetch_bytes(a.qk + plane_row_offset(L, next), D * sizeof(scalar_t));
      }
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k = task % chunks, sh = task / chunks, h = sh % H, s = sh / H;
        const scalar_t* plane = a.qk + s * L.ss + h * L.sh;
        backward_task<scalar_t, kRotate, kInterleaved, kFreqsGrad, kContig>(
            a, vec, s, h, k, [&](int64_t, int64_t b, int64_t n) { return plane + b * L.sb + n * L.sn; },
            [&] {
              if (ahead > 0 && next < last) {
                prefetch_bytes(a.qk + plane_row_offset(L, next++), D * sizeof(scalar_t));
              }
            },
            scratch.data());
      }
    });
  });
}

// run_backward_tokens: for a qk with unit channel stride whose tokens lie farther apart than its
// q/k and head rows (a qkv view), one parallel task per chunk k of tokens: the chunk's tasks
// (s, h, k) run as run_backward_planes runs them, on rows of qk read in place, so grad_out and
// grad_qk stay sequential and every partial gets the same rows in the same order: the same bits.
// Plane by plane, a chunk's qk rows lie 2H rows apart, which the hardware prefetcher does not
// follow; but the chunk's rows together are one stretch of qk's memory (its tokens), so while a
// chunk computes, the next chunk's rows are prefetched in memory order, one row per row computed,
// and the chunk finds its rows in cache.
template <typename scalar_t, bool kRotate, bool kInterleaved, bool kFreqsGrad>
void run_backward_tokens(const BackwardArgs<scalar_t>& a, bool vec) {
  using acc_t = acc_type<scalar_t>;
  const QkLayout& L = a.L;
  const int64_t D = L.D, H = L.H, BN = L.B * L.N, chunks = a.chunks, rpc = a.rpc;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, rpc * 2 * H * D));
  // Row i (token-major: i = token * 2H + s * H + h) of the chunk starting at token bn0.
  auto prefetch_row = [&](int64_t bn0, int64_t i) {
    const int64_t bn = bn0 + i / (2 * H), sh = i % (2 * H), b = bn / L.N, n = bn - b * L.N;
    prefetch_bytes(a.qk + (sh / H) * L.ss + b * L.sb + (sh % H) * L.sh + n * L.sn, D * sizeof(scalar_t));
  };
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    run_isa([&] {
      std::vector<acc_t> scratch(kBackwardScratch * D);
      const int64_t first0 = begin * rpc;
      for (int64_t i = 0, rows = 2 * H * (std::min(BN, first0 + rpc) - first0); i < rows; ++i) {
        prefetch_row(first0, i);
      }
      for (int64_t k = begin; k < end; ++k) {
        const int64_t next0 = (k + 1) * rpc;
        const int64_t next_rows = k + 1 < end ? 2 * H * (std::min(BN, next0 + rpc) - next0) : 0;
        int64_t fetched = 0;
        for (int64_t sh = 0; sh < 2 * H; ++sh) {
          const scalar_t* plane = a.qk + (sh / H) * L.ss + (sh % H) * L.sh;
          backward_task<scalar_t, kRotate, kInterleaved, kFreqsGrad, /*kContig=*/true>(
              a, vec, sh / H, sh % H, k, [&](int64_t, int64_t b, int64_t n) { return plane + b * L.sb + n * L.sn; },
              [&] {
                if (fetched < next_rows) {
                  prefetch_row(next0, fetched++);
                }
              },
              scratch.data());
        }
      }
    });
  });
}

template <typename scalar_t, bool kRotate, bool kInterleaved, bool kFreqsGrad, bool kContig>
void run_backward(const BackwardArgs<scalar_t>& a) {
  // Rows of whole pairs of eight lanes in the AVX2 build: the vector row (cpu/vec8.h).
  const bool vec = vec8::use_rows<scalar_t>(kContig, a.L.D);
  if (kContig && tokens_outer(a.L)) {
    run_backward_tokens<scalar_t, kRotate, kInterleaved, kFreqsGrad>(a, vec);
  } else {
    run_backward_planes<scalar_t, kRotate, kInterleaved, kFreqsGrad, kContig>(a, vec);
  }
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
      forward_kernel<scalar_t, kRotate, kInterleaved, kContig>(a, cos_t, sin_t);
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
            run_backward<scalar_t, kRotate, kInterleaved, kFreqsGrad, kContig>(args);
          }
        });
  });
  reduce_partials(a);
}

}  // namespace jitrope::cpu

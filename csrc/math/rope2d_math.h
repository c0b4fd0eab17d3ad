// Per-element math of jitrope::rope2d (docs/ops.md), shared by the CPU and the CUDA kernels so that
// the CPU tests exercise the arithmetic the GPU runs: the angle of a channel pair, the rotation,
// the angle gradient, the channels of a pair, and the offset of a "plane" (one [N, D] matrix of x:
// one leading index and head) from its linear index. No CUDA header: CPU builds include it too. sin_cos is the GPU's
// (sincosf); the CPU fills its cos/sin table with ATen's vectorized sin/cos instead.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <c10/macros/Macros.h>

// Loop unrolling hint for nvcc; host compilers unroll the constant-trip loops at -O3 on their own.
#if defined(__CUDACC__)
#define JITROPE_UNROLL _Pragma("unroll")
#else
#define JITROPE_UNROLL
#endif

namespace jitrope::rope2d_math {

// Products and sums rounded one by one, never contracted into FMAs: nvcc fuses a * b + c * d
// differently in different kernel instantiations (interleaved / half-split, vector / scalar),
// which would make results differ by an ulp between layouts of the same data, and from the CPU.
// T is float or double (the accumulation types); a - b is add_rn(a, -b), which is exact.
template <typename T>
C10_HOST_DEVICE inline T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

template <typename T>
C10_HOST_DEVICE inline T add_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

// phi = y * f_y + x * f_x, the products rounded separately so that the CPU kernel, the CUDA
// kernel and the PyTorch reference compute the same angle.
template <typename T>
C10_HOST_DEVICE inline T angle(T y, T x, T fy, T fx) {
  return add_rn(mul_rn(y, fy), mul_rn(x, fx));
}

// Accurate sine and cosine (never the fast-math intrinsics: angles reach tens of radians).
C10_HOST_DEVICE inline void sin_cos(float phi, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  ::sincosf(phi, s, c);
#else
  *s = std::sin(phi);
  *c = std::cos(phi);
#endif
}

C10_HOST_DEVICE inline void sin_cos(double phi, double* s, double* c) {
#if defined(__CUDA_ARCH__)
  ::sincos(phi, s, c);
#else
  *s = std::sin(phi);
  *c = std::cos(phi);
#endif
}

// (out_a, out_b) = R(phi) (a, b); the inverse rotation R(-phi) is the same call with -s.
template <typename acc_t>
C10_HOST_DEVICE inline void rotate(acc_t a, acc_t b, acc_t c, acc_t s, acc_t& out_a, acc_t& out_b) {
  out_a = add_rn(mul_rn(a, c), -mul_rn(b, s));
  out_b = add_rn(mul_rn(a, s), mul_rn(b, c));
}

// dL/dphi of one pair from the input (a, b) and the input gradient (ga, gb) = R(-phi) (dL/dout):
// d out/dphi = R(phi) (-b, a), and rotations preserve the cross product, so
// dL/dphi = <R(phi)^T dL/dout, (-b, a)> = gb * a - ga * b.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t angle_grad(acc_t a, acc_t b, acc_t ga, acc_t gb) {
  return add_rn(mul_rn(gb, a), -mul_rn(ga, b));
}

// Channels of pair m: (2m, 2m+1) when interleaved (EVA-02 / JiT), else (m, m + D/2) (rotate_half).
template <bool kInterleaved>
C10_HOST_DEVICE inline int64_t channel_a(int64_t m, int64_t /*half*/) {
  return kInterleaved ? 2 * m : m;
}

template <bool kInterleaved>
C10_HOST_DEVICE inline int64_t channel_b(int64_t m, int64_t half) {
  return kInterleaved ? 2 * m + 1 : m + half;
}

// Division by a fixed 32-bit divisor d (1 <= d <= 2^31 - 1) as a multiply and a shift, the
// algorithm of TensorIterator's IntDivider<uint32_t> (Granlund and Montgomery), here without its
// CUDA header so that CPU builds include none: shift = ceil(log2 d), m1 = 2^32 (2^shift - d) / d + 1,
// n / d = (umulhi(n, m1) + n) >> shift for every n < 2^31. Exact, the same on host and device.
struct PlaneDivider {
  uint32_t divisor = 1;
  uint32_t m1 = 0;
  uint32_t shift = 0;

  PlaneDivider() = default;

  explicit PlaneDivider(uint32_t d) : divisor(d) {
    while (shift < 32 && (uint32_t{1} << shift) < d) {
      ++shift;
    }
    m1 = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }

  struct DivMod {
    uint32_t div, mod;
  };

  C10_HOST_DEVICE inline DivMod divmod(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    // t < n < 2^31, so t + n does not overflow.
    const uint32_t q = (__umulhi(n, m1) + n) >> shift;
#else
    const uint32_t q = static_cast<uint32_t>((((static_cast<uint64_t>(n) * m1) >> 32) + n) >> shift);
#endif
    return {q, n - q * divisor};
  }
};

// Planes of a group (see Rope2dGeometry) as coalesced dims, innermost first, each with one stride
// per tensor; plane sizes and indices fit in 31 bits so the index is split with PlaneDivider,
// offsets are 64-bit.
constexpr int kMaxPlaneDims = 6;
constexpr int kMaxTensors = 3;

struct PlaneIndexer {
  int ndim = 0;
  PlaneDivider sizes[kMaxPlaneDims];
  int64_t strides[kMaxPlaneDims][kMaxTensors] = {};

  C10_HOST_DEVICE inline void offsets(uint32_t plane, int64_t (&off)[kMaxTensors]) const {
    JITROPE_UNROLL
    for (int t = 0; t < kMaxTensors; ++t) {
      off[t] = 0;
    }
    JITROPE_UNROLL
    for (int d = 0; d < kMaxPlaneDims; ++d) {
      if (d == ndim) {
        break;
      }
      const auto qr = sizes[d].divmod(plane);
      plane = qr.div;
      JITROPE_UNROLL
      for (int t = 0; t < kMaxTensors; ++t) {
        off[t] += static_cast<int64_t>(qr.mod) * strides[d][t];
      }
    }
  }
};

// Where x (tensor 0: x or grad_out), the result (1) and, in the backward, the forward input (2) live.
// A plane is one [N, D] matrix; planes sharing a frequency row form a group: one group of all
// [..., H] planes when freqs is shared, H groups (one per head, offset group * group_stride) when
// freqs is per head. Plane q of group g starts at group_stride * g + planes.offsets(q).
struct Rope2dGeometry {
  int64_t n_tokens = 0;  // N
  int64_t half = 0;      // D / 2 pairs per token
  int64_t groups = 1;    // rows of the frequency table: 1 or H
  int64_t planes_per_group = 0;
  int64_t token_stride[kMaxTensors] = {};
  int64_t channel_stride[kMaxTensors] = {};
  int64_t group_stride[kMaxTensors] = {};
  PlaneIndexer planes;
};

}  // namespace jitrope::rope2d_math

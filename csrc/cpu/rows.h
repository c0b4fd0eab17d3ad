// Rows of D channels between a tensor's dtype and the accumulation type, for the CPU kernels that
// compute a row in float32 (float64 for float64) scratch: plain loops the compiler vectorizes.
// bfloat16 converts through its bits, written without a branch so that the loops vectorize, with
// exactly c10::BFloat16's arithmetic (a shift up; round to nearest even down, NaN to 0x7FC0), so
// the results are those of static_cast.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>

namespace jitrope::cpu {

inline float bf16_to_float(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint16_t rounded = static_cast<uint16_t>((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
  return f != f ? uint16_t{0x7FC0} : rounded;
}

// static_cast<acc_t>(v) and static_cast<scalar_t>(v), bfloat16 through its bits.
template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    return bf16_to_float(v.x);
  } else {
    return static_cast<acc_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
inline scalar_t from_acc(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    return c10::BFloat16(float_to_bf16(v), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// acc[d] = x[d * sd] for d < n, in the accumulation type.
template <bool kContig, typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* __restrict__ x, int64_t sd, acc_t* __restrict__ acc, int64_t n) {
  if constexpr (kContig) {
    sd = 1;
  }
  for (int64_t d = 0; d < n; ++d) {
    acc[d] = to_acc<acc_t>(x[d * sd]);
  }
}

// out[d] = acc[d] rounded once to scalar_t, for d < n; out is contiguous.
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* __restrict__ acc, scalar_t* __restrict__ out, int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    out[d] = from_acc<scalar_t>(acc[d]);
  }
}

// out[0, bytes) = in[0, bytes) through 32-byte vector moves (two 16-byte moves in the baseline
// build), for the rows that a position op copies unchanged. Not std::memcpy: glibc's memcpy of rows
// of a few KB into an output whose pages are touched for the first time ran markedly slower than
// this loop (pos2d_add's condition-prefix rows, scripts/bench_ops.py --op pos2d_add), so GCC is
// kept from turning the loop back into a memcpy call.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-loop-distribute-patterns")))
#endif
inline void copy_bytes(void* __restrict__ out, const void* __restrict__ in, int64_t bytes) {
  using V = uint64_t __attribute__((vector_size(32)));
  char* o = static_cast<char*>(out);
  const char* i = static_cast<const char*>(in);
  int64_t b = 0;
  for (; b + 32 <= bytes; b += 32) {
    V v;
    std::memcpy(&v, i + b, sizeof(v));
    std::memcpy(o + b, &v, sizeof(v));
  }
  for (; b < bytes; ++b) {
    o[b] = i[b];
  }
}

// Prefetches the cache lines of `bytes` bytes from p for reading (kLocality: __builtin_prefetch's,
// 0 for data read once), ahead of a strided walk that the hardware prefetcher does not follow.
template <int kLocality = 3>
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) {
    __builtin_prefetch(c + b, /*rw=*/0, kLocality);
  }
}

}  // namespace jitrope::cpu

// Eight float32 lanes for the CPU row kernels, as GCC/Clang vector extensions: the compiler lowers
// them to two SSE registers in the baseline build and one AVX2 register in the AVX2 build
// (cpu/isa.h). Every operation is the IEEE float32 operation of the scalar code, lane by lane, so a
// row computed with F8 has the bits of the same row computed one element at a time; the
// accumulations keep their lane order (channel d in lane d mod 8, as cpu kernels' lane sums do).
// bfloat16 converts through its bits exactly as c10::BFloat16 does (cpu/rows.h).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>

#include "cpu/isa.h"

// Values of these types cross no function boundary that is not inlined: GCC's note that their
// passing ABI differs with and without AVX does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace jitrope::cpu::vec8 {

using F8 = float __attribute__((vector_size(32)));
using I8 = int32_t __attribute__((vector_size(32)));
using U8 = uint32_t __attribute__((vector_size(32)));
using H8 = uint16_t __attribute__((vector_size(16)));

#if defined(__clang__)
#define JITROPE_SHUFFLE8(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#define JITROPE_SHUFFLE16(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define JITROPE_SHUFFLE8(v, ...) __builtin_shuffle(v, I8{__VA_ARGS__})
#define JITROPE_SHUFFLE16(a, b, ...) __builtin_shuffle(a, b, I8{__VA_ARGS__})
#endif

inline F8 load(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// bfloat16 b is the float32 with bits b << 16: each lane is (0, b) as two 16-bit halves, which a
// shuffle with zeros builds (two shuffle instructions in AVX2, against four and a shift for the
// widening conversion that older GCCs, without __builtin_shufflevector, are left with).
inline F8 load(const c10::BFloat16* p) {
  H8 h;
  std::memcpy(&h, p, sizeof(h));
#if defined(__clang__) || __GNUC__ >= 12
  const H8 zero{};
  return reinterpret_cast<F8>(__builtin_shufflevector(zero, h, 0, 8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15));
#else
  return reinterpret_cast<F8>(__builtin_convertvector(h, U8) << 16);
#endif
}

inline void store(float* p, F8 v) {
  std::memcpy(p, &v, sizeof(v));
}

// c10::BFloat16(float) lane by lane, in the upper 16 bits of each lane (the lower 16 are not
// cleared): round to nearest even, NaN to 0x7FC0.
inline U8 bf16_high_bits(F8 v) {
  const U8 u = reinterpret_cast<U8>(v);
  const I8 rounded = reinterpret_cast<I8>(u + ((u >> 16) & 1u) + 0x7FFFu);
  return reinterpret_cast<U8>((v != v) ? I8{} + 0x7FC00000 : rounded);
}

inline void store(c10::BFloat16* p, F8 v) {
  const H8 h = __builtin_convertvector(bf16_high_bits(v) >> 16, H8);
  std::memcpy(p, &h, sizeof(h));
}

inline void store(float* p, F8 v0, F8 v1) {
  store(p, v0);
  store(p + 8, v1);
}

// 16 channels at once: one pack of the two halves instead of two.
inline void store(c10::BFloat16* p, F8 v0, F8 v1) {
  using H16 = uint16_t __attribute__((vector_size(32)));
  const H16 a = reinterpret_cast<H16>(bf16_high_bits(v0) >> 16), b = reinterpret_cast<H16>(bf16_high_bits(v1) >> 16);
#if defined(__clang__) || __GNUC__ >= 12
  const H16 h = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#else
  const H16 h = __builtin_shuffle(a, b, H16{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30});
#endif
  std::memcpy(p, &h, sizeof(h));
}

// 16 bfloat16 channels as their even channels (0, 2, ..., 14) and odd channels (1, 3, ..., 15):
// each 32-bit word holds an even channel in its low half and the next odd one in its high half,
// so two bit operations split them, with no shuffle. For rows of interleaved pairs these are the
// pairs' first and second channels.
inline void load_even_odd(const c10::BFloat16* p, F8& even, F8& odd) {
  U8 u;
  std::memcpy(&u, p, sizeof(u));
  even = reinterpret_cast<F8>(u << 16);
  odd = reinterpret_cast<F8>(u & 0xFFFF0000u);
}

// The inverse of load_even_odd, each channel rounded as store() rounds it.
inline void store_even_odd(c10::BFloat16* p, F8 even, F8 odd) {
  const U8 u = (bf16_high_bits(even) >> 16) | (bf16_high_bits(odd) & 0xFFFF0000u);
  std::memcpy(p, &u, sizeof(u));
}

inline F8 broadcast(float x) {
  return F8{} + x;
}

// (v1, v0, v3, v2, ...): the other channel of each interleaved pair.
inline F8 swap_pairs(F8 v) {
  return JITROPE_SHUFFLE8(v, 1, 0, 3, 2, 5, 4, 7, 6);
}

// Each of lanes 0..3 (lo) or 4..7 (hi) twice: a pair's value on both of its channels.
inline F8 dup_lo(F8 v) {
  return JITROPE_SHUFFLE8(v, 0, 0, 1, 1, 2, 2, 3, 3);
}

inline F8 dup_hi(F8 v) {
  return JITROPE_SHUFFLE8(v, 4, 4, 5, 5, 6, 6, 7, 7);
}

// Even lanes negated (exactly: the sign bit flips).
inline F8 negate_even(F8 v) {
  return reinterpret_cast<F8>(
      reinterpret_cast<U8>(v) ^ U8{0x80000000u, 0, 0x80000000u, 0, 0x80000000u, 0, 0x80000000u, 0});
}

// Eight lanes of four interleaved pairs (a, b) turned by (c, s) per pair, given on both channels of
// the pair (dup_lo / dup_hi of the per-pair table): (a c - b s, b c + a s), in channel order as
// v * c + swap(v) * (-s, s). A product by -s is minus the product by s and b c + a s is the scalar
// a s + b c, so the lanes have the bits of the scalar rotation (math/rope2d_math.h).
inline F8 rotate_pairs(F8 v, F8 c, F8 s) {
  return v * c + swap_pairs(v) * negate_even(s);
}

// Eight pairs given as two vectors, their first channels a and second channels b (half-split rows,
// or vec8::load_even_odd's lanes), turned by (c, s) per pair: a <- a c - b s, b <- a s + b c, the
// scalar rotation's operations (math/rope2d_math.h), hence its bits.
inline void rotate_split(F8& a, F8& b, F8 c, F8 s) {
  const F8 oa = a * c - b * s;
  b = a * s + b * c;
  a = oa;
}

// The even and the odd lanes of the 16 lanes a, b: one channel of each of 8 interleaved pairs.
inline F8 even_lanes(F8 a, F8 b) {
  return JITROPE_SHUFFLE16(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
}

inline F8 odd_lanes(F8 a, F8 b) {
  return JITROPE_SHUFFLE16(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
}

// The lanes added pairwise in the order of the scalar lane sums.
inline float sum_lanes(F8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

using F4 = float __attribute__((vector_size(16)));

// sum_lanes of four vectors at once, with the same adds in the same order: lane k of the result is
// ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) of v[k], from three rounds of pairwise adds
// across the four vectors (no lane is extracted alone).
inline F4 sum_lanes(F8 v0, F8 v1, F8 v2, F8 v3) {
  // (a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7) for two vectors a, b.
  auto pairs = [](F8 a, F8 b) {
    return JITROPE_SHUFFLE16(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + JITROPE_SHUFFLE16(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const F8 p = pairs(v0, v1), q = pairs(v2, v3);
  // (s0 lo, s1 lo, s2 lo, s3 lo, s0 hi, s1 hi, s2 hi, s3 hi): each row's two halves.
  const F8 r = JITROPE_SHUFFLE16(p, q, 0, 2, 8, 10, 4, 6, 12, 14) + JITROPE_SHUFFLE16(p, q, 1, 3, 9, 11, 5, 7, 13, 15);
  return F4{r[0], r[1], r[2], r[3]} + F4{r[4], r[5], r[6], r[7]};
}

// The element types whose rows run eight lanes at a time (float32, and bfloat16 converted on load
// and store).
template <typename scalar_t>
constexpr bool kType = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

// Whether rows of D channels of scalar_t (unit channel stride when `contig`) take the eight-lane
// form: whole pairs of eight lanes (D a multiple of 16), in the AVX2 build (the baseline build's
// lowering of eight-lane vectors to SSE2 is slower than its own vectorization of the scalar rows).
template <typename scalar_t>
inline bool use_rows(bool contig, int64_t D) {
  return kType<scalar_t> && contig && D % 16 == 0 && use_avx2();
}

}  // namespace jitrope::cpu::vec8

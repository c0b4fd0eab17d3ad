// Compile-time dispatch on run-time flags, written flat: one macro picks the template
// instantiation for up to four flags, in the manner of flash-attention's BOOL_SWITCH.
//
//   JITROPE_BOOL_SWITCH3(rotate, kRotate, interleaved, kInterleaved, contig, kContig, [&] {
//     kernel<scalar_t, kRotate, kInterleaved, kContig>(...);
//   });
//
// Each name is a `constexpr bool` inside the body (a lambda taking no arguments), so it can be a
// template argument. The body is instantiated once per combination (2^k times): keep it to the
// launch, and put combinations that must not compile behind `if constexpr`. The switch returns
// what the body returns. Host-only (kernel launches and CPU loops both happen on the host).
#pragma once

#define JITROPE_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                      \
    if (COND) {                              \
      constexpr bool NAME = true;            \
      return __VA_ARGS__();                  \
    }                                        \
    constexpr bool NAME = false;             \
    return __VA_ARGS__();                    \
  }()

#define JITROPE_BOOL_SWITCH2(COND1, NAME1, COND2, NAME2, ...) \
  JITROPE_BOOL_SWITCH(COND1, NAME1, [&] { return JITROPE_BOOL_SWITCH(COND2, NAME2, __VA_ARGS__); })

#define JITROPE_BOOL_SWITCH3(COND1, NAME1, COND2, NAME2, COND3, NAME3, ...) \
  JITROPE_BOOL_SWITCH(COND1, NAME1, [&] { return JITROPE_BOOL_SWITCH2(COND2, NAME2, COND3, NAME3, __VA_ARGS__); })

#define JITROPE_BOOL_SWITCH4(COND1, NAME1, COND2, NAME2, COND3, NAME3, COND4, NAME4, ...) \
  JITROPE_BOOL_SWITCH(                                                                    \
      COND1, NAME1, [&] { return JITROPE_BOOL_SWITCH3(COND2, NAME2, COND3, NAME3, COND4, NAME4, __VA_ARGS__); })

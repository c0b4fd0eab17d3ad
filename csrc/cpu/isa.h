// The instruction set the CPU kernels' row loops run in. The extension is built for the baseline
// ISA of its target (SSE2 on x86-64), so that it loads on any CPU of that architecture; on x86-64
// the hot loops are compiled a second time for AVX2 and picked at run time when the CPU (and the
// OS) support it, as ATen's DispatchStub picks its per-capability kernels. Both builds of a loop
// run the same arithmetic in the same order and give the same bits: AVX2 without FMA, so no product
// is contracted into an add, and the compiler never reassociates floating-point sums; only the
// vector width differs. JITROPE_CPU_ISA=baseline in the environment (read once) keeps the baseline
// build, for comparing the two.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JITROPE_CPU_AVX2 1
#endif

namespace jitrope::cpu {

// Whether run_isa takes the AVX2 build.
inline bool use_avx2() {
#ifdef JITROPE_CPU_AVX2
  static const bool avx2 = [] {
    const char* isa = std::getenv("JITROPE_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "baseline") == 0) {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return avx2;
#else
  return false;
#endif
}

// f() with everything it calls inlined into it (flatten), so that the whole loop nest is compiled
// for this function's ISA.
template <typename F>
__attribute__((flatten)) void run_baseline(const F& f) {
  f();
}

#ifdef JITROPE_CPU_AVX2
template <typename F>
__attribute__((target("avx2"), flatten)) void run_avx2(const F& f) {
  f();
}
#endif

// Runs f (a lambda taking no arguments: one parallel task's loop) in the AVX2 build where the CPU
// has AVX2, else in the baseline build. Call it inside at::parallel_for's body, not around it: the
// OpenMP region is outlined into a function of its own, which flatten cannot reach.
template <typename F>
inline void run_isa(const F& f) {
#ifdef JITROPE_CPU_AVX2
  if (use_avx2()) {
    run_avx2(f);
    return;
  }
#endif
  run_baseline(f);
}

}  // namespace jitrope::cpu

// Kernels built twice, for the x86-64 baseline and for AVX2+FMA, with the choice made at run time as ATen makes
// it for its own kernels (ATEN_CPU_CAPABILITY=default forces the baseline). A source opts in by building its
// loops with cpu/isa_builds.h (into namespaces `baseline` and, under `#pragma GCC target("avx2,fma")`, `avx2`),
// then calling NORMKIT_BEST_ISA(kernel)(args...).
// The pragma gives the wider instruction set only to functions defined in that region: header code compiled
// elsewhere (ATen, the standard library) stays baseline, so no AVX instruction leaks into shared inline functions.
#pragma once

#include <ATen/Version.h>

#include <string>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NORMKIT_AVX2_CLONES 1
#else
#define NORMKIT_AVX2_CLONES 0
#endif

namespace normkit {

inline bool use_avx2_kernels() {
#if NORMKIT_AVX2_CLONES
  static const bool avx2 = [] {
    // "AVX2" or "AVX512"; the baseline is "DEFAULT", or "NO AVX" in older torch (2.6).
    const std::string capability = at::get_cpu_capability();
    return capability.rfind("AVX", 0) == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

}  // namespace normkit

#if NORMKIT_AVX2_CLONES
#define NORMKIT_BEST_ISA(...) (::normkit::use_avx2_kernels() ? &avx2::__VA_ARGS__ : &baseline::__VA_ARGS__)
#else
#define NORMKIT_BEST_ISA(...) (&baseline::__VA_ARGS__)
#endif

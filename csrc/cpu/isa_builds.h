// Builds the loops of NORMKIT_ISA_SOURCE (an .inc file with no #include of its own) twice, into namespaces
// `baseline` and, for AVX2+FMA, `avx2`, for NORMKIT_BEST_ISA (cpu/isa.h) to choose from at run time.
// Include it once per source, inside the namespace the loops belong to, with NORMKIT_ISA_SOURCE defined:
//   #define NORMKIT_ISA_SOURCE "cpu/my_loops.inc"
//   #include "cpu/isa_builds.h"
// No include guard: each including file builds its own loops.
#ifndef NORMKIT_ISA_SOURCE
#error "define NORMKIT_ISA_SOURCE (the .inc file to build) before including cpu/isa_builds.h"
#endif

namespace baseline {
#include NORMKIT_ISA_SOURCE
}  // namespace baseline

#if NORMKIT_AVX2_CLONES
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include NORMKIT_ISA_SOURCE
}  // namespace avx2
#pragma GCC pop_options
#endif

#undef NORMKIT_ISA_SOURCE

// The CPU kernels compiled for AVX2 + FMA + F16C (x86-64 with GCC), chosen at run time when the CPU has all three
// (kernel_dispatch.h). Twice the vector width of the x86-64 baseline: the reductions are compute-bound
// there. The library headers are included first, so only bnx's own functions get the AVX2 target; the
// same functions are compiled for the baseline in kernels_default.cpp. Other compilers (untested here) build
// this file for the baseline too and never select it.
#include "kernel_deps.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BNX_CPU_AVX2_COMPILED 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define BNX_CPU_ISA isa_avx2
#include "kernels_impl.h"

#if defined(BNX_CPU_AVX2_COMPILED)
#pragma GCC pop_options
#endif

namespace bnx {

bool cpu_avx2_kernels_usable() {
#if defined(BNX_CPU_AVX2_COMPILED)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

}  // namespace bnx

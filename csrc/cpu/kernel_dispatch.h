// Chooses between the CPU kernels compiled for the baseline and for AVX2 + FMA + F16C (kernels_*.cpp).
#pragma once

#include <cstdlib>
#include <cstring>

#define BNX_CPU_ISA isa_default
#include "kernel_api.h"
#undef BNX_CPU_ISA
#define BNX_CPU_ISA isa_avx2
#include "kernel_api.h"
#undef BNX_CPU_ISA

namespace bnx {

// True when the AVX2 kernels were compiled (x86-64 with GCC) and this CPU has AVX2, FMA and F16C.
bool cpu_avx2_kernels_usable();

// The AVX2 kernels when usable, unless BNX_CPU_KERNELS=default asks for the baseline ones (read once).
inline bool use_cpu_avx2_kernels() {
  static const bool use = [] {
    const char* choice = std::getenv("BNX_CPU_KERNELS");
    if (choice != nullptr && std::strcmp(choice, "default") == 0) return false;
    return cpu_avx2_kernels_usable();
  }();
  return use;
}

// fn(kernels) with kernels an isa_avx2::Kernels or isa_default::Kernels value (an empty tag).
template <typename Fn>
void with_cpu_kernels(const Fn& fn) {
  if (use_cpu_avx2_kernels()) {
    fn(isa_avx2::Kernels{});
  } else {
    fn(isa_default::Kernels{});
  }
}

}  // namespace bnx

// The CPU kernels compiled for the compiler's baseline instruction set (any x86-64 or other CPU).
#define BNX_CPU_ISA isa_default
#include "kernels_impl.h"

// Headers the CPU kernels (kernels_impl.h) use. kernels_avx2.cpp includes them before switching the
// instruction set, so that only bnx's own functions are compiled for AVX2.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>  // F16C / AVX2 conversions of the 16-bit types in the AVX2 kernels (kernels_impl.h)
#endif

#include "../common.h"
#include "batch_grad_coefficients.h"

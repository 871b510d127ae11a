// Headers the CPU kernels (kernels_impl.h) use. kernels_avx2.cpp includes them before switching the
// instruction set, so that only bnx's own functions are compiled for AVX2.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common.h"

// Definitions of the CPU kernels declared in kernel_api.h, for the instruction set the including file
// selects (kernels_default.cpp: the compiler's baseline; kernels_avx2.cpp: AVX2 + FMA + F16C). Inner loops run
// over contiguous memory and are written for the compiler to vectorize (`omp simd`; built with -fopenmp).
#include "kernel_api.h"

namespace bnx {
namespace BNX_CPU_ISA {
namespace {

// Conversions between the stored type and opmath inside the loops. For float and double a plain cast. For
// bfloat16 and half, c10's own conversions (round to nearest even; NaN stays NaN) written as bit arithmetic
// with masks instead of branches and selects, which GCC turns into control flow that stops the loop from
// vectorizing: with c10::Half / c10::BFloat16's casts the half types ran one element at a time (2-vCPU AMD
// EPYC, (16,64,56,56): half eval forward 12x, bfloat16 4x slower than native). The results are bit for bit
// c10's. These serve the tails and the baseline kernels; the blocks of eight go through load8 / store8
// (tests/test_cpu_kernels.py checks every 16-bit pattern through both).
inline float float_from_bits(uint32_t u) { return c10::bit_cast<float>(u); }
inline uint32_t bits_from_float(float f) { return c10::bit_cast<uint32_t>(f); }
// All ones where `cond`, else zero.
inline uint32_t mask_if(bool cond) { return 0u - static_cast<uint32_t>(cond); }

template <typename opmath_t, typename scalar_t>
inline opmath_t load_opmath(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return float_from_bits(static_cast<uint32_t>(v.x) << 16);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    // c10::detail::fp16_ieee_to_fp32_value: normal numbers by moving the exponent and mantissa into place,
    // subnormals (and zero) through a float subtraction, inf and NaN by the rescale.
    const uint32_t w = static_cast<uint32_t>(v.x) << 16;
    const uint32_t sign = w & 0x80000000u, two_w = w + w;
    const float normalized = float_from_bits((two_w >> 4) + (0xE0u << 23)) * float_from_bits(15u << 23);
    const float denormalized = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t subnormal = mask_if(two_w < (1u << 27));
    return float_from_bits(sign | (bits_from_float(denormalized) & subnormal) |
                           (bits_from_float(normalized) & ~subnormal));
  } else {
    return static_cast<opmath_t>(v);
  }
}

template <typename scalar_t, typename opmath_t>
inline scalar_t store_from_opmath(opmath_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // c10::detail::round_to_nearest_even; NaN becomes 0x7FC0.
    const uint32_t u = bits_from_float(v);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = mask_if(v != v);
    return c10::BFloat16(static_cast<uint16_t>((0x7FC0u & nan) | (rounded & ~nan)), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    // c10::detail::fp16_ieee_from_fp32_value: the float addition rounds the mantissa to half's (subnormals
    // included); overflow comes out as inf, NaN as 0x7E00 with its sign.
    float base = (std::fabs(v) * float_from_bits(239u << 23)) * float_from_bits(17u << 23);
    const uint32_t w = bits_from_float(v);
    const uint32_t shl1_w = w + w, sign = w & 0x80000000u;
    const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
    base = float_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = bits_from_float(base);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    const uint32_t nan = mask_if(shl1_w > 0xFF000000u);
    return c10::Half(static_cast<uint16_t>((sign >> 16) | (0x7E00u & nan) | (nonsign & ~nan)), c10::Half::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// Whether a stored type is converted to and from float eight at a time by the maps and sums (the 16-bit types).
template <typename scalar_t>
constexpr bool kConvertsInBlocks = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

// Eight 16-bit values as floats, and back (round to nearest even, as c10's conversions; a NaN stays a NaN, its
// payload bits may differ). F16C / AVX2 instructions in the AVX2 kernels; elsewhere loops over c10's bit
// arithmetic (load_opmath, store_from_opmath).
template <typename scalar_t>
inline void load8(const scalar_t* src, float* dst) {
#if defined(BNX_CPU_AVX2_COMPILED)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    _mm256_storeu_ps(dst, _mm256_cvtph_ps(v));
  } else {
    _mm256_storeu_ps(dst, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)));
  }
#else
#pragma omp simd
  for (int k = 0; k < 8; ++k) dst[k] = load_opmath<float>(src[k]);
#endif
}

#if defined(BNX_CPU_AVX2_COMPILED)
// Eight floats rounded to the 16-bit type, in one 128-bit register.
template <typename scalar_t>
inline __m128i round8(const float* src) {
  const __m256 v = _mm256_loadu_ps(src);
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  } else {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
}
#endif

template <typename scalar_t>
inline void store8(const float* src, scalar_t* dst) {
#if defined(BNX_CPU_AVX2_COMPILED)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), round8<scalar_t>(src));
#else
#pragma omp simd
  for (int k = 0; k < 8; ++k) dst[k] = store_from_opmath<scalar_t>(src[k]);
#endif
}

// Sixteen values, as store8 twice (one 256-bit store under AVX2).
template <typename scalar_t>
inline void store16(const float* src, scalar_t* dst) {
#if defined(BNX_CPU_AVX2_COMPILED)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_set_m128i(round8<scalar_t>(src + 8), round8<scalar_t>(src)));
#else
  store8(src, dst);
  store8(src + 8, dst + 8);
#endif
}

// Eight floats as one value (GCC / Clang vector extension; two SSE registers in the baseline kernels), for
// accumulators the compiler must keep in registers: float arrays indexed in a loop stayed on the stack, and
// each iteration's adds went through memory (the 16-bit NC* sums: a read-only pass at 7 GB/s).
// (Functions that return it have internal linkage, so GCC's warning that returning it without AVX changes the
// ABI is moot. Parameters take it by reference, where GCC would note the same.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float Float8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));

template <typename scalar_t>
inline Float8 load8v(const scalar_t* src) {
  alignas(32) float f[8];
  load8(src, f);
  Float8 v;
  std::memcpy(&v, f, sizeof(v));
  return v;
}

template <typename scalar_t>
inline void store8v(const Float8& v, scalar_t* dst) {
  alignas(32) float f[8];
  std::memcpy(f, &v, sizeof(v));
  store8(f, dst);
}

constexpr int64_t kGrainElements = 1 << 15;  // elements per parallel task, at least
constexpr int kLanes = 16;                   // independent partial sums in the plane-wise reductions
constexpr int64_t kOpmathRun = 256;          // values one opmath accumulator adds before its sum moves into double
constexpr int64_t kBlock = kLanes * kOpmathRun;  // NC* elements summed in opmath lanes per move into double

// Sum of kLanes partial sums, as a tree (vectorizes; a chain of kLanes dependent adds does not).
template <typename opmath_t>
inline opmath_t sum_lanes(opmath_t* v) {
  for (int w = kLanes / 2; w > 0; w /= 2) {
#pragma omp simd
    for (int l = 0; l < w; ++l) v[l] += v[l + w];
  }
  return v[0];
}

// Channels-last rows this wide (C opmath values) or wider are taken four at a time, one pass over the
// per-channel arrays per four rows, by the loops that use three or more of them: the sums' two accumulators
// and the shift (or mean), the normalize's three coefficients, grad_input's four. At 3 x 8 KiB and more they
// no longer fit the 32 KiB L1 beside the input and output rows, and are re-read from L2 for every row.
// (2-vCPU AMD EPYC, float32, 12.8 MB inputs, op A/B in one process, at C = 2048-4096, against one row at a
// time: statistics 1.17x-1.72x, gradient sums 1.22x-1.30x, normalize 1.32x-1.48x, grad_input 1.14x-1.22x
// faster; two rows: 0.93x-1.30x, 1.16x-1.20x, 1.09x-1.24x, 1.04x-1.23x, and less than four in every run
// that took both. At C = 256-1536 every multi-row form was slower, down to 0.55x, so narrower rows keep one
// row at a time; frozen dx, one coefficient array, was 0.81x-1.04x with two rows and keeps one.)
constexpr int64_t kManyRowsBytes = 8 << 10;

// out[i] = a[i] * scale[c], written by the sums' pass over a (the frozen dx inside the gradient sums), for the
// 16-bit types: eight at a time through store8, where the sums' function would round one element at a time
// (F16C cannot vectorize there: float16's frozen_bwd_wgrad ran at 0.71x-0.80x native in channels-last). The
// other types write it from the sums' function.
template <typename scalar_t, typename opmath_t>
struct ScaledCopy {
  scalar_t* out = nullptr;
  const opmath_t* scale = nullptr;

  // Eight values of a (as floats) from index i, in channels c .. c + 7 (a channels-last row).
  inline void write8_row(const float* a8, int64_t i, int64_t c) const {
    alignas(32) float o[8];
#pragma omp simd
    for (int k = 0; k < 8; ++k) o[k] = a8[k] * scale[c + k];
    store8(o, out + i);
  }
  // Eight values of a from index i, all in channel c (an NC* plane).
  inline void write8(const Float8& a8, int64_t i, int64_t c) const { store8v(a8 * scale[c], out + i); }
  inline void write1(opmath_t a1, int64_t i, int64_t c) const { out[i] = store_from_opmath<scalar_t>(a1 * scale[c]); }
};

// pa[c] += sum over R rows of f(.).first, pb[c] likewise with .second, for the R rows from `base` (each
// C elements). The R values are added among themselves first (pairwise), then into the accumulator.
// f(a value, b value, index, channel); the 16-bit types are converted eight channels at a time (load8).
template <int R, bool kCopy, typename opmath_t, typename scalar_t, typename F>
inline void add_rows(const F& f, const scalar_t* a, const scalar_t* b, int64_t base, int64_t C, opmath_t* pa,
                     opmath_t* pb, const ScaledCopy<scalar_t, opmath_t>& copy) {
  static_assert(R == 1 || R == 4, "rows per accumulator update: 1 or 4");
  int64_t c0 = 0;
  if constexpr (kConvertsInBlocks<scalar_t>) {
    for (; c0 + 8 <= C; c0 += 8) {
      alignas(32) float av[R][8], bv[R][8];
      for (int r = 0; r < R; ++r) {
        load8(a + base + r * C + c0, av[r]);
        load8(b + base + r * C + c0, bv[r]);
        if constexpr (kCopy) copy.write8_row(av[r], base + r * C + c0, c0);
      }
#pragma omp simd
      for (int k = 0; k < 8; ++k) {
        const int64_t c = c0 + k, i = base + c;
        if constexpr (R == 1) {
          const auto v = f(av[0][k], bv[0][k], i, c);
          pa[c] += v.first;
          pb[c] += v.second;
        } else {
          const auto v0 = f(av[0][k], bv[0][k], i, c);
          const auto v1 = f(av[1][k], bv[1][k], i + C, c);
          const auto v2 = f(av[2][k], bv[2][k], i + 2 * C, c);
          const auto v3 = f(av[3][k], bv[3][k], i + 3 * C, c);
          pa[c] += (v0.first + v1.first) + (v2.first + v3.first);
          pb[c] += (v0.second + v1.second) + (v2.second + v3.second);
        }
      }
    }
  }
  // (For the 16-bit types, the last C % 8 channels.)
  const auto ld = [](const scalar_t* p, int64_t i) { return load_opmath<opmath_t>(p[i]); };
  if constexpr (kCopy) {
    for (int r = 0; r < R; ++r) {
      for (int64_t c = c0; c < C; ++c) copy.write1(ld(a, base + r * C + c), base + r * C + c, c);
    }
  }
#pragma omp simd
  for (int64_t c = c0; c < C; ++c) {
    const int64_t i = base + c;
    if constexpr (R == 1) {
      const auto v = f(ld(a, i), ld(b, i), i, c);
      pa[c] += v.first;
      pb[c] += v.second;
    } else {
      const auto v0 = f(ld(a, i), ld(b, i), i, c);
      const auto v1 = f(ld(a, i + C), ld(b, i + C), i + C, c);
      const auto v2 = f(ld(a, i + 2 * C), ld(b, i + 2 * C), i + 2 * C, c);
      const auto v3 = f(ld(a, i + 3 * C), ld(b, i + 3 * C), i + 3 * C, c);
      pa[c] += (v0.first + v1.first) + (v2.first + v3.first);
      pb[c] += (v0.second + v1.second) + (v2.second + v3.second);
    }
  }
}

// sum1 += sum of f(.).first over elements [e, end) of one NC* plane of channel c (sum2 likewise with .second),
// in blocks of kBlock elements summed in kLanes opmath lanes, each block's lanes added into the double sums.
template <bool kCopy, typename opmath_t, typename scalar_t, typename F>
inline void plane_sums(const F& f, const scalar_t* a, const scalar_t* b, int64_t e, int64_t end, int64_t c,
                       double& sum1, double& sum2, const ScaledCopy<scalar_t, opmath_t>& copy) {
  const auto ld = [](const scalar_t* p, int64_t i) { return load_opmath<opmath_t>(p[i]); };
  for (; e < end;) {
    const int64_t block_start = e, block_end = std::min(end, e + kBlock);
    // Independent lanes the compiler maps onto vector registers (a reduction into one scalar
    // would not vectorize without reassociation).
    opmath_t lane1[kLanes] = {}, lane2[kLanes] = {};
    if constexpr (kConvertsInBlocks<scalar_t>) {
      static_assert(kLanes == 16, "the 16-bit sums keep the lanes as two Float8 per sum");
      // The 16-bit types: f gets eight converted values at a time (as Float8), the sums stay in
      // registers (Float8 variables).
      Float8 sum1_lo = {}, sum1_hi = {}, sum2_lo = {}, sum2_hi = {};
      // kLanes elements from s, the first `skip` of them left out of the sums (masked, as their
      // values may be inf or NaN).
      const auto add_converted = [&](int64_t s, int skip) {
        const Float8 a_lo = load8v(a + s), a_hi = load8v(a + s + 8);
        const Float8 b_lo = load8v(b + s), b_hi = load8v(b + s + 8);
        if constexpr (kCopy) {
          copy.write8(a_lo, s, c);
          copy.write8(a_hi, s + 8, c);
        }
        const auto lo = f(a_lo, b_lo, s, c), hi = f(a_hi, b_hi, s + 8, c);
        if (skip == 0) {
          sum1_lo += lo.first;
          sum1_hi += hi.first;
          sum2_lo += lo.second;
          sum2_hi += hi.second;
          return;
        }
        const Int8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
        const Int8 keep_lo = lane >= skip, keep_hi = lane + 8 >= skip;  // all ones or zero
        sum1_lo += (Float8)((Int8)lo.first & keep_lo);
        sum1_hi += (Float8)((Int8)hi.first & keep_hi);
        sum2_lo += (Float8)((Int8)lo.second & keep_lo);
        sum2_hi += (Float8)((Int8)hi.second & keep_hi);
      };
      for (; e + kLanes <= block_end; e += kLanes) add_converted(e, 0);
      // The last block_end - e (< kLanes) elements: the kLanes ending at block_end, those before e
      // masked off (and their copies rewritten with the same values).
      if (e < block_end && block_end - kLanes >= block_start) {
        add_converted(block_end - kLanes, static_cast<int>(e - (block_end - kLanes)));
        e = block_end;
      }
      std::memcpy(lane1, &sum1_lo, sizeof(Float8));
      std::memcpy(lane1 + 8, &sum1_hi, sizeof(Float8));
      std::memcpy(lane2, &sum2_lo, sizeof(Float8));
      std::memcpy(lane2 + 8, &sum2_hi, sizeof(Float8));
    } else {
      for (; e + kLanes <= block_end; e += kLanes) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          const auto v = f(a[e + l], b[e + l], e + l, c);
          lane1[l] += v.first;
          lane2[l] += v.second;
        }
      }
    }
    // (Short blocks: one element at a time.)
    for (int l = 0; e < block_end; ++e, ++l) {
      if constexpr (kCopy) copy.write1(ld(a, e), e, c);
      const auto v = f(ld(a, e), ld(b, e), e, c);
      lane1[l] += v.first;
      lane2[l] += v.second;
    }
    sum1 += sum_lanes(lane1);
    sum2 += sum_lanes(lane2);
  }
}

// Per-channel sums of the two values f(a[idx], b[idx], idx, c) returns, over every element of the channel (a
// and b as opmath; b may be a again when f reads one tensor).
// The memory is cut into a fixed number of slices, each read in order by one task into its own per-channel
// partial sums; the partials are then added in slice order, so the result does not depend on thread timing.
// Reading in memory order (rather than channel by channel, which in NC* memory jumps between the N planes
// of a channel) keeps the hardware prefetchers ahead of the loads.
// kCopy: also write copy (ScaledCopy; 16-bit types only). A template switch: a run-time test of copy.out in
// these loops made the sums without it slower (channels-last training 1.18x-1.26x -> 0.98x-1.17x native).
template <typename opmath_t, bool kCopy = false, typename scalar_t, typename F>
void channel_sums(const Layout& L, const scalar_t* a, const scalar_t* b, const F& f, std::vector<double>& sum1,
                  std::vector<double>& sum2, const ScaledCopy<scalar_t, opmath_t>& copy = {}) {
  const auto ld = [](const scalar_t* p, int64_t i) { return load_opmath<opmath_t>(p[i]); };
  const int64_t C = L.C;
  sum1.assign(C, 0.0);
  sum2.assign(C, 0.0);
  if (L.rows == 0 || C == 0) return;
  const int64_t total = L.rows * C;
  const int64_t slices = std::min<int64_t>((total + kGrainElements - 1) / kGrainElements,
                                           std::max<int64_t>(1, 4 * at::get_num_threads()));
  std::vector<double> partial(static_cast<size_t>(slices * 2 * C), 0.0);
  at::parallel_for(0, slices, 1, [&](int64_t t0, int64_t t1) {
    std::vector<opmath_t> row_a, row_b;
    if (L.channels_last) {
      row_a.resize(C);
      row_b.resize(C);
    }
    for (int64_t t = t0; t < t1; ++t) {
      double* p1 = partial.data() + t * 2 * C;
      double* p2 = p1 + C;
      if (!L.channels_last) {
        // Elements [e0, e1) cover parts of consecutive (n, c) planes of S elements.
        const int64_t S = L.inner;
        const int64_t e0 = total * t / slices, e1 = total * (t + 1) / slices;
        if (S < kLanes) {
          // Planes shorter than the lanes (e.g. 2x2): one plain sum per plane; zeroing and folding 2 x kLanes
          // lanes per plane cost more than the plane's few elements.
          for (int64_t e = e0, plane = e0 / S, c = plane % C; e < e1; ++plane, c = c + 1 == C ? 0 : c + 1) {
            const int64_t end = std::min(e1, (plane + 1) * S);
            opmath_t plane1 = 0, plane2 = 0;
            for (; e < end; ++e) {
              if constexpr (kCopy) copy.write1(ld(a, e), e, c);
              const auto v = f(ld(a, e), ld(b, e), e, c);
              plane1 += v.first;
              plane2 += v.second;
            }
            p1[c] += plane1;
            p2[c] += plane2;
          }
          continue;
        }
        // The plane and its channel advance by one per plane (a division per plane cost as much as a small
        // plane's sums).
        for (int64_t e = e0, plane = e0 / S, c = plane % C; e < e1; ++plane, c = c + 1 == C ? 0 : c + 1) {
          const int64_t end = std::min(e1, (plane + 1) * S);
          plane_sums<kCopy, opmath_t>(f, a, b, e, end, c, p1[c], p2[c], copy);
          e = end;
        }
        continue;
      }
      // Rows of C channels, added row after row into two C-long accumulators. (Adding several rows per
      // accumulator update reads several rows at once: faster when the input is in cache, much slower when it
      // streams from memory, which is the usual case for activations, except for rows of kManyRowsBytes.)
      const int64_t r0 = L.rows * t / slices, r1 = L.rows * (t + 1) / slices;
      const bool four_rows = C * static_cast<int64_t>(sizeof(opmath_t)) >= kManyRowsBytes;
      // kOpmathRun rows per move into double whatever C is: the move costs 2C double additions, and with
      // kBlock / C rows wide rows made it frequent (C = 1024: every 4 rows, 1.5x slower per byte than C = 64).
      const int64_t row_block = kOpmathRun;
      opmath_t* pa = row_a.data();
      opmath_t* pb = row_b.data();
      for (int64_t rb = r0; rb < r1; rb += row_block) {
        const int64_t re = std::min(r1, rb + row_block);
        std::fill(row_a.begin(), row_a.end(), opmath_t(0));
        std::fill(row_b.begin(), row_b.end(), opmath_t(0));
        int64_t r = rb;
        if (four_rows) {
          for (; r + 4 <= re; r += 4) add_rows<4, kCopy>(f, a, b, r * C, C, pa, pb, copy);
        }
        for (; r < re; ++r) add_rows<1, kCopy>(f, a, b, r * C, C, pa, pb, copy);
        for (int64_t c = 0; c < C; ++c) {
          p1[c] += pa[c];
          p2[c] += pb[c];
        }
      }
    }
  });
  for (int64_t t = 0; t < slices; ++t) {
    const double* p1 = partial.data() + t * 2 * C;
    for (int64_t c = 0; c < C; ++c) {
      sum1[c] += p1[c];
      sum2[c] += p1[C + c];
    }
  }
}

// A pass over memory that the pass before read front to back (the statistics before the normalize pass, the
// gradient sums before grad_input) walks each thread's range in chunks of about kReuseChunkBytes of each
// tensor, the last chunk first and each chunk front to back: what the previous pass read last is what the
// caches still hold, and within a chunk the hardware prefetchers still see a forward stream. (2-vCPU AMD
// EPYC, float32, same-process A/B: backward 2-12 % faster at 12.8 MB per tensor in either layout, training
// forward about 6 % at 25.7 MB and unchanged at 12.8 MB; chunks of 256 KB or 4 MB gained less.)
constexpr int64_t kReuseChunkBytes = 1 << 20;

// Calls f(a, b) on ranges [a, b) that cover [u0, u1): the whole range, or with last_chunk_first chunks of
// `chunk` units taken from the end (each walked in order by f).
template <typename F>
inline void walk_ranges(int64_t u0, int64_t u1, int64_t chunk, bool last_chunk_first, const F& f) {
  if (!last_chunk_first) {
    f(u0, u1);
    return;
  }
  for (int64_t c1 = u1; c1 > u0; c1 -= chunk) f(std::max(u0, c1 - chunk), c1);
}

// A map's vector width: four elements per vector (SSE width, under AVX2 too) for inputs streamed from memory,
// where 8-float vectors ran slower (AMD EPYC, float32: channels-last 10-25 %, NC* about 6 %; at 6.4 and 12.8 MB
// per tensor 5-40 %); eight for inputs up to kWideMapBytes, which come from the caches and where the narrow
// vectors' extra instructions cost more (1.6 MB and less per tensor: eval forward 19-46 %, training forward
// 11-27 %, backward 10-23 % faster). (The sums gain from the wider vectors at any size.)
constexpr int64_t kWideMapBytes = int64_t(2) << 20;

// out[base + i] = g(a + base, b + base, i, channel(i)) for i in [0, n), W elements per vector: one plane of a
// channel (NC*: channel(i) is that channel) or one row of channels (channels-last: channel(i) = i). a and b are
// the stored tensors g reads (b may be null), g reads them at index i. The 16-bit types go sixteen (then eight)
// at a time through float arrays: g gets those, converted from a and b, and its results are rounded from one (with
// c10::Half / c10::BFloat16's own conversions inside g the loop did not vectorize, or in 2-float pieces).
template <int W, typename scalar_t, typename G, typename Channel>
inline void map_run(scalar_t* out, const scalar_t* a, const scalar_t* b, const G& g, int64_t base, int64_t n,
                    const Channel& channel) {
  if constexpr (kConvertsInBlocks<scalar_t>) {
    // g captured by value: through the reference, GCC reloaded g's coefficient pointers after every store to out.
    const auto block = [&, g](int64_t j) {
      alignas(32) float a8[8], b8[8], out8[8];
      load8(a + base + j, a8);
      if (b != nullptr) load8(b + base + j, b8);
#pragma omp simd
      for (int k = 0; k < 8; ++k) out8[k] = g(a8, b8, k, channel(j + k));
      store8(out8, out + base + j);
    };
    const auto block16 = [&, g](int64_t j) {
      alignas(32) float a16[16], b16[16], out16[16];
      load8(a + base + j, a16);
      load8(a + base + j + 8, a16 + 8);
      if (b != nullptr) {
        load8(b + base + j, b16);
        load8(b + base + j + 8, b16 + 8);
      }
#pragma omp simd
      for (int k = 0; k < 16; ++k) out16[k] = g(a16, b16, k, channel(j + k));
      store16(out16, out + base + j);
    };
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) block16(j);
    for (; j + 8 <= n; j += 8) block(j);
    if (j < n && n >= 8) {
      // The last n % 8 elements: the eight ending at n again, which rewrites up to seven outputs with the same
      // values (out never overlaps a or b). One at a time they cost a quarter of a 196-element plane's time.
      block(n - 8);
      return;
    }
    for (; j < n; ++j) {
      const float a1 = load_opmath<float>(a[base + j]);
      const float b1 = b != nullptr ? load_opmath<float>(b[base + j]) : 0.0f;
      out[base + j] = store_from_opmath<scalar_t>(g(&a1, &b1, 0, channel(j)));
    }
  } else {
    const scalar_t* a_run = a + base;
    const scalar_t* b_run = b != nullptr ? b + base : nullptr;
#pragma omp simd simdlen(W)
    for (int64_t i = 0; i < n; ++i) out[base + i] = static_cast<scalar_t>(g(a_run, b_run, i, channel(i)));
  }
}

// Four channels-last rows of C elements from `base`, each channel's coefficients read once for all four (see
// kManyRowsBytes). (The 16-bit types take the rows one at a time.)
template <int W, typename scalar_t, typename G>
inline void map_four_rows(scalar_t* out, const scalar_t* a, const scalar_t* b, const G& g, int64_t base, int64_t C) {
  const auto row_channel = [](int64_t i) { return i; };
  if constexpr (kConvertsInBlocks<scalar_t>) {
    for (int k = 0; k < 4; ++k) map_run<W>(out, a, b, g, base + k * C, C, row_channel);
  } else {
    const scalar_t* r0 = a + base;
    const scalar_t* s0 = b != nullptr ? b + base : nullptr;
    const auto row = [C](const scalar_t* p, int k) { return p != nullptr ? p + k * C : nullptr; };
    const scalar_t *r1 = row(r0, 1), *r2 = row(r0, 2), *r3 = row(r0, 3);
    const scalar_t *s1 = row(s0, 1), *s2 = row(s0, 2), *s3 = row(s0, 3);
#pragma omp simd simdlen(W)
    for (int64_t i = 0; i < C; ++i) {
      out[base + i] = static_cast<scalar_t>(g(r0, s0, i, i));
      out[base + C + i] = static_cast<scalar_t>(g(r1, s1, i, i));
      out[base + 2 * C + i] = static_cast<scalar_t>(g(r2, s2, i, i));
      out[base + 3 * C + i] = static_cast<scalar_t>(g(r3, s3, i, i));
    }
  }
}

// out[idx] = g(a, b, idx, c) for every element (see map_run); after_pass: the input was just read by a pass in
// memory order; coefficient_arrays: how many per-channel arrays g reads.
template <typename opmath_t, typename scalar_t, typename G>
void channel_map(const Layout& L, scalar_t* out, const scalar_t* a, const scalar_t* b, const G& g, bool after_pass,
                 int coefficient_arrays) {
  const int64_t C = L.C;
  if (L.rows == 0 || C == 0) return;
  const int64_t unit_bytes = (L.channels_last ? C : L.inner) * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t chunk = std::max<int64_t>(1, kReuseChunkBytes / std::max<int64_t>(1, unit_bytes));
  const bool wide = L.rows * C * static_cast<int64_t>(sizeof(scalar_t)) <= kWideMapBytes;
  if (!L.channels_last) {
    const int64_t S = L.inner;
    at::parallel_for(0, L.N * C, std::max<int64_t>(1, kGrainElements / S), [&](int64_t p0, int64_t p1) {
      walk_ranges(p0, p1, chunk, after_pass, [&](int64_t u0, int64_t u1) {
        for (int64_t p = u0, c = u0 % C; p < u1; ++p, c = c + 1 == C ? 0 : c + 1) {
          const auto plane_channel = [c](int64_t) { return c; };
          wide ? map_run<8>(out, a, b, g, p * S, S, plane_channel) : map_run<4>(out, a, b, g, p * S, S, plane_channel);
        }
      });
    });
    return;
  }
  const bool four_rows = coefficient_arrays >= 3 && C * static_cast<int64_t>(sizeof(opmath_t)) >= kManyRowsBytes;
  at::parallel_for(0, L.rows, std::max<int64_t>(1, kGrainElements / C), [&](int64_t r0, int64_t r1) {
    walk_ranges(r0, r1, chunk, after_pass, [&](int64_t u0, int64_t u1) {
      const auto row_channel = [](int64_t i) { return i; };
      int64_t r = u0;
      if (four_rows) {
        for (; r + 4 <= u1; r += 4) {
          wide ? map_four_rows<8>(out, a, b, g, r * C, C) : map_four_rows<4>(out, a, b, g, r * C, C);
        }
      }
      for (; r < u1; ++r) {
        wide ? map_run<8>(out, a, b, g, r * C, C, row_channel) : map_run<4>(out, a, b, g, r * C, C, row_channel);
      }
    });
  });
}

}  // namespace

// The gradient sums' function: per element of channel c, (dy, dy * (x - mean[c])), the two sums the batch
// formula and the weight gradient need. g, xv: opmath_t or Float8. (Outside the unnamed namespace: the
// kernels' own lambdas capture it.)
template <typename opmath_t>
inline auto grad_terms(const opmath_t* mean) {
  return [=](const auto& g, const auto& xv, int64_t, int64_t c) { return std::make_pair(g, g * (xv - mean[c])); };
}

// The batch formula's grad_input of one element (BatchGradCoefficients).
template <typename opmath_t>
inline opmath_t batch_grad_input_value(opmath_t dy, opmath_t x, opmath_t mean, opmath_t gain, opmath_t xmu_coef,
                                       opmath_t offset) {
  return dy * gain + (x - mean) * xmu_coef + offset;
}

template <typename scalar_t>
void Kernels::moments_sums(const Layout& L, const scalar_t* x, const opmath<scalar_t>* shift,
                           std::vector<double>& sum, std::vector<double>& sum_sq) {
  using opmath_t = opmath<scalar_t>;
  channel_sums<opmath_t>(L, x, x, [=](const auto& xv, const auto&, int64_t, int64_t c) {  // xv: opmath_t or Float8
    const auto d = xv - shift[c];
    return std::make_pair(d, d * d);
  }, sum, sum_sq);
}

template <typename scalar_t>
void Kernels::affine_map(const Layout& L, const scalar_t* x, const opmath<scalar_t>* mean,
                         const opmath<scalar_t>* scale, const opmath<scalar_t>* bias, scalar_t* out,
                         bool after_pass) {
  using opmath_t = opmath<scalar_t>;
  channel_map<opmath_t>(L, out, x, static_cast<const scalar_t*>(nullptr), [=](const auto* xs, const auto*, int64_t i, int64_t c) {
    return (static_cast<opmath_t>(xs[i]) - mean[c]) * scale[c] + bias[c];
  }, after_pass, /*coefficient_arrays=*/3);
}

template <typename scalar_t>
void Kernels::backward_sums(const Layout& L, const scalar_t* dy, const scalar_t* x, const opmath<scalar_t>* mean,
                            const opmath<scalar_t>* dx_scale, scalar_t* dx, std::vector<double>& sum_dy,
                            std::vector<double>& sum_dy_xmu) {
  using opmath_t = opmath<scalar_t>;
  const auto terms = grad_terms(mean);
  if (dx == nullptr) {
    channel_sums<opmath_t>(L, dy, x, terms, sum_dy, sum_dy_xmu);
    return;
  }
  if constexpr (kConvertsInBlocks<scalar_t>) {  // dx written by the sums eight at a time (ScaledCopy)
    channel_sums<opmath_t, true>(L, dy, x, terms, sum_dy, sum_dy_xmu, ScaledCopy<scalar_t, opmath_t>{dx, dx_scale});
  } else {
    channel_sums<opmath_t>(L, dy, x, [=](opmath_t g, opmath_t xv, int64_t i, int64_t c) {
      dx[i] = store_from_opmath<scalar_t>(g * dx_scale[c]);
      return terms(g, xv, i, c);
    }, sum_dy, sum_dy_xmu);
  }
}

template <typename scalar_t>
void Kernels::batch_backward_by_channel(const Layout& L, const scalar_t* dy, const scalar_t* x,
                                        const opmath<scalar_t>* mean, const opmath<scalar_t>* gain,
                                        const opmath<scalar_t>* invstd, int64_t count, scalar_t* dx,
                                        std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu) {
  using opmath_t = opmath<scalar_t>;
  const int64_t C = L.C, S = L.inner, N = L.N;
  sum_dy.assign(C, 0.0);
  sum_dy_xmu.assign(C, 0.0);
  if (L.rows == 0 || C == 0) return;
  const auto terms = grad_terms(mean);
  const opmath_t inv_count = opmath_t(1) / static_cast<opmath_t>(count);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        plane_sums<false, opmath_t>(terms, dy, x, (n * C + c) * S, (n * C + c + 1) * S, c, s1, s2, {});
      }
      sum_dy[c] = s1;
      sum_dy_xmu[c] = s2;
      // batch_grad_input's coefficients, from the sums in opmath.
      const BatchGradCoefficients<opmath_t> k = batch_grad_coefficients(
          gain[c], invstd[c], static_cast<opmath_t>(s1), static_cast<opmath_t>(s2), inv_count);
      const opmath_t g = gain[c], m = mean[c], xmu_coef = k.xmu_coef, offset = k.offset;
      const auto grad_input = [=](const auto* dys, const auto* xs, int64_t i, int64_t) {
        return batch_grad_input_value<opmath_t>(static_cast<opmath_t>(dys[i]), static_cast<opmath_t>(xs[i]), m, g,
                                                xmu_coef, offset);
      };
      const auto plane_channel = [c](int64_t) { return c; };
      // The planes read last first (what L1 still holds).
      for (int64_t n = N - 1; n >= 0; --n) map_run<8>(dx, dy, x, grad_input, (n * C + c) * S, S, plane_channel);
    }
  });
}

template <typename scalar_t>
void Kernels::grad_input_map(const Layout& L, const scalar_t* dy, const scalar_t* x, const opmath<scalar_t>* mean,
                             const opmath<scalar_t>* gain, const opmath<scalar_t>* xmu_coef,
                             const opmath<scalar_t>* offset, scalar_t* dx) {
  using opmath_t = opmath<scalar_t>;
  channel_map<opmath_t>(L, dx, dy, x, [=](const auto* dys, const auto* xs, int64_t i, int64_t c) {
    return batch_grad_input_value<opmath_t>(static_cast<opmath_t>(dys[i]), static_cast<opmath_t>(xs[i]), mean[c],
                                            gain[c], xmu_coef[c], offset[c]);
  }, /*after_pass=*/true, /*coefficient_arrays=*/4);
}

template <typename scalar_t>
void Kernels::scale_map(const Layout& L, const scalar_t* dy, const opmath<scalar_t>* gain, scalar_t* dx) {
  using opmath_t = opmath<scalar_t>;
  channel_map<opmath_t>(L, dx, dy, static_cast<const scalar_t*>(nullptr),
                        [=](const auto* dys, const auto*, int64_t i, int64_t c) { return static_cast<opmath_t>(dys[i]) * gain[c]; },
                        /*after_pass=*/false, /*coefficient_arrays=*/1);
}

#define BNX_INSTANTIATE_CPU_KERNELS(scalar_t)                                                                    \
  template void Kernels::moments_sums<scalar_t>(const Layout&, const scalar_t*, const opmath<scalar_t>*,        \
                                                std::vector<double>&, std::vector<double>&);                    \
  template void Kernels::affine_map<scalar_t>(const Layout&, const scalar_t*, const opmath<scalar_t>*,          \
                                              const opmath<scalar_t>*, const opmath<scalar_t>*, scalar_t*,      \
                                              bool);                                                            \
  template void Kernels::backward_sums<scalar_t>(const Layout&, const scalar_t*, const scalar_t*,               \
                                                 const opmath<scalar_t>*, const opmath<scalar_t>*, scalar_t*,   \
                                                 std::vector<double>&, std::vector<double>&);                   \
  template void Kernels::batch_backward_by_channel<scalar_t>(const Layout&, const scalar_t*, const scalar_t*,     \
                                                             const opmath<scalar_t>*, const opmath<scalar_t>*,  \
                                                             const opmath<scalar_t>*, int64_t, scalar_t*,       \
                                                             std::vector<double>&, std::vector<double>&);       \
  template void Kernels::grad_input_map<scalar_t>(const Layout&, const scalar_t*, const scalar_t*,              \
                                                  const opmath<scalar_t>*, const opmath<scalar_t>*,             \
                                                  const opmath<scalar_t>*, const opmath<scalar_t>*, scalar_t*); \
  template void Kernels::scale_map<scalar_t>(const Layout&, const scalar_t*, const opmath<scalar_t>*, scalar_t*);

BNX_INSTANTIATE_CPU_KERNELS(double)
BNX_INSTANTIATE_CPU_KERNELS(float)
BNX_INSTANTIATE_CPU_KERNELS(c10::Half)
BNX_INSTANTIATE_CPU_KERNELS(c10::BFloat16)
#undef BNX_INSTANTIATE_CPU_KERNELS

}  // namespace BNX_CPU_ISA
}  // namespace bnx

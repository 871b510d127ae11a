// Definitions of the CPU kernels declared in kernel_api.h, for the instruction set the including file
// selects (kernels_default.cpp: the compiler's baseline; kernels_avx2.cpp: AVX2 + FMA). Inner loops run
// over contiguous memory and are written for the compiler to vectorize (`omp simd`; built with -fopenmp).
#include "kernel_api.h"

namespace bnx {
namespace BNX_CPU_ISA {
namespace {

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

// pa[c] += sum over R rows of f(.).first, pb[c] likewise with .second, for the R rows from `base` (each
// C elements). The R values are added among themselves first (pairwise), then into the accumulator.
template <int R, typename opmath_t, typename F>
inline void add_rows(const F& f, int64_t base, int64_t C, opmath_t* pa, opmath_t* pb) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    if constexpr (R == 1) {
      const auto v = f(base + c, c);
      pa[c] += v.first;
      pb[c] += v.second;
    } else {
      static_assert(R == 4, "rows per accumulator update: 1 or 4");
      const auto v0 = f(base + c, c);
      const auto v1 = f(base + C + c, c);
      const auto v2 = f(base + 2 * C + c, c);
      const auto v3 = f(base + 3 * C + c, c);
      pa[c] += (v0.first + v1.first) + (v2.first + v3.first);
      pb[c] += (v0.second + v1.second) + (v2.second + v3.second);
    }
  }
}

// Per-channel sums of the two values f(idx, c) returns, over every element of the channel.
// The memory is cut into a fixed number of slices, each read in order by one task into its own per-channel
// partial sums; the partials are then added in slice order, so the result does not depend on thread timing.
// Reading in memory order (rather than channel by channel, which in NC* memory jumps between the N planes
// of a channel) keeps the hardware prefetchers ahead of the loads.
template <typename opmath_t, typename F>
void channel_sums(const Layout& L, const F& f, std::vector<double>& sum1, std::vector<double>& sum2) {
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
            opmath_t a = 0, b = 0;
            for (; e < end; ++e) {
              const auto v = f(e, c);
              a += v.first;
              b += v.second;
            }
            p1[c] += a;
            p2[c] += b;
          }
          continue;
        }
        // The plane and its channel advance by one per plane (a division per plane cost as much as a small
        // plane's sums).
        for (int64_t e = e0, plane = e0 / S, c = plane % C; e < e1; ++plane, c = c + 1 == C ? 0 : c + 1) {
          const int64_t end = std::min(e1, (plane + 1) * S);
          for (; e < end;) {
            const int64_t block_end = std::min(end, e + kBlock);
            // Independent lanes the compiler maps onto vector registers (a reduction into one scalar
            // would not vectorize without reassociation).
            opmath_t a[kLanes] = {}, b[kLanes] = {};
            for (; e + kLanes <= block_end; e += kLanes) {
#pragma omp simd
              for (int l = 0; l < kLanes; ++l) {
                const auto v = f(e + l, c);
                a[l] += v.first;
                b[l] += v.second;
              }
            }
            for (int l = 0; e < block_end; ++e, ++l) {
              const auto v = f(e, c);
              a[l] += v.first;
              b[l] += v.second;
            }
            p1[c] += sum_lanes(a);
            p2[c] += sum_lanes(b);
          }
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
          for (; r + 4 <= re; r += 4) add_rows<4>(f, r * C, C, pa, pb);
        }
        for (; r < re; ++r) add_rows<1>(f, r * C, C, pa, pb);
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

// out[base + i] = g(base + i, channel(i)) for i in [0, n), W elements per vector: one plane of a channel
// (NC*: channel(i) is that channel) or one row of channels (channels-last: channel(i) = i).
template <int W, typename scalar_t, typename G, typename Channel>
inline void map_run(scalar_t* out, const G& g, int64_t base, int64_t n, const Channel& channel) {
#pragma omp simd simdlen(W)
  for (int64_t i = 0; i < n; ++i) out[base + i] = static_cast<scalar_t>(g(base + i, channel(i)));
}

// Four channels-last rows of C elements from `base`, each channel's coefficients read once for all four (see
// kManyRowsBytes).
template <int W, typename scalar_t, typename G>
inline void map_four_rows(scalar_t* out, const G& g, int64_t base, int64_t C) {
#pragma omp simd simdlen(W)
  for (int64_t i = 0; i < C; ++i) {
    out[base + i] = static_cast<scalar_t>(g(base + i, i));
    out[base + C + i] = static_cast<scalar_t>(g(base + C + i, i));
    out[base + 2 * C + i] = static_cast<scalar_t>(g(base + 2 * C + i, i));
    out[base + 3 * C + i] = static_cast<scalar_t>(g(base + 3 * C + i, i));
  }
}

// out[idx] = g(idx, c) for every element; after_pass: the input was just read by a pass in memory order;
// coefficient_arrays: how many per-channel arrays g reads.
template <typename opmath_t, typename scalar_t, typename G>
void channel_map(const Layout& L, scalar_t* out, const G& g, bool after_pass, int coefficient_arrays) {
  const int64_t C = L.C;
  if (L.rows == 0 || C == 0) return;
  const int64_t unit_bytes = (L.channels_last ? C : L.inner) * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t chunk = std::max<int64_t>(1, kReuseChunkBytes / std::max<int64_t>(1, unit_bytes));
  const bool wide = L.rows * C * static_cast<int64_t>(sizeof(scalar_t)) <= kWideMapBytes;
  if (!L.channels_last) {
    const int64_t S = L.inner;
    at::parallel_for(0, L.N * C, std::max<int64_t>(1, kGrainElements / S), [&](int64_t p0, int64_t p1) {
      walk_ranges(p0, p1, chunk, after_pass, [&](int64_t a, int64_t b) {
        for (int64_t p = a, c = a % C; p < b; ++p, c = c + 1 == C ? 0 : c + 1) {
          const auto plane_channel = [c](int64_t) { return c; };
          wide ? map_run<8>(out, g, p * S, S, plane_channel) : map_run<4>(out, g, p * S, S, plane_channel);
        }
      });
    });
    return;
  }
  const bool four_rows = coefficient_arrays >= 3 && C * static_cast<int64_t>(sizeof(opmath_t)) >= kManyRowsBytes;
  at::parallel_for(0, L.rows, std::max<int64_t>(1, kGrainElements / C), [&](int64_t r0, int64_t r1) {
    walk_ranges(r0, r1, chunk, after_pass, [&](int64_t a, int64_t b) {
      const auto row_channel = [](int64_t i) { return i; };
      int64_t r = a;
      if (four_rows) {
        for (; r + 4 <= b; r += 4) {
          wide ? map_four_rows<8>(out, g, r * C, C) : map_four_rows<4>(out, g, r * C, C);
        }
      }
      for (; r < b; ++r) {
        wide ? map_run<8>(out, g, r * C, C, row_channel) : map_run<4>(out, g, r * C, C, row_channel);
      }
    });
  });
}

}  // namespace

template <typename scalar_t>
void Kernels::moments_sums(const Layout& L, const scalar_t* x, const opmath<scalar_t>* shift,
                           std::vector<double>& sum, std::vector<double>& sum_sq) {
  using opmath_t = opmath<scalar_t>;
  channel_sums<opmath_t>(L, [=](int64_t i, int64_t c) {
    const opmath_t d = static_cast<opmath_t>(x[i]) - shift[c];
    return std::make_pair(d, d * d);
  }, sum, sum_sq);
}

template <typename scalar_t>
void Kernels::affine_map(const Layout& L, const scalar_t* x, const opmath<scalar_t>* mean,
                         const opmath<scalar_t>* scale, const opmath<scalar_t>* bias, scalar_t* out,
                         bool after_pass) {
  using opmath_t = opmath<scalar_t>;
  channel_map<opmath_t>(L, out, [=](int64_t i, int64_t c) {
    return (static_cast<opmath_t>(x[i]) - mean[c]) * scale[c] + bias[c];
  }, after_pass, /*coefficient_arrays=*/3);
}

template <typename scalar_t>
void Kernels::backward_sums(const Layout& L, const scalar_t* dy, const scalar_t* x, const opmath<scalar_t>* mean,
                            const opmath<scalar_t>* dx_scale, scalar_t* dx, std::vector<double>& sum_dy,
                            std::vector<double>& sum_dy_xmu) {
  using opmath_t = opmath<scalar_t>;
  if (dx != nullptr) {
    channel_sums<opmath_t>(L, [=](int64_t i, int64_t c) {
      const opmath_t g = static_cast<opmath_t>(dy[i]);
      dx[i] = static_cast<scalar_t>(g * dx_scale[c]);
      return std::make_pair(g, g * (static_cast<opmath_t>(x[i]) - mean[c]));
    }, sum_dy, sum_dy_xmu);
  } else {
    channel_sums<opmath_t>(L, [=](int64_t i, int64_t c) {
      const opmath_t g = static_cast<opmath_t>(dy[i]);
      return std::make_pair(g, g * (static_cast<opmath_t>(x[i]) - mean[c]));
    }, sum_dy, sum_dy_xmu);
  }
}

template <typename scalar_t>
void Kernels::grad_input_map(const Layout& L, const scalar_t* dy, const scalar_t* x, const opmath<scalar_t>* mean,
                             const opmath<scalar_t>* gain, const opmath<scalar_t>* xmu_coef,
                             const opmath<scalar_t>* offset, scalar_t* dx) {
  using opmath_t = opmath<scalar_t>;
  channel_map<opmath_t>(L, dx, [=](int64_t i, int64_t c) {
    return static_cast<opmath_t>(dy[i]) * gain[c] + (static_cast<opmath_t>(x[i]) - mean[c]) * xmu_coef[c] + offset[c];
  }, /*after_pass=*/true, /*coefficient_arrays=*/4);
}

template <typename scalar_t>
void Kernels::scale_map(const Layout& L, const scalar_t* dy, const opmath<scalar_t>* gain, scalar_t* dx) {
  using opmath_t = opmath<scalar_t>;
  channel_map<opmath_t>(L, dx, [=](int64_t i, int64_t c) { return static_cast<opmath_t>(dy[i]) * gain[c]; },
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

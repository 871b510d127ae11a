// Launch plan, vector access and the two kernel shapes every bnx CUDA op is made of:
//  - channel_sums_kernel: per-channel sums of two per-element values, two-level (CTA partials, then a
//    finalize step), deterministic: every sum is taken in a fixed order, no atomics.
//  - channel_map_kernel: an elementwise pass where each thread owns fixed channel(s), so its per-channel
//    coefficients live in registers and no index is divided per element.
// (grouped_sums_map_kernel, opt-in and slower where measured, runs a sums pass and the map pass after it in
// one cooperative launch, group of channels by group of channels, so that the map re-reads its input from L2.)
// A thread walks 16-byte vectors of one channel (NCHW: V elements of one plane), of V adjacent channels
// (channels-last rows), or of the planes of V adjacent channels (NCHW planes no vector divides, see Walk).
#pragma once

#include <ATen/ATen.h>
#ifdef BNX_CUDA_EMULATION
// Compiled as C++ for tests on CPU tensors (emulation.h): the ops register under another library name.
#include "emulation.h"
#define BNX_CUDA_LIBRARY bnx_cuda_emulation
#define BNX_CUDA_KEY CPU
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#define BNX_CUDA_LIBRARY bnx
#define BNX_CUDA_KEY CUDA
#endif

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common.h"

namespace bnx {
namespace cuda {

constexpr int kThreads = 256;

#ifdef BNX_CUDA_EMULATION
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
#else
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

// Launches kernel<<<grid, block>>>(args...) on the current stream and checks the launch.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, const Args&... args) {
#ifdef BNX_CUDA_EMULATION
  emulation::launch(grid, block, [&] { kernel(args...); });
#else
  kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// A cooperative launch (all CTAs resident at once, so that grid_sync() may be called) on the current stream,
// each CTA with smem_bytes of dynamic shared memory (dynamic_smem()).
template <typename... Params, typename... Args>
void launch_cooperative_smem(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, const Args&... args) {
#ifdef BNX_CUDA_EMULATION
  emulation::launch_cooperative(grid, block, [&] { kernel(args...); }, smem_bytes);
#else
  std::tuple<std::decay_t<Params>...> params(args...);
  std::apply(
      [&](auto&... p) {
        void* ptrs[] = {static_cast<void*>(&p)...};
        C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, ptrs,
                                                   smem_bytes, at::cuda::getCurrentCUDAStream()));
      },
      params);
#endif
}

template <typename... Params, typename... Args>
void launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, const Args&... args) {
  launch_cooperative_smem(kernel, grid, block, 0, args...);
}

// The CTA's dynamic shared memory (16-byte aligned).
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef BNX_CUDA_EMULATION
  return emulation::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char bnx_dynamic_smem[];
  return bnx_dynamic_smem;
#endif
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load_vec(const T* __restrict__ p, int64_t offset) {
#ifdef BNX_CUDA_EMULATION
  emulation::check_aligned(p + offset, sizeof(Vec<T, V>));
#endif
  return *reinterpret_cast<const Vec<T, V>*>(p + offset);
}

// Element i of vector v as acc_t. A bfloat16 is the high half of a float32, so one 32-bit word of the vector
// gives its two elements by a shift and a mask; converting element by element first unpacks the pair into two
// 16-bit registers, which cost the bf16 backward kernels 30-41 registers a thread (2026-11-27, sm_90: grad_input
// 105-128 -> 64-96, `python benchmarks/kernel_resources.py`). Exact either way.
template <typename acc_t, typename T, int V>
__device__ __forceinline__ acc_t to_acc(const Vec<T, V>& v, int i) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float> && V % 2 == 0) {
    uint32_t w;
    memcpy(&w, &v.v[i & ~1], sizeof(w));  // elements i & ~1 (low half) and i | 1 (high half)
    w = (i & 1) ? (w & 0xffff0000u) : (w << 16);
    float f;
    memcpy(&f, &w, sizeof(f));
    return f;
  } else {
    return static_cast<acc_t>(v.v[i]);
  }
}

// r[0..V) rounded (to nearest even) to a vector of T. bfloat16 two at a time, by the one instruction that
// rounds a pair into one 32-bit word (cvt.rn.bf16x2.f32; sm_80 and up), with the same results as one by one.
// (The emulation pairs them the same way, with c10's rounding.)
template <typename T, int V, typename acc_t>
__device__ __forceinline__ Vec<T, V> from_acc(const acc_t (&r)[V]) {
  Vec<T, V> out;
#if defined(BNX_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float> && V % 2 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 2) {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(r[i], r[i + 1]);  // .x (low half) = r[i]
      memcpy(&out.v[i], &pair, sizeof(pair));
    }
    return out;
  }
#endif
#pragma unroll
  for (int i = 0; i < V; ++i) out.v[i] = static_cast<T>(r[i]);
  return out;
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, int64_t offset, const Vec<T, V>& v) {
#ifdef BNX_CUDA_EMULATION
  emulation::check_aligned(p + offset, sizeof(Vec<T, V>));
#endif
  *reinterpret_cast<Vec<T, V>*>(p + offset) = v;
}

// Loads the n (<= B) vectors of p at off[0..n) into v[0..n), all before any is used, so that B loads are in
// flight at once (for_each_batch hands the ops their offsets in batches of B for this).
template <int V, int B, typename T>
__device__ __forceinline__ void load_batch(const T* __restrict__ p, const int64_t* off, int n, Vec<T, V>* v) {
#pragma unroll
  for (int u = 0; u < B; ++u)
    if (u < n) v[u] = load_vec<V>(p, off[u]);
}

// Per-lane per-channel coefficients of an op (the meaning of a..d is the op's).
template <typename acc_t, int V>
struct Coef {
  acc_t a[V], b[V], c[V], d[V];
};

// How a launch walks the tensor (a template argument of the kernels):
//  - kPlanes: NCHW; a CTA owns one channel, its threads walk vectors of that channel's planes.
//  - kRows: channels-last rows; a thread owns V adjacent channels and walks rows.
//  - kPlaneGroups: NCHW whose plane size S no 16-byte vector divides (7x7; 14x14 in 16-bit types), which
//    kPlanes could only walk with narrow or scalar loads, and S >= V - 1 (see Lanes::split). A CTA owns V
//    adjacent channels: in each batch entry their planes are V * S contiguous elements, S 16-byte vectors, and
//    thread x owns vector x of every batch entry, so its lanes' channels ((x * V + lane) / S) are fixed and
//    its coefficients stay in registers.
//    On by default: on an H100 it took bf16 (256,2048,7,7) training forward + backward from 330 to 199 us and
//    left every other shape as it was (BNX_CUDA_PLANE_GROUPS=0 turns it off, for comparison).
//  - kPlaneSegments: kPlanes where a channel has fewer batch entries than the splits a plan wants: the planes
//    are cut into segments (Plan::segs) and a CTA takes a range of segments. Its own walk, so that the kPlanes
//    kernels stay as they were (the segment loop's state cost the whole-plane grad_input maps a resident CTA).
enum Walk : int { kPlanes = 0, kRows = 1, kPlaneGroups = 2, kPlaneSegments = 3 };

// A vector width and the walk that uses it.
struct Access {
  int V = 1;
  int walk = kPlanes;
};

// How a launch covers the tensor. "rows" are NCHW batch entries (one plane of S elements per channel)
// or channels-last rows (C channels each).
struct Plan {
  int64_t rows = 0;
  int64_t C = 0;
  int64_t S = 1;
  int64_t vecs_per_row = 0;  // NCHW: S / V; channels-last: C / V
  // kPlaneSegments: each plane is cut into `segs` segments of seg_vecs vectors (the last may be shorter), and a
  // "row" is one segment of a batch entry's plane (rows = N * segs), so that a few long planes still spread
  // over many CTAs (and no thread sums a whole plane into one float32 accumulator). Other walks: segs = 1,
  // seg_vecs = vecs_per_row.
  int64_t segs = 1;
  int64_t seg_vecs = 0;
  int64_t rows_per_split = 0;
  int64_t grid_x = 0;
  int64_t splits = 0;
  int tx = 1, ty = 1;
  int V = 1;
  int walk = kPlanes;
  bool reverse = false;  // walk the tiles last to first (see block_tile)
  dim3 grid() const { return dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(splits)); }
  dim3 block() const { return dim3(tx, ty); }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

// The widest vector of 16 or 8 bytes (or one element) that divides the contiguous run (plane or row) and
// keeps every pointer aligned.
inline int vector_width(const Layout& L, int64_t element_size, std::initializer_list<const void*> ptrs) {
  const int64_t run = L.channels_last ? L.C : L.inner;
  for (int64_t bytes : {16, 8}) {
    const int64_t V = bytes / element_size;
    if (V < 2 || run % V != 0) continue;
    bool aligned = true;
    for (const void* p : ptrs) aligned = aligned && reinterpret_cast<uintptr_t>(p) % bytes == 0;
    if (aligned) return static_cast<int>(V);
  }
  return 1;
}

// Whether environment variable `name` is exactly `value` (the opt-in switches, read per call so that tests
// and the benchmark can flip them within one process).
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// The positive integer in environment variable `name`, else `fallback` (unset, zero, negative or not a
// number); read per call like env_is.
inline int64_t env_positive(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  const long long n = v != nullptr ? std::atoll(v) : 0;
  return n > 0 ? static_cast<int64_t>(n) : fallback;
}

// Programmatic dependent launch (BNX_CUDA_PDL=1, opt-in: on an H100 it took launch-bound NCHW passes 5-10 %
// faster but most channels-last ones up to 7.6 % slower; compute capability 9.0 and up): a
// kernel that needs the results of the bnx kernel launched just before it on the stream (the finalize step
// after the sums, the map after them) may be launched while that one still runs. Its CTAs become resident
// and wait in wait_for_prior_grids() until the earlier grid has finished and its writes are visible, so
// the launch latency and the earlier grid's tail overlap instead of adding up: the launch-bound passes are
// three short kernels each. Every bnx kernel waits before touching memory, so the launch is safe after any
// kernel; it is used only after bnx's own.
inline bool pdl_enabled() {
#ifdef BNX_CUDA_EMULATION
  return false;  // the emulation runs launches one after another anyway
#else
  return env_is("BNX_CUDA_PDL", "1") && at::cuda::getCurrentDeviceProperties()->major >= 9;
#endif
}

// launch_kernel for a kernel that reads what the bnx kernel before it on the stream wrote: as a programmatic
// dependent launch where pdl_enabled(), else a plain one.
template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, const Args&... args) {
#ifndef BNX_CUDA_EMULATION
  if (pdl_enabled()) {
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = 0;
    config.stream = at::cuda::getCurrentCUDAStream();
    config.attrs = attribute;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
    return;
  }
#endif
  launch_kernel(kernel, grid, block, args...);
}

inline int num_sms() {
#ifdef BNX_CUDA_EMULATION
  return emulation::num_sms();
#else
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
}

// (ctas_per_sm, min_vecs_per_thread) for a kernel shape: the defaults, or "A,B" from environment variable
// `name` (for measuring other plans on a GPU without a rebuild).
inline std::pair<int, int> plan_sizes(const char* name, int ctas_per_sm, int min_vecs_per_thread) {
  const char* v = std::getenv(name);
  int a = 0, b = 0;
  if (v != nullptr && std::sscanf(v, "%d,%d", &a, &b) == 2 && a > 0 && b > 0) return {a, b};
  return {ctas_per_sm, min_vecs_per_thread};
}

// The two kernel shapes' plan sizes (see sums_plan and map_plan).
inline std::pair<int, int> sums_plan_sizes() { return plan_sizes("BNX_CUDA_SUMS_PLAN", 8, 16); }
inline std::pair<int, int> map_plan_sizes() { return plan_sizes("BNX_CUDA_MAP_PLAN", 16, 4); }

// The segments to cut each of L's NCHW planes of `vecs` vectors into for a plan of ctas_per_sm and
// min_vecs_per_thread (1: none): only where a channel has fewer batch entries than the splits the plan
// wants, and only so many that a segment keeps min_vecs_per_thread vectors for each of kThreads threads.
inline int64_t plane_segments(const Layout& L, int64_t vecs, int ctas_per_sm, int min_vecs_per_thread) {
  const int64_t wanted = ceil_div(static_cast<int64_t>(num_sms()) * ctas_per_sm, L.C);
  if (L.N >= wanted) return 1;
  return std::max<int64_t>(1, std::min(ceil_div(wanted, L.N), vecs / (int64_t(kThreads) * min_vecs_per_thread)));
}

// The walk and vector width for a layout and the pointers a pass touches: kPlaneSegments for few batch entries
// of long NCHW planes, kPlaneGroups where it gives NCHW planes 16-byte vectors that kPlanes cannot (see Walk),
// otherwise kPlanes / kRows with vector_width.
inline Access choose_access(const Layout& L, int64_t element_size, std::initializer_list<const void*> ptrs) {
  Access a;
  a.walk = L.channels_last ? kRows : kPlanes;
  a.V = vector_width(L, element_size, ptrs);
  if (a.walk == kPlanes && L.N > 0 && L.C > 0) {
    // Either kernel shape cutting the planes makes it the segments walk for both (one op's kernels share
    // their walk); the other may still get one segment a plane.
    const int64_t vecs = L.inner / a.V;
    const auto [sums_ctas, sums_vecs] = sums_plan_sizes();
    const auto [map_ctas, map_vecs] = map_plan_sizes();
    if (plane_segments(L, vecs, sums_ctas, sums_vecs) > 1 || plane_segments(L, vecs, map_ctas, map_vecs) > 1) {
      a.walk = kPlaneSegments;
      return a;
    }
  }
  const int64_t v16 = 16 / element_size;
  // Planes of at least v16 - 1 elements: a vector's lanes then lie in at most two channels (Lanes::split).
  if (L.channels_last || a.V >= v16 || v16 < 2 || L.inner > kThreads || L.inner < v16 - 1 || L.C % v16 != 0 ||
      env_is("BNX_CUDA_PLANE_GROUPS", "0"))
    return a;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return a;
  a.walk = kPlaneGroups;
  a.V = static_cast<int>(v16);
  return a;
}

// Splits the rows into about `wanted` ranges (tiles per tile column), fewer where a thread would get less
// than min_vecs_per_thread vectors or a thread-row no row.
inline void split_rows(Plan& p, int64_t wanted, int min_vecs_per_thread) {
  const int64_t vecs_per_thread_row = p.walk == kPlanes || p.walk == kPlaneSegments ? ceil_div(p.seg_vecs, p.tx) : 1;
  const int64_t max_by_work = std::max<int64_t>(1, p.rows * vecs_per_thread_row / (int64_t(min_vecs_per_thread) * p.ty));
  int64_t splits = std::min({std::max<int64_t>(wanted, 1), max_by_work, ceil_div(p.rows, p.ty), int64_t(4096)});
  splits = std::max<int64_t>(splits, 1);
  p.rows_per_split = ceil_div(p.rows, splits);
  p.splits = ceil_div(p.rows, p.rows_per_split);
}

// ctas_per_sm: how many 256-thread CTAs per SM the launch aims for (one full wave at 8); min_vecs_per_thread:
// the least work a thread should get (sums kernels end with a block reduction, so they want fatter CTAs).
inline Plan make_plan(const Layout& L, Access a, int ctas_per_sm, int min_vecs_per_thread) {
  Plan p;
  p.C = L.C;
  p.S = L.inner;
  p.V = a.V;
  p.walk = a.walk;
  if (a.walk == kRows) {
    p.rows = L.rows;
    p.vecs_per_row = L.C / a.V;
    p.tx = pow2_at_least(p.vecs_per_row, 32);
    p.grid_x = ceil_div(p.vecs_per_row, p.tx);
  } else if (a.walk == kPlaneGroups) {
    // One thread per vector of a batch entry's run of V planes (S <= kThreads), kThreads / S batch entries
    // at a time.
    TORCH_INTERNAL_ASSERT(L.inner >= a.V - 1, "bnx: plane groups need planes of at least V - 1 elements");
    p.rows = L.N;
    p.vecs_per_row = L.inner;
    p.tx = static_cast<int>(L.inner);
    p.grid_x = L.C / a.V;
  } else {
    p.rows = L.N;
    p.vecs_per_row = L.inner / a.V;
    p.tx = pow2_at_least(p.vecs_per_row, kThreads);
    p.grid_x = L.C;
  }
  p.ty = kThreads / p.tx;
  p.seg_vecs = p.vecs_per_row;
  if (a.walk == kPlaneSegments) {
    // Few batch entries of long planes (e.g. (8,32,256,256)): segments of at least min_vecs_per_thread
    // vectors per thread; choose_access took this walk only with >= 2 * kThreads vectors a plane, so
    // blockDim.y == 1, which the segment loop relies on.
    TORCH_INTERNAL_ASSERT(p.ty == 1, "bnx: the plane segments walk needs one thread-row");
    const int64_t segs = plane_segments(L, p.vecs_per_row, ctas_per_sm, min_vecs_per_thread);
    p.seg_vecs = ceil_div(p.vecs_per_row, segs);
    p.segs = ceil_div(p.vecs_per_row, p.seg_vecs);
    p.rows = L.N * p.segs;
  }
  split_rows(p, ceil_div(static_cast<int64_t>(num_sms()) * ctas_per_sm, p.grid_x), min_vecs_per_thread);
  return p;
}

// Channels in one tile column: one (NCHW planes), V (plane groups), blockDim.x * V (rows; the last column
// may be cut short by C).
__host__ __device__ __forceinline__ int64_t channels_per_tile(const Plan& p) {
  return p.walk == kRows ? static_cast<int64_t>(p.tx) * p.V : p.walk == kPlaneGroups ? p.V : 1;
}

// Plans of the two kernel shapes. A sums kernel ends with a block reduction and a partial-sum write, so
// it wants fewer, fatter CTAs; a map kernel has no epilogue and just wants the machine full. A map pass
// that follows a sums pass over the same data walks in reverse (see block_tile).
// BNX_CUDA_SUMS_PLAN / BNX_CUDA_MAP_PLAN override the sizes.
inline Plan sums_plan(const Layout& L, Access a) {
  const auto [ctas_per_sm, min_vecs] = sums_plan_sizes();
  return make_plan(L, a, ctas_per_sm, min_vecs);
}
inline Plan map_plan(const Layout& L, Access a, bool reverse = false) {
  const auto [ctas_per_sm, min_vecs] = map_plan_sizes();
  Plan p = make_plan(L, a, ctas_per_sm, min_vecs);
  p.reverse = reverse;
  return p;
}

// Vectors a thread handles per batch: all loads of a batch are issued before any use, so about 64 bytes
// per input are in flight per thread (stores to the output cannot be proven not to alias the inputs,
// which would otherwise serialize load, compute and store). Narrow vectors get deeper batches.
template <typename scalar_t, int V>
constexpr int batch_depth() {
  constexpr int depth = 64 / static_cast<int>(V * sizeof(scalar_t));
  return depth < 4 ? 4 : (depth > 16 ? 16 : depth);
}

// A tile of a plan: x, the channel (NCHW planes), the group of V channels (plane groups) or the block of
// blockDim.x vectors of channels (rows); y, the split (range of rows).
struct Tile {
  int64_t x, y;
};

// The CTA's tile in a plain launch: a sums kernel walks the tensor from its start, the map pass that follows
// walks it from its end (reverse), so the map pass first reads what the sums pass left in L2.
__device__ __forceinline__ Tile block_tile(const Plan& p) {
  return p.reverse ? Tile{p.grid_x - 1 - blockIdx.x, p.splits - 1 - blockIdx.y} : Tile{blockIdx.x, blockIdx.y};
}

// for_each_batch's kPlaneSegments walk (blockDim.y == 1): rows r0..r1 are segments, row r segment r % segs of
// batch entry r / segs, of seg_vecs vectors (the last of a plane may be shorter, even shorter than the block,
// so a thread can have no vector in it; segs may be 1 for one of an op's two plans).
template <int V, int B, typename F>
__device__ __forceinline__ void for_each_segment_batch(const Plan& p, int64_t c, int64_t r0, int64_t r1, int64_t* off,
                                                       F&& f) {
  int64_t row = r0;
  int64_t seg = row % p.segs;
  int64_t plane = (row / p.segs * p.C + c) * p.S;  // where the row's plane starts
  int64_t base = plane + seg * p.seg_vecs * V;     // where the row starts
  int64_t len = ::min(p.seg_vecs, p.vecs_per_row - seg * p.seg_vecs);
  const auto next_row = [&] {
    ++row;
    if (++seg == p.segs) {
      seg = 0;
      plane += p.C * p.S;
    }
    base = plane + seg * p.seg_vecs * V;
    len = ::min(p.seg_vecs, p.vecs_per_row - seg * p.seg_vecs);
  };
  int64_t sv = threadIdx.x;
  while (row < r1 && sv >= len) next_row();
  while (row < r1) {
    int n = 0;
#pragma unroll
    for (int u = 0; u < B; ++u) {
      if (row < r1) {
        off[u] = base + sv * V;
        ++n;
        sv += blockDim.x;
        if (sv >= len) {
          sv = threadIdx.x;
          do next_row();
          while (row < r1 && sv >= len);
        }
      }
    }
    f(off, n);
  }
}

// Calls f(offsets, n) with up to B element offsets of vectors this thread owns (n of them valid).
template <int V, int B, int W, typename F>
__device__ __forceinline__ void for_each_batch(const Plan& p, Tile t, F&& f) {
  const int64_t r0 = t.y * p.rows_per_split;
  const int64_t r1 = ::min(p.rows, r0 + p.rows_per_split);
  int64_t off[B];
  if constexpr (W == kPlaneSegments) {
    if (threadIdx.x >= p.vecs_per_row) return;
    for_each_segment_batch<V, B>(p, t.x, r0, r1, off, f);
  } else if (W != kPlanes) {
    // One vector position of every row: channels-last, V channels of a row; plane groups, vector x of a
    // batch entry's run of V planes.
    int64_t col, row_stride;
    if (W == kRows) {
      const int64_t cv = t.x * blockDim.x + threadIdx.x;
      if (cv >= p.vecs_per_row) return;
      col = cv * V;
      row_stride = p.C;
    } else {
      col = t.x * V * p.S + static_cast<int64_t>(threadIdx.x) * V;
      row_stride = p.C * p.S;
    }
    for (int64_t r = r0 + threadIdx.y; r < r1; r += static_cast<int64_t>(blockDim.y) * B) {
      int n = 0;
#pragma unroll
      for (int u = 0; u < B; ++u) {
        const int64_t row = r + static_cast<int64_t>(u) * blockDim.y;
        off[u] = row * row_stride + col;
        n += row < r1 ? 1 : 0;
      }
      f(off, n);
    }
  } else {
    // The thread's vectors are (row, sv) with sv = tx, tx + TX, ... < vecs_per_row in rows r0 + ty, +TY, ...
    if (threadIdx.x >= p.vecs_per_row) return;
    const int64_t c = t.x;
    const int64_t row_step = static_cast<int64_t>(blockDim.y) * p.C * p.S;
    int64_t row = r0 + threadIdx.y;
    int64_t base = (row * p.C + c) * p.S;
    int64_t sv = threadIdx.x;
    while (row < r1) {
      int n = 0;
#pragma unroll
      for (int u = 0; u < B; ++u) {
        if (row < r1) {
          off[u] = base + sv * V;
          ++n;
          sv += blockDim.x;
          if (sv >= p.vecs_per_row) {
            sv = threadIdx.x;
            row += blockDim.y;
            base += row_step;
          }
        }
      }
      f(off, n);
    }
  }
}

// The channel of each of a thread's V lanes, and whether the thread has any (channels-last threads past the
// last channel have none). Ops compute their per-lane coefficients from it once per thread.
template <int V>
struct Lanes {
  int64_t c[V];
  bool active;
  // Plane groups (planes of at least V - 1 elements, see choose_access): a thread's V consecutive elements
  // cross at most one plane boundary, so the lanes cover at most two channels, c[0] and then c[V - 1]:
  // lanes [0, split) lie in c[0] (split is V elsewhere). coef_of and sum_coef_of both select by split.
  bool two_channels;
  int split;
};

// An active thread's values of a per-channel array at its lanes' channels (`fallback` where the array is
// absent). Ops' coef gathers every array it needs first and computes after: coefficients loaded and used
// channel by channel wait for one load after another before a CTA's first streaming load (sm_90 SASS: the
// statistics' shift, five samples a channel, cost V round trips in a row in channels-last, and the
// normalize's coefficients were loaded channel by channel too).
template <int V, typename acc_t>
__device__ __forceinline__ void gather(const acc_t* values, const Lanes<V>& lanes, acc_t fallback, acc_t (&out)[V]) {
  if (values == nullptr) {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = fallback;
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = values[lanes.c[i]];
}

template <int V, int W>
__device__ __forceinline__ Lanes<V> lanes_of(const Plan& p, Tile t) {
  Lanes<V> l;
  l.active = true;
  l.two_channels = W == kPlaneGroups && V > 2 && p.S >= V - 1;
  l.split = V;
  if (W == kRows) {
    const int64_t cv = t.x * blockDim.x + threadIdx.x;
    l.active = cv < p.vecs_per_row;
#pragma unroll
    for (int i = 0; i < V; ++i) l.c[i] = cv * V + i;
  } else if (W == kPlaneGroups) {
    // Element x * V + i of the run of V planes lies in plane (x * V + i) / S of the group.
#pragma unroll
    for (int i = 0; i < V; ++i) l.c[i] = t.x * V + (static_cast<int64_t>(threadIdx.x) * V + i) / p.S;
    l.split = static_cast<int>(::min(static_cast<int64_t>(V), p.S - static_cast<int64_t>(threadIdx.x) * V % p.S));
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) l.c[i] = t.x;
  }
  return l;
}

// The op's coefficients for two channels: a plane-groups thread's c[0] and c[V - 1] (see Lanes::split).
template <typename acc_t, int V, typename Op>
__device__ __forceinline__ Coef<acc_t, 2> coef_of_ends(const Op& op, const Lanes<V>& lanes) {
  Lanes<2> ends;
  ends.c[0] = lanes.c[0];
  ends.c[1] = lanes.c[V - 1];
  ends.active = lanes.active;
  ends.two_channels = false;
  ends.split = 1;
  return op.template coef<2>(ends);
}

// An op's coefficients for a thread's lanes, for a map pass. Where the lanes cover two channels (plane
// groups), the op computes the two channels' and each lane takes its own: two loads of each array instead of
// V (by ptxas, the bf16 plane-groups normalize gathering 4 arrays for 8 lanes held 70 registers). The test
// stays a run-time one although every plane-groups plan passes it now (choose_access): by ptxas (sm_90),
// the bf16 normalize holds 64 registers so, 70 with the test made at compile time.
template <typename acc_t, int V, typename Op>
__device__ __forceinline__ Coef<acc_t, V> coef_of(const Op& op, const Lanes<V>& lanes) {
  if constexpr (V > 2) {
    if (lanes.two_channels) {
      const Coef<acc_t, 2> k2 = coef_of_ends<acc_t>(op, lanes);
      Coef<acc_t, V> k;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const bool second = i >= lanes.split;  // a select, not an index: k2 stays in registers
        k.a[i] = second ? k2.a[1] : k2.a[0];
        k.b[i] = second ? k2.b[1] : k2.b[0];
        k.c[i] = second ? k2.c[1] : k2.c[0];
        k.d[i] = second ? k2.d[1] : k2.d[0];
      }
      return k;
    }
  }
  return op.template coef<V>(lanes);
}

// A coefficient of a plane-groups thread in the sums passes, kept as its two channels' values: lane i takes
// `first` below `split`, else `second`, chosen where it is used (ops index it as they index Coef's arrays).
template <typename acc_t>
struct TwoChannelValue {
  acc_t first, second;
  int split;
  __device__ __forceinline__ acc_t operator[](int i) const { return i < split ? first : second; }
};
template <typename acc_t>
struct TwoChannelCoef {
  TwoChannelValue<acc_t> a, b, c, d;
};

// An op's coefficients for a sums pass: in plane groups (V > 2) two channels' values, selected per use.
// By ptxas (sm_90), the bf16/fp16 plane-groups gradient sums hold 78/80 registers this way against 90
// with V-wide arrays (3 CTAs per SM, not 2), and the bf16 statistics 56 against 64; the map passes, whose
// ops use up to four coefficients an element, hold more this way (bf16 normalize 64 -> 70), so coef_of keeps
// them V-wide.
template <typename acc_t, int V, int W, typename Op>
__device__ __forceinline__ auto sum_coef_of(const Op& op, const Lanes<V>& lanes) {
  if constexpr (W == kPlaneGroups && V > 2) {
    const Coef<acc_t, 2> k2 = coef_of_ends<acc_t>(op, lanes);
    const int sp = lanes.split;
    return TwoChannelCoef<acc_t>{{k2.a[0], k2.a[1], sp}, {k2.b[0], k2.b[1], sp}, {k2.c[0], k2.c[1], sp},
                                 {k2.d[0], k2.d[1], sp}};
  } else {
    return op.template coef<V>(lanes);
  }
}

// k for one batch of a sums pass. The two-channel form's split is passed through an empty asm, which the
// compiler must assume changes it: otherwise it hoists the per-lane selects out of the loop, and the V-wide
// arrays are back in registers (ptxas: 90 registers, as before).
template <typename K>
__device__ __forceinline__ const K& per_batch(const K& k) {
  return k;
}
template <typename acc_t>
__device__ __forceinline__ TwoChannelCoef<acc_t> per_batch(const TwoChannelCoef<acc_t>& k) {
  int split = k.a.split;
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+r"(split));
#endif
  TwoChannelCoef<acc_t> f = k;
  f.a.split = f.b.split = f.c.split = f.d.split = split;
  return f;
}

// A load that bypasses L1 (which is not coherent across SMs): for what other CTAs of the same launch wrote.
template <typename T>
__device__ __forceinline__ T load_coherent(const T* p) {
#ifdef BNX_CUDA_EMULATION
  return *p;
#else
  return __ldcg(p);
#endif
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Per-channel sums of op's two values over tile t. With one split the CTA hands its totals to
// `fin(c, s1, s2)`; otherwise it writes partial[split][c][2] for the finalize step.
template <typename acc_t, int V, int W, typename Op, typename Fin>
__device__ void sum_tile(const Plan& p, Tile t, const Op& op, const Fin& fin, acc_t* __restrict__ partial) {
  __shared__ acc_t smem[kThreads * V * 2];
  const Lanes<V> lanes = lanes_of<V, W>(p, t);
  const auto k = sum_coef_of<acc_t, V, W>(op, lanes);
  acc_t s1[V], s2[V];
#pragma unroll
  for (int i = 0; i < V; ++i) s1[i] = s2[i] = acc_t(0);
  constexpr int B = batch_depth<typename Op::scalar_type, V>();
  for_each_batch<V, B, W>(p, t, [&](const int64_t* off, int n) {
    op.template accumulate<V, B>(off, n, per_batch(k), s1, s2);
  });

  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  auto emit = [&](int64_t c, acc_t a, acc_t b) {
    if (p.splits == 1) {
      fin(c, a, b);
    } else {
      acc_t* out = partial + (t.y * p.C + c) * 2;
      out[0] = a;
      out[1] = b;
    }
  };
  if (W == kPlanes || W == kPlaneSegments) {
    // Every lane holds the CTA's channel: fold the lanes, then the block.
    acc_t a = 0, b = 0;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      a += s1[i];
      b += s2[i];
    }
    a = warp_sum(a);
    b = warp_sum(b);
    const int warp = tid / 32, lane = tid % 32;
    if (lane == 0) {
      smem[warp * 2] = a;
      smem[warp * 2 + 1] = b;
    }
    __syncthreads();
    if (warp == 0) {
      constexpr int kWarps = kThreads / 32;
      a = lane < kWarps ? smem[lane * 2] : acc_t(0);
      b = lane < kWarps ? smem[lane * 2 + 1] : acc_t(0);
      a = warp_sum(a);
      b = warp_sum(b);
      if (lane == 0) emit(t.x, a, b);
    }
  } else if (W == kRows) {
    // Lanes hold different channels: fold over threadIdx.y as a fixed tree (blockDim.y is a power of 2).
    const int width = blockDim.x * V;
    acc_t* mine = smem + (threadIdx.y * width + threadIdx.x * V) * 2;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      mine[2 * i] = s1[i];
      mine[2 * i + 1] = s2[i];
    }
    for (int half = blockDim.y / 2; half > 0; half /= 2) {
      __syncthreads();
      if (threadIdx.y < half) {
        const acc_t* other = mine + half * width * 2;
#pragma unroll
        for (int i = 0; i < 2 * V; ++i) mine[i] += other[i];
      }
    }
    if (threadIdx.y == 0 && lanes.active) {
#pragma unroll
      for (int i = 0; i < V; ++i) emit(lanes.c[i], mine[2 * i], mine[2 * i + 1]);
    }
  } else {
    // Plane groups: fold the thread-rows in order (blockDim.y need not be a power of 2), which leaves the
    // sums of element e = x * V + i of the run of V planes at smem[2 e]; then one warp per channel adds its
    // S elements (strided lane sums and a fixed shuffle tree).
    const int run = blockDim.x * V;  // V * S
    acc_t* mine = smem + (threadIdx.y * run + threadIdx.x * V) * 2;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      mine[2 * i] = s1[i];
      mine[2 * i + 1] = s2[i];
    }
    __syncthreads();
    if (threadIdx.y == 0) {
      for (int y = 1; y < blockDim.y; ++y) {
        const acc_t* other = mine + y * run * 2;
#pragma unroll
        for (int i = 0; i < 2 * V; ++i) mine[i] += other[i];
      }
    }
    __syncthreads();
    const int S = blockDim.x;
    const int warp = tid / 32, lane = tid % 32;
    const int full_warps = (blockDim.x * blockDim.y) / 32;  // >= 4: a CTA has more than kThreads / 2 threads
    if (warp < full_warps) {
      for (int g = warp; g < V; g += full_warps) {
        acc_t a = 0, b = 0;
        for (int e = g * S + lane; e < (g + 1) * S; e += 32) {
          a += smem[2 * e];
          b += smem[2 * e + 1];
        }
        a = warp_sum(a);
        b = warp_sum(b);
        if (lane == 0) emit(t.x * V + g, a, b);
      }
    }
  }
}

// Splits whose partial sums a lane loads before it adds any (see reduce_channel).
constexpr int kReduceDepth = 8;

// Adds the splits' partial sums of channel c in one warp (strided lane sums, then a fixed shuffle tree, so
// the order never changes); every lane gets the totals. The sums come from L2, so what a channel costs is
// round trips: each lane issues the loads of kReduceDepth of its splits before the first add (32 * 8 = 256
// splits a round trip; the plans' split counts are mostly 100-400). The plain loop, one split an iteration,
// ran up to three iterations one at a time and the rest four or sixteen at a time (sm_90 SASS): about four
// round trips at 392 splits, two now. The adds keep their order, so the results are the same bit for bit.
// kCoherent: load past L1 (partial sums that other CTAs of the same launch wrote).
template <typename acc_t, bool kCoherent = false>
__device__ __forceinline__ void reduce_channel(const acc_t* __restrict__ partial, int64_t splits, int64_t C, int64_t c,
                                               int lane, acc_t& a, acc_t& b) {
  a = 0;
  b = 0;
  for (int64_t s0 = lane; s0 < splits; s0 += 32 * kReduceDepth) {
    acc_t va[kReduceDepth] = {}, vb[kReduceDepth] = {};
#pragma unroll
    for (int u = 0; u < kReduceDepth; ++u) {
      const int64_t s = s0 + 32 * u;
      if (s >= splits) continue;
      const acc_t* v = partial + (s * C + c) * 2;
      if constexpr (kCoherent) {
        va[u] = load_coherent(v);
        vb[u] = load_coherent(v + 1);
      } else {
        va[u] = v[0];
        vb[u] = v[1];
      }
    }
#pragma unroll
    for (int u = 0; u < kReduceDepth; ++u) {
      if (s0 + 32 * u >= splits) break;
      a += va[u];
      b += vb[u];
    }
  }
  a = warp_sum(a);
  b = warp_sum(b);
}

// reduce_channel, then fin from lane 0, which loads what fin reads besides the sums (fin.load) first, so
// that those loads are in flight with the partial sums' (fin.finish uses them).
template <bool kCoherent = false, typename acc_t, typename Fin>
__device__ __forceinline__ void finalize_channel(const acc_t* __restrict__ partial, int64_t splits, int64_t C,
                                                 int64_t c, int lane, const Fin& fin) {
  typename Fin::Loaded loaded;
  if (lane == 0) loaded = fin.load(c);
  acc_t a, b;
  reduce_channel<acc_t, kCoherent>(partial, splits, C, c, lane, a, b);
  if (lane == 0) fin.finish(c, a, b, loaded);
}

// The two halves of a programmatic dependent launch (see pdl_enabled), called first thing by every bnx kernel
// that a launch_dependent may follow or precede: wait until the grids this one depends on have finished and
// their writes are visible (returns at once when the kernel was launched plainly), then let the next kernel
// on the stream be launched early. griddepcontrol needs sm_90; on older targets both are nothing.
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Both, in that order: a dependent of this kernel may become resident once this one runs, never before the
// grids this one waits for are done.
__device__ __forceinline__ void begin_dependent_grid() {
  wait_for_prior_grids();
  allow_dependent_grids();
}

constexpr int kFinalizeWarps = 4;

// One warp per channel.
template <typename acc_t, typename Fin>
__global__ void finalize_kernel(const acc_t* __restrict__ partial, int64_t splits, int64_t C, Fin fin) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + threadIdx.x / 32;
  begin_dependent_grid();
  if (c >= C) return;  // whole warps leave together: c is uniform in a warp
  finalize_channel(partial, splits, C, c, threadIdx.x % 32, fin);
}

template <typename acc_t, int V, int W, typename Op, typename Fin>
__global__ void __launch_bounds__(kThreads) channel_sums_kernel(Plan p, Op op, Fin fin, acc_t* __restrict__ partial) {
  begin_dependent_grid();
  sum_tile<acc_t, V, W>(p, block_tile(p), op, fin, partial);
}

template <typename acc_t, int V, int W, typename Op>
__device__ __forceinline__ void map_tile(const Plan& p, Tile t, const Op& op) {
  const Coef<acc_t, V> k = coef_of<acc_t>(op, lanes_of<V, W>(p, t));
  constexpr int B = batch_depth<typename Op::scalar_type, V>();
  for_each_batch<V, B, W>(p, t, [&](const int64_t* off, int n) { op.template apply<V, B>(off, n, k); });
}

template <typename acc_t, int V, int W, typename Op>
__global__ void __launch_bounds__(kThreads) channel_map_kernel(Plan p, Op op) {
  begin_dependent_grid();
  map_tile<acc_t, V, W>(p, block_tile(p), op);
}

// A sums pass and the map pass that needs its results, in one cooperative launch that walks the tiles in
// groups of `tiles_per_group` tile columns sized so that a group's inputs stay in L2: per group, the sums
// of its tiles (spread over the grid), a grid-wide barrier, the finalize step of its channels (one warp per
// channel across the grid), another barrier, then the map over the same tiles, each CTA re-reading what it
// summed, from L2 rather than DRAM. Opt-in (BNX_CUDA_L2_GROUPS=1): on an H100 it was slower than the two
// launches on every ResNet-50 training forward + backward (up to 2x in NCHW: the grid barriers, and a
// cooperative grid no larger than what is resident), and so was its barrier-free form (1.03x-5.4x, 2026-11-27),
// so it stays off; see docs/DESIGN.md.
// kOneBarrier (NCHW walks, whose tiles have at most V channels): no second barrier; each CTA adds the
// partial sums of its own tiles' channels itself, in the same fixed order as everywhere, and finishes them
// into shared memory with `local_finalize(fin, ...)` (fin's arithmetic without its side effects), which
// `local_map(mop, ...)` then reads; the CTA of split 0 also calls fin, so the outputs and running
// statistics are written once. With one split per tile column no barrier is needed at all: a tile's one
// CTA finishes its channels itself.
// kNoBarrier (BNX_CUDA_L2_GROUPS_BARRIERS=0, every walk): no grid barrier at all. A CTA sums its tiles of
// group g, counting each in its tile column; the CTA that counts a column's last split adds the column's
// partial sums, finishes its channels (fin) and counts the column in the group; then the CTA maps its tiles
// of group g - 1 once all of that group's columns are counted. The grid never drains at a barrier: while
// some CTAs still sum group g, others already map group g - 1, whose inputs are still in L2 (a group takes a
// third of it), and each channel is finished once, not by every CTA that maps it. No deadlock: all CTAs
// are resident (cooperative launch), a column is finished right after its last sums (no wait in between),
// and a CTA waits only for columns of an earlier group, which no CTA waits before summing.
// The map pass never reads what fin wrote in the same launch through the op's own pointers (const
// __restrict__, which the compiler may serve from the non-coherent read-only cache): it reads a copy in
// shared memory, staged with loads that bypass L1 (`finalized`, after a fence) or computed by the CTA.
constexpr int kMaxTileChannels = 256;  // a rows tile: up to 32 lanes x V channels

struct Groups {
  int64_t tiles_per_group = 1;
  int64_t count = 1;
};

// Group g's tile columns: [x0, x0 + nx) (the last group may be narrower).
struct GroupColumns {
  int64_t x0, nx;
};
__device__ __forceinline__ GroupColumns group_columns(const Plan& p, const Groups& groups, int64_t g) {
  const int64_t x0 = g * groups.tiles_per_group;
  return {x0, ::min(groups.tiles_per_group, p.grid_x - x0)};
}

// How the grouped kernel makes a group's map wait for the group's sums.
enum GroupSync : int { kTwoBarriers = 0, kOneBarrier = 1, kNoBarrier = 2 };

// Counts a finished piece of work (release: the CTA's writes before it are visible to whoever sees the
// count) and returns the count before it. Called by one thread after every thread of the CTA has fenced its
// writes and passed a __syncthreads.
__device__ __forceinline__ unsigned count_done(unsigned* counter) { return atomicAdd(counter, 1u); }

// Waits until *counter reaches `expected` (acquire: what was written before those counts is then visible).
__device__ __forceinline__ void wait_count(const unsigned* counter, unsigned expected) {
#ifdef BNX_CUDA_EMULATION
  emulation::wait_until([&] { return __atomic_load_n(counter, __ATOMIC_ACQUIRE) >= expected; });
#else
  while (true) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
    if (v >= expected) break;
    __nanosleep(100);
  }
#endif
}

__device__ __forceinline__ void grid_sync() {
#ifdef BNX_CUDA_EMULATION
  emulation::Block::current()->sync_grid();
#else
  cooperative_groups::this_grid().sync();
#endif
}

// The channels [c0, c1) of tile columns [x0, x1).
__device__ __forceinline__ void tile_channels(const Plan& p, int64_t x0, int64_t x1, int64_t& c0, int64_t& c1) {
  const int64_t width = channels_per_tile(p);
  c0 = x0 * width;
  c1 = ::min(p.C, x1 * width);
}

// Maps tile t with its channels' finished values in local_a / local_b, which fill(c0, c1, a, b) writes
// first; a and b index local_a / local_b by channel c in [c0, c1).
template <typename acc_t, int V, int W, typename MapOp, typename Fill>
__device__ __forceinline__ void map_from_local(const Plan& p, Tile t, const MapOp& mop, acc_t* local_a, acc_t* local_b,
                                               Fill&& fill) {
  int64_t c0, c1;
  tile_channels(p, t.x, t.x + 1, c0, c1);
  acc_t* a = local_a - c0;
  acc_t* b = local_b - c0;
  fill(c0, c1, a, b);
  __syncthreads();
  map_tile<acc_t, V, W>(p, t, local_map(mop, a, b));
  __syncthreads();  // local_a / local_b are rewritten for the next tile
}

// map_from_local with what fin wrote earlier in this launch, copied past L1.
template <typename acc_t, int V, int W, typename Fin, typename MapOp>
__device__ __forceinline__ void map_staged(const Plan& p, Tile t, const Fin& fin, const MapOp& mop, acc_t* local_a,
                                           acc_t* local_b) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  map_from_local<acc_t, V, W>(p, t, mop, local_a, local_b, [&](int64_t c0, int64_t c1, acc_t* a, acc_t* b) {
    for (int64_t c = c0 + tid; c < c1; c += static_cast<int64_t>(blockDim.x) * blockDim.y) finalized(fin, c, a[c], b[c]);
  });
}

// Maps this CTA's tiles of the group of tile columns [x0, x0 + nx) with what fin wrote (map_staged).
template <typename acc_t, int V, int W, typename Fin, typename MapOp>
__device__ __forceinline__ void map_group_staged(const Plan& p, int64_t x0, int64_t nx, const Fin& fin, const MapOp& mop,
                                                 acc_t* local_a, acc_t* local_b) {
  for (int64_t i = blockIdx.x; i < nx * p.splits; i += gridDim.x)
    map_staged<acc_t, V, W>(p, Tile{x0 + i % nx, i / nx}, fin, mop, local_a, local_b);
}

// Maps this CTA's tiles of the group of tile columns [x0, x0 + nx), finishing each tile's channels from the
// partial sums itself (local_finalize; the tile of split 0 also calls fin). After a grid barrier.
template <typename acc_t, int V, int W, typename Fin, typename MapOp>
__device__ __forceinline__ void map_group_finishing_locally(const Plan& p, int64_t x0, int64_t nx, const Fin& fin,
                                                            const MapOp& mop, const acc_t* __restrict__ partial,
                                                            acc_t* local_a, acc_t* local_b) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int warps = (blockDim.x * blockDim.y) / 32;  // whole warps: a plane-groups CTA may end in a partial one
  const int64_t tiles = nx * p.splits;
  for (int64_t i = blockIdx.x; i < tiles; i += gridDim.x) {
    const Tile t{x0 + i % nx, i / nx};
    map_from_local<acc_t, V, W>(p, t, mop, local_a, local_b, [&](int64_t c0, int64_t c1, acc_t* a, acc_t* b) {
      if (warp >= warps) return;
      const Fin local_fin = local_finalize(fin, a, b);
      for (int64_t c = c0 + warp; c < c1; c += warps) {
        acc_t s1, s2;
        reduce_channel(partial, p.splits, p.C, c, lane, s1, s2);
        if (lane == 0) {
          // One load of what finishing reads for both finishes (fin's covers local_fin's), after the sums:
          // loaded before them, it held registers through the sums (fp32 80 -> 99).
          const typename Fin::Loaded loaded = t.y == 0 ? fin.load(c) : local_fin.load(c);
          local_fin.finish(c, s1, s2, loaded);
          if (t.y == 0) fin.finish(c, s1, s2, loaded);
        }
      }
    });
  }
}

// kNoBarrier: the CTA that counts the last of tile column x's splits adds the column's partial sums and
// finishes its channels (fin) once, for every CTA that maps the column.
template <typename acc_t, typename Fin>
__device__ __forceinline__ void finish_column(const Plan& p, int64_t x, const Fin& fin, const acc_t* __restrict__ partial) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int warps = (blockDim.x * blockDim.y) / 32;  // whole warps: a plane-groups CTA may end in a partial one
  if (warp >= warps) return;
  int64_t c0, c1;
  tile_channels(p, x, x + 1, c0, c1);
  for (int64_t c = c0 + warp; c < c1; c += warps) finalize_channel</*kCoherent=*/true>(partial, p.splits, p.C, c, lane, fin);
}

// A cooperative launch gets exactly the CTAs that fit on an SM, so the grouped kernel's registers set its loads
// in flight: ptxas gives it 76-184 a thread (1-3 CTAs per SM), against 45-99 for the two launches' kernels
// (sm_90, `python benchmarks/kernel_resources.py`). BNX_CUDA_GROUPED_MIN_CTAS=n, a compile-time switch for
// measuring, asks ptxas for n CTAs per SM instead, which spills (at b28f733: the 16-bit backward forms at 2,
// every backward form at 3; docs/DESIGN.md).
#ifdef BNX_CUDA_GROUPED_MIN_CTAS
#define BNX_GROUPED_LAUNCH_BOUNDS __launch_bounds__(kThreads, BNX_CUDA_GROUPED_MIN_CTAS)
#else
#define BNX_GROUPED_LAUNCH_BOUNDS __launch_bounds__(kThreads)
#endif

template <typename acc_t, int V, int W, int kSync, typename SumOp, typename Fin, typename MapOp>
__global__ void BNX_GROUPED_LAUNCH_BOUNDS grouped_sums_map_kernel(Plan p, Groups groups, SumOp sop, Fin fin, MapOp mop,
                                                                  acc_t* __restrict__ partial,
                                                                  unsigned* __restrict__ counts) {
  __shared__ acc_t local_a[kMaxTileChannels], local_b[kMaxTileChannels];
  const int64_t ctas = gridDim.x;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int warps = (blockDim.x * blockDim.y) / 32;  // whole warps: a plane-groups CTA may end in a partial one
  if constexpr (kSync == kNoBarrier) {
    if (p.splits > 1) {
      // counts: finished splits per tile column (grid_x), then finished columns per group (groups.count).
      __shared__ bool last_split;
      // Step g: the sums of group g (if any), then the map of group g - 1 (if any).
      for (int64_t g = 0; g <= groups.count; ++g) {
        if (g < groups.count) {
          const auto [x0, nx] = group_columns(p, groups, g);
          for (int64_t i = blockIdx.x; i < nx * p.splits; i += ctas) {
            const Tile t{x0 + i % nx, i / nx};
            sum_tile<acc_t, V, W>(p, t, sop, fin, partial);
            __threadfence();  // every thread's partial sums before the count
            __syncthreads();  // (also: the next tile's reduction reuses the shared memory)
            if (tid == 0) {
              last_split = count_done(&counts[t.x]) == static_cast<unsigned>(p.splits - 1);
              __threadfence();  // acquire: the other splits' partial sums, counted before ours
            }
            __syncthreads();
            if (last_split) {
              finish_column(p, t.x, fin, partial);
              __threadfence();  // fin's writes before the column's count
              __syncthreads();
              if (tid == 0) count_done(&counts[p.grid_x + g]);
            }
          }
        }
        if (g > 0) {
          const auto [x0, nx] = group_columns(p, groups, g - 1);
          if (tid == 0) wait_count(&counts[p.grid_x + g - 1], static_cast<unsigned>(nx));
          __syncthreads();
          map_group_staged<acc_t, V, W>(p, x0, nx, fin, mop, local_a, local_b);
        }
      }
      return;
    }
  }
  for (int64_t g = 0; g < groups.count; ++g) {
    const auto [x0, nx] = group_columns(p, groups, g);
    const int64_t tiles = nx * p.splits;
    if (p.splits == 1) {
      // Tile i's one CTA sums it, finishes its channels (fin, in sum_tile) and maps it: no barrier.
      for (int64_t i = blockIdx.x; i < tiles; i += ctas) {
        const Tile t{x0 + i, 0};
        sum_tile<acc_t, V, W>(p, t, sop, fin, partial);
        __threadfence();  // fin's writes reach L2, where load_coherent reads them
        __syncthreads();
        map_staged<acc_t, V, W>(p, t, fin, mop, local_a, local_b);
      }
      continue;
    }
    for (int64_t i = blockIdx.x; i < tiles; i += ctas) {
      sum_tile<acc_t, V, W>(p, Tile{x0 + i % nx, i / nx}, sop, fin, partial);
      __syncthreads();  // the next tile's reduction reuses the shared memory
    }
    grid_sync();
    if constexpr (kSync != kTwoBarriers) {
      map_group_finishing_locally<acc_t, V, W>(p, x0, nx, fin, mop, partial, local_a, local_b);
      continue;
    }
    // Several splits per column (one split continued above): finish the group's channels across the grid.
    int64_t c0, c1;
    tile_channels(p, x0, x0 + nx, c0, c1);
    if (warp < warps) {
      for (int64_t c = c0 + static_cast<int64_t>(blockIdx.x) * warps + warp; c < c1; c += ctas * warps)
        finalize_channel(partial, p.splits, p.C, c, lane, fin);
    }
    grid_sync();
    map_group_staged<acc_t, V, W>(p, x0, nx, fin, mop, local_a, local_b);
  }
}

// A tensor from at::empty that the kernels are to write in full (an output, a workspace). On a GPU it is
// left as it is; the emulation fills it with NaN, so that an element no kernel writes fails the tests instead
// of keeping what the allocator's block held, often the same op's result from the call before.
inline at::Tensor unwritten(at::Tensor t) {
#ifdef BNX_CUDA_EMULATION
  if (t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
#endif
  return t;
}

// Workspace for the partial sums of every split of every channel.
template <typename acc_t>
at::Tensor partial_workspace(const Plan& p, const at::Tensor& like) {
  if (p.splits <= 1) return at::Tensor();
  return unwritten(at::empty({p.splits, p.C, 2}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value)));
}

// Runs the sums (and the finalize step when the channel is split across CTAs). `workspace` comes from
// partial_workspace(p).
template <typename acc_t, int V, int W, typename Op, typename Fin>
void launch_sums(const Plan& p, const Op& op, const Fin& fin, const at::Tensor& workspace) {
  acc_t* partial = p.splits > 1 ? workspace.mutable_data_ptr<acc_t>() : nullptr;
  TORCH_INTERNAL_ASSERT(p.splits <= 1 || workspace.numel() >= p.splits * p.C * 2, "bnx: workspace too small");
  launch_kernel(&channel_sums_kernel<acc_t, V, W, Op, Fin>, p.grid(), p.block(), p, op, fin, partial);
  if (p.splits > 1) {
    launch_dependent(&finalize_kernel<acc_t, Fin>, dim3(static_cast<unsigned>(ceil_div(p.C, kFinalizeWarps))),
                     dim3(kFinalizeWarps * 32), static_cast<const acc_t*>(partial), p.splits, p.C, fin);
  }
}

// The map pass; after_sums: it reads what the sums launched just before it produced (launch_dependent).
template <typename acc_t, int V, int W, typename Op>
void launch_map(const Plan& p, const Op& op, bool after_sums = false) {
  if (after_sums) {
    launch_dependent(&channel_map_kernel<acc_t, V, W, Op>, p.grid(), p.block(), p, op);
  } else {
    launch_kernel(&channel_map_kernel<acc_t, V, W, Op>, p.grid(), p.block(), p, op);
  }
}

inline int64_t l2_bytes() {
#ifdef BNX_CUDA_EMULATION
  return emulation::l2_bytes();
#else
  return at::cuda::getCurrentDeviceProperties()->l2CacheSize;
#endif
}

// The input bytes a group of the grouped launch may take: a third of the L2, or BNX_CUDA_L2_GROUP_BYTES
// (for measuring the trade-off: larger groups mean fewer grid barriers but fewer L2 hits).
inline int64_t group_bytes() { return env_positive("BNX_CUDA_L2_GROUP_BYTES", l2_bytes() / 3); }

// How many CTAs of `kernel` (blocks of `threads`, with `dynamic_smem` bytes of dynamic shared memory) an SM
// holds at once.
template <typename K>
int resident_per_sm(K kernel, int threads, int64_t dynamic_smem) {
#ifdef BNX_CUDA_EMULATION
  (void)kernel;
  (void)threads;
  (void)dynamic_smem;
  return emulation::blocks_per_sm();
#else
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads,
                                                               static_cast<size_t>(dynamic_smem)));
  return per_sm;
#endif
}

// How many CTAs of `kernel` can be resident at once (a cooperative launch may not use more).
template <typename K>
int64_t resident_ctas(K kernel, int threads) {
  return static_cast<int64_t>(resident_per_sm(kernel, threads, 0)) * num_sms();
}

// The narrowest channels-last tile column the grouped launch makes, in bytes of every row of one tensor:
// 64, or BNX_CUDA_L2_GROUP_ROW_BYTES (narrower columns fit in L2 at more rows, but read DRAM in smaller
// pieces).
inline int64_t group_row_bytes() { return env_positive("BNX_CUDA_L2_GROUP_ROW_BYTES", 64); }

// Channels-last: a rows tile column is tx lanes of `lane_bytes` wide (512 bytes of every row at 32 lanes),
// so with many rows one column's inputs outgrow a group and nothing is re-read from L2. Halves the lanes
// (doubling the rows a CTA walks at once) until a column fits, but not below group_row_bytes(); where even
// that does not fit, keeps the plan (narrower reads would buy no reuse).
inline void narrow_row_columns(Plan& p, const Layout& L, int64_t lane_bytes, int64_t input_bytes_per_element) {
  const int64_t budget = group_bytes();
  const auto column_bytes = [&](int tx) { return L.rows * tx * p.V * input_bytes_per_element; };
  int tx = p.tx;
  while (column_bytes(tx) > budget && tx > 1 && (tx / 2) * lane_bytes >= group_row_bytes()) tx /= 2;
  if (tx == p.tx || column_bytes(tx) > budget) return;
  p.tx = tx;
  p.ty = kThreads / tx;
  p.grid_x = ceil_div(p.vecs_per_row, tx);
}

// The input bytes of one tile column of `p` (its channels in every row), at `input_bytes_per_element`.
inline int64_t column_input_bytes(const Plan& p, const Layout& L, int64_t input_bytes_per_element) {
  return L.rows * channels_per_tile(p) * input_bytes_per_element;
}

// The grouped launch's tile columns: the sums plan `p`, with channels-last columns narrowed to fit in a group
// where they can (`inputs` tensors of `element_bytes` per element: x alone, or x and dy).
inline Plan grouped_columns(Plan p, const Layout& L, int64_t element_bytes, int64_t inputs) {
  if (p.walk == kRows) narrow_row_columns(p, L, element_bytes * p.V, element_bytes * inputs);
  return p;
}

// The grouped launch's plan for `ctas_max` resident CTAs: grouped_columns in groups whose inputs take at most
// group_bytes(), and rows split so that a group has about ctas_max tiles. Returns the plan; `groups` and
// `ctas` are set.
inline Plan grouped_plan(Plan p, const Layout& L, int64_t element_bytes, int64_t inputs, int64_t ctas_max,
                         Groups& groups, int64_t& ctas) {
  p = grouped_columns(p, L, element_bytes, inputs);
  const int64_t column_bytes = std::max<int64_t>(1, column_input_bytes(p, L, element_bytes * inputs));
  groups.tiles_per_group = std::min<int64_t>(std::max<int64_t>(1, group_bytes() / column_bytes), p.grid_x);
  groups.count = ceil_div(p.grid_x, groups.tiles_per_group);
  p.reverse = false;
  split_rows(p, ceil_div(std::max<int64_t>(ctas_max, 1), groups.tiles_per_group), 16);
  ctas = std::min(ctas_max, groups.tiles_per_group * p.splits);
  return p;
}

// Whether the grouped launch's columns `p` (grouped_columns) buy L2 reuse that the two launches do not get
// (BNX_CUDA_L2_GROUPS=auto takes the grouped launch only then): a column fits in a group, so the map
// re-reads what the sums read from L2, and the pass's inputs are larger than the L2 (three groups' worth),
// so the two launches' map, walking back from where the sums ended, would find only part of them there.
inline bool grouped_reuses_l2(const Plan& p, const Layout& L, int64_t input_bytes_per_element) {
  return column_input_bytes(p, L, input_bytes_per_element) <= group_bytes() &&
         L.rows * L.C * input_bytes_per_element > 3 * group_bytes();
}

// Runs the sums pass (sop, fin) and then the map pass (mop) over `p`'s tiles as one grouped cooperative
// launch (see grouped_sums_map_kernel and grouped_plan). Launches nothing and returns false when the kernel
// cannot be resident, or with only_if_reuse when the plan does not pass grouped_reuses_l2.
template <typename acc_t, int V, int W, int kSync, typename SumOp, typename Fin, typename MapOp>
bool launch_grouped_kernel(const Plan& sums, const Layout& L, int64_t element_bytes, int64_t inputs, const SumOp& sop,
                           const Fin& fin, const MapOp& mop, const at::Tensor& like, bool only_if_reuse) {
  // Decided before the occupancy query, which the two launches do not need.
  if (only_if_reuse && !grouped_reuses_l2(grouped_columns(sums, L, element_bytes, inputs), L, element_bytes * inputs))
    return false;
  auto kernel = &grouped_sums_map_kernel<acc_t, V, W, kSync, SumOp, Fin, MapOp>;
  Groups groups;
  int64_t ctas = 0;
  const Plan p = grouped_plan(sums, L, element_bytes, inputs, resident_ctas(kernel, sums.tx * sums.ty), groups, ctas);
  if (ctas < 1) return false;
  const at::Tensor workspace = partial_workspace<acc_t>(p, like);
  acc_t* partial = p.splits > 1 ? workspace.mutable_data_ptr<acc_t>() : nullptr;
  // kNoBarrier's counts, from zero: finished splits per tile column, then finished columns per group.
  at::Tensor counts;
  unsigned* count_ptr = nullptr;
  if (kSync == kNoBarrier && p.splits > 1) {
    counts = at::zeros({p.grid_x + groups.count}, like.options().dtype(at::kInt));
    count_ptr = reinterpret_cast<unsigned*>(counts.mutable_data_ptr<int32_t>());
  }
  launch_cooperative(kernel, dim3(static_cast<unsigned>(ctas)), p.block(), p, groups, sop, fin, mop, partial, count_ptr);
  return true;
}

template <typename acc_t, int V, int W, typename SumOp, typename Fin, typename MapOp>
bool launch_grouped(const Plan& sums, const Layout& L, int64_t element_bytes, int64_t inputs, const SumOp& sop,
                    const Fin& fin, const MapOp& mop, const at::Tensor& like, bool only_if_reuse) {
  // BNX_CUDA_L2_GROUPS_BARRIERS=0 (and BNX_CUDA_L2_GROUPS=auto): no grid barrier (every walk). Otherwise, where
  // a tile has few channels (NCHW): one barrier per group, two with =2; channels-last tiles (up to 256
  // channels, many splits) take two.
  if (only_if_reuse || env_is("BNX_CUDA_L2_GROUPS_BARRIERS", "0"))
    return launch_grouped_kernel<acc_t, V, W, kNoBarrier>(sums, L, element_bytes, inputs, sop, fin, mop, like,
                                                          only_if_reuse);
  if constexpr (W != kRows) {
    if (!env_is("BNX_CUDA_L2_GROUPS_BARRIERS", "2"))
      return launch_grouped_kernel<acc_t, V, W, kOneBarrier>(sums, L, element_bytes, inputs, sop, fin, mop, like, false);
  }
  return launch_grouped_kernel<acc_t, V, W, kTwoBarriers>(sums, L, element_bytes, inputs, sop, fin, mop, like, false);
}

// The on-chip launch (BNX_CUDA_ON_CHIP=1, opt-in, not yet measured on a GPU): where the whole input fits in
// the shared memory of the CTAs that can be resident at once, one cooperative launch reads it from DRAM once.
// Every CTA takes one tile: it copies the tile's input vectors into its shared memory (fill_cache: all of
// them in flight at once), sums them from there (sum_tile over Cached); a grid barrier; the channels are
// finished across the grid (one warp per channel, as the finalize kernel does); another barrier; then each
// CTA maps its tile from the copy (Cached again) and writes the output. So a training forward moves 2 tensor
// transfers instead of 3 and a batch backward 3 instead of 5, in one launch instead of three: what cuDNN's
// persistent kernels do on small channels-last inputs, where bnx's launch-bound (32,64,56,56) fp32 passes
// trail them. An H100 has 228 KB of shared memory per SM, about 30 MB in all. Where the input only partly
// fits (the fp32 backward of that shape: x and dy, 51 MB), each thread caches the first vectors of its walk
// and reads the rest from global memory in both passes; the launch is taken only where that rest fits in
// half the L2, and the map re-reads it first, so that its second read comes from L2 (on_chip_plan).
// A thread's k-th vector of input j sits at slot (j * slots + k) * threads + tid, so that a warp's accesses
// to one slot are contiguous; every pass walks the tile with the same for_each_batch, so the k-th vector is
// the same one in each.
// Copies the vector at p + offset from global to shared memory. 16-byte vectors on sm_80 and up go by
// cp.async, which takes no registers and does not wait: a thread issues its whole tile before the first
// arrives, so an SM has all of its CTAs' tiles in flight at once (a CTA per SM holds ~200 KB).
// wait_for_smem_copies() waits for them (and makes them visible to the issuing thread, the only one that reads
// them). Other widths load as load_vec does.
template <int V, typename T>
__device__ __forceinline__ void copy_to_smem(Vec<T, V>* dst, const T* __restrict__ p, int64_t offset) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(Vec<T, V>) == 16) {
    const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(p + offset) : "memory");
    return;
  }
#endif
  *dst = load_vec<V>(p, offset);
}

__device__ __forceinline__ void wait_for_smem_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Emulation only: fails a thread of the whole-input form that walks past its cache slots (where the partial
// form reads from global memory instead), which on a GPU would read another input's slots or past the cache.
template <bool kPartial>
__device__ __forceinline__ void check_cache_slots(int64_t next, int n, int64_t slots) {
#ifdef BNX_CUDA_EMULATION
  if (!kPartial && next + n > slots) emulation::Block::current()->report("cuda emulation: on-chip cache slots overrun");
#else
  (void)next;
  (void)n;
  (void)slots;
#endif
}

// Copies the first `slots` vectors a thread walks in tile t (for_each_batch, as the ops see them) of each of
// op's inputs into its cache slots, in walk order: all of them where the input fits, else (kPartial) as many
// as fit.
template <int V, int W, bool kPartial, typename Op>
__device__ __forceinline__ void fill_cache(const Plan& p, Tile t, const Op& op, unsigned char* cache, int64_t slots,
                                              int threads, int tid) {
  using VecT = Vec<typename Op::scalar_type, V>;
  constexpr int B = batch_depth<typename Op::scalar_type, V>();
  VecT* c = reinterpret_cast<VecT*>(cache);
  int64_t next = 0;
  for_each_batch<V, B, W>(p, t, [&](const int64_t* off, int n) {
    check_cache_slots<kPartial>(next, n, slots);
    if (kPartial && next >= slots) return;
#pragma unroll
    for (int j = 0; j < Op::kInputs; ++j)
#pragma unroll
      for (int u = 0; u < B; ++u)
        if (u < n && (!kPartial || next + u < slots))
          copy_to_smem<V>(c + (j * slots + next + u) * threads + tid, op.input(j), off[u]);
    next += n;
  });
  wait_for_smem_copies();
}

// The op, its inputs read from the cache slots (in walk order) instead of global memory: a sums op
// (accumulate) or a map op (apply, which writes the output to global memory as usual). kPartial (an input
// that only partly fits): vectors past the thread's slots come from global memory, as the op itself reads
// them. (A template argument, because the check and the offsets it keeps live cost the whole-input kernels
// up to 25 registers: ptxas, sm_90.) `only` restricts apply to the batches that are wholly cached or to the
// others, so that a map can take them in two walks.
enum CachedBatches : int { kAllBatches = 0, kUncachedBatches = 1, kCachedBatches = 2 };
template <typename Op, bool kPartial>
struct Cached {
  using scalar_type = typename Op::scalar_type;
  Op op;
  const unsigned char* cache;
  int64_t slots;
  int threads, tid;
  CachedBatches only = kAllBatches;
  mutable int64_t next = 0;

  template <int V>
  __device__ __forceinline__ auto coef(const Lanes<V>& lanes) const {
    return op.template coef<V>(lanes);
  }

  template <int V, int B>
  __device__ __forceinline__ void read(const int64_t* off, int n, Vec<scalar_type, V> (&in)[Op::kInputs][B]) const {
    using VecT = Vec<scalar_type, V>;
    check_cache_slots<kPartial>(next, n, slots);
    const VecT* c = reinterpret_cast<const VecT*>(cache);
#pragma unroll
    for (int j = 0; j < Op::kInputs; ++j)
#pragma unroll
      for (int u = 0; u < B; ++u)
        if (u < n)
          in[j][u] = !kPartial || next + u < slots ? c[(j * slots + next + u) * threads + tid]
                                                   : load_vec<V>(op.input(j), off[u]);
    next += n;
  }

  template <int V, int B, typename K, typename acc_t>
  __device__ __forceinline__ void accumulate(const int64_t* off, int n, const K& k, acc_t* s1, acc_t* s2) const {
    Vec<scalar_type, V> in[Op::kInputs][B];
    read<V, B>(off, n, in);
    op.template accumulate_loaded<V, B>(off, in, n, k, s1, s2);
  }

  template <int V, int B, typename K>
  __device__ __forceinline__ void apply(const int64_t* off, int n, const K& k) const {
    if constexpr (kPartial) {
      if (only != kAllBatches && (only == kCachedBatches) != (next + n <= slots)) {
        next += n;  // not this walk's batch
        return;
      }
    }
    Vec<scalar_type, V> in[Op::kInputs][B];
    read<V, B>(off, n, in);
    op.template apply_loaded<V, B>(off, in, n, k);
  }
};

template <typename acc_t, int V, int W, bool kPartial, typename SumOp, typename Fin, typename MapOp>
__global__ void __launch_bounds__(kThreads) on_chip_sums_map_kernel(Plan p, SumOp sop, Fin fin, MapOp mop,
                                                                    acc_t* __restrict__ partial, int64_t slots) {
  __shared__ acc_t local_a[kMaxTileChannels], local_b[kMaxTileChannels];
  const int threads = blockDim.x * blockDim.y;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int warps = threads / 32;  // whole warps: a plane-groups CTA may end in a partial one
  unsigned char* cache = dynamic_smem();
  const Tile t{static_cast<int64_t>(blockIdx.x) % p.grid_x, static_cast<int64_t>(blockIdx.x) / p.grid_x};
  fill_cache<V, W, kPartial>(p, t, sop, cache, slots, threads, tid);
  sum_tile<acc_t, V, W>(p, t, Cached<SumOp, kPartial>{sop, cache, slots, threads, tid}, fin, partial);
  __threadfence();  // the partial sums (or, with one split, fin's writes) before the barrier
  grid_sync();
  if (p.splits > 1) {
    if (warp < warps) {
      const int64_t stride = static_cast<int64_t>(gridDim.x) * warps;
      for (int64_t c = static_cast<int64_t>(blockIdx.x) * warps + warp; c < p.C; c += stride)
        finalize_channel</*kCoherent=*/true>(partial, p.splits, p.C, c, lane, fin);
    }
    __threadfence();
    grid_sync();
  }
  int64_t c0, c1;
  tile_channels(p, t.x, t.x + 1, c0, c1);
  acc_t* a = local_a - c0;
  acc_t* b = local_b - c0;
  for (int64_t c = c0 + tid; c < c1; c += threads) finalized(fin, c, a[c], b[c]);
  __syncthreads();
  const auto local = local_map(mop, a, b);
  if constexpr (kPartial) {
    // What is not cached first: the sums read it last, so it is what L2 holds most recently, and the map's
    // output writes have not yet evicted any of it. Then the cached vectors.
    map_tile<acc_t, V, W>(p, t, Cached<decltype(local), true>{local, cache, slots, threads, tid, kUncachedBatches});
    map_tile<acc_t, V, W>(p, t, Cached<decltype(local), true>{local, cache, slots, threads, tid, kCachedBatches});
  } else {
    map_tile<acc_t, V, W>(p, t, Cached<decltype(local), false>{local, cache, slots, threads, tid});
  }
}

// Shared memory: what an SM has for its CTAs, what one CTA may take (opt-in), and what the system reserves
// per CTA.
struct SmemLimits {
  int64_t per_sm, per_cta_max, reserved_per_cta;
};
inline SmemLimits smem_limits() {
#ifdef BNX_CUDA_EMULATION
  const int64_t s = emulation::smem_per_sm();
  return {s, s, 0};
#else
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return {static_cast<int64_t>(prop->sharedMemPerMultiprocessor), static_cast<int64_t>(prop->sharedMemPerBlockOptin),
          static_cast<int64_t>(prop->reservedSharedMemPerBlock)};
#endif
}

// The most vectors one thread of plan p walks in a tile (for_each_batch): a vector position of every
// thread-row's rows (rows, plane groups), or of every block-row of every row (planes, segments).
inline int64_t vectors_per_thread(const Plan& p) {
  const int64_t rows = ceil_div(p.rows_per_split, p.ty);
  return p.walk == kRows || p.walk == kPlaneGroups ? rows : rows * ceil_div(p.seg_vecs, p.tx);
}

// The on-chip launch's plan for the sums plan `sums` (its columns, rows re-split so that every tile has a CTA
// resident at once, ctas_per_sm of them per SM): the cache slots a thread gets and the shared-memory bytes a
// CTA needs; whether every vector is cached (cached_all) and whether the launch may run (fits): every vector
// cached, or with `partial` at least one per thread and the uncached rest (read twice from global memory,
// by the sums and by the map) within half the L2, so that the map's second read of it comes from there.
// bytes_per_vector: one vector of every cached input. BNX_CUDA_ON_CHIP_SLOTS caps the slots (so that tests
// on a GPU, whose shared memory holds any small input, can take the partial form).
struct OnChipPlan {
  Plan p;
  int64_t slots = 0, smem_bytes = 0;
  bool fits = false, cached_all = false;
};
inline OnChipPlan on_chip_plan(const Plan& sums, int ctas_per_sm, int64_t bytes_per_vector, int64_t static_smem,
                               bool partial) {
  OnChipPlan o;
  o.p = sums;
  o.p.reverse = false;
  const int64_t ctas = static_cast<int64_t>(ctas_per_sm) * num_sms();
  if (sums.grid_x > ctas) return o;
  split_rows(o.p, ctas / sums.grid_x, 1);
  const int64_t threads = static_cast<int64_t>(o.p.tx) * o.p.ty;
  const int64_t needed = vectors_per_thread(o.p);
  const SmemLimits smem = smem_limits();
  const int64_t budget = std::min(smem.per_cta_max, smem.per_sm / ctas_per_sm - smem.reserved_per_cta) - static_smem;
  o.slots = std::min({needed, std::max<int64_t>(0, budget / (threads * bytes_per_vector)),
                      env_positive("BNX_CUDA_ON_CHIP_SLOTS", needed)});
  o.smem_bytes = o.slots * threads * bytes_per_vector;
  o.cached_all = o.slots == needed;
  const int64_t tiles = o.p.grid_x * o.p.splits;
  const int64_t uncached_bytes = (needed - o.slots) * threads * tiles * bytes_per_vector;  // at most
  o.fits = tiles <= ctas && (o.cached_all || (partial && o.slots > 0 && uncached_bytes <= l2_bytes() / 2));
  return o;
}

// The on-chip plan with the most CTAs per SM (more loads in flight) whose shares of an SM's shared memory hold
// the input and which `resident(plan)` (CTAs of the kernel an SM holds with that plan's shared memory: its
// registers may allow fewer) can hold; where none holds the whole input, the same for the partial plans
// (on_chip_plan); `fits` is false where there is none either.
template <typename Resident>
OnChipPlan choose_on_chip_plan(const Plan& sums, int64_t bytes_per_vector, int64_t static_smem, Resident&& resident) {
  for (const bool partial : {false, true}) {
    for (int per_sm = 4; per_sm >= 1; --per_sm) {
      const OnChipPlan o = on_chip_plan(sums, per_sm, bytes_per_vector, static_smem, partial);
      if (o.fits && resident(o) >= per_sm) return o;
    }
  }
  return OnChipPlan{};
}

// Once per device for a pair of on-chip kernels (whole, partial): allows each the most dynamic shared memory
// a CTA may take beside the larger of their static shared memory, which it returns. The launch then asks for
// what its plan needs. (Set once, to the same value, so that concurrent calls cannot undo each other; and not
// on every call: the attribute queries and sets are driver calls.)
template <typename K>
int64_t prepare_on_chip_kernels(K whole, K partial) {
#ifdef BNX_CUDA_EMULATION
  (void)whole;
  (void)partial;
  return 0;
#else
  static std::mutex mutex;
  static std::vector<int64_t> static_smem_by_device;  // -1: not yet prepared on that device
  const auto device = static_cast<size_t>(c10::cuda::current_device());
  std::lock_guard<std::mutex> lock(mutex);
  if (static_smem_by_device.size() <= device) static_smem_by_device.resize(device + 1, -1);
  int64_t& static_smem = static_smem_by_device[device];
  if (static_smem < 0) {
    int64_t most = 0;
    for (K kernel : {whole, partial}) {
      cudaFuncAttributes attributes;
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
      most = std::max(most, static_cast<int64_t>(attributes.sharedSizeBytes));
    }
    for (K kernel : {whole, partial})
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem_limits().per_cta_max - most)));
    static_smem = most;
  }
  return static_smem;
#endif
}

// Runs the sums pass (sop, fin) and the map pass (mop) as the on-chip launch. Launches nothing and returns
// false where the input does not fit (or mop does not read the tensors sop reads, which the cache holds).
template <typename acc_t, int V, int W, typename SumOp, typename Fin, typename MapOp>
bool launch_on_chip(const Plan& sums, const SumOp& sop, const Fin& fin, const MapOp& mop, const at::Tensor& like) {
  constexpr int kInputs = SumOp::kInputs;
  static_assert(MapOp::kInputs == kInputs, "the on-chip launch maps from the sums op's cached inputs");
  for (int j = 0; j < kInputs; ++j)
    if (sop.input(j) != mop.input(j)) return false;
  // The kernel for a whole input, and for one that partly fits.
  auto kernel = [](bool cached_all) {
    return cached_all ? &on_chip_sums_map_kernel<acc_t, V, W, false, SumOp, Fin, MapOp>
                      : &on_chip_sums_map_kernel<acc_t, V, W, true, SumOp, Fin, MapOp>;
  };
  const int64_t bytes_per_vector = kInputs * static_cast<int64_t>(sizeof(Vec<typename SumOp::scalar_type, V>));
  const int64_t static_smem = prepare_on_chip_kernels(kernel(true), kernel(false));
  const OnChipPlan o = choose_on_chip_plan(sums, bytes_per_vector, static_smem, [&](const OnChipPlan& candidate) {
    return resident_per_sm(kernel(candidate.cached_all), candidate.p.tx * candidate.p.ty, candidate.smem_bytes);
  });
  if (!o.fits) return false;
  const at::Tensor workspace = partial_workspace<acc_t>(o.p, like);
  acc_t* partial = o.p.splits > 1 ? workspace.mutable_data_ptr<acc_t>() : nullptr;
  launch_cooperative_smem(kernel(o.cached_all), dim3(static_cast<unsigned>(o.p.grid_x * o.p.splits)), o.p.block(),
                          static_cast<size_t>(o.smem_bytes), o.p, sop, fin, mop, partial, o.slots);
  return true;
}

// A sums pass (sop, fin) and the map pass (mop) that needs its results, over the tiles of the sums plan `ps`:
// the on-chip launch with BNX_CUDA_ON_CHIP=1 where the input fits; one grouped launch with BNX_CUDA_L2_GROUPS=1
// (where the kernel can be resident), or with BNX_CUDA_L2_GROUPS=auto its barrier-free form where
// grouped_reuses_l2; else the two passes (and the finalize step) as separate launches, the map walking in
// reverse so that it starts where the sums ended, still in L2.
template <typename acc_t, int V, int W, typename SumOp, typename Fin, typename MapOp>
void launch_sums_then_map(const Plan& ps, const Layout& L, Access a, int64_t element_bytes, int64_t inputs,
                          const SumOp& sop, const Fin& fin, const MapOp& mop, const at::Tensor& like) {
  if (env_is("BNX_CUDA_ON_CHIP", "1") && launch_on_chip<acc_t, V, W>(ps, sop, fin, mop, like)) return;
  const bool auto_groups = env_is("BNX_CUDA_L2_GROUPS", "auto");
  if ((auto_groups || env_is("BNX_CUDA_L2_GROUPS", "1")) &&
      launch_grouped<acc_t, V, W>(ps, L, element_bytes, inputs, sop, fin, mop, like, /*only_if_reuse=*/auto_groups))
    return;
  launch_sums<acc_t, V, W>(ps, sop, fin, partial_workspace<acc_t>(ps, like));
  launch_map<acc_t, V, W>(map_plan(L, a, /*reverse=*/true), mop, /*after_sums=*/true);
}

// Calls f(std::integral_constant<int, V>, std::integral_constant<int, walk>) for the plan's vector width
// (16 bytes, 8 bytes or one element) and walk.
template <typename scalar_t, typename W, typename F>
void dispatch_width(const Plan& p, F&& f) {
  constexpr int kVec16 = 16 / sizeof(scalar_t);
  constexpr int kVec8 = 8 / sizeof(scalar_t) > 1 ? 8 / sizeof(scalar_t) : 1;
  if (p.V == kVec16) {
    f(std::integral_constant<int, kVec16>{}, W{});
  } else if (kVec8 > 1 && p.V == kVec8) {
    f(std::integral_constant<int, kVec8>{}, W{});
  } else {
    TORCH_INTERNAL_ASSERT(p.V == 1, "bnx: unexpected vector width " + std::to_string(p.V));  // no streamed ints: see checks.cpp
    f(std::integral_constant<int, 1>{}, W{});
  }
}

template <typename scalar_t, typename F>
void dispatch_plan(const Plan& p, F&& f) {
  if (p.walk == kRows) {
    dispatch_width<scalar_t, std::integral_constant<int, kRows>>(p, f);
  } else if (p.walk == kPlaneGroups) {
    constexpr int kVec16 = 16 / sizeof(scalar_t);
    TORCH_INTERNAL_ASSERT(p.V == kVec16, "bnx: plane groups need 16-byte vectors, got width " + std::to_string(p.V));
    f(std::integral_constant<int, kVec16>{}, std::integral_constant<int, kPlaneGroups>{});
  } else if (p.walk == kPlaneSegments) {
    dispatch_width<scalar_t, std::integral_constant<int, kPlaneSegments>>(p, f);
  } else {
    dispatch_width<scalar_t, std::integral_constant<int, kPlanes>>(p, f);
  }
}

// A per-channel tensor as acc_t data (converted only when it has another dtype).
inline at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  if (!t.defined()) return t;
  return t.scalar_type() == acc && t.is_contiguous() ? t : t.to(acc).contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace cuda
}  // namespace bnx

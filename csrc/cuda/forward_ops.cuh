// The per-element functors of the forward passes (statistics and normalize), shared by the forward ops.
#pragma once

#include "common.cuh"

namespace bnx {
namespace cuda {

// Sums of d = x - shift and d^2, where shift is the median of a few of the channel's elements (ShiftSamples
// in common.h): near the mean, so the variance escapes the cancellation that plain sums of x and x^2 suffer
// at large means. (The CPU op takes the sums again around the mean when the samples were far off; here that
// would take the host a synchronization, so more than two outliers among five samples cost precision.)
template <typename scalar_t, typename acc_t>
struct ShiftedMomentsOp {
  using scalar_type = scalar_t;
  const scalar_t* __restrict__ x;
  ShiftSamples samples;

  template <int V>
  __device__ Coef<acc_t, V> coef(const Lanes<V>& lanes) const {
    if (!lanes.active) return {};  // no channel: zero coefficients
    Coef<acc_t, V> k;
    // Every lane's samples first, then the medians (see gather).
    ShiftSamples::Values<scalar_t> s[V];
#pragma unroll
    for (int i = 0; i < V; ++i) s[i] = samples.load(x, lanes.c[i]);
#pragma unroll
    for (int i = 0; i < V; ++i) k.a[i] = ShiftSamples::median_of<acc_t>(s[i]);
    return k;
  }

  // The tensors it reads, in the order of accumulate_loaded's `in` (the on-chip launch caches them).
  static constexpr int kInputs = 1;
  __host__ __device__ const scalar_t* input(int) const { return x; }

  template <int V, int B, typename K>
  __device__ __forceinline__ void accumulate(const int64_t* off, int n, const K& k, acc_t* s1,
                                             acc_t* s2) const {
    Vec<scalar_t, V> in[kInputs][B];
    load_batch<V, B>(x, off, n, in[0]);
    accumulate_loaded<V, B>(off, in, n, k, s1, s2);
  }

  template <int V, int B, typename K>
  __device__ __forceinline__ void accumulate_loaded(const int64_t* /*off*/, const Vec<scalar_t, V> (&in)[kInputs][B],
                                                    int n, const K& k, acc_t* s1, acc_t* s2) const {
    const Vec<scalar_t, V>* v = in[0];
#pragma unroll
    for (int u = 0; u < B; ++u) {
      if (u >= n) break;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const acc_t d = to_acc<acc_t>(v[u], i) - k.a[i];
        s1[i] += d;
        s2[i] += d * d;
      }
    }
  }
};

// Turns a channel's shifted sums into mean and invstd, and updates the running statistics:
// r = (1 - f) * r + f * value with f = momentum, or 1 / num_batches_tracked when that is given.
template <typename scalar_t, typename acc_t>
struct MomentsFinalize {
  const scalar_t* __restrict__ x;
  ShiftSamples samples;  // the shift ShiftedMomentsOp summed around
  int64_t count;
  double eps;
  double momentum;
  const int64_t* __restrict__ num_batches_tracked;
  acc_t* __restrict__ mean;
  acc_t* __restrict__ invstd;
  acc_t* __restrict__ running_mean;
  acc_t* __restrict__ running_var;

  // What finishing channel c reads besides its sums, as loaded: the shift's samples, the running statistics
  // and num_batches_tracked. finalize_channel loads them before it adds the partial sums and uses them after,
  // so that these loads (the samples are scattered over x, likely evicted from L2 by then) overlap the
  // sums' instead of following them (sm_90 SASS: three dependent round trips after the sums before).
  struct Loaded {
    ShiftSamples::Values<scalar_t> samples;
    acc_t running_mean = 0, running_var = 0;
    int64_t num_batches_tracked = 1;
  };
  __device__ Loaded load(int64_t c) const {
    Loaded l;
    l.samples = samples.load(x, c);
    if (running_mean != nullptr) {
      l.running_mean = running_mean[c];
      l.running_var = running_var[c];
      if (num_batches_tracked != nullptr) l.num_batches_tracked = *num_batches_tracked;
    }
    return l;
  }

  __device__ void finish(int64_t c, acc_t s1, acc_t s2, const Loaded& l) const {
    const acc_t shift = ShiftSamples::median_of<acc_t>(l.samples);
    const acc_t n = static_cast<acc_t>(count);
    const acc_t d = s1 / n;
    const acc_t var = ::max(s2 / n - d * d, acc_t(0));
    const acc_t m = shift + d;
    mean[c] = m;
    invstd[c] = acc_t(1) / ::sqrt(var + static_cast<acc_t>(eps));
    if (running_mean != nullptr) {
      // The count includes this batch, so it is at least 1. The CPU op refuses a smaller one; here a check
      // would wait for the device, so the running statistics become NaN instead of 1/0's infinities or a
      // negative factor's extrapolation, which would pass for numbers.
      const acc_t f = num_batches_tracked == nullptr ? static_cast<acc_t>(momentum)
                      : l.num_batches_tracked >= 1   ? acc_t(1) / static_cast<acc_t>(l.num_batches_tracked)
                                                     : std::numeric_limits<acc_t>::quiet_NaN();
      const acc_t unbiased = var * n / (n - acc_t(1));
      running_mean[c] = (acc_t(1) - f) * l.running_mean + f * m;
      running_var[c] = (acc_t(1) - f) * l.running_var + f * unbiased;
    }
  }

  __device__ void operator()(int64_t c, acc_t s1, acc_t s2) const { finish(c, s1, s2, load(c)); }
};

// y = (x - mean) * (weight * invstd) + bias; with scale_is_var, invstd = 1 / sqrt(scale + eps).
template <typename scalar_t, typename acc_t>
struct AffineOp {
  using scalar_type = scalar_t;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ y;
  const acc_t* __restrict__ weight;
  const acc_t* __restrict__ bias;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ scale;
  bool scale_is_var;
  acc_t eps;

  template <int V>
  __device__ Coef<acc_t, V> coef(const Lanes<V>& lanes) const {
    if (!lanes.active) return {};  // no channel: zero coefficients
    Coef<acc_t, V> k;
    acc_t s[V], w[V];
    gather(mean, lanes, acc_t(0), k.a);
    gather(scale, lanes, acc_t(0), s);
    gather(weight, lanes, acc_t(1), w);
    gather(bias, lanes, acc_t(0), k.c);
#pragma unroll
    for (int i = 0; i < V; ++i) k.b[i] = w[i] * (scale_is_var ? acc_t(1) / ::sqrt(s[i] + eps) : s[i]);
    return k;
  }

  static constexpr int kInputs = 1;
  __host__ __device__ const scalar_t* input(int) const { return x; }

  template <int V, int B>
  __device__ __forceinline__ void apply(const int64_t* off, int n, const Coef<acc_t, V>& k) const {
    Vec<scalar_t, V> in[kInputs][B];
    load_batch<V, B>(x, off, n, in[0]);
    apply_loaded<V, B>(off, in, n, k);
  }

  // apply on vectors already loaded (in[0]: x at off).
  template <int V, int B>
  __device__ __forceinline__ void apply_loaded(const int64_t* off, const Vec<scalar_t, V> (&in)[kInputs][B], int n,
                                               const Coef<acc_t, V>& k) const {
    const Vec<scalar_t, V>* v = in[0];
#pragma unroll
    for (int u = 0; u < B; ++u) {
      if (u >= n) break;
      acc_t out[V];
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = (to_acc<acc_t>(v[u], i) - k.a[i]) * k.b[i] + k.c[i];
      store_vec<V>(y, off[u], from_acc<scalar_t>(out));
    }
  }
};

// The one-barrier grouped launch (see grouped_sums_map_kernel): the statistics finished into a CTA's own
// arrays (mean -> a, invstd -> b, indexed by channel), without the running-statistics update, and the
// normalize pass reading them.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ MomentsFinalize<scalar_t, acc_t> local_finalize(MomentsFinalize<scalar_t, acc_t> f, acc_t* a,
                                                                         acc_t* b) {
  f.mean = a;
  f.invstd = b;
  f.running_mean = nullptr;
  f.running_var = nullptr;
  return f;
}

// What fin wrote for channel c in this launch (mean -> a, invstd -> b), read past L1.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void finalized(const MomentsFinalize<scalar_t, acc_t>& f, int64_t c, acc_t& a, acc_t& b) {
  a = load_coherent(f.mean + c);
  b = load_coherent(f.invstd + c);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ AffineOp<scalar_t, acc_t> local_map(AffineOp<scalar_t, acc_t> op, const acc_t* a, const acc_t* b) {
  op.mean = a;
  op.scale = b;  // invstd: the training forward's normalize has scale_is_var == false
  return op;
}

}  // namespace cuda
}  // namespace bnx

// Training-forward statistics on CUDA: per-channel mean and invstd, with the running-statistics update
// fused into the step that finishes each channel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.cuh"

namespace bnx {
namespace cuda {
namespace {

using at::Tensor;

// Sums of d = x - shift and d^2, where shift is the channel's first element: shifting by a sample keeps
// the variance free of the cancellation that plain sums of x and x^2 suffer at large means.
template <typename scalar_t, typename acc_t>
struct ShiftedMomentsOp {
  const scalar_t* __restrict__ x;
  int64_t S;  // plane size (NCHW); the first element of channel c is x[c * S] (NCHW) or x[c] (rows)

  template <int V, bool CL>
  __device__ Coef<acc_t, V> coef(int64_t cbase, bool active) const {
    Coef<acc_t, V> k;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int64_t c = lane_channel<CL>(cbase, i);
      k.a[i] = active ? static_cast<acc_t>(x[CL ? c : c * S]) : acc_t(0);
    }
    return k;
  }

  template <int V>
  __device__ __forceinline__ void accumulate(const int64_t* off, int n, const Coef<acc_t, V>& k, acc_t* s1,
                                             acc_t* s2) const {
    Vec<scalar_t, V> v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (u < n) v[u] = load_vec<V>(x, off[u]);
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (u >= n) break;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const acc_t d = static_cast<acc_t>(v[u].v[i]) - k.a[i];
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
  int64_t S;
  bool channels_last;
  int64_t count;
  double eps;
  double momentum;
  const int64_t* __restrict__ num_batches_tracked;
  acc_t* __restrict__ mean;
  acc_t* __restrict__ invstd;
  acc_t* __restrict__ running_mean;
  acc_t* __restrict__ running_var;

  __device__ void operator()(int64_t c, acc_t s1, acc_t s2) const {
    const acc_t shift = static_cast<acc_t>(x[channels_last ? c : c * S]);
    const acc_t n = static_cast<acc_t>(count);
    const acc_t d = s1 / n;
    const acc_t var = ::max(s2 / n - d * d, acc_t(0));
    const acc_t m = shift + d;
    mean[c] = m;
    invstd[c] = acc_t(1) / ::sqrt(var + static_cast<acc_t>(eps));
    if (running_mean != nullptr) {
      const acc_t f = num_batches_tracked != nullptr
                          ? acc_t(1) / static_cast<acc_t>(*num_batches_tracked)
                          : static_cast<acc_t>(momentum);
      const acc_t unbiased = var * n / (n - acc_t(1));
      running_mean[c] = (acc_t(1) - f) * running_mean[c] + f * m;
      running_var[c] = (acc_t(1) - f) * running_var[c] + f * unbiased;
    }
  }
};

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& input_, const c10::optional<Tensor>& running_mean_,
                                                 const c10::optional<Tensor>& running_var_,
                                                 const c10::optional<Tensor>& num_batches_tracked_,
                                                 double momentum, double eps) {
  check_input(input_);
  check_running_pair(running_mean_, running_var_, input_);
  TORCH_CHECK(eps > 0, "bnx: eps must be positive when computing batch statistics, got ", eps);
  Tensor nbt = value_or_undefined(num_batches_tracked_);
  if (nbt.defined()) {
    TORCH_CHECK(nbt.numel() == 1 && nbt.device() == input_.device(),
                "bnx: num_batches_tracked must be a one-element tensor on the input's device, got shape ",
                nbt.sizes(), " on ", nbt.device());
  }
  const c10::cuda::CUDAGuard guard(input_.device());
  const Layout L = layout_of(input_);
  const Tensor input = dense_as(input_, L.format);
  const auto acc = stat_dtype(input);
  Tensor running_mean = value_or_undefined(running_mean_);
  Tensor running_var = value_or_undefined(running_var_);
  const bool update = running_mean.defined();
  TORCH_CHECK(!update || L.rows != 1, "Expected more than 1 value per channel when training, got input size ",
              input_.sizes());
  Tensor mean = at::empty({L.C}, input.options().dtype(acc));
  Tensor invstd = at::empty({L.C}, input.options().dtype(acc));
  if (L.C == 0) return {mean, invstd};
  if (L.rows == 0) {  // empty batch: nothing to normalize, running statistics untouched
    mean.zero_();
    invstd.fill_(1.0 / std::sqrt(eps));
    return {mean, invstd};
  }
  if (nbt.defined()) nbt = nbt.to(at::kLong).reshape({1});
  // The kernels update running statistics of the statistics dtype in place; others go through a copy.
  Tensor rm = running_mean, rv = running_var;
  if (update) {
    if (rm.scalar_type() != acc || !rm.is_contiguous()) rm = rm.to(acc).contiguous();
    if (rv.scalar_type() != acc || !rv.is_contiguous()) rv = rv.to(acc).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const int V = vector_width(L, sizeof(scalar_t), {x});
    const Plan p = make_plan(L, V, 8);
    const ShiftedMomentsOp<scalar_t, acc_t> op{x, L.inner};
    const MomentsFinalize<scalar_t, acc_t> fin{
        x, L.inner, L.channels_last, L.rows, eps, momentum,
        nbt.defined() ? nbt.const_data_ptr<int64_t>() : nullptr,
        mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(),
        update ? rm.mutable_data_ptr<acc_t>() : nullptr, update ? rv.mutable_data_ptr<acc_t>() : nullptr};
    dispatch_plan<scalar_t>(p, [&](auto vec, auto cl) {
      launch_sums<acc_t, decltype(vec)::value, decltype(cl)::value>(p, op, fin, input);
    });
  });
  if (update) {
    if (!rm.is_same(running_mean)) running_mean.copy_(rm);
    if (!rv.is_same(running_var)) running_var.copy_(rv);
  }
  return {mean, invstd};
}

}  // namespace
}  // namespace cuda
}  // namespace bnx

TORCH_LIBRARY_IMPL(bnx, CUDA, m) {
  m.impl("batch_norm_stats", &bnx::cuda::batch_norm_stats_cuda);
}

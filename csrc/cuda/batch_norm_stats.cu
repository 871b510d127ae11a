// Training forward on CUDA: per-channel mean and invstd, with the running-statistics update fused into the
// step that finishes each channel, alone (batch_norm_stats) or followed by the normalize pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "forward_ops.cuh"

namespace bnx {
namespace cuda {
namespace {

using at::Tensor;

// The statistics arguments, checked, with running statistics as contiguous tensors of the statistics
// dtype that the kernels update in place (copies when the caller's are not; finish() writes them back).
struct StatsArgs {
  Layout L;
  Tensor input, nbt, running_mean, running_var, rm, rv;
  bool update = false;

  void finish() {
    if (!update) return;
    if (!rm.is_same(running_mean)) running_mean.copy_(rm);
    if (!rv.is_same(running_var)) running_var.copy_(rv);
  }
};

StatsArgs prepare_stats(const Tensor& input_, const c10::optional<Tensor>& running_mean,
                        const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& num_batches_tracked,
                        double eps) {
  check_stats_args(input_, running_mean, running_var, num_batches_tracked, eps);
  StatsArgs a;
  a.nbt = value_or_undefined(num_batches_tracked);
  if (a.nbt.defined()) a.nbt = a.nbt.to(at::kLong).reshape({1});
  a.L = layout_of(input_);
  a.input = dense_as(input_, a.L.format);
  a.running_mean = value_or_undefined(running_mean);
  a.running_var = value_or_undefined(running_var);
  a.update = a.running_mean.defined();
  if (a.update) {
    const auto acc = stat_dtype(a.input);
    a.rm = as_acc(a.running_mean, acc);
    a.rv = as_acc(a.running_var, acc);
  }
  return a;
}

template <typename scalar_t, typename acc_t>
MomentsFinalize<scalar_t, acc_t> moments_finalize(const StatsArgs& a, const ShiftSamples& samples, double momentum,
                                                  double eps, Tensor& mean, Tensor& invstd) {
  return MomentsFinalize<scalar_t, acc_t>{
      a.input.const_data_ptr<scalar_t>(), samples, a.L.rows, eps, momentum,
      a.nbt.defined() ? a.nbt.const_data_ptr<int64_t>() : nullptr, mean.mutable_data_ptr<acc_t>(),
      invstd.mutable_data_ptr<acc_t>(), a.update ? a.rm.mutable_data_ptr<acc_t>() : nullptr,
      a.update ? a.rv.mutable_data_ptr<acc_t>() : nullptr};
}

// An empty batch has nothing to normalize: mean 0, invstd 1/sqrt(eps), running statistics untouched.
void fill_empty_stats(Tensor& mean, Tensor& invstd, double eps) {
  mean.zero_();
  invstd.fill_(1.0 / std::sqrt(eps));
}

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& input_, const c10::optional<Tensor>& running_mean,
                                                 const c10::optional<Tensor>& running_var,
                                                 const c10::optional<Tensor>& num_batches_tracked,
                                                 double momentum, double eps) {
  StatsArgs a = prepare_stats(input_, running_mean, running_var, num_batches_tracked, eps);
  const DeviceGuard guard(a.input.device());
  const auto options = a.input.options().dtype(stat_dtype(a.input));
  Tensor mean = unwritten(at::empty({a.L.C}, options)), invstd = unwritten(at::empty({a.L.C}, options));
  if (a.L.C == 0) return {mean, invstd};
  if (a.L.rows == 0) {
    fill_empty_stats(mean, invstd, eps);
    return {mean, invstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    const Plan p = sums_plan(a.L, choose_access(a.L, sizeof(scalar_t), {x}));
    // The sums and the finalize take the same shift (the finalize adds it back to the mean).
    const ShiftSamples samples = shift_samples(a.L);
    const ShiftedMomentsOp<scalar_t, acc_t> op{x, samples};
    const auto fin = moments_finalize<scalar_t, acc_t>(a, samples, momentum, eps, mean, invstd);
    const Tensor workspace = partial_workspace<acc_t>(p, a.input);
    dispatch_plan<scalar_t>(p, [&](auto vec, auto walk) {
      launch_sums<acc_t, decltype(vec)::value, decltype(walk)::value>(p, op, fin, workspace);
    });
  });
  a.finish();
  return {mean, invstd};
}

// The whole training forward: statistics, running-statistics update and normalize.
std::tuple<Tensor, Tensor, Tensor> batch_norm_train_forward_cuda(
    const Tensor& input_, const c10::optional<Tensor>& weight_, const c10::optional<Tensor>& bias_,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    const c10::optional<Tensor>& num_batches_tracked, double momentum, double eps) {
  check_input(input_);  // first: check_affine reads the input's channel count
  check_affine(input_, weight_, bias_);
  StatsArgs a = prepare_stats(input_, running_mean, running_var, num_batches_tracked, eps);
  const DeviceGuard guard(a.input.device());
  const auto acc = stat_dtype(a.input);
  const auto options = a.input.options().dtype(acc);
  Tensor mean = unwritten(at::empty({a.L.C}, options)), invstd = unwritten(at::empty({a.L.C}, options));
  Tensor out = unwritten(at::empty_like(a.input, a.L.format));
  if (a.L.C == 0) return {out, mean, invstd};
  if (a.L.rows == 0) {
    fill_empty_stats(mean, invstd, eps);
    return {out, mean, invstd};
  }
  const Tensor weight = as_acc(value_or_undefined(weight_), acc);
  const Tensor bias = as_acc(value_or_undefined(bias_), acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_train_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const Access access = choose_access(a.L, sizeof(scalar_t), {x, y});
    const ShiftSamples samples = shift_samples(a.L);
    const ShiftedMomentsOp<scalar_t, acc_t> stats_op{x, samples};
    const auto fin = moments_finalize<scalar_t, acc_t>(a, samples, momentum, eps, mean, invstd);
    const AffineOp<scalar_t, acc_t> affine_op{x, y, ptr_or_null<acc_t>(weight), ptr_or_null<acc_t>(bias),
                                              mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                              /*scale_is_var=*/false, acc_t(0)};
    const Plan ps = sums_plan(a.L, access);
    dispatch_plan<scalar_t>(ps, [&](auto vec, auto walk) {
      launch_sums_then_map<acc_t, decltype(vec)::value, decltype(walk)::value>(ps, a.L, access, sizeof(scalar_t), 1, stats_op,
                                                                               fin, affine_op, a.input);
    });
  });
  a.finish();
  return {out, mean, invstd};
}

}  // namespace
}  // namespace cuda
}  // namespace bnx

TORCH_LIBRARY_IMPL(BNX_CUDA_LIBRARY, BNX_CUDA_KEY, m) {
  m.impl("batch_norm_stats", &bnx::cuda::batch_norm_stats_cuda);
  m.impl("batch_norm_train_forward", &bnx::cuda::batch_norm_train_forward_cuda);
}

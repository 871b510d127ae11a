// The CPU ops of bnx: argument handling, per-channel coefficients and the running-statistics update. The
// loops over the input are the kernels of kernel_api.h (compiled for the baseline and for AVX2).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "../common.h"
#include "kernel_dispatch.h"

namespace bnx {
namespace {

using at::Tensor;

// A per-channel tensor as a contiguous vector of the statistics dtype (weight 1 / bias 0 when absent).
template <typename opmath_t>
std::vector<opmath_t> channel_values(const Tensor& t, int64_t C, opmath_t fill) {
  if (!t.defined()) return std::vector<opmath_t>(C, fill);
  const Tensor v = t.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
  const opmath_t* p = v.data_ptr<opmath_t>();
  return std::vector<opmath_t>(p, p + C);
}

// gain = weight * invstd per channel (weight 1 when absent): dx's factor in both backward formulas.
template <typename opmath_t>
std::vector<opmath_t> channel_gain(const Tensor& weight, const std::vector<opmath_t>& invstd) {
  const int64_t C = static_cast<int64_t>(invstd.size());
  std::vector<opmath_t> gain = channel_values<opmath_t>(weight, C, 1);
  for (int64_t c = 0; c < C; ++c) gain[c] *= invstd[c];
  return gain;
}

template <typename opmath_t>
Tensor channel_tensor(const std::vector<double>& v, const Tensor& like) {
  Tensor out = at::empty({static_cast<int64_t>(v.size())}, like.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
  opmath_t* p = out.data_ptr<opmath_t>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<opmath_t>(v[i]);
  return out;
}

// A C-long tensor of `dtype` with value(c) in each channel (the parameter gradients: written directly, not with
// tensor ops, which cost more than the whole backward on small inputs).
template <typename F>
Tensor channel_result(int64_t C, at::ScalarType dtype, const Tensor& like, const F& value) {
  Tensor out = at::empty({C}, like.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "batch_norm_param_grad_cpu", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<scalar_t>(value(c));
  });
  return out;
}

// running = (1 - f) * running + f * value per channel, in double, with f = momentum or
// 1 / num_batches_tracked. Written as one loop: the running tensors may have any floating dtype and
// strides, so they are read and written through an accessor.
void update_running(Tensor& running, const std::vector<double>& value, double f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "batch_norm_update_running_cpu", [&] {
    auto r = running.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < r.size(0); ++c) {
      r[c] = static_cast<scalar_t>((1 - f) * static_cast<double>(r[c]) + f * value[c]);
    }
  });
}

std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input_, const c10::optional<Tensor>& running_mean,
                                                const c10::optional<Tensor>& running_var,
                                                const c10::optional<Tensor>& num_batches_tracked,
                                                double momentum, double eps) {
  check_stats_args(input_, running_mean, running_var, num_batches_tracked, eps);
  const Tensor nbt = value_or_undefined(num_batches_tracked);
  const Layout L = layout_of(input_);
  const Tensor input = dense_as(input_, L.format);
  const bool update = running_mean.has_value() && running_mean->defined();
  // The running statistics' update factor: momentum, or 1 / num_batches_tracked, read once (before the pass,
  // so a bad count fails fast). The count includes this batch, so it is at least 1.
  double factor = momentum;
  if (update && L.rows > 0 && nbt.defined()) {
    const double batches = nbt.item<double>();
    TORCH_CHECK(batches >= 1, "bnx: num_batches_tracked (the cumulative average's count, this batch "
                "included) must be at least 1, got ", batches);
    factor = 1.0 / batches;
  }
  Tensor mean, invstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_stats_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = L.C, M = L.rows;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    // Sums of d = x - shift and d^2 around a shift near each channel's mean (ShiftSamples in common.h).
    std::vector<opmath_t> shift(C, opmath_t(0));
    if (M > 0) {
      const ShiftSamples samples = shift_samples(L);
      for (int64_t c = 0; c < C; ++c) shift[c] = samples.shift<opmath_t>(x, c);
    }
    std::vector<double> s1, s2;
    with_cpu_kernels([&](auto kernels) { kernels.moments_sums(L, x, shift.data(), s1, s2); });
    // Per channel: d = mean - shift and the biased variance, from the sums. (Multiplied by 1 / M rather than
    // divided: with many channels and few rows, a division per channel cost more than the pass itself.)
    const double inv_m = M > 0 ? 1.0 / static_cast<double>(M) : 0.0;
    std::vector<double> d(C), var(C);
    const auto moments = [&] {
      for (int64_t c = 0; c < C; ++c) {
        d[c] = s1[c] * inv_m;
        var[c] = s2[c] * inv_m - d[c] * d[c];
      }
    };
    moments();
    // When a channel's shift still lies more than kRecenter deviations from its mean (more than two outliers
    // among the samples), the sums are taken again around the mean just found: exact for any input, at the
    // cost of one more read, only then.
    constexpr double kRecenter = 4.0;
    bool recenter = false;
    for (int64_t c = 0; c < C && M > 0; ++c) recenter |= d[c] * d[c] > kRecenter * kRecenter * var[c];
    if (recenter) {
      for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<opmath_t>(shift[c] + d[c]);
      with_cpu_kernels([&](auto kernels) { kernels.moments_sums(L, x, shift.data(), s1, s2); });
      moments();
    }
    const double bessel = M > 1 ? static_cast<double>(M) / static_cast<double>(M - 1) : 1.0;
    std::vector<double> m(C), iv(C), var_unbiased(C);
    for (int64_t c = 0; c < C; ++c) {
      const double v = std::max(var[c], 0.0);
      m[c] = shift[c] + d[c];
      iv[c] = 1.0 / std::sqrt(v + eps);
      var_unbiased[c] = v * bessel;
    }
    mean = channel_tensor<opmath_t>(m, input);
    invstd = channel_tensor<opmath_t>(iv, input);
    if (update && M > 0) {
      Tensor rm = *running_mean, rv = *running_var;
      update_running(rm, m, factor);
      update_running(rv, var_unbiased, factor);
    }
  });
  return {mean, invstd};
}

// y = (x - mean) * scale + bias per channel, with scale = weight * invstd. With
// spread_is_var, `spread` holds the variance and invstd = 1 / sqrt(var + eps) (the eval forward: computed
// here rather than with tensor ops, which cost more than the pass itself on small inputs).
Tensor affine_map(const Tensor& input, const Layout& L, const Tensor& weight, const Tensor& bias,
                  const Tensor& mean, const Tensor& spread, bool spread_is_var = false, double eps = 0.0) {
  Tensor out = at::empty_like(input, L.format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_elemt_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = L.C;
    const auto w = channel_values<opmath_t>(weight, C, 1);
    const auto b = channel_values<opmath_t>(bias, C, 0);
    const auto mu = channel_values<opmath_t>(mean, C, 0);
    const auto sp = channel_values<opmath_t>(spread, C, 1);
    std::vector<opmath_t> scale(C);
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t invstd = spread_is_var ? opmath_t(1) / std::sqrt(sp[c] + static_cast<opmath_t>(eps)) : sp[c];
      scale[c] = w[c] * invstd;
    }
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    // Normalizing with batch statistics follows the pass that computed them over the same input (here, or
    // batch_norm_stats before batch_norm_elemt); the eval forward is the only pass over its input.
    const bool after_pass = !spread_is_var;
    with_cpu_kernels([&](auto kernels) { kernels.affine_map(L, x, mu.data(), scale.data(), b.data(), y, after_pass); });
  });
  return out;
}

Tensor batch_norm_elemt_cpu(const Tensor& input_, const c10::optional<Tensor>& weight,
                            const c10::optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd) {
  check_input(input_);
  check_affine(input_, weight, bias);
  check_stat_pair(mean, invstd, input_);
  const Layout L = layout_of(input_);
  const Tensor input = dense_as(input_, L.format);
  return affine_map(input, L, value_or_undefined(weight), value_or_undefined(bias), mean, invstd);
}

Tensor batch_norm_inference_cpu(const Tensor& input_, const c10::optional<Tensor>& weight,
                                const c10::optional<Tensor>& bias, const Tensor& running_mean,
                                const Tensor& running_var, double eps) {
  check_inference_args(input_, weight, bias, running_mean, running_var, eps);
  const Layout L = layout_of(input_);
  const Tensor input = dense_as(input_, L.format);
  return affine_map(input, L, value_or_undefined(weight), value_or_undefined(bias), running_mean, running_var,
                    /*spread_is_var=*/true, eps);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_forward_cpu(
    const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    const c10::optional<Tensor>& num_batches_tracked, double momentum, double eps) {
  check_input(input);
  check_affine(input, weight, bias);
  auto [mean, invstd] = batch_norm_stats_cpu(input, running_mean, running_var, num_batches_tracked, momentum, eps);
  const Layout L = layout_of(input);
  Tensor out = affine_map(dense_as(input, L.format), L, value_or_undefined(weight), value_or_undefined(bias), mean, invstd);
  return {out, mean, invstd};
}

// Per-channel sum(dy) and sum(dy * (x - mean)); when dx_scale is given, also writes dx = dx_scale[c] * dy
// in the same pass (the frozen-statistics backward).
template <typename scalar_t, typename opmath_t>
void backward_sums(const Layout& L, const Tensor& grad_out, const Tensor& input, const opmath_t* mu,
                   std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu, const opmath_t* dx_scale,
                   scalar_t* dx) {
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
  with_cpu_kernels([&](auto kernels) {
    kernels.backward_sums(L, dy, x, mu, dx_scale, dx, sum_dy, sum_dy_xmu);
  });
}

struct BackwardArgs {
  Layout L;
  Tensor grad_out, input;
};

BackwardArgs prepare_backward(const Tensor& grad_out_, const Tensor& input_, const Tensor& mean,
                              const Tensor& invstd) {
  check_backward_args(grad_out_, input_, mean, invstd);
  BackwardArgs a;
  a.L = layout_of(input_);
  a.input = dense_as(input_, a.L.format);
  a.grad_out = dense_as(grad_out_, a.L.format);
  return a;
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cpu(const Tensor& grad_out_, const Tensor& input_,
                                                          const Tensor& mean, const Tensor& invstd) {
  const BackwardArgs a = prepare_backward(grad_out_, input_, mean, invstd);
  Tensor sum_dy, sum_dy_xmu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_backward_reduce_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<double> s1, s2;
    const auto mu = channel_values<opmath_t>(mean, a.L.C, 0);
    backward_sums<scalar_t, opmath_t>(a.L, a.grad_out, a.input, mu.data(), s1, s2, nullptr, nullptr);
    sum_dy = channel_tensor<opmath_t>(s1, a.input);
    sum_dy_xmu = channel_tensor<opmath_t>(s2, a.input);
  });
  return {sum_dy, sum_dy_xmu};
}

// Batch-statistics grad_input: w*invstd*(dy - sum_dy/M - (x-mean)*invstd^2*sum_dy_xmu/M), from C-long arrays
// of weight (gain = w * invstd), mean, invstd and the two sums.
template <typename scalar_t, typename opmath_t>
Tensor batch_grad_input(const BackwardArgs& a, const opmath_t* gain, const opmath_t* mu, const opmath_t* is,
                        const opmath_t* sdy, const opmath_t* sdx, int64_t count) {
  Tensor dx = at::empty_like(a.input, a.L.format);
  if (count == 0) return dx;
  const int64_t C = a.L.C;
  std::vector<opmath_t> xmu_coef(C), offset(C);
  const opmath_t inv_count = opmath_t(1) / static_cast<opmath_t>(count);
  for (int64_t c = 0; c < C; ++c) {
    const BatchGradCoefficients<opmath_t> k = batch_grad_coefficients(gain[c], is[c], sdy[c], sdx[c], inv_count);
    xmu_coef[c] = k.xmu_coef;
    offset[c] = k.offset;
  }
  const scalar_t* x = a.input.const_data_ptr<scalar_t>();
  const scalar_t* dy = a.grad_out.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  with_cpu_kernels([&](auto kernels) {
    kernels.grad_input_map(a.L, dy, x, mu, gain, xmu_coef.data(), offset.data(), out);
  });
  return dx;
}

Tensor batch_norm_backward_elemt_cpu(const Tensor& grad_out_, const Tensor& input_, const Tensor& mean,
                                     const Tensor& invstd, const c10::optional<Tensor>& weight,
                                     const Tensor& sum_dy, const Tensor& sum_dy_xmu, int64_t count) {
  const BackwardArgs a = prepare_backward(grad_out_, input_, mean, invstd);
  check_channel_tensor(value_or_undefined(weight), "weight", input_);
  check_channel_tensor(sum_dy, "sum_dy", input_);
  check_channel_tensor(sum_dy_xmu, "sum_dy_xmu", input_);
  check_count(count, a.input);
  Tensor dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_backward_elemt_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = a.L.C;
    const auto mu = channel_values<opmath_t>(mean, C, 0);
    const auto is = channel_values<opmath_t>(invstd, C, 1);
    const auto sdy = channel_values<opmath_t>(sum_dy, C, 0);
    const auto sdx = channel_values<opmath_t>(sum_dy_xmu, C, 0);
    const auto gain = channel_gain(value_or_undefined(weight), is);
    dx = batch_grad_input<scalar_t, opmath_t>(a, gain.data(), mu.data(), is.data(), sdy.data(), sdx.data(), count);
  });
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(const Tensor& grad_out_, const Tensor& input_,
                                                           const Tensor& mean, const Tensor& invstd,
                                                           const c10::optional<Tensor>& weight_,
                                                           c10::string_view formula_,
                                                           std::array<bool, 3> output_mask) {
  const BackwardArgs a = prepare_backward(grad_out_, input_, mean, invstd);
  const Tensor weight = value_or_undefined(weight_);
  check_channel_tensor(weight, "weight", input_);
  const Formula formula = parse_formula(formula_);
  const at::ScalarType param_dtype = param_grad_dtype(weight, a.input);
  Tensor grad_input, grad_weight, grad_bias;
  const bool need_sums = output_mask[1] || output_mask[2] || (formula == Formula::Batch && output_mask[0]);
  // (The batch formula's grad_input comes from batch_grad_input.)
  if (output_mask[0] && formula == Formula::Frozen) grad_input = at::empty_like(a.input, a.L.format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = a.L.C;
    const auto is = channel_values<opmath_t>(invstd, C, 1);
    const auto gain = channel_gain(weight, is);
    // The frozen formula writes dx in the same pass as the sums, or alone when no sums are wanted.
    scalar_t* frozen_dx = (formula == Formula::Frozen && output_mask[0]) ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
    if (need_sums) {
      std::vector<double> s1, s2;
      const auto mu = channel_values<opmath_t>(mean, C, 0);
      // The batch grad_input with the sums, one channel at a time, where a channel fits in L2: dy and x are
      // read from memory once (the same arithmetic as the two passes; the sums may round differently).
      bool by_channel = false;
      if (formula == Formula::Batch && output_mask[0]) {
        with_cpu_kernels([&](auto kernels) { by_channel = kernels.backward_by_channel_fits(a.L, sizeof(scalar_t)); });
      }
      if (by_channel) {
        grad_input = at::empty_like(a.input, a.L.format);
        const scalar_t* x = a.input.const_data_ptr<scalar_t>();
        const scalar_t* dy = a.grad_out.const_data_ptr<scalar_t>();
        scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
        with_cpu_kernels([&](auto kernels) {
          kernels.batch_backward_by_channel(a.L, dy, x, mu.data(), gain.data(), is.data(), a.L.rows, dx, s1, s2);
        });
      } else {
        backward_sums<scalar_t, opmath_t>(a.L, a.grad_out, a.input, mu.data(), s1, s2, gain.data(), frozen_dx);
      }
      // The sums in opmath, as batch_norm_backward_reduce returns them (the same arithmetic as that op
      // followed by batch_norm_backward_elemt).
      std::vector<opmath_t> sdy(C), sdx(C);
      for (int64_t c = 0; c < C; ++c) {
        sdy[c] = static_cast<opmath_t>(s1[c]);
        sdx[c] = static_cast<opmath_t>(s2[c]);
      }
      if (output_mask[1]) grad_weight = channel_result(C, param_dtype, a.input, [&](int64_t c) { return sdx[c] * is[c]; });
      if (output_mask[2]) grad_bias = channel_result(C, param_dtype, a.input, [&](int64_t c) { return sdy[c]; });
      if (formula == Formula::Batch && output_mask[0] && !by_channel) {
        grad_input = batch_grad_input<scalar_t, opmath_t>(a, gain.data(), mu.data(), is.data(), sdy.data(),
                                                          sdx.data(), a.L.rows);
      }
    } else if (frozen_dx != nullptr) {
      const scalar_t* dy = a.grad_out.const_data_ptr<scalar_t>();
      with_cpu_kernels([&](auto kernels) { kernels.scale_map(a.L, dy, gain.data(), frozen_dx); });
    }
  });
  // What was not asked for comes back empty.
  if (!grad_input.defined()) grad_input = at::empty({0}, a.input.options());
  if (!grad_weight.defined()) grad_weight = at::empty({0}, a.input.options().dtype(param_dtype));
  if (!grad_bias.defined()) grad_bias = at::empty({0}, a.input.options().dtype(param_dtype));
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

const char* cpu_kernels_name() { return use_cpu_avx2_kernels() ? "avx2" : "default"; }

}  // namespace bnx

TORCH_LIBRARY_IMPL(bnx, CPU, m) {
  m.impl("batch_norm_stats", &bnx::batch_norm_stats_cpu);
  m.impl("batch_norm_train_forward", &bnx::batch_norm_train_forward_cpu);
  m.impl("batch_norm_elemt", &bnx::batch_norm_elemt_cpu);
  m.impl("batch_norm_inference", &bnx::batch_norm_inference_cpu);
  m.impl("batch_norm_backward_reduce", &bnx::batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &bnx::batch_norm_backward_elemt_cpu);
  m.impl("batch_norm_backward", &bnx::batch_norm_backward_cpu);
}

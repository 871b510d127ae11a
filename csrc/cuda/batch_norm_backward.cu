// Backward on CUDA: per-channel gradient sums, the batch-statistics grad_input pass, and the one-pass
// frozen-statistics backward (grad_input written while the weight/bias sums are taken).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.cuh"

namespace bnx {
namespace cuda {
namespace {

using at::Tensor;

// Sums dy and dy * (x - mean); with kWriteDx also writes dx = weight * invstd * dy (frozen formula).
template <typename scalar_t, typename acc_t, bool kWriteDx>
struct GradSumsOp {
  using scalar_type = scalar_t;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ dy;
  scalar_t* __restrict__ dx;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ weight;
  const acc_t* __restrict__ invstd;

  template <int V>
  __device__ Coef<acc_t, V> coef(const Lanes<V>& lanes) const {
    if (!lanes.active) return {};  // no channel: zero coefficients
    Coef<acc_t, V> k;
    gather(mean, lanes, acc_t(0), k.a);
    if constexpr (kWriteDx) {
      acc_t w[V], is[V];
      gather(weight, lanes, acc_t(1), w);
      gather(invstd, lanes, acc_t(0), is);
#pragma unroll
      for (int i = 0; i < V; ++i) k.b[i] = w[i] * is[i];
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) k.b[i] = acc_t(0);
    }
    return k;
  }

  // The tensors it reads, in the order of accumulate_loaded's `in` (the on-chip launch caches them).
  static constexpr int kInputs = 2;
  __host__ __device__ const scalar_t* input(int j) const { return j == 0 ? x : dy; }

  template <int V, int B, typename K>
  __device__ __forceinline__ void accumulate(const int64_t* off, int n, const K& k, acc_t* s1,
                                             acc_t* s2) const {
    Vec<scalar_t, V> in[kInputs][B];
    load_batch<V, B>(x, off, n, in[0]);
    load_batch<V, B>(dy, off, n, in[1]);
    accumulate_loaded<V, B>(off, in, n, k, s1, s2);
  }

  // accumulate on vectors already loaded (in[0]: x, in[1]: dy, at off).
  template <int V, int B, typename K>
  __device__ __forceinline__ void accumulate_loaded(const int64_t* off, const Vec<scalar_t, V> (&in)[kInputs][B], int n,
                                                    const K& k, acc_t* s1, acc_t* s2) const {
    const Vec<scalar_t, V>* xv = in[0];
    const Vec<scalar_t, V>* gv = in[1];
#pragma unroll
    for (int u = 0; u < B; ++u) {
      if (u >= n) break;
      acc_t out[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const acc_t g = to_acc<acc_t>(gv[u], i);
        s1[i] += g;
        s2[i] += g * (to_acc<acc_t>(xv[u], i) - k.a[i]);
        if (kWriteDx) out[i] = g * k.b[i];
      }
      if (kWriteDx) store_vec<V>(dx, off[u], from_acc<scalar_t>(out));
    }
  }
};

// Writes whichever of sum_dy, sum_dy_xmu, grad_weight (= sum_dy_xmu * invstd), grad_bias (= sum_dy) is wanted.
template <typename acc_t>
struct GradFinalize {
  acc_t* __restrict__ sum_dy;
  acc_t* __restrict__ sum_dy_xmu;
  acc_t* __restrict__ grad_weight;
  acc_t* __restrict__ grad_bias;
  const acc_t* __restrict__ invstd;

  // What finishing channel c reads besides its sums (invstd, for grad_weight): see MomentsFinalize::Loaded.
  struct Loaded {
    acc_t invstd = 0;
  };
  __device__ Loaded load(int64_t c) const {
    Loaded l;
    if (grad_weight != nullptr) l.invstd = invstd[c];
    return l;
  }

  __device__ void finish(int64_t c, acc_t s1, acc_t s2, const Loaded& l) const {
    if (sum_dy != nullptr) sum_dy[c] = s1;
    if (sum_dy_xmu != nullptr) sum_dy_xmu[c] = s2;
    if (grad_weight != nullptr) grad_weight[c] = s2 * l.invstd;
    if (grad_bias != nullptr) grad_bias[c] = s1;
  }

  __device__ void operator()(int64_t c, acc_t s1, acc_t s2) const { finish(c, s1, s2, load(c)); }
};

// dx = weight * invstd * (dy - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M)
template <typename scalar_t, typename acc_t>
struct BatchGradInputOp {
  using scalar_type = scalar_t;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ dy;
  scalar_t* __restrict__ dx;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ invstd;
  const acc_t* __restrict__ weight;
  const acc_t* __restrict__ sum_dy;
  const acc_t* __restrict__ sum_dy_xmu;
  acc_t inv_count;

  template <int V>
  __device__ Coef<acc_t, V> coef(const Lanes<V>& lanes) const {
    if (!lanes.active) return {};  // no channel: zero coefficients
    Coef<acc_t, V> k;
    acc_t is[V], w[V], sxmu[V], sdy[V];
    gather(invstd, lanes, acc_t(0), is);
    gather(weight, lanes, acc_t(1), w);
    gather(sum_dy_xmu, lanes, acc_t(0), sxmu);
    gather(sum_dy, lanes, acc_t(0), sdy);
    gather(mean, lanes, acc_t(0), k.d);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const acc_t gain = w[i] * is[i];
      k.a[i] = gain;
      k.b[i] = -gain * is[i] * is[i] * sxmu[i] * inv_count;
      k.c[i] = -gain * sdy[i] * inv_count;
    }
    return k;
  }

  static constexpr int kInputs = 2;
  __host__ __device__ const scalar_t* input(int j) const { return j == 0 ? x : dy; }

  template <int V, int B>
  __device__ __forceinline__ void apply(const int64_t* off, int n, const Coef<acc_t, V>& k) const {
    Vec<scalar_t, V> in[kInputs][B];
    load_batch<V, B>(x, off, n, in[0]);
    load_batch<V, B>(dy, off, n, in[1]);
    apply_loaded<V, B>(off, in, n, k);
  }

  // apply on vectors already loaded (in[0]: x, in[1]: dy, at off).
  template <int V, int B>
  __device__ __forceinline__ void apply_loaded(const int64_t* off, const Vec<scalar_t, V> (&in)[kInputs][B], int n,
                                               const Coef<acc_t, V>& k) const {
    const Vec<scalar_t, V>* xv = in[0];
    const Vec<scalar_t, V>* gv = in[1];
#pragma unroll
    for (int u = 0; u < B; ++u) {
      if (u >= n) break;
      acc_t out[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        out[i] = to_acc<acc_t>(gv[u], i) * k.a[i] + (to_acc<acc_t>(xv[u], i) - k.d[i]) * k.b[i] + k.c[i];
      }
      store_vec<V>(dx, off[u], from_acc<scalar_t>(out));
    }
  }
};

// The one-barrier grouped launch (see grouped_sums_map_kernel): the gradient sums kept in a CTA's own
// arrays (sum_dy -> a, sum_dy_xmu -> b, indexed by channel) instead of the outputs, and grad_input reading them.
template <typename acc_t>
__device__ __forceinline__ GradFinalize<acc_t> local_finalize(GradFinalize<acc_t> f, acc_t* a, acc_t* b) {
  f.sum_dy = a;
  f.sum_dy_xmu = b;
  f.grad_weight = nullptr;
  f.grad_bias = nullptr;
  return f;
}

// What fin wrote for channel c in this launch (sum_dy -> a, sum_dy_xmu -> b), read past L1.
template <typename acc_t>
__device__ __forceinline__ void finalized(const GradFinalize<acc_t>& f, int64_t c, acc_t& a, acc_t& b) {
  a = load_coherent(f.sum_dy + c);
  b = load_coherent(f.sum_dy_xmu + c);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ BatchGradInputOp<scalar_t, acc_t> local_map(BatchGradInputOp<scalar_t, acc_t> op, const acc_t* a,
                                                                     const acc_t* b) {
  op.sum_dy = a;
  op.sum_dy_xmu = b;
  return op;
}

// dx = weight * invstd * dy
template <typename scalar_t, typename acc_t>
struct FrozenGradInputOp {
  using scalar_type = scalar_t;
  const scalar_t* __restrict__ dy;
  scalar_t* __restrict__ dx;
  const acc_t* __restrict__ invstd;
  const acc_t* __restrict__ weight;

  template <int V>
  __device__ Coef<acc_t, V> coef(const Lanes<V>& lanes) const {
    if (!lanes.active) return {};  // no channel: zero coefficients
    Coef<acc_t, V> k;
    acc_t w[V], is[V];
    gather(weight, lanes, acc_t(1), w);
    gather(invstd, lanes, acc_t(0), is);
#pragma unroll
    for (int i = 0; i < V; ++i) k.a[i] = w[i] * is[i];
    return k;
  }

  template <int V, int B>
  __device__ __forceinline__ void apply(const int64_t* off, int n, const Coef<acc_t, V>& k) const {
    Vec<scalar_t, V> gv[B];
    load_batch<V, B>(dy, off, n, gv);
#pragma unroll
    for (int u = 0; u < B; ++u) {
      if (u >= n) break;
      acc_t out[V];
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = to_acc<acc_t>(gv[u], i) * k.a[i];
      store_vec<V>(dx, off[u], from_acc<scalar_t>(out));
    }
  }
};

struct BackwardArgs {
  Layout L;
  Tensor grad_out, input, mean, invstd;
  at::ScalarType acc;
};

BackwardArgs prepare(const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& invstd) {
  check_backward_args(grad_out, input, mean, invstd);
  BackwardArgs a;
  a.L = layout_of(input);
  a.input = dense_as(input, a.L.format);
  a.grad_out = dense_as(grad_out, a.L.format);
  a.acc = stat_dtype(input);
  a.mean = as_acc(mean, a.acc);
  a.invstd = as_acc(invstd, a.acc);
  return a;
}

// Per-channel sums into the acc_t tensors given (undefined ones are skipped); with dx defined, the frozen
// grad_input is written in the same pass.
void gradient_sums(const BackwardArgs& a, const Tensor& weight, const Tensor& dx, const Tensor& sum_dy,
                   const Tensor& sum_dy_xmu, const Tensor& grad_weight, const Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    const scalar_t* dy = a.grad_out.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    const Access access = dx.defined() ? choose_access(a.L, sizeof(scalar_t), {x, dy, dxp})
                                       : choose_access(a.L, sizeof(scalar_t), {x, dy});
    const Plan p = sums_plan(a.L, access);
    const Tensor workspace = partial_workspace<acc_t>(p, a.input);
    auto out = [](const Tensor& t) { return t.defined() ? t.mutable_data_ptr<acc_t>() : nullptr; };
    const GradFinalize<acc_t> fin{out(sum_dy), out(sum_dy_xmu), out(grad_weight), out(grad_bias),
                                  a.invstd.const_data_ptr<acc_t>()};
    const acc_t* mean = a.mean.const_data_ptr<acc_t>();
    const acc_t* invstd = a.invstd.const_data_ptr<acc_t>();
    const acc_t* w = ptr_or_null<acc_t>(weight);
    dispatch_plan<scalar_t>(p, [&](auto vec, auto walk) {
      constexpr int kV = decltype(vec)::value;
      constexpr int kW = decltype(walk)::value;
      if (dxp != nullptr) {
        launch_sums<acc_t, kV, kW>(p, GradSumsOp<scalar_t, acc_t, true>{x, dy, dxp, mean, w, invstd}, fin, workspace);
      } else {
        launch_sums<acc_t, kV, kW>(p, GradSumsOp<scalar_t, acc_t, false>{x, dy, nullptr, mean, w, invstd}, fin, workspace);
      }
    });
  });
}

void batch_grad_input(const BackwardArgs& a, const Tensor& weight, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                      int64_t count, const Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    const scalar_t* dy = a.grad_out.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const Plan p = map_plan(a.L, choose_access(a.L, sizeof(scalar_t), {x, dy, dxp}), /*reverse=*/true);
    const BatchGradInputOp<scalar_t, acc_t> op{x, dy, dxp, a.mean.const_data_ptr<acc_t>(), a.invstd.const_data_ptr<acc_t>(),
                                               ptr_or_null<acc_t>(weight), sum_dy.const_data_ptr<acc_t>(),
                                               sum_dy_xmu.const_data_ptr<acc_t>(), acc_t(1) / static_cast<acc_t>(count)};
    dispatch_plan<scalar_t>(p, [&](auto vec, auto walk) {
      launch_map<acc_t, decltype(vec)::value, decltype(walk)::value>(p, op);
    });
  });
}

// The batch-statistics backward: gradient sums, then grad_input from them.
void batch_backward(const BackwardArgs& a, const Tensor& weight, const Tensor& dx, const Tensor& grad_weight,
                    const Tensor& grad_bias) {
  const auto acc_options = a.input.options().dtype(a.acc);
  Tensor sum_dy = unwritten(at::empty({a.L.C}, acc_options));
  Tensor sum_dy_xmu = unwritten(at::empty({a.L.C}, acc_options));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    const scalar_t* dy = a.grad_out.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    const Access access = dxp != nullptr ? choose_access(a.L, sizeof(scalar_t), {x, dy, dxp})
                                         : choose_access(a.L, sizeof(scalar_t), {x, dy});
    auto out = [](const Tensor& t) { return t.defined() ? t.mutable_data_ptr<acc_t>() : nullptr; };
    const GradFinalize<acc_t> fin{out(sum_dy), out(sum_dy_xmu), out(grad_weight), out(grad_bias),
                                  a.invstd.const_data_ptr<acc_t>()};
    const acc_t* mean = a.mean.const_data_ptr<acc_t>();
    const acc_t* invstd = a.invstd.const_data_ptr<acc_t>();
    const acc_t* w = ptr_or_null<acc_t>(weight);
    const GradSumsOp<scalar_t, acc_t, false> sums_op{x, dy, nullptr, mean, w, invstd};
    const BatchGradInputOp<scalar_t, acc_t> dx_op{x, dy, dxp, mean, invstd, w, sum_dy.const_data_ptr<acc_t>(),
                                                  sum_dy_xmu.const_data_ptr<acc_t>(),
                                                  acc_t(1) / static_cast<acc_t>(a.L.rows)};
    const Plan ps = sums_plan(a.L, access);
    dispatch_plan<scalar_t>(ps, [&](auto vec, auto walk) {
      constexpr int kV = decltype(vec)::value;
      constexpr int kW = decltype(walk)::value;
      if (dxp != nullptr) {
        launch_sums_then_map<acc_t, kV, kW>(ps, a.L, access, sizeof(scalar_t), 2, sums_op, fin, dx_op, a.input);
      } else {
        launch_sums<acc_t, kV, kW>(ps, sums_op, fin, partial_workspace<acc_t>(ps, a.input));
      }
    });
  });
}

void frozen_grad_input(const BackwardArgs& a, const Tensor& weight, const Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "batch_norm_frozen_grad_input_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy = a.grad_out.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const Plan p = map_plan(a.L, choose_access(a.L, sizeof(scalar_t), {dy, dxp}));
    const FrozenGradInputOp<scalar_t, acc_t> op{dy, dxp, a.invstd.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(weight)};
    dispatch_plan<scalar_t>(p, [&](auto vec, auto walk) {
      launch_map<acc_t, decltype(vec)::value, decltype(walk)::value>(p, op);
    });
  });
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cuda(const Tensor& grad_out, const Tensor& input,
                                                           const Tensor& mean, const Tensor& invstd) {
  const BackwardArgs a = prepare(grad_out, input, mean, invstd);
  const DeviceGuard guard(a.input.device());
  Tensor sum_dy = at::zeros({a.L.C}, a.input.options().dtype(a.acc));
  Tensor sum_dy_xmu = at::zeros({a.L.C}, a.input.options().dtype(a.acc));
  if (a.L.rows > 0 && a.L.C > 0) gradient_sums(a, Tensor(), Tensor(), sum_dy, sum_dy_xmu, Tensor(), Tensor());
  return {sum_dy, sum_dy_xmu};
}

Tensor batch_norm_backward_elemt_cuda(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                      const Tensor& invstd, const c10::optional<Tensor>& weight_,
                                      const Tensor& sum_dy, const Tensor& sum_dy_xmu, int64_t count) {
  const BackwardArgs a = prepare(grad_out, input, mean, invstd);
  const DeviceGuard guard(a.input.device());
  check_channel_tensor(value_or_undefined(weight_), "weight", input);
  check_channel_tensor(sum_dy, "sum_dy", input);
  check_channel_tensor(sum_dy_xmu, "sum_dy_xmu", input);
  check_count(count, a.input);
  Tensor dx = unwritten(at::empty_like(a.input, a.L.format));
  if (a.input.numel() == 0 || count == 0) return dx;
  batch_grad_input(a, as_acc(value_or_undefined(weight_), a.acc), as_acc(sum_dy, a.acc), as_acc(sum_dy_xmu, a.acc),
                   count, dx);
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(const Tensor& grad_out, const Tensor& input,
                                                            const Tensor& mean, const Tensor& invstd,
                                                            const c10::optional<Tensor>& weight_,
                                                            c10::string_view formula_, std::array<bool, 3> output_mask) {
  const BackwardArgs a = prepare(grad_out, input, mean, invstd);
  const DeviceGuard guard(a.input.device());
  const Tensor weight_orig = value_or_undefined(weight_);
  check_channel_tensor(weight_orig, "weight", input);
  const Formula formula = parse_formula(formula_);
  const Tensor weight = as_acc(weight_orig, a.acc);
  const auto param_dtype = param_grad_dtype(weight_orig, a.input);
  const auto acc_options = a.input.options().dtype(a.acc);
  Tensor grad_input =
      output_mask[0] ? unwritten(at::empty_like(a.input, a.L.format)) : at::empty({0}, a.input.options());
  Tensor grad_weight = unwritten(at::empty({output_mask[1] ? a.L.C : 0}, acc_options));
  Tensor grad_bias = unwritten(at::empty({output_mask[2] ? a.L.C : 0}, acc_options));
  const bool empty = a.L.rows == 0 || a.L.C == 0;
  if (empty) {
    grad_weight.zero_();
    grad_bias.zero_();
  } else if (formula == Formula::Batch) {
    if (output_mask[0] || output_mask[1] || output_mask[2]) {
      batch_backward(a, weight, output_mask[0] ? grad_input : Tensor(), output_mask[1] ? grad_weight : Tensor(),
                     output_mask[2] ? grad_bias : Tensor());
    }
  } else if (output_mask[1] || output_mask[2]) {
    gradient_sums(a, weight, output_mask[0] ? grad_input : Tensor(), Tensor(), Tensor(),
                  output_mask[1] ? grad_weight : Tensor(), output_mask[2] ? grad_bias : Tensor());
  } else if (output_mask[0]) {
    frozen_grad_input(a, weight, grad_input);
  }
  if (grad_weight.scalar_type() != param_dtype) grad_weight = grad_weight.to(param_dtype);
  if (grad_bias.scalar_type() != param_dtype) grad_bias = grad_bias.to(param_dtype);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cuda
}  // namespace bnx

TORCH_LIBRARY_IMPL(BNX_CUDA_LIBRARY, BNX_CUDA_KEY, m) {
  m.impl("batch_norm_backward_reduce", &bnx::cuda::batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &bnx::cuda::batch_norm_backward_elemt_cuda);
  m.impl("batch_norm_backward", &bnx::cuda::batch_norm_backward_cuda);
}

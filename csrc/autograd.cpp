// bnx::batch_norm, the layer op that bnx.functional calls in eager mode: its Autograd kernel is a C++
// autograd Function around the forward and backward ops (device-independent: they dispatch to the CPU or
// CUDA kernels), with the backward formula as an argument.
//
// Why in C++: the same steps written as a Python torch.autograd.Function (bnx/autograd.py) cost about 20 us more
// per forward + backward on a small input, and on large inputs more again, since every Python step then
// runs with the caches and TLB flushed by the kernel before it (2-vCPU AMD EPYC, float32 channels-last
// (16,64,56,56): about 450 us of Python and autograd glue around 2.2 ms of kernels, against 200-250 us for
// native's layer). The Python Function stays for what a C++ Function cannot do: torch.func transforms
// (vmap, per-sample gradients), forward-mode AD and torch.compile tracing; bnx.functional picks it then.
// Both run the same ops, so they compute the same numbers (tests/test_cpp_autograd.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>

#include "common.h"

namespace bnx {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using TrainForwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const c10::optional<Tensor>&,
                                                          const c10::optional<Tensor>&, const c10::optional<Tensor>&,
                                                          const c10::optional<Tensor>&, const c10::optional<Tensor>&,
                                                          double, double);
using InferenceFn = Tensor(const Tensor&, const c10::optional<Tensor>&, const c10::optional<Tensor>&, const Tensor&,
                           const Tensor&, double);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const c10::optional<Tensor>&, c10::string_view,
                                                      std::array<bool, 3>);

// The ops, looked up once (the registrations are static, so they exist by the first call).
const c10::TypedOperatorHandle<TrainForwardFn>& train_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bnx::batch_norm_train_forward", "").typed<TrainForwardFn>();
  return op;
}
const c10::TypedOperatorHandle<InferenceFn>& inference_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bnx::batch_norm_inference", "").typed<InferenceFn>();
  return op;
}
const c10::TypedOperatorHandle<BackwardFn>& backward_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnx::batch_norm_backward", "").typed<BackwardFn>();
  return op;
}

void check_layer_args(bool training, const c10::optional<Tensor>& running_mean,
                      const c10::optional<Tensor>& running_var, Formula formula) {
  const bool has_running = running_mean.has_value() && running_mean->defined();
  TORCH_CHECK(training || (has_running && running_var.has_value() && running_var->defined()),
              "bnx: batch_norm with training=False normalizes with running_mean and running_var, but they are None");
  TORCH_CHECK(training || formula == Formula::Frozen,
              "bnx: batch_norm with training=False uses the running statistics, which are constants: the backward "
              "formula must be \"frozen\", got \"batch\"");
}

// The forward without autograd: what both kernels below compute. -> (output, mean, invstd); mean/invstd
// are undefined in eval (the backward derives them from the running statistics).
std::tuple<Tensor, Tensor, Tensor> layer_forward(const Tensor& input, const c10::optional<Tensor>& weight,
                                                 const c10::optional<Tensor>& bias,
                                                 const c10::optional<Tensor>& running_mean,
                                                 const c10::optional<Tensor>& running_var,
                                                 const c10::optional<Tensor>& num_batches_tracked, bool training,
                                                 double momentum, double eps) {
  if (training) {
    return train_forward_op().call(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
  }
  return {inference_op().call(input, weight, bias, *running_mean, *running_var, eps), Tensor(), Tensor()};
}

// The input/weight/bias gradients in differentiable ATen ops, for create_graph=True (double backward): the
// "batch" formula recomputes the statistics from the input so that second derivatives see their dependence
// on it; "frozen" takes mean and invstd as constants. (bnx/autograd.py: differentiable_backward, the same
// formulas for the Python Function.)
std::array<Tensor, 3> differentiable_backward(const Tensor& grad_out, const Tensor& input, const Tensor& weight,
                                              Tensor mean, Tensor invstd, double eps, Formula formula,
                                              std::array<bool, 3> needs) {
  const auto acc = stat_dtype(input);
  std::vector<int64_t> dims{0};
  std::vector<int64_t> shape{1, -1};
  for (int64_t d = 2; d < input.dim(); ++d) {
    dims.push_back(d);
    shape.push_back(1);
  }
  const Tensor x = input.to(acc), dy = grad_out.to(acc);
  if (formula == Formula::Batch) {
    mean = x.mean(dims);
    invstd = at::rsqrt(x.var(dims, /*unbiased=*/false) + eps);
  } else {
    mean = mean.detach().to(acc);
    invstd = invstd.detach().to(acc);
  }
  const Tensor xhat = (x - mean.view(shape)) * invstd.view(shape);
  const Tensor gain = weight.defined() ? weight.to(acc).view(shape) * invstd.view(shape) : invstd.view(shape);
  std::array<Tensor, 3> grads;
  if (needs[0]) {
    const Tensor g = formula == Formula::Batch
                         ? gain * (dy - dy.mean(dims, /*keepdim=*/true) - xhat * (dy * xhat).mean(dims, /*keepdim=*/true))
                         : gain * dy;
    grads[0] = g.to(input.scalar_type());
  }
  if (needs[1]) grads[1] = (dy * xhat).sum(dims).to(weight.scalar_type());
  if (needs[2]) grads[2] = dy.sum(dims);
  return grads;
}

}  // namespace

// (Outside the anonymous namespace: its name is the autograd node's, "CppNode<bnx::BatchNormFunction>".)
class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const c10::optional<Tensor>& weight,
                        const c10::optional<Tensor>& bias, const c10::optional<Tensor>& running_mean,
                        const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& num_batches_tracked,
                        bool training, double momentum, double eps, c10::string_view backward) {
    const Formula formula = parse_formula(backward);
    check_layer_args(training, running_mean, running_var, formula);
    // The ops below autograd: this Function is their derivative, and the ops' own Autograd kernels refuse
    // forward-mode tangents, which this Function must see to refuse them itself (its jvp).
    auto [output, mean, invstd] = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return layer_forward(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
                           eps);
    }();
    const Tensor w = value_or_undefined(weight), b = value_or_undefined(bias);
    // Eval saves the running statistics themselves (an in-place update before the backward is an error, as
    // for any saved tensor); training saves the batch statistics.
    ctx->save_for_backward({input, w, training ? mean : *running_mean, training ? invstd : *running_var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["formula"] = formula == Formula::Batch;
    ctx->saved_data["bias_dtype"] = b.defined() ? static_cast<int64_t>(b.scalar_type()) : int64_t(-1);
    // An undefined output gradient gives no gradients (as torch's layer), not zeros.
    ctx->set_materialize_grads(false);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    constexpr size_t kArgs = 10;
    const Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return variable_list(kArgs);
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1];
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const Formula formula = ctx->saved_data["formula"].toBool() ? Formula::Batch : Formula::Frozen;
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool has_bias = bias_dtype >= 0;
    // needs_input_grad counts the defined tensor arguments only: weight is the second when defined, bias
    // the one after the defined ones before it.
    const int64_t bias_edge = weight.defined() ? 2 : 1;
    const std::array<bool, 3> needs{ctx->needs_input_grad(0), weight.defined() && ctx->needs_input_grad(1),
                                    has_bias && ctx->needs_input_grad(bias_edge)};
    Tensor mean = saved[2], invstd = saved[3];
    if (!training) {  // constants: the running statistics
      const auto acc = stat_dtype(input);
      mean = mean.to(acc);
      invstd = at::rsqrt(invstd.to(acc) + eps);
    }
    std::array<Tensor, 3> grads;
    if (at::GradMode::is_enabled()) {  // create_graph=True: stay differentiable
      grads = differentiable_backward(grad_out, input, weight, mean, invstd, eps, formula, needs);
    } else {
      // Below autograd, as in forward: this is the op's derivative, not a use its Autograd kernel must see.
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [gi, gw, gb] = backward_op().call(grad_out, input, mean, invstd, weight,
                                             formula == Formula::Batch ? "batch" : "frozen", needs);
      grads = {gi, gw, gb};
      for (int i = 0; i < 3; ++i) {
        if (!needs[i]) grads[i] = Tensor();  // the op returns empty tensors for what it was not asked
      }
    }
    if (grads[2].defined() && grads[2].scalar_type() != static_cast<at::ScalarType>(bias_dtype)) {
      grads[2] = grads[2].to(static_cast<at::ScalarType>(bias_dtype));
    }
    variable_list out(kArgs);
    out[0] = grads[0];
    out[1] = grads[1];
    out[2] = grads[2];
    return out;
  }
};

namespace {

// Below autograd (inference mode, no graph to build, or a caller that already handles autograd): the forward
// alone.
Tensor batch_norm_no_autograd(const Tensor& input, const c10::optional<Tensor>& weight,
                              const c10::optional<Tensor>& bias, const c10::optional<Tensor>& running_mean,
                              const c10::optional<Tensor>& running_var,
                              const c10::optional<Tensor>& num_batches_tracked, bool training, double momentum,
                              double eps, c10::string_view backward) {
  check_layer_args(training, running_mean, running_var, parse_formula(backward));
  return std::get<0>(
      layer_forward(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps));
}

bool requires_grad(const c10::optional<Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); }
bool has_tangent(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() && t->_fw_grad(/*level=*/0).defined();
}

Tensor batch_norm_autograd(const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                           const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                           const c10::optional<Tensor>& num_batches_tracked, bool training, double momentum,
                           double eps, c10::string_view backward) {
  // No graph to build (no_grad, or nothing requires grad, as in an eval loop): the forward alone, without
  // the autograd Function's node and saved tensors. Forward-mode tangents (which grad mode does not turn off)
  // go to the Function, which refuses them rather than dropping them.
  const bool graph = at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) || requires_grad(bias));
  const bool tangents = has_tangent(input) || has_tangent(weight) || has_tangent(bias);
  if (!graph && !tangents) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_no_autograd(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                                  momentum, eps, backward);
  }
  return BatchNormFunction::apply(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                                  momentum, eps, backward);
}

}  // namespace
}  // namespace bnx

TORCH_LIBRARY_IMPL(bnx, Autograd, m) {
  m.impl("batch_norm", &bnx::batch_norm_autograd);
  // The building-block ops have no derivative of their own (bnx.functional and the Functions around them
  // supply it). Without an Autograd kernel, torch's fallback only warns at backward and leaves the inputs'
  // gradients unset (a gradient lost in silence, e.g. through a program that recorded these ops); this
  // kernel makes that backward raise, naming the op.
  for (const char* op : {"batch_norm_stats", "batch_norm_train_forward", "batch_norm_elemt", "batch_norm_inference",
                         "batch_norm_backward_reduce", "batch_norm_backward_elemt", "batch_norm_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(bnx, CompositeExplicitAutograd, m) {
  m.impl("batch_norm", &bnx::batch_norm_no_autograd);
}

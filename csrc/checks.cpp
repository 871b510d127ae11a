// Argument checks of the bnx ops (declared in common.h), compiled by the host compiler only.
#include "common.h"

#include <cstdio>
#include <string>

namespace bnx {
namespace {

// Numbers and shapes are formatted here into strings rather than streamed into the message: on the GPU
// machine (torch 2.11) messages that streamed integers or sizes segfaulted when thrown from the CUDA ops,
// while messages made of strings and devices did not. (Not yet re-checked on a GPU with this change.)
std::string num(int64_t v) { return std::to_string(v); }

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

std::string shape(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

std::string dtype_name(at::ScalarType t) { return c10::toString(t); }

std::string device_name(const at::Device& d) { return d.str(); }

// The dtypes the kernels are dispatched for (AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16, ...)).
bool is_supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_input(const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.defined(), "bnx: ", name, " is undefined");
  TORCH_CHECK(input.dim() >= 2 && input.dim() <= 5, "bnx: expected ", name,
              " of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), got ", num(input.dim()),
              "-D ", name, " of shape ", shape(input.sizes()));
  TORCH_CHECK(is_supported_dtype(input.scalar_type()), "bnx: expected ", name,
              " of dtype float64, float32, float16 or bfloat16, got ", dtype_name(input.scalar_type()));
}

void check_channel_tensor(const at::Tensor& t, const char* name, const at::Tensor& input) {
  if (!t.defined()) return;
  TORCH_CHECK(t.device() == input.device(), "bnx: expected ", name, " on the input's device ",
              device_name(input.device()), ", got it on ", device_name(t.device()));
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), "bnx: expected ", name,
              " of dtype float64, float32, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), "bnx: ", name,
              " should contain ", num(input.size(1)),
              " elements (one per channel of input of shape ", shape(input.sizes()), "), got shape ",
              shape(t.sizes()));
}

void check_same_shape(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "bnx: ", name_a, " of shape ", shape(a.sizes()),
              " must have the shape of ", name_b, " ", shape(b.sizes()));
  TORCH_CHECK(a.device() == b.device(), "bnx: ", name_a, " is on ", device_name(a.device()), " but ", name_b,
              " is on ", device_name(b.device()));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "bnx: ", name_a, " has dtype ", dtype_name(a.scalar_type()),
              " but ", name_b, " has dtype ", dtype_name(b.scalar_type()));
}

Formula parse_formula(c10::string_view formula) {
  if (formula == "batch") return Formula::Batch;
  if (formula == "frozen") return Formula::Frozen;
  TORCH_CHECK(false, "bnx: formula must be \"batch\" or \"frozen\", got \"", std::string(formula), "\"");
}

void check_stat_pair(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& input) {
  TORCH_CHECK(mean.defined() && invstd.defined(), "bnx: mean and invstd must be given");
  check_channel_tensor(mean, "mean", input);
  check_channel_tensor(invstd, "invstd", input);
}

void check_running_pair(const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                        const at::Tensor& input) {
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_mean == has_var,
              "bnx: running_mean and running_var must either both be given or both be None");
  if (has_mean) {
    check_channel_tensor(*running_mean, "running_mean", input);
    check_channel_tensor(*running_var, "running_var", input);
  }
}

void check_affine(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias) {
  check_channel_tensor(value_or_undefined(weight), "weight", input);
  check_channel_tensor(value_or_undefined(bias), "bias", input);
}

void check_stats_args(const at::Tensor& input, const c10::optional<at::Tensor>& running_mean,
                      const c10::optional<at::Tensor>& running_var,
                      const c10::optional<at::Tensor>& num_batches_tracked, double eps) {
  check_input(input);
  check_running_pair(running_mean, running_var, input);
  TORCH_CHECK(eps > 0, "bnx: eps must be positive when computing batch statistics, got ", num(eps));
  const at::Tensor nbt = value_or_undefined(num_batches_tracked);
  if (nbt.defined()) {
    TORCH_CHECK(nbt.numel() == 1 && nbt.device() == input.device(),
                "bnx: num_batches_tracked must be a one-element tensor on the input's device, got shape ",
                shape(nbt.sizes()), " on ", device_name(nbt.device()));
    // A count: the CPU op would take 2.5 as 2.5 and the CUDA op (which reads it as int64 on the device) as 2.
    TORCH_CHECK(at::isIntegralType(nbt.scalar_type(), /*includeBool=*/false),
                "bnx: num_batches_tracked must be an integer tensor (a count of batches), got dtype ",
                dtype_name(nbt.scalar_type()));
  }
  const bool update = running_mean.has_value() && running_mean->defined();
  int64_t values = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) values *= input.size(d);
  TORCH_CHECK(!update || values != 1, "Expected more than 1 value per channel when training, got input size ",
              shape(input.sizes()));
}

void check_inference_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                          const at::Tensor& running_var, double eps) {
  check_input(input);
  check_affine(input, weight, bias);
  TORCH_CHECK(running_mean.defined() && running_var.defined(),
              "bnx: batch_norm_inference needs running_mean and running_var");
  check_running_pair(running_mean, running_var, input);
  TORCH_CHECK(eps >= 0, "bnx: eps must be non-negative, got ", num(eps));
}

void check_backward_args(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                         const at::Tensor& invstd) {
  check_input(input);
  check_same_shape(grad_out, "grad_out", input, "input");
  check_stat_pair(mean, invstd, input);
}

void check_count(int64_t count, const at::Tensor& input) {
  TORCH_CHECK(count > 0 || (count == 0 && input.numel() == 0),
              "bnx: count (the number of values per channel the gradient sums were taken over) must be "
              "positive for an input of shape ", shape(input.sizes()), ", got ", num(count));
}

}  // namespace bnx

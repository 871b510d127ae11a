// Shared argument checks and layout description for the bnx kernels (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

namespace bnx {

// How a (N, C, *) input is walked by the kernels.
//  - planes: contiguous NC* memory, each (n, c) pair owns `inner` consecutive elements.
//  - rows:   channels-last memory (or no spatial dims), each of `rows` rows holds C consecutive channels.
struct Layout {
  int64_t N = 0;      // batch size
  int64_t C = 0;      // channels
  int64_t inner = 1;  // product of the spatial sizes
  int64_t rows = 0;   // N * inner: elements per channel (M)
  bool channels_last = false;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  int64_t count() const { return rows; }
};

// The memory format the ops compute in and return: channels_last(_3d) when the input is dense in that
// format and not plainly contiguous, contiguous otherwise. The fake kernels in bnx/_meta.py follow the same
// rule so their strides match.
inline at::MemoryFormat output_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

inline void check_input(const at::Tensor& input, const char* name = "input") {
  TORCH_CHECK(input.defined(), "bnx: ", name, " is undefined");
  TORCH_CHECK(input.dim() >= 2 && input.dim() <= 5, "bnx: expected ", name,
              " of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), got ", input.dim(),
              "-D ", name, " of shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()) && input.scalar_type() != at::kFloat8_e4m3fn,
              "bnx: expected ", name, " of dtype float64, float32, float16 or bfloat16, got ",
              input.scalar_type());
}

inline Layout layout_of(const at::Tensor& input) {
  Layout L;
  L.N = input.size(0);
  L.C = input.size(1);
  L.inner = 1;
  for (int64_t d = 2; d < input.dim(); ++d) L.inner *= input.size(d);
  L.rows = L.N * L.inner;
  L.format = output_format(input);
  // With no spatial extent, NC memory is already "rows of C channels".
  L.channels_last = L.format != at::MemoryFormat::Contiguous || L.inner == 1;
  return L;
}

// Makes `t` dense in `format` (a no-op when it already is).
inline at::Tensor dense_as(const at::Tensor& t, at::MemoryFormat format) {
  return t.is_contiguous(format) ? t : t.contiguous(format);
}

// Accumulate / statistics dtype: double for double input, float otherwise.
inline at::ScalarType stat_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel tensor (weight, bias, running stats, mean, invstd, sums): 1-D, C elements, floating, on
// the input's device.
inline void check_channel_tensor(const at::Tensor& t, const char* name, const at::Tensor& input) {
  if (!t.defined()) return;
  TORCH_CHECK(t.device() == input.device(), "bnx: expected ", name, " on the input's device ",
              input.device(), ", got it on ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "bnx: expected ", name,
              " to be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), "bnx: ", name,
              " should contain ", input.size(1), " elements (one per channel of input of shape ",
              input.sizes(), "), got shape ", t.sizes());
}

inline void check_same_shape(const at::Tensor& a, const char* name_a, const at::Tensor& b,
                             const char* name_b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "bnx: ", name_a, " of shape ", a.sizes(),
              " must have the shape of ", name_b, " ", b.sizes());
  TORCH_CHECK(a.device() == b.device(), "bnx: ", name_a, " is on ", a.device(), " but ", name_b,
              " is on ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "bnx: ", name_a, " has dtype ", a.scalar_type(),
              " but ", name_b, " has dtype ", b.scalar_type());
}

enum class Formula { Batch, Frozen };

inline Formula parse_formula(c10::string_view formula) {
  if (formula == "batch") return Formula::Batch;
  if (formula == "frozen") return Formula::Frozen;
  TORCH_CHECK(false, "bnx: formula must be \"batch\" or \"frozen\", got \"", std::string(formula), "\"");
}

// Checks shared by every op's entry point; returns the layout the kernels walk.
inline void check_stat_pair(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& input) {
  TORCH_CHECK(mean.defined() && invstd.defined(), "bnx: mean and invstd must be given");
  check_channel_tensor(mean, "mean", input);
  check_channel_tensor(invstd, "invstd", input);
}

inline void check_running_pair(const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var, const at::Tensor& input) {
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_mean == has_var,
              "bnx: running_mean and running_var must either both be given or both be None");
  if (has_mean) {
    check_channel_tensor(*running_mean, "running_mean", input);
    check_channel_tensor(*running_var, "running_var", input);
  }
}

inline at::Tensor value_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

// dtype for grad_weight / grad_bias: weight's dtype, or the statistics dtype when there is no weight.
inline at::ScalarType param_grad_dtype(const at::Tensor& weight, const at::Tensor& input) {
  return weight.defined() ? weight.scalar_type() : stat_dtype(input);
}

}  // namespace bnx

// Layout description and argument checks shared by the bnx kernels (CPU and CUDA).
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

enum class Formula { Batch, Frozen };

// Argument checks, shared by the CPU and CUDA ops (checks.cpp).
void check_input(const at::Tensor& input, const char* name = "input");
// A per-channel tensor (weight, bias, running stats, mean, invstd, sums): 1-D, C elements, floating, on
// the input's device. Undefined tensors pass.
void check_channel_tensor(const at::Tensor& t, const char* name, const at::Tensor& input);
void check_same_shape(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b);
Formula parse_formula(c10::string_view formula);
void check_stat_pair(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& input);
void check_running_pair(const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                        const at::Tensor& input);
void check_affine(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias);
// batch_norm_stats / batch_norm_train_forward: input, running statistics, num_batches_tracked, eps, and
// more than one value per channel when the running statistics are updated.
void check_stats_args(const at::Tensor& input, const c10::optional<at::Tensor>& running_mean,
                      const c10::optional<at::Tensor>& running_var,
                      const c10::optional<at::Tensor>& num_batches_tracked, double eps);
void check_inference_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                          const at::Tensor& running_var, double eps);
// grad_out / input / mean / invstd of the backward ops.
void check_backward_args(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                         const at::Tensor& invstd);
void check_count(int64_t count);

// The instruction set of the CPU kernels in use: "avx2" or "default" (csrc/cpu/kernel_dispatch.h).
const char* cpu_kernels_name();

inline at::Tensor value_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

// dtype for grad_weight / grad_bias: weight's dtype, or the statistics dtype when there is no weight.
inline at::ScalarType param_grad_dtype(const at::Tensor& weight, const at::Tensor& input) {
  return weight.defined() ? weight.scalar_type() : stat_dtype(input);
}

}  // namespace bnx

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

// True when a 4-D or 5-D input's strides grow in channels-last order (channels, then the spatial dimensions
// last to first, then the batch), over the dimensions of more than one element: a channels_last(_3d) tensor,
// or a slice of one that is not dense (x[:, :k] of a channels_last activation, as channel splits make).
inline bool strides_like_channels_last(const at::Tensor& input) {
  const int64_t D = input.dim();
  if ((D != 4 && D != 5) || input.size(1) <= 1) return false;
  int64_t inner = input.stride(1);
  for (int64_t i = 0; i < D - 1; ++i) {
    const int64_t d = i < D - 2 ? D - 1 - i : 0;  // D-1, ..., 2, then 0
    if (input.size(d) <= 1) continue;
    if (input.stride(d) <= inner) return false;
    inner = input.stride(d);
  }
  return true;
}

// The memory format the ops compute in and return: channels_last(_3d) when the input is dense in that
// format and not plainly contiguous, or not dense but with strides like it (torch keeps such a slice of a
// channels_last tensor in channels_last too); contiguous otherwise. The fake kernels in
// bnx/_meta.py follow the same rule so their strides match.
inline at::MemoryFormat output_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  const at::MemoryFormat channels_last =
      input.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  if (input.dim() >= 4 && input.is_contiguous(channels_last)) return channels_last;
  if (strides_like_channels_last(input)) return channels_last;
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

// The statistics sum d = x - shift and d^2 per channel (var = E[d^2] - E[d]^2), which loses precision by a
// factor of about 1 + (shift - mean)^2 / var: the shift has to sit near the mean. It is the median of
// kShiftSamples elements of the channel, spread over the batch and (NC* memory) the image. A single sample,
// such as the channel's first element (a corner pixel of the first image), can sit many deviations away:
// with it, a float32 channel of 2^20 values with one outlier of 1000 deviations there lost 3e-3 of its
// variance (torch: 3e-8). The median ignores up to two outliers among the samples.
constexpr int kShiftSamples = 5;

struct ShiftSamples {
  int64_t offset[kShiftSamples];  // where each sample of channel 0 is; channel c's is c * channel_stride further
  int64_t channel_stride;

  // Channel c's samples as stored (load), and their median in acc_t (median_of): apart, so that a GPU
  // finalize step can issue the loads early and use them later.
  template <typename scalar_t>
  struct Values {
    scalar_t v[kShiftSamples];
  };
  template <typename scalar_t>
  C10_HOST_DEVICE Values<scalar_t> load(const scalar_t* x, int64_t c) const {
    const int64_t base = c * channel_stride;
    Values<scalar_t> s;
    for (int k = 0; k < kShiftSamples; ++k) s.v[k] = x[base + offset[k]];
    return s;
  }
  template <typename acc_t, typename scalar_t>
  C10_HOST_DEVICE static acc_t median_of(const Values<scalar_t>& s) {
    acc_t v[kShiftSamples];
    for (int k = 0; k < kShiftSamples; ++k) v[k] = static_cast<acc_t>(s.v[k]);
    // Median of five: the median of v[4] and two of v[0..3] that leave out their smallest and their largest.
    const acc_t lo = max_of(min_of(v[0], v[1]), min_of(v[2], v[3]));
    const acc_t hi = min_of(max_of(v[0], v[1]), max_of(v[2], v[3]));
    return max_of(min_of(lo, hi), min_of(max_of(lo, hi), v[4]));
  }
  template <typename acc_t, typename scalar_t>
  C10_HOST_DEVICE acc_t shift(const scalar_t* x, int64_t c) const {
    return median_of<acc_t>(load(x, c));
  }

 private:
  template <typename T>
  C10_HOST_DEVICE static T min_of(T u, T v) { return v < u ? v : u; }
  template <typename T>
  C10_HOST_DEVICE static T max_of(T u, T v) { return u < v ? v : u; }
};

// The samples of a layout with M = L.rows > 0 elements per channel: positions floor(M * f / 2^16) among them
// for fractions f that are no simple ratio, so that they fall in different batch entries and at different
// spatial positions whatever N and the image size.
inline ShiftSamples shift_samples(const Layout& L) {
  constexpr int64_t fraction[kShiftSamples] = {7411, 20483, 33331, 46153, 58997};  // of 2^16
  ShiftSamples s;
  const int64_t M = L.rows, S = L.inner;
  for (int k = 0; k < kShiftSamples; ++k) {
    const int64_t p = (M >> 16) * fraction[k] + (((M & 0xFFFF) * fraction[k]) >> 16);  // no overflow of M * f
    s.offset[k] = L.channels_last ? p * L.C : (p / S) * L.C * S + p % S;
  }
  s.channel_stride = L.channels_last ? 1 : S;
  return s;
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
// The count of batch_norm_backward_elemt: positive unless the input is empty.
void check_count(int64_t count, const at::Tensor& input);

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

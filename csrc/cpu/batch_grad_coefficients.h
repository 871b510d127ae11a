// The batch formula's grad_input per channel, shared by the two-pass op (batch_norm_cpu.cpp) and the
// channel-by-channel kernel (kernels_impl.h), so the two cannot drift apart.
#pragma once

namespace bnx {

// dx = gain * dy + (x - mean) * xmu_coef + offset, the batch-statistics input gradient
// gain * (dy - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M) with gain = weight * invstd.
template <typename opmath_t>
struct BatchGradCoefficients {
  opmath_t xmu_coef;
  opmath_t offset;
};

// One channel's coefficients from its gradient sums (in opmath, as batch_norm_backward_reduce returns them);
// inv_count = 1 / M.
template <typename opmath_t>
inline BatchGradCoefficients<opmath_t> batch_grad_coefficients(opmath_t gain, opmath_t invstd, opmath_t sum_dy,
                                                               opmath_t sum_dy_xmu, opmath_t inv_count) {
  return {-gain * invstd * invstd * sum_dy_xmu * inv_count, -gain * sum_dy * inv_count};
}

}  // namespace bnx

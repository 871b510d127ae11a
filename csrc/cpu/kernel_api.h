// The CPU kernels of the bnx ops, declared for one instruction set: BNX_CPU_ISA names the namespace.
// batch_norm_cpu.cpp includes this once per instruction set; kernels_impl.h defines the members.
// (No include guard on purpose.)
#include "kernel_deps.h"

namespace bnx {
namespace BNX_CPU_ISA {

// Loops over the input in its memory order. Per-channel coefficients are contiguous arrays of the
// accumulation type (opmath: float for half types and float, double for double); sums come back in double.
struct Kernels {
  template <typename scalar_t>
  using opmath = at::opmath_type<scalar_t>;

  // sum (x - shift[c]) and sum (x - shift[c])^2 per channel.
  template <typename scalar_t>
  static void moments_sums(const Layout& L, const scalar_t* x, const opmath<scalar_t>* shift,
                           std::vector<double>& sum, std::vector<double>& sum_sq);
  // out = (x - mean[c]) * scale[c] + bias[c] (centred first: folding mean into an offset, x * scale + offset,
  // cancels when |mean| * scale is large against the output, as in a constant channel, where out should be
  // bias); after_pass: x was just read front to back (by the statistics), so the map walks it last chunk
  // first to find the end still in cache.
  template <typename scalar_t>
  static void affine_map(const Layout& L, const scalar_t* x, const opmath<scalar_t>* mean,
                         const opmath<scalar_t>* scale, const opmath<scalar_t>* bias, scalar_t* out, bool after_pass);
  // sum dy and sum dy * (x - mean[c]) per channel; with dx, also dx = dx_scale[c] * dy in the same pass.
  template <typename scalar_t>
  static void backward_sums(const Layout& L, const scalar_t* dy, const scalar_t* x, const opmath<scalar_t>* mean,
                            const opmath<scalar_t>* dx_scale, scalar_t* dx, std::vector<double>& sum_dy,
                            std::vector<double>& sum_dy_xmu);
  // dx = dy * gain[c] + (x - mean[c]) * xmu_coef[c] + offset[c] (the batch-statistics input gradient; it
  // follows the gradient sums, so it walks the inputs last chunk first, as affine_map after_pass).
  template <typename scalar_t>
  static void grad_input_map(const Layout& L, const scalar_t* dy, const scalar_t* x, const opmath<scalar_t>* mean,
                             const opmath<scalar_t>* gain, const opmath<scalar_t>* xmu_coef,
                             const opmath<scalar_t>* offset, scalar_t* dx);
  // The batch-formula backward of NC* input one channel at a time: the channel's gradient sums (as
  // backward_sums), then its dx (as grad_input_map with the coefficients batch_grad_input derives from the sums)
  // from the planes just read, which are still in L2 (backward_by_channel_fits). The two-pass form reads dy and
  // x from memory twice.
  template <typename scalar_t>
  static void batch_backward_by_channel(const Layout& L, const scalar_t* dy, const scalar_t* x,
                                        const opmath<scalar_t>* mean, const opmath<scalar_t>* gain,
                                        const opmath<scalar_t>* invstd, int64_t count, scalar_t* dx,
                                        std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu);
  // Whether batch_backward_by_channel suits L: NC* planes of kByChannelPlaneBytes or more (a channel's planes
  // lie C planes apart; short ones left the prefetchers behind: float16 (64,256,14,14) backward 1.5x slower), a
  // channel's dy and x together within kByChannelBytes (half of a 1 MiB L2), and channels enough to share
  // among the threads.
  static constexpr int64_t kByChannelBytes = 512 << 10;
  static constexpr int64_t kByChannelPlaneBytes = 4 << 10;
  static bool backward_by_channel_fits(const Layout& L, int64_t element_bytes) {
    return !L.channels_last && L.inner * element_bytes >= kByChannelPlaneBytes &&
           2 * L.rows * element_bytes <= kByChannelBytes &&
           L.C >= 2 * static_cast<int64_t>(at::get_num_threads());
  }
  // dx = dy * gain[c] (the frozen-statistics input gradient alone).
  template <typename scalar_t>
  static void scale_map(const Layout& L, const scalar_t* dy, const opmath<scalar_t>* gain, scalar_t* dx);
};

}  // namespace BNX_CPU_ISA
}  // namespace bnx

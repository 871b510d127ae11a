// The elementwise forward pass on CUDA: training (batch mean/invstd) and eval (running statistics).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "forward_ops.cuh"

namespace bnx {
namespace cuda {
namespace {

using at::Tensor;

Tensor affine_forward(const Tensor& input_, const c10::optional<Tensor>& weight_, const c10::optional<Tensor>& bias_,
                      const Tensor& mean_, const Tensor& scale_, bool scale_is_var, double eps) {
  const DeviceGuard guard(input_.device());
  const Layout L = layout_of(input_);
  const Tensor input = dense_as(input_, L.format);
  Tensor out = unwritten(at::empty_like(input, L.format));
  if (input.numel() == 0) return out;
  const auto acc = stat_dtype(input);
  const Tensor weight = as_acc(value_or_undefined(weight_), acc);
  const Tensor bias = as_acc(value_or_undefined(bias_), acc);
  const Tensor mean = as_acc(mean_, acc);
  const Tensor scale = as_acc(scale_, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const Access access = choose_access(L, sizeof(scalar_t), {x, y});
    const Plan p = map_plan(L, access);
    const AffineOp<scalar_t, acc_t> op{x, y, ptr_or_null<acc_t>(weight), ptr_or_null<acc_t>(bias),
                                       mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(),
                                       scale_is_var, static_cast<acc_t>(eps)};
    dispatch_plan<scalar_t>(p, [&](auto vec, auto walk) {
      launch_map<acc_t, decltype(vec)::value, decltype(walk)::value>(p, op);
    });
  });
  return out;
}

Tensor batch_norm_elemt_cuda(const Tensor& input, const c10::optional<Tensor>& weight,
                             const c10::optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd) {
  check_input(input);
  check_affine(input, weight, bias);
  check_stat_pair(mean, invstd, input);
  return affine_forward(input, weight, bias, mean, invstd, /*scale_is_var=*/false, 0.0);
}

Tensor batch_norm_inference_cuda(const Tensor& input, const c10::optional<Tensor>& weight,
                                 const c10::optional<Tensor>& bias, const Tensor& running_mean,
                                 const Tensor& running_var, double eps) {
  check_inference_args(input, weight, bias, running_mean, running_var, eps);
  return affine_forward(input, weight, bias, running_mean, running_var, /*scale_is_var=*/true, eps);
}

}  // namespace
}  // namespace cuda
}  // namespace bnx

TORCH_LIBRARY_IMPL(BNX_CUDA_LIBRARY, BNX_CUDA_KEY, m) {
  m.impl("batch_norm_elemt", &bnx::cuda::batch_norm_elemt_cuda);
  m.impl("batch_norm_inference", &bnx::cuda::batch_norm_inference_cuda);
}

// The bnx operator schemas. Kernels live in csrc/cpu and csrc/cuda (the layer op's autograd kernel in
// csrc/autograd.cpp); fake kernels in bnx/_meta.py.
// docs/DESIGN.md describes each op.
#include <Python.h>
#include <torch/library.h>

#include "common.h"

extern "C" {
// `import bnx._C` loads this library, which registers the ops below. The module itself only carries
// `cpu_kernels`, the instruction set the CPU kernels run with ("avx2" or "default").
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "cpu_kernels", bnx::cpu_kernels_name()) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(bnx, m) {
  // The layer: forward (batch statistics when training, else the running statistics) with its autograd
  // kernel in C++ and the backward formula ("batch" or "frozen") as an argument (csrc/autograd.cpp).
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? num_batches_tracked, bool training, float momentum, float eps, str backward) -> Tensor");
  // Per-channel batch mean and invstd; updates the running statistics in place when given.
  m.def(
      "batch_norm_stats(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? num_batches_tracked, float momentum, float eps) -> (Tensor, Tensor)");
  // The whole training forward (statistics, running-statistics update, normalize) in one op, so a
  // backend can schedule the two passes together: -> (output, mean, invstd).
  m.def(
      "batch_norm_train_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor? num_batches_tracked, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  // y = (x - mean) * invstd * weight + bias.
  m.def(
      "batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) -> Tensor");
  // Eval forward with the running statistics, in one pass.
  m.def(
      "batch_norm_inference(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> Tensor");
  // Per-channel sum(dy) and sum(dy * (x - mean)).
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd) "
      "-> (Tensor, Tensor)");
  // Batch-statistics grad_input from the reduced sums.
  m.def(
      "batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor sum_dy, Tensor sum_dy_xmu, int count) -> Tensor");
  // Fused backward, formula "batch" or "frozen"; unwanted outputs come back empty.
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
      "str formula, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

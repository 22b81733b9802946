#pragma once
// A learning rate as the CUDA functors read it: a double, or, for a tensor lr on the GPU, a
// pointer to it as float32, read on the device (so a scheduler's update reaches a captured CUDA
// graph); and the hyperparameters the Adam and Lion functors read. Shared by the fp32 and low-bit
// ops.

#include <ATen/core/Tensor.h>

#include "common/adam_args.h"
#include "common/checks.h"

namespace dldna_fused::cuda {

struct DeviceLr {
  double value = 0.0;
  const float* ptr = nullptr;  // set for a tensor lr on the device
  at::Tensor storage;          // keeps the float32 copy alive until the launch is queued
};

inline DeviceLr device_lr(const char* op, double lr, const at::Tensor* lr_tensor, const at::Device& device) {
  DeviceLr out;
  if (lr_tensor == nullptr) {
    check_lr(op, lr);
    out.value = lr;
  } else if (check_lr_tensor(op, *lr_tensor, device); lr_tensor->is_cpu()) {
    out.value = lr_tensor->item<double>();
    check_lr(op, out.value);
  } else {
    out.storage = lr_tensor->to(at::kFloat);
    out.ptr = out.storage.const_data_ptr<float>();
  }
  return out;
}

// Adam's (and Lion's) hyperparameters as the functors read them; doubles until the coefficients
// are rounded once on the device (adam_coefficients, lion_coefficients).
struct DeviceHyperparameters {
  double lr;
  const float* lr_ptr;  // a tensor lr, read on the device; nullptr for a float lr
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  bool maximize;
  bool decoupled_weight_decay;

  __device__ __forceinline__ double learning_rate() const { return lr_ptr != nullptr ? *lr_ptr : lr; }
};

inline DeviceHyperparameters device_hyperparameters(const DeviceLr& lr, const AdamHyperparameters& hp) {
  return {lr.value, lr.ptr, hp.beta1, hp.beta2, hp.weight_decay, hp.eps, hp.maximize, hp.decoupled_weight_decay};
}

}  // namespace dldna_fused::cuda

#pragma once
// The argument validation of dldna_fused::fused_adam_, shared by its CPU and CUDA implementations.

#include <ATen/core/Tensor.h>

#include <optional>

#include "common/checks.h"

namespace dldna_fused {

struct AdamHyperparameters {
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;
};

// betas, weight_decay and eps (the low-bit op checks the same).
void check_adam_hyperparameters(const char* op, const AdamHyperparameters& hp);

// Validates every argument of one fused_adam_ call except lr (a float or a tensor, checked by the
// caller) and returns the dtypes it runs at.
CallDtypes check_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                           at::TensorList state_steps, const AdamHyperparameters& hp,
                           const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf);

// A tensor lr: one float32 or float64 element, on the params' device or the CPU.
void check_lr_tensor(const char* op, const at::Tensor& lr, const at::Device& device);

}  // namespace dldna_fused

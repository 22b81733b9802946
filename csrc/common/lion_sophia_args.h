#pragma once
// The argument validation of dldna_fused::fused_lion_, fused_sophia_ and fused_sophia_hessian_,
// shared by their CPU and CUDA implementations.

#include <ATen/core/Tensor.h>

#include <optional>

#include "common/checks.h"

namespace dldna_fused {

// lr, betas and weight_decay of a Lion op (fused_lion_ and fused_lion_lowbit_).
void check_lion_hyperparameters(const char* op, double lr, double beta1, double beta2, double weight_decay);

// Validates every argument of one fused_lion_ call and returns the dtypes it runs at.
CallDtypes check_lion_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList state_steps, double lr, double beta1, double beta2,
                           double weight_decay, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf);

// Validates every argument of one fused_sophia_ call; `unclipped`, when given, must be an int64
// tensor of one element on the params' device.
CallDtypes check_sophia_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList hessians, at::TensorList state_steps, double lr,
                             double beta1, double rho, double bs, double weight_decay,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf,
                             const std::optional<at::Tensor>& unclipped);

// Validates one fused_sophia_hessian_ call: estimates play the role of grads (one per hessian,
// same shape, dtype float32/bfloat16/float16), hessians that of a state (the estimates' dtype or
// float32).
CallDtypes check_sophia_hessian_args(at::TensorList hessians, at::TensorList estimates,
                                     double beta2, const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& found_inf);

}  // namespace dldna_fused

#pragma once
// [Note: unscaled grads] (cpu/kernel_table.h) on CUDA, and the folded clip factor. Defined in
// cuda/multi_tensor_apply.cu.

#include <ATen/core/Tensor.h>

#include <optional>

namespace dldna_fused::cuda {

// With a grad_scale, multiplies every grad by 1 / scale unless found_inf is set, so p.grad ends
// as torch's fused optimizers leave it. One foreach launch after the update, no host sync. Call
// it after DenseLayout::copy_back (it writes the caller's tensors).
void store_unscaled_grads(at::TensorList grads, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf);

// What the update kernels divide the gradient by: grad_scale / clip_coef, computed on the device
// (no host sync), or grad_scale alone without a clip factor; empty when neither is given. The
// grads written back by store_unscaled_grads use grad_scale only ([Note: unscaled grads]).
std::optional<at::Tensor> gradient_divisor(const std::optional<at::Tensor>& grad_scale,
                                           const std::optional<at::Tensor>& clip_coef);

}  // namespace dldna_fused::cuda

#pragma once
// The argument validation of dldna_fused::fused_grad_norm and fused_scale_, shared by their CPU
// and CUDA implementations.

#include <ATen/core/Tensor.h>

#include <optional>

#include "common/checks.h"
#include "cpu/kernel_table.h"

namespace dldna_fused {

struct GradNormCall {
  at::ScalarType dtype;  // every tensor's
  cpu::NormKind kind;
};

// Tensors of one dtype (float32, bfloat16, float16) and one device, strided; norm_type 1, 2 or
// inf; grad_scale, when given, a float32 tensor of one element on their device.
GradNormCall check_grad_norm_args(at::TensorList tensors, double norm_type,
                                  const std::optional<at::Tensor>& grad_scale);

// fused_scale_: tensors as above (may be empty); factor a float32 tensor of one element on their
// device. Returns their dtype.
at::ScalarType check_scale_args(at::TensorList tensors, const at::Tensor& factor);

}  // namespace dldna_fused

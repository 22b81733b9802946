#pragma once
// The argument validation of the low-bit ops (fused_adam_lowbit_, fused_lion_lowbit_,
// quantize_blockwise, dequantize_blockwise), shared by their CPU and CUDA implementations.

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "common/adam_args.h"
#include "common/checks.h"

namespace dldna_fused {

// One quantized state of every param: its codes and absmax lists, and their names in messages.
struct QuantStateLists {
  const char* codes_name;
  at::TensorList codes;
  const char* absmax_name;
  at::TensorList absmax;
};

// bits is 8 or 4; block_size a power of two in [kMinQuantBlock, kMaxQuantBlock].
void check_quantization(const char* op, int64_t bits, int64_t block_size);

// Checks params and grads (as check_param_lists), and that each param's codes and absmax are
// contiguous uint8 / float32 tensors on its device with the element counts of
// [Note: blockwise quantized states] in common/quantization.h. Returns the params' dtype.
at::ScalarType check_lowbit_lists(const char* op, at::TensorList params, at::TensorList grads,
                                  const std::vector<QuantStateLists>& states,
                                  at::TensorList state_steps, int64_t bits, int64_t block_size,
                                  const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& found_inf);

// Every argument of one fused_adam_lowbit_ call but lr (a float or a tensor, checked by the
// caller); returns the params' dtype.
at::ScalarType check_adam_lowbit_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sqs,
                                      at::TensorList exp_avg_sq_absmaxes, at::TensorList state_steps,
                                      const AdamHyperparameters& hp, int64_t bits, int64_t block_size,
                                      const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& found_inf);

// Every argument of one fused_lion_lowbit_ call; returns the params' dtype.
at::ScalarType check_lion_lowbit_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_absmaxes, at::TensorList state_steps, double lr,
                                      double beta1, double beta2, double weight_decay, int64_t bits,
                                      int64_t block_size, const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& found_inf);

// quantize_blockwise's checks, and what it works on: the input flattened (contiguous), and
// uninitialized codes and absmax of the right sizes on its device.
struct QuantizeTensors {
  at::Tensor flat;
  at::Tensor codes;
  at::Tensor absmax;
};
QuantizeTensors prepare_quantize(const at::Tensor& input, int64_t bits, int64_t block_size);

// Codes and absmax of one tensor of `numel` elements, as dequantize_blockwise takes them.
void check_quantized(const char* op, const at::Tensor& codes, const at::Tensor& absmax, int64_t numel,
                     int64_t bits, int64_t block_size);

}  // namespace dldna_fused

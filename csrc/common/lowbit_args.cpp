#include "common/lowbit_args.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "common/lion_sophia_args.h"
#include "common/quantization.h"

namespace dldna_fused {
namespace {

void check_quantized_tensor(const char* op, const char* name, size_t i, const at::Tensor& t,
                            at::ScalarType dtype, int64_t expected, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
              " but its param is on ", device);
  TORCH_CHECK(t.numel() == expected, op, ": ", name, "[", i, "] must have ", expected,
              " elements for its param, got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
}

}  // namespace

void check_quantization(const char* op, int64_t bits, int64_t block_size) {
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  TORCH_CHECK(block_size >= kMinQuantBlock && block_size <= kMaxQuantBlock &&
                  (block_size & (block_size - 1)) == 0,
              op, ": block_size must be a power of two from ", kMinQuantBlock, " to ",
              kMaxQuantBlock, ", got ", block_size);
}

at::ScalarType check_lowbit_lists(const char* op, at::TensorList params, at::TensorList grads,
                                  const std::vector<QuantStateLists>& states,
                                  at::TensorList state_steps, int64_t bits, int64_t block_size,
                                  const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& found_inf) {
  check_quantization(op, bits, block_size);
  const CallDtypes dtypes = check_param_lists(op, params, grads, {});
  const size_t n = params.size();
  for (const QuantStateLists& state : states) {
    TORCH_CHECK(state.codes.size() == n, op, ": expected ", state.codes_name,
                " to have one tensor per param (", n, "), got ", state.codes.size());
    TORCH_CHECK(state.absmax.size() == n, op, ": expected ", state.absmax_name,
                " to have one tensor per param (", n, "), got ", state.absmax.size());
  }
  if (n == 0) {
    return dtypes.param;
  }
  const at::Device device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    for (const QuantStateLists& state : states) {
      check_quantized_tensor(op, state.codes_name, i, state.codes[i], at::kByte,
                             code_bytes(numel, static_cast<int>(bits)), device);
      check_quantized_tensor(op, state.absmax_name, i, state.absmax[i], at::kFloat,
                             num_blocks(numel, block_size), device);
    }
  }
  check_state_steps(op, state_steps, n, device);
  check_amp_tensors(op, grad_scale, found_inf, device);
  return dtypes.param;
}

at::ScalarType check_adam_lowbit_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sqs,
                                      at::TensorList exp_avg_sq_absmaxes, at::TensorList state_steps,
                                      const AdamHyperparameters& hp, int64_t bits, int64_t block_size,
                                      const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "dldna_fused::fused_adam_lowbit_";
  check_adam_hyperparameters(op, hp);
  return check_lowbit_lists(op, params, grads,
                            {{"exp_avgs", exp_avgs, "exp_avg_absmaxes", exp_avg_absmaxes},
                             {"exp_avg_sqs", exp_avg_sqs, "exp_avg_sq_absmaxes", exp_avg_sq_absmaxes}},
                            state_steps, bits, block_size, grad_scale, found_inf);
}

at::ScalarType check_lion_lowbit_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_absmaxes, at::TensorList state_steps, double lr,
                                      double beta1, double beta2, double weight_decay, int64_t bits,
                                      int64_t block_size, const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "dldna_fused::fused_lion_lowbit_";
  check_lion_hyperparameters(op, lr, beta1, beta2, weight_decay);
  return check_lowbit_lists(op, params, grads, {{"exp_avgs", exp_avgs, "exp_avg_absmaxes", exp_avg_absmaxes}},
                            state_steps, bits, block_size, grad_scale, found_inf);
}

QuantizeTensors prepare_quantize(const at::Tensor& input, int64_t bits, int64_t block_size) {
  constexpr const char* op = "dldna_fused::quantize_blockwise";
  check_quantization(op, bits, block_size);
  TORCH_CHECK(is_supported_param_dtype(input.scalar_type()), op,
              ": input must be float32, bfloat16 or float16, got ", input.scalar_type());
  at::Tensor flat = input.contiguous();
  const int64_t numel = flat.numel();
  return {flat, at::empty({code_bytes(numel, static_cast<int>(bits))}, input.options().dtype(at::kByte)),
          at::empty({num_blocks(numel, block_size)}, input.options().dtype(at::kFloat))};
}

void check_quantized(const char* op, const at::Tensor& codes, const at::Tensor& absmax, int64_t numel,
                     int64_t bits, int64_t block_size) {
  check_quantization(op, bits, block_size);
  TORCH_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  check_quantized_tensor(op, "codes", 0, codes, at::kByte, code_bytes(numel, static_cast<int>(bits)),
                         codes.device());
  check_quantized_tensor(op, "absmax", 0, absmax, at::kFloat, num_blocks(numel, block_size),
                         codes.device());
}

}  // namespace dldna_fused

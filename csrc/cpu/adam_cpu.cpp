// dldna_fused::fused_adam_ on the CPU: argument checks, per-tensor coefficients, and one parallel
// pass of the chunk kernel (cpu/kernels_impl.h) over all tensors.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/adam_args.h"
#include "common/adam_math.h"
#include "cpu/parallel.h"

namespace dldna_fused {
namespace {

void fused_adam_cpu_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::TensorList state_steps, double lr, const AdamHyperparameters& hp,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& clip_coef,
                         const std::optional<at::TensorList>& kahan_comps, at::OptionalIntArrayRef sr_keys) {
  const CallDtypes dtypes = check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                            state_steps, hp, grad_scale, found_inf);
  check_lr("dldna_fused::fused_adam_", lr);
  const RoundMode mode = check_param_writes("dldna_fused::fused_adam_", params, kahan_comps, sr_keys);
  if (params.empty()) {
    return;
  }
  check_clip_coef("dldna_fused::fused_adam_", clip_coef, params[0].device());
  // A step GradScaler found inf/nan in is skipped whole: params, states and step counters.
  if (cpu::found_inf_set(found_inf)) {
    return;
  }
  const float inv_grad_scale = cpu::gradient_factor(grad_scale, clip_coef);

  const bool store_grads = grad_scale.has_value();  // [Note: unscaled grads]
  // Rounding other than to nearest numbers elements in row-major order ([Note: bf16 param writes]).
  DenseLayout layout({params, grads, exp_avgs, exp_avg_sqs,
                      hp.amsgrad ? max_exp_avg_sqs : at::TensorList{},
                      comps_or_none(mode, kahan_comps)},
                     {true, store_grads, true, true, true, true}, mode != RoundMode::Nearest);

  const size_t n = params.size();
  std::vector<cpu::AdamTensorArgs> args(n);
  // Params of one group almost always share their step count, so the coefficients (two pow()s)
  // are recomputed only when it changes along the list.
  float coefficients_step = -1.f;
  AdamCoefficients c{};
  for (size_t i = 0; i < n; ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.f;
    if (*step != coefficients_step) {
      c = adam_coefficients(lr, hp.beta1, hp.beta2, hp.weight_decay, hp.eps, *step, inv_grad_scale,
                            hp.amsgrad, hp.maximize, hp.decoupled_weight_decay);
      coefficients_step = *step;
    }
    args[i] = {layout.get(0, i).data_ptr(), cpu::grad_pointer(layout.get(1, i), store_grads),
               layout.get(2, i).data_ptr(), layout.get(3, i).data_ptr(),
               hp.amsgrad ? layout.get(4, i).data_ptr() : nullptr, c,
               cpu::param_write(layout, 5, mode, sr_keys, i, *state_steps[i].const_data_ptr<float>())};
  }

  const cpu::AdamLaunch launch{kernel_dtype(dtypes.param), kernel_dtype(dtypes.state), args.data(),
                               cpu::unscale_factor(grad_scale), mode};
  cpu::parallel_over_chunks(cpu::make_chunks(params), cpu::cpu_kernels().adam, launch);
  layout.copy_back();
}

AdamHyperparameters hyperparameters(double beta1, double beta2, double weight_decay, double eps,
                                    bool amsgrad, bool maximize, bool decoupled_weight_decay) {
  return {beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay};
}

void fused_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList state_steps, double lr, double beta1, double beta2,
                    double weight_decay, double eps, bool amsgrad, bool maximize,
                    bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& clip_coef,
                    std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  fused_adam_cpu_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                      hyperparameters(beta1, beta2, weight_decay, eps, amsgrad, maximize,
                                      decoupled_weight_decay),
                      grad_scale, found_inf, clip_coef, kahan_comps, sr_keys);
}

void fused_adam_cpu_tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                              at::TensorList state_steps, const at::Tensor& lr, double beta1,
                              double beta2, double weight_decay, double eps, bool amsgrad,
                              bool maximize, bool decoupled_weight_decay,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf,
                              const std::optional<at::Tensor>& clip_coef,
                              std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  check_lr_tensor("dldna_fused::fused_adam_", lr, at::kCPU);
  fused_adam_cpu_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                      lr.item<double>(),
                      hyperparameters(beta1, beta2, weight_decay, eps, amsgrad, maximize,
                                      decoupled_weight_decay),
                      grad_scale, found_inf, clip_coef, kahan_comps, sr_keys);
}

}  // namespace

TORCH_LIBRARY_IMPL(dldna_fused, CPU, m) {
  m.impl("fused_adam_", &fused_adam_cpu);
  m.impl("fused_adam_.tensor_lr", &fused_adam_cpu_tensor_lr);
}

}  // namespace dldna_fused

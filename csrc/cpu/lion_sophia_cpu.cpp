// dldna_fused::fused_lion_, fused_sophia_ and fused_sophia_hessian_ on the CPU: argument checks,
// coefficients, and one parallel pass of the chunk kernels (cpu/kernels_impl.h) over all tensors.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "common/lion_math.h"
#include "common/lion_sophia_args.h"
#include "common/sophia_math.h"
#include "cpu/parallel.h"

namespace dldna_fused {
namespace {

void increment_steps(at::TensorList state_steps) {
  for (const at::Tensor& step : state_steps) {
    *step.data_ptr<float>() += 1.f;
  }
}

void fused_lion_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList state_steps, double lr, double beta1, double beta2,
                    double weight_decay, bool maximize,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& clip_coef,
                    std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  const CallDtypes dtypes = check_lion_args(params, grads, exp_avgs, state_steps, lr, beta1, beta2,
                                            weight_decay, grad_scale, found_inf);
  const RoundMode mode = check_param_writes("dldna_fused::fused_lion_", params, kahan_comps, sr_keys);
  if (params.empty()) {
    return;
  }
  check_clip_coef("dldna_fused::fused_lion_", clip_coef, params[0].device());
  if (cpu::found_inf_set(found_inf)) {
    return;
  }
  const bool store_grads = grad_scale.has_value();  // [Note: unscaled grads]
  DenseLayout layout({params, grads, exp_avgs, comps_or_none(mode, kahan_comps)},
                     {true, store_grads, true, true}, mode != RoundMode::Nearest);
  increment_steps(state_steps);
  const size_t n = params.size();
  std::vector<cpu::LionTensorArgs> args(n);
  for (size_t i = 0; i < n; ++i) {
    args[i] = {layout.get(0, i).data_ptr(), cpu::grad_pointer(layout.get(1, i), store_grads),
               layout.get(2, i).data_ptr(), cpu::param_write(layout, 3, mode, sr_keys, i, *state_steps[i].const_data_ptr<float>())};
  }
  const cpu::LionLaunch launch{
      kernel_dtype(dtypes.param), kernel_dtype(dtypes.state),
      lion_coefficients(lr, beta1, beta2, weight_decay, cpu::gradient_factor(grad_scale, clip_coef),
                        maximize),
      args.data(), cpu::unscale_factor(grad_scale), mode};
  cpu::parallel_over_chunks(cpu::make_chunks(params), cpu::cpu_kernels().lion, launch);
  layout.copy_back();
}

void fused_sophia_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList hessians, at::TensorList state_steps, double lr, double beta1,
                      double rho, double bs, double weight_decay, bool maximize,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& unclipped,
                      const std::optional<at::Tensor>& clip_coef,
                      std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  const CallDtypes dtypes =
      check_sophia_args(params, grads, exp_avgs, hessians, state_steps, lr, beta1, rho, bs,
                        weight_decay, grad_scale, found_inf, unclipped);
  const RoundMode mode = check_param_writes("dldna_fused::fused_sophia_", params, kahan_comps, sr_keys);
  if (params.empty()) {
    return;
  }
  check_clip_coef("dldna_fused::fused_sophia_", clip_coef, params[0].device());
  if (cpu::found_inf_set(found_inf)) {
    return;
  }
  const bool store_grads = grad_scale.has_value();  // [Note: unscaled grads]
  DenseLayout layout({params, grads, exp_avgs, hessians, comps_or_none(mode, kahan_comps)},
                     {true, store_grads, true, false, true}, mode != RoundMode::Nearest);
  increment_steps(state_steps);
  const size_t n = params.size();
  std::vector<cpu::SophiaTensorArgs> args(n);
  for (size_t i = 0; i < n; ++i) {
    args[i] = {layout.get(0, i).data_ptr(), cpu::grad_pointer(layout.get(1, i), store_grads),
               layout.get(2, i).data_ptr(), layout.get(3, i).const_data_ptr(),
               cpu::param_write(layout, 4, mode, sr_keys, i, *state_steps[i].const_data_ptr<float>())};
  }
  std::atomic<int64_t> count{0};
  const cpu::SophiaLaunch launch{
      kernel_dtype(dtypes.param), kernel_dtype(dtypes.state),
      sophia_coefficients(lr, beta1, rho, bs, weight_decay, cpu::gradient_factor(grad_scale, clip_coef),
                          maximize),
      args.data(), unclipped.has_value() ? &count : nullptr, cpu::unscale_factor(grad_scale), mode};
  cpu::parallel_over_chunks(cpu::make_chunks(params), cpu::cpu_kernels().sophia, launch);
  layout.copy_back();
  if (unclipped.has_value()) {
    *unclipped->data_ptr<int64_t>() += count.load();
  }
}

void fused_sophia_hessian_cpu(at::TensorList hessians, at::TensorList estimates, double beta2,
                              bool square, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  const CallDtypes dtypes =
      check_sophia_hessian_args(hessians, estimates, beta2, grad_scale, found_inf);
  if (hessians.empty() || cpu::found_inf_set(found_inf)) {
    return;
  }
  // The estimates fix the layout here, as the params do elsewhere.
  DenseLayout layout({estimates, hessians}, {false, true});
  const size_t n = hessians.size();
  std::vector<cpu::SophiaHessianTensorArgs> args(n);
  for (size_t i = 0; i < n; ++i) {
    args[i] = {layout.get(1, i).data_ptr(), layout.get(0, i).const_data_ptr()};
  }
  const SophiaHessianCoefficients c{static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                                    cpu::inverse_grad_scale(grad_scale), square};
  const cpu::SophiaHessianLaunch launch{kernel_dtype(dtypes.param), kernel_dtype(dtypes.state), c,
                                        args.data()};
  cpu::parallel_over_chunks(cpu::make_chunks(hessians), cpu::cpu_kernels().sophia_hessian,
                            launch);
  layout.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(dldna_fused, CPU, m) {
  m.impl("fused_lion_", &fused_lion_cpu);
  m.impl("fused_sophia_", &fused_sophia_cpu);
  m.impl("fused_sophia_hessian_", &fused_sophia_hessian_cpu);
}

}  // namespace dldna_fused

#include "common/lion_sophia_args.h"

#include <c10/util/Exception.h>

namespace dldna_fused {

void check_lion_hyperparameters(const char* op, double lr, double beta1, double beta2, double weight_decay) {
  check_lr(op, lr);
  check_beta(op, "beta1", beta1);
  check_beta(op, "beta2", beta2);
  check_nonnegative(op, "weight_decay", weight_decay);
}

CallDtypes check_lion_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList state_steps, double lr, double beta1, double beta2,
                           double weight_decay, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "dldna_fused::fused_lion_";
  check_lion_hyperparameters(op, lr, beta1, beta2, weight_decay);
  const CallDtypes dtypes = check_param_lists(op, params, grads, {{"exp_avgs", exp_avgs}});
  if (!params.empty()) {
    check_state_steps(op, state_steps, params.size(), params[0].device());
    check_amp_tensors(op, grad_scale, found_inf, params[0].device());
  }
  return dtypes;
}

CallDtypes check_sophia_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList hessians, at::TensorList state_steps, double lr,
                             double beta1, double rho, double bs, double weight_decay,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf,
                             const std::optional<at::Tensor>& unclipped) {
  constexpr const char* op = "dldna_fused::fused_sophia_";
  check_lr(op, lr);
  check_beta(op, "beta1", beta1);
  check_nonnegative(op, "rho", rho);
  TORCH_CHECK(bs > 0.0, op, ": bs must be > 0, got ", bs);
  check_nonnegative(op, "weight_decay", weight_decay);
  const CallDtypes dtypes =
      check_param_lists(op, params, grads, {{"exp_avgs", exp_avgs}, {"hessians", hessians}});
  if (!params.empty()) {
    check_state_steps(op, state_steps, params.size(), params[0].device());
    check_amp_tensors(op, grad_scale, found_inf, params[0].device());
    if (unclipped.has_value()) {
      TORCH_CHECK(unclipped->scalar_type() == at::kLong && unclipped->numel() == 1, op,
                  ": unclipped must be an int64 tensor of one element, got ",
                  unclipped->scalar_type(), " with ", unclipped->numel(), " elements");
      TORCH_CHECK(unclipped->device() == params[0].device(), op, ": unclipped is on ",
                  unclipped->device(), " but the params are on ", params[0].device());
    }
  }
  return dtypes;
}

CallDtypes check_sophia_hessian_args(at::TensorList hessians, at::TensorList estimates,
                                     double beta2, const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "dldna_fused::fused_sophia_hessian_";
  check_beta(op, "beta2", beta2);
  // The estimates stand where the params do in check_param_lists (they fix dtype and device), and
  // the hessians where a state does.
  std::vector<NamedList> states{{"hessians", hessians}};
  TORCH_CHECK(hessians.size() == estimates.size(), op,
              ": expected estimates to have one tensor per hessian (", hessians.size(), "), got ",
              estimates.size());
  const CallDtypes dtypes =
      check_param_lists(op, estimates, estimates, states, "estimates", "estimates");
  if (!estimates.empty()) {
    check_amp_tensors(op, grad_scale, found_inf, estimates[0].device());
  }
  return dtypes;
}

}  // namespace dldna_fused

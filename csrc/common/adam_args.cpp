#include "common/adam_args.h"

#include <c10/util/Exception.h>

namespace dldna_fused {

void check_adam_hyperparameters(const char* op, const AdamHyperparameters& hp) {
  check_beta(op, "beta1", hp.beta1);
  check_beta(op, "beta2", hp.beta2);
  check_nonnegative(op, "weight_decay", hp.weight_decay);
  check_nonnegative(op, "eps", hp.eps);
}

CallDtypes check_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                           at::TensorList state_steps, const AdamHyperparameters& hp,
                           const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "dldna_fused::fused_adam_";
  check_adam_hyperparameters(op, hp);
  std::vector<NamedList> states{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (hp.amsgrad) {
    states.push_back({"max_exp_avg_sqs", max_exp_avg_sqs});
  }
  const CallDtypes dtypes = check_param_lists(op, params, grads, states);
  if (!params.empty()) {
    check_state_steps(op, state_steps, params.size(), params[0].device());
    check_amp_tensors(op, grad_scale, found_inf, params[0].device());
  }
  return dtypes;
}

void check_lr_tensor(const char* op, const at::Tensor& lr, const at::Device& device) {
  TORCH_CHECK(lr.numel() == 1 && (lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble),
              op, ": a tensor lr must be a float32 or float64 tensor of one element, got ",
              lr.scalar_type(), " with ", lr.numel(), " elements");
  TORCH_CHECK(lr.device() == device || lr.device().is_cpu(), op, ": lr is on ", lr.device(),
              " but the params are on ", device);
}

}  // namespace dldna_fused

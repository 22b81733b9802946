#include "common/checks.h"

#include <c10/util/Exception.h>

#include <utility>

namespace dldna_fused {

bool is_supported_param_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

namespace {

// Same dense memory order as `ref` (see [Note: dense layouts]).
bool shares_dense_layout(const at::Tensor& t, const at::Tensor& ref) {
  if (t.is_contiguous() && ref.is_contiguous()) {
    return true;
  }
  if (!t.is_non_overlapping_and_dense() || !ref.is_non_overlapping_and_dense()) {
    return false;
  }
  for (int64_t d = 0; d < ref.dim(); ++d) {
    if (ref.size(d) > 1 && t.stride(d) != ref.stride(d)) {
      return false;
    }
  }
  return true;
}

}  // namespace

RoundMode check_param_writes(const char* op, at::TensorList params,
                             const std::optional<at::TensorList>& kahan_comps,
                             at::OptionalIntArrayRef sr_keys) {
  if (!kahan_comps.has_value() && !sr_keys.has_value()) {
    return RoundMode::Nearest;
  }
  TORCH_CHECK(!(kahan_comps.has_value() && sr_keys.has_value()), op,
              ": kahan_comps and sr_keys were both given; a step uses Kahan summation or stochastic "
              "rounding, not both");
  const size_t n = params.size();
  const char* what = kahan_comps.has_value() ? "kahan_comps" : "sr_keys";
  const size_t given = kahan_comps.has_value() ? kahan_comps->size() : sr_keys->size();
  TORCH_CHECK(given == n, op, ": expected ", what, " to have one entry per param (", n, "), got ", given);
  if (n == 0) {
    return kahan_comps.has_value() ? RoundMode::Kahan : RoundMode::Stochastic;
  }
  TORCH_CHECK(params[0].scalar_type() == at::kBFloat16, op, ": ", what,
              " were given for ", params[0].scalar_type(),
              " params; Kahan summation and stochastic rounding apply to bfloat16 params only");
  if (sr_keys.has_value()) {
    return RoundMode::Stochastic;
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& c = (*kahan_comps)[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(c.layout() == at::kStrided && c.sizes() == p.sizes(), op, ": kahan_comps[", i,
                "] has shape ", c.sizes(), " but params[", i, "] has shape ", p.sizes());
    TORCH_CHECK(c.scalar_type() == p.scalar_type(), op, ": kahan_comps[", i, "] has dtype ",
                c.scalar_type(), " but params[", i, "] has ", p.scalar_type());
    TORCH_CHECK(c.device() == p.device(), op, ": kahan_comps[", i, "] is on ", c.device(),
                " but params[", i, "] is on ", p.device());
  }
  return RoundMode::Kahan;
}

CallDtypes check_param_lists(const char* op, at::TensorList params, at::TensorList grads,
                             const std::vector<NamedList>& states, const char* params_name,
                             const char* grads_name) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": expected ", grads_name, " to have one tensor per param (", n,
              "), got ", grads.size());
  for (const auto& state : states) {
    TORCH_CHECK(state.tensors.size() == n, op, ": expected ", state.name,
                " to have one tensor per param (", n, "), got ", state.tensors.size());
  }
  if (n == 0) {
    return {at::kFloat, at::kFloat};
  }
  const at::ScalarType param_dtype = params[0].scalar_type();
  TORCH_CHECK(is_supported_param_dtype(param_dtype), op,
              ": ", params_name, " must be float32, bfloat16 or float16, got ", param_dtype,
              " (use torch.optim for other dtypes)");
  const at::Device device = params[0].device();
  at::ScalarType state_dtype = param_dtype;
  if (!states.empty()) {
    state_dtype = states[0].tensors[0].scalar_type();
    TORCH_CHECK(state_dtype == param_dtype || state_dtype == at::kFloat, op, ": ", states[0].name,
                " must have the ", params_name, "' dtype (", param_dtype, ") or float32, got ", state_dtype);
  }

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(p.layout() == at::kStrided, op, ": ", params_name, "[", i, "] must be a dense tensor, got layout ",
                p.layout());
    TORCH_CHECK(p.scalar_type() == param_dtype, op, ": ", params_name, "[", i, "] has dtype ", p.scalar_type(),
                " but ", params_name, "[0] has ", param_dtype, "; one call takes params of one dtype");
    TORCH_CHECK(p.device() == device, op, ": ", params_name, "[", i, "] is on ", p.device(),
                " but ", params_name, "[0] is on ", device, "; one call takes params of one device");
    TORCH_CHECK(g.layout() == at::kStrided, op, ": ", grads_name, "[", i,
                "] is sparse; the fused optimizers take dense gradients only");
    TORCH_CHECK(g.scalar_type() == param_dtype, op, ": ", grads_name, "[", i, "] has dtype ", g.scalar_type(),
                " but ", params_name, "[", i, "] has ", param_dtype);
    TORCH_CHECK(g.device() == device, op, ": ", grads_name, "[", i, "] is on ", g.device(), " but ", params_name, "[", i,
                "] is on ", device);
    TORCH_CHECK(g.sizes() == p.sizes(), op, ": ", grads_name, "[", i, "] has shape ", g.sizes(), " but ", params_name, "[",
                i, "] has shape ", p.sizes());
    for (const auto& state : states) {
      const at::Tensor& s = state.tensors[i];
      TORCH_CHECK(s.layout() == at::kStrided && s.sizes() == p.sizes(), op, ": ", state.name, "[", i,
                  "] has shape ", s.sizes(), " but ", params_name, "[", i, "] has shape ", p.sizes());
      TORCH_CHECK(s.scalar_type() == state_dtype, op, ": ", state.name, "[", i, "] has dtype ",
                  s.scalar_type(), " but ", states[0].name, "[0] has ", state_dtype,
                  "; all optimizer states of one call share a dtype");
      TORCH_CHECK(s.device() == device, op, ": ", state.name, "[", i, "] is on ", s.device(),
                  " but ", params_name, "[", i, "] is on ", device);
    }
  }
  return {param_dtype, state_dtype};
}

void check_state_steps(const char* op, at::TensorList state_steps, size_t expected,
                       const at::Device& device) {
  TORCH_CHECK(state_steps.size() == expected, op,
              ": expected state_steps to have one tensor per param (", expected, "), got ",
              state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == 1, op, ": state_steps[", i,
                "] must be a float32 tensor of one element, got ", s.scalar_type(), " with ",
                s.numel(), " elements");
    TORCH_CHECK(s.device() == device, op, ": state_steps[", i, "] is on ", s.device(),
                " but must be on ", device, " with its param");
  }
}

void check_amp_tensors(const char* op, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, const at::Device& device) {
  for (const auto& [name, t] : {std::pair{"grad_scale", &grad_scale}, {"found_inf", &found_inf}}) {
    if (!t->has_value()) {
      continue;
    }
    const at::Tensor& v = t->value();
    TORCH_CHECK(v.scalar_type() == at::kFloat && v.numel() == 1, op, ": ", name,
                " must be a float32 tensor of one element, got ", v.scalar_type(), " with ",
                v.numel(), " elements");
    TORCH_CHECK(v.device() == device, op, ": ", name, " is on ", v.device(), " but the params are on ",
                device);
  }
}

void check_clip_coef(const char* op, const std::optional<at::Tensor>& clip_coef, const at::Device& device) {
  if (!clip_coef.has_value()) {
    return;
  }
  const at::Tensor& c = *clip_coef;
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.numel() == 1, op,
              ": clip_coef must be a float32 tensor of one element, got ", c.scalar_type(), " with ",
              c.numel(), " elements");
  TORCH_CHECK(c.device() == device, op, ": clip_coef is on ", c.device(), " but the params are on ", device);
}

void check_lr(const char* op, double lr) {
  TORCH_CHECK(lr >= 0.0, op, ": lr must be >= 0, got ", lr);
}

void check_beta(const char* op, const char* name, double beta) {
  TORCH_CHECK(beta >= 0.0 && beta < 1.0, op, ": ", name, " must be in [0, 1), got ", beta);
}

void check_nonnegative(const char* op, const char* name, double value) {
  TORCH_CHECK(value >= 0.0, op, ": ", name, " must be >= 0, got ", value);
}

cpu::Dtype kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return cpu::Dtype::Float;
    case at::kBFloat16:
      return cpu::Dtype::BFloat16;
    case at::kHalf:
      return cpu::Dtype::Half;
    default:
      TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", dtype);
  }
}

DenseLayout::DenseLayout(std::vector<at::TensorList> lists, std::vector<bool> written,
                         bool contiguous)
    : lists_(std::move(lists)), written_(std::move(written)), copies_(lists_.size()) {
  TORCH_INTERNAL_ASSERT(!lists_.empty() && lists_.size() == written_.size());
  const at::TensorList params = lists_[0];
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& ref = params[i];
    bool ok = ref.is_contiguous() || (!contiguous && ref.is_non_overlapping_and_dense());
    for (size_t k = 1; ok && k < lists_.size(); ++k) {
      ok = i >= lists_[k].size() || shares_dense_layout(lists_[k][i], ref);
    }
    if (ok) {
      continue;
    }
    for (size_t k = 0; k < lists_.size(); ++k) {
      if (i >= lists_[k].size() || lists_[k][i].is_contiguous()) {
        continue;
      }
      if (copies_[k].empty()) {
        copies_[k].resize(lists_[k].size());
      }
      copies_[k][i] = lists_[k][i].contiguous();
    }
  }
}

std::vector<at::Tensor> DenseLayout::list(size_t k) const {
  std::vector<at::Tensor> out;
  out.reserve(lists_[k].size());
  for (size_t i = 0; i < lists_[k].size(); ++i) {
    out.push_back(get(k, i));
  }
  return out;
}

void DenseLayout::copy_back() {
  for (size_t k = 0; k < lists_.size(); ++k) {
    if (!written_[k]) {
      continue;
    }
    for (size_t i = 0; i < copies_[k].size(); ++i) {
      if (copies_[k][i].defined()) {
        lists_[k][i].copy_(copies_[k][i]);
      }
    }
    copies_[k].clear();
  }
}

}  // namespace dldna_fused

#include "common/adafactor_args.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace dldna_fused {

namespace {

constexpr const char* kOp = "dldna_fused::fused_adafactor_";

// A state that is not elementwise (rows, cols, rms): float32, contiguous, `shape`, on `device`.
void check_float_state(const char* name, size_t i, const at::Tensor& s, at::IntArrayRef shape,
                       const at::Device& device) {
  TORCH_CHECK(s.layout() == at::kStrided && s.sizes() == shape, kOp, ": ", name, "[", i,
              "] has shape ", s.sizes(), " but must have shape ", shape);
  TORCH_CHECK(s.scalar_type() == at::kFloat, kOp, ": ", name, "[", i,
              "] must be float32 (AdaFactor keeps its statistics in fp32), got ", s.scalar_type());
  TORCH_CHECK(s.device() == device, kOp, ": ", name, "[", i, "] is on ", s.device(),
              " but params[", i, "] is on ", device);
  TORCH_CHECK(s.is_contiguous(), kOp, ": ", name, "[", i, "] must be contiguous");
}

AdafactorOptions adafactor_options(std::optional<double> lr, double eps1, double eps2,
                                   double clip_threshold, double decay_rate,
                                   std::optional<double> beta1, double weight_decay,
                                   bool scale_parameter, bool relative_step, bool warmup_init) {
  TORCH_CHECK(!(lr.has_value() && relative_step), kOp,
              ": a manual lr cannot be combined with relative_step=True (pass lr=None, or "
              "relative_step=False)");
  TORCH_CHECK(lr.has_value() || relative_step, kOp,
              ": relative_step=False needs a manual lr, got lr=None");
  TORCH_CHECK(!warmup_init || relative_step, kOp, ": warmup_init=True requires relative_step=True");
  if (lr.has_value()) {
    check_lr(kOp, *lr);
  }
  check_nonnegative(kOp, "eps1", eps1);
  check_nonnegative(kOp, "eps2", eps2);
  TORCH_CHECK(clip_threshold > 0.0, kOp, ": clip_threshold must be > 0, got ", clip_threshold);
  TORCH_CHECK(decay_rate <= 0.0, kOp, ": decay_rate must be <= 0 (beta2_t = 1 - t^decay_rate), got ",
              decay_rate);
  if (beta1.has_value()) {
    check_beta(kOp, "beta1", *beta1);
  }
  check_nonnegative(kOp, "weight_decay", weight_decay);
  AdafactorOptions o{};
  o.lr = lr.value_or(0.0);
  o.eps1 = eps1;
  o.eps2 = eps2;
  o.clip_threshold = clip_threshold;
  o.decay_rate = decay_rate;
  o.beta1 = beta1.value_or(0.0);
  o.weight_decay = weight_decay;
  o.use_first_moment = beta1.has_value();
  o.scale_parameter = scale_parameter;
  o.relative_step = relative_step;
  o.warmup_init = warmup_init;
  return o;
}

}  // namespace

AdafactorCall check_adafactor_call(at::TensorList params, at::TensorList grads,
                                   at::TensorList exp_avg_sq_rows, at::TensorList exp_avg_sq_cols,
                                   at::TensorList exp_avg_sqs, at::TensorList exp_avgs,
                                   at::TensorList rms, at::TensorList state_steps,
                                   std::optional<double> lr, double eps1, double eps2,
                                   double clip_threshold, double decay_rate,
                                   std::optional<double> beta1, double weight_decay,
                                   bool scale_parameter, bool relative_step, bool warmup_init,
                                   const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf) {
  const AdafactorOptions options =
      adafactor_options(lr, eps1, eps2, clip_threshold, decay_rate, beta1, weight_decay,
                        scale_parameter, relative_step, warmup_init);
  const size_t n = params.size();
  const bool factored = !exp_avg_sq_rows.empty() || !exp_avg_sq_cols.empty();
  TORCH_CHECK(!factored || exp_avg_sqs.empty(), kOp,
              ": pass either exp_avg_sq_rows and exp_avg_sq_cols (factored) or exp_avg_sqs "
              "(unfactored), not both; one call is of one kind");
  TORCH_CHECK(exp_avgs.empty() == !options.use_first_moment, kOp,
              options.use_first_moment ? ": beta1 is set, so exp_avgs must have one tensor per param"
                                       : ": exp_avgs must be empty when beta1 is None");
  std::vector<NamedList> elementwise;
  if (options.use_first_moment) {
    elementwise.push_back({"exp_avgs", exp_avgs});
  }
  if (!factored) {
    elementwise.push_back({"exp_avg_sqs", exp_avg_sqs});
  }
  const CallDtypes dtypes = check_param_lists(kOp, params, grads, elementwise);
  TORCH_CHECK(elementwise.empty() || n == 0 || dtypes.state == at::kFloat, kOp, ": ",
              elementwise[0].name, " must be float32 (AdaFactor keeps its statistics in fp32), got ",
              dtypes.state);
  if (factored) {
    TORCH_CHECK(exp_avg_sq_rows.size() == n && exp_avg_sq_cols.size() == n, kOp,
                ": expected exp_avg_sq_rows and exp_avg_sq_cols to have one tensor per param (", n,
                "), got ", exp_avg_sq_rows.size(), " and ", exp_avg_sq_cols.size());
  }
  if (n == 0) {
    return {options, dtypes, factored};
  }
  const at::Device device = params[0].device();
  check_state_steps(kOp, state_steps, n, device);
  check_amp_tensors(kOp, grad_scale, found_inf, device);
  TORCH_CHECK(rms.size() == n, kOp, ": expected rms to have one tensor per param (", n, "), got ",
              rms.size());
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(rms[i].numel() == 1, kOp, ": rms[", i, "] must have one element, got ",
                rms[i].numel());
    check_float_state("rms", i, rms[i], rms[i].sizes(), device);
    if (!factored) {
      continue;
    }
    const at::IntArrayRef shape = params[i].sizes();
    TORCH_CHECK(shape.size() >= 2, kOp, ": params[", i, "] has shape ", shape,
                "; a factored call needs params of at least 2 dims (pass 1-D params in an "
                "unfactored call)");
    std::vector<int64_t> col_shape(shape.begin(), shape.end() - 2);
    col_shape.push_back(shape.back());
    check_float_state("exp_avg_sq_rows", i, exp_avg_sq_rows[i], shape.slice(0, shape.size() - 1),
                      device);
    check_float_state("exp_avg_sq_cols", i, exp_avg_sq_cols[i], col_shape, device);
  }
  return {options, dtypes, factored};
}

AdafactorShape adafactor_shape(const at::Tensor& param, bool factored) {
  if (!factored) {
    return {param.numel(), 0, 0};
  }
  return {param.numel(), param.size(-2), param.size(-1)};
}

AdafactorPlan plan_adafactor(const std::vector<AdafactorShape>& shapes, int64_t target_elements,
                             int64_t max_rows) {
  AdafactorPlan plan;
  const size_t n = shapes.size();
  plan.unit_begin.reserve(n + 1);
  plan.units_per_matrix.assign(n, 0);
  plan.rows_per_unit.assign(n, 0);
  plan.matrix_offset.assign(n, 0);
  plan.column_offset.assign(n, 0);
  for (size_t i = 0; i < n; ++i) {
    const AdafactorShape& s = shapes[i];
    plan.unit_begin.push_back(static_cast<int64_t>(plan.units.size()));
    if (s.numel == 0) {
      continue;
    }
    const auto tensor = static_cast<int64_t>(i);
    if (s.rows == 0) {
      for (int64_t begin = 0; begin < s.numel; begin += target_elements) {
        plan.units.push_back({tensor, begin, std::min(begin + target_elements, s.numel), -1});
      }
      continue;
    }
    const int64_t rows_per_unit =
        std::clamp<int64_t>(target_elements / s.cols, 1, std::max<int64_t>(1, max_rows));
    const int64_t per_matrix = (s.rows + rows_per_unit - 1) / rows_per_unit;
    plan.units_per_matrix[i] = per_matrix;
    plan.rows_per_unit[i] = rows_per_unit;
    plan.matrix_offset[i] = plan.num_matrices;
    plan.column_offset[i] = plan.num_columns;
    plan.num_matrices += s.matrices();
    plan.num_columns += s.matrices() * s.cols;
    for (int64_t b = 0; b < s.matrices(); ++b) {
      const int64_t matrix_begin = b * s.rows * s.cols;
      for (int64_t r = 0; r < s.rows; r += rows_per_unit) {
        const int64_t r_end = std::min(r + rows_per_unit, s.rows);
        plan.units.push_back({tensor, matrix_begin + r * s.cols, matrix_begin + r_end * s.cols,
                              plan.col_partials});
        plan.col_partials += s.cols;
      }
    }
  }
  plan.unit_begin.push_back(static_cast<int64_t>(plan.units.size()));
  return plan;
}

}  // namespace dldna_fused

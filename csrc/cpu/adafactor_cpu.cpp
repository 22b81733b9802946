// dldna_fused::fused_adafactor_ on the CPU: checks, the work plan, and the three passes of
// [Note: AdaFactor passes] (common/adafactor_math.h) over all tensors at once, with the small
// per-tensor finalize steps between them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/adafactor_args.h"
#include "cpu/parallel.h"

namespace dldna_fused {
namespace {

// Elements per work unit: a factored unit is whole rows and owns one row of column partial sums
// (cols floats), so units are larger than elementwise chunks to keep that buffer ~1% of the data.
constexpr int64_t kUnitElements = 262144;

void fused_adafactor_cpu(at::TensorList params, at::TensorList grads,
                         at::TensorList exp_avg_sq_rows, at::TensorList exp_avg_sq_cols,
                         at::TensorList exp_avg_sqs, at::TensorList exp_avgs, at::TensorList rms,
                         at::TensorList state_steps, std::optional<double> lr, double eps1,
                         double eps2, double clip_threshold, double decay_rate,
                         std::optional<double> beta1, double weight_decay, bool scale_parameter,
                         bool relative_step, bool warmup_init,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& clip_coef,
                         std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  const AdafactorCall call = check_adafactor_call(
      params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs, rms, state_steps, lr,
      eps1, eps2, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter, relative_step,
      warmup_init, grad_scale, found_inf);
  const RoundMode mode = check_param_writes("dldna_fused::fused_adafactor_", params, kahan_comps, sr_keys);
  const AdafactorOptions& o = call.options;
  if (params.empty()) {
    return;
  }
  check_clip_coef("dldna_fused::fused_adafactor_", clip_coef, params[0].device());
  if (cpu::found_inf_set(found_inf)) {
    return;
  }
  const size_t n = params.size();
  const bool store_grads = grad_scale.has_value();  // [Note: unscaled grads]
  // Rounding other than to nearest numbers elements in row-major order ([Note: bf16 param writes]).
  DenseLayout layout({params, grads, exp_avgs, exp_avg_sqs, comps_or_none(mode, kahan_comps)},
                     {true, store_grads, true, true, true},
                     /*contiguous=*/call.factored || mode != RoundMode::Nearest);

  std::vector<AdafactorShape> shapes(n);
  for (size_t i = 0; i < n; ++i) {
    shapes[i] = adafactor_shape(params[i], call.factored);
  }
  const AdafactorPlan plan =
      plan_adafactor(shapes, kUnitElements, std::numeric_limits<int64_t>::max());

  // A tensor of one unit (at most kUnitElements) runs all its passes on one thread back to back,
  // while its g and p are still in cache: for many small matrices that halves the memory traffic
  // (BENCHMARKS.md, 200 x 316 x 316). Larger ("spread") tensors take each pass over all their
  // units in parallel, with the finalize steps between. The units are laid out spread tensors
  // first, so those form one contiguous run; first_unit[i] is tensor i's first unit there.
  std::vector<int64_t> spread, local;
  for (size_t i = 0; i < n; ++i) {
    const bool one_unit = plan.unit_begin[i + 1] - plan.unit_begin[i] <= 1;
    (one_unit ? local : spread).push_back(static_cast<int64_t>(i));
  }
  std::vector<cpu::Chunk> units;
  std::vector<int64_t> col_offsets, first_unit(n), unit_count(n);
  units.reserve(plan.units.size());
  col_offsets.reserve(plan.units.size());
  for (const auto* group : {&spread, &local}) {
    for (int64_t i : *group) {
      first_unit[i] = static_cast<int64_t>(units.size());
      unit_count[i] = plan.unit_begin[i + 1] - plan.unit_begin[i];
      for (int64_t k = plan.unit_begin[i]; k < plan.unit_begin[i + 1]; ++k) {
        const AdafactorUnit& u = plan.units[k];
        units.push_back({u.tensor, u.begin, u.end});
        col_offsets.push_back(u.col_offset);
      }
    }
  }
  const auto num_units = static_cast<int64_t>(units.size());
  int64_t spread_units = 0;
  for (int64_t i : spread) {
    spread_units += unit_count[i];
  }
  std::vector<float> col_partials(plan.col_partials), row_means(plan.num_matrices),
      col_rsqrt(plan.num_columns);
  std::vector<double> unit_p2(num_units, 0.0), unit_u2(num_units, 0.0);

  std::vector<double> steps(n);
  std::vector<cpu::AdafactorTensorArgs> args(n);
  for (size_t i = 0; i < n; ++i) {
    steps[i] = static_cast<double>(*state_steps[i].const_data_ptr<float>()) + 1.0;
    cpu::AdafactorTensorArgs& a = args[i];
    a.param = layout.get(0, i).data_ptr();
    a.grad = cpu::grad_pointer(layout.get(1, i), store_grads);
    a.exp_avg = o.use_first_moment ? layout.get(2, i).data_ptr<float>() : nullptr;
    if (call.factored) {
      a.exp_avg_sq_row = exp_avg_sq_rows[i].data_ptr<float>();
      a.exp_avg_sq_col = exp_avg_sq_cols[i].data_ptr<float>();
      a.rows = shapes[i].rows;
      a.cols = shapes[i].cols;
      a.row_mean = row_means.data() + plan.matrix_offset[i];
      a.col_rsqrt = col_rsqrt.data() + plan.column_offset[i];
    } else {
      a.exp_avg_sq = layout.get(3, i).data_ptr<float>();
    }
    a.decay = adafactor_decay(o, steps[i]);
    a.write = cpu::param_write(layout, 4, mode, sr_keys, i, static_cast<float>(steps[i]));
  }
  const cpu::AdafactorLaunch launch{kernel_dtype(call.dtypes.param),
                                    static_cast<float>(eps1),
                                    cpu::gradient_factor(grad_scale, clip_coef),
                                    args.data(),
                                    units.data(),
                                    col_offsets.data(),
                                    col_partials.data(),
                                    unit_p2.data(),
                                    unit_u2.data(),
                                    cpu::unscale_factor(grad_scale),
                                    mode};
  const cpu::KernelTable& kernels = cpu::cpu_kernels();

  // Finalize 1 of tensor i: RMS(p), and for factored tensors C's EMA from the column sums (units
  // added in order), rsqrt(C) and mean(R) per matrix.
  std::vector<double> rms_p(n), alpha(n);
  auto finalize_statistics = [&](int64_t i) {
    double p2 = 0.0;
    for (int64_t k = first_unit[i]; k < first_unit[i] + unit_count[i]; ++k) {
      p2 += unit_p2[k];
    }
    rms_p[i] = adafactor_rms(p2, shapes[i].numel);
    alpha[i] = adafactor_alpha(o, steps[i], rms_p[i]);
    const cpu::AdafactorTensorArgs& a = args[i];
    if (a.rows == 0 || shapes[i].numel == 0) {
      return;
    }
    const int64_t per_matrix = plan.units_per_matrix[i];
    for (int64_t b = 0; b < shapes[i].matrices(); ++b) {
      const int64_t first = first_unit[i] + b * per_matrix;
      float* col = a.exp_avg_sq_col + b * a.cols;
      float* inv_sqrt_col = col_rsqrt.data() + plan.column_offset[i] + b * a.cols;
      for (int64_t c = 0; c < a.cols; ++c) {
        float sum = 0.f;
        for (int64_t k = first; k < first + per_matrix; ++k) {
          sum += col_partials[col_offsets[k] + c];
        }
        col[c] = adafactor_ema(col[c], sum / static_cast<float>(a.rows), a.decay);
        inv_sqrt_col[c] = 1.f / std::sqrt(col[c]);
      }
      double row_sum = 0.0;
      for (int64_t r = 0; r < a.rows; ++r) {
        row_sum += a.exp_avg_sq_row[b * a.rows + r];
      }
      row_means[plan.matrix_offset[i] + b] = static_cast<float>(row_sum / a.rows);
    }
  };
  // Finalize 2 of tensor i: the clip.
  auto finalize_scale = [&](int64_t i) {
    double u2 = 0.0;
    for (int64_t k = first_unit[i]; k < first_unit[i] + unit_count[i]; ++k) {
      u2 += unit_u2[k];
    }
    const float scale = adafactor_update_scale(o, alpha[i], u2, shapes[i].numel);
    args[i].apply = adafactor_apply_constants(o, alpha[i], scale);
  };

  if (!spread.empty()) {
    cpu::parallel_over_chunks(units.data(), spread_units, kernels.adafactor_reduce, launch);
    at::parallel_for(0, static_cast<int64_t>(spread.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        finalize_statistics(spread[j]);
      }
    });
    if (call.factored) {
      cpu::parallel_over_chunks(units.data(), spread_units, kernels.adafactor_update_norm, launch);
    }
    for (int64_t i : spread) {
      finalize_scale(i);
    }
    cpu::parallel_over_chunks(units.data(), spread_units, kernels.adafactor_apply, launch);
  }
  int64_t local_elements = 0;
  for (int64_t i : local) {
    local_elements += shapes[i].numel;
  }
  // As parallel_over_chunks: at least ~2 chunks' worth of elements per thread.
  const int64_t grain = std::max<int64_t>(
      1, 2 * cpu::kChunkElements * static_cast<int64_t>(local.size()) /
             std::max<int64_t>(1, local_elements));
  at::parallel_for(0, static_cast<int64_t>(local.size()), grain, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t i = local[j];
      const cpu::Chunk* unit = units.data() + first_unit[i];
      kernels.adafactor_reduce(launch, unit, unit_count[i]);
      finalize_statistics(i);
      if (call.factored) {
        kernels.adafactor_update_norm(launch, unit, unit_count[i]);
      }
      finalize_scale(i);
      kernels.adafactor_apply(launch, unit, unit_count[i]);
    }
  });

  for (size_t i = 0; i < n; ++i) {
    *rms[i].data_ptr<float>() = static_cast<float>(rms_p[i]);
    *state_steps[i].data_ptr<float>() = static_cast<float>(steps[i]);
  }
  layout.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(dldna_fused, CPU, m) {
  m.impl("fused_adafactor_", &fused_adafactor_cpu);
}

}  // namespace dldna_fused

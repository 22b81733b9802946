#pragma once
// dldna_fused::fused_adafactor_, shared by its CPU and CUDA implementations: the argument checks,
// the options, and the plan that cuts the tensors of one call into work units
// (see [Note: AdaFactor passes] in common/adafactor_math.h).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/adafactor_math.h"
#include "common/checks.h"

namespace dldna_fused {

// One checked call: its options, dtypes, and whether it is factored (rows/cols lists given, every
// param has >= 2 dims) or not (exp_avg_sqs given).
struct AdafactorCall {
  AdafactorOptions options;
  CallDtypes dtypes;
  bool factored;
};

// Validates every argument of one fused_adafactor_ call (the op's arguments, in its order).
AdafactorCall check_adafactor_call(at::TensorList params, at::TensorList grads,
                                   at::TensorList exp_avg_sq_rows, at::TensorList exp_avg_sq_cols,
                                   at::TensorList exp_avg_sqs, at::TensorList exp_avgs,
                                   at::TensorList rms, at::TensorList state_steps,
                                   std::optional<double> lr, double eps1, double eps2,
                                   double clip_threshold, double decay_rate,
                                   std::optional<double> beta1, double weight_decay,
                                   bool scale_parameter, bool relative_step, bool warmup_init,
                                   const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf);

// A tensor of a call seen as `matrices` matrices of rows x cols (factored: the last two dims; the
// leading dims batched) or as a flat vector (rows = cols = 0).
struct AdafactorShape {
  int64_t numel;
  int64_t rows;
  int64_t cols;
  int64_t matrices() const { return rows > 0 && cols > 0 ? numel / (rows * cols) : 0; }
};

AdafactorShape adafactor_shape(const at::Tensor& param, bool factored);

// One unit of parallel work: elements [begin, end) of tensor `tensor`. In a factored tensor a unit
// is whole rows of one matrix, and owns `cols` floats of column partial sums at `col_offset`.
struct AdafactorUnit {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t col_offset;  // -1 for unfactored tensors
};

struct AdafactorPlan {
  std::vector<AdafactorUnit> units;
  // Per tensor: its units are [unit_begin[i], unit_begin[i + 1]); a factored tensor's matrix b
  // has units_per_matrix[i] of them, starting at unit_begin[i] + b * units_per_matrix[i].
  std::vector<int64_t> unit_begin;
  std::vector<int64_t> units_per_matrix;
  std::vector<int64_t> rows_per_unit;  // factored: the rows of every unit but a matrix's last
  // Per tensor, the offset of its matrices' values in a per-matrix buffer (mean of R) and of its
  // B x cols values in a per-column buffer (rsqrt of C); and the sizes of the buffers.
  std::vector<int64_t> matrix_offset;
  std::vector<int64_t> column_offset;
  int64_t num_matrices = 0;
  int64_t num_columns = 0;
  int64_t col_partials = 0;  // floats of column partial sums over all units
};

// Units of about `target_elements` (whole rows, at most `max_rows` of them, for factored tensors).
// Zero-size tensors get no unit.
AdafactorPlan plan_adafactor(const std::vector<AdafactorShape>& shapes, int64_t target_elements,
                             int64_t max_rows);

}  // namespace dldna_fused

#include "common/adafactor_gpu_plan.h"

#include <algorithm>

namespace dldna_fused {
namespace {

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace

AdafactorGpuPlan plan_adafactor_gpu(const std::vector<AdafactorShape>& shapes) {
  AdafactorGpuPlan plan;
  const size_t n = shapes.size();
  plan.tensors.resize(n);
  for (auto* first : {&plan.row_first, &plan.column_first, &plan.combine_first, &plan.mean_first}) {
    first->assign(n + 1, 0);
  }
  for (size_t i = 0; i < n; ++i) {
    const AdafactorShape& s = shapes[i];
    AdafactorGpuTensor& t = plan.tensors[i];
    const bool factored = s.rows > 0 && s.cols > 0 && s.numel > 0;
    if (s.numel > 0 && !factored) {
      t.rows_per_block = kGpuBlockElements;
      t.row_blocks = ceil_div(s.numel, kGpuBlockElements);
    } else if (factored) {
      t.matrices = s.matrices();
      const int64_t rows = t.matrices * s.rows;
      // At least a row per warp (long rows) or per thread (short rows).
      const int64_t min_rows = s.cols >= kGpuWarpRowCols ? kGpuThreads / 32 : kGpuThreads;
      t.rows_per_block = std::max<int64_t>(min_rows, kGpuBlockElements / s.cols);
      t.row_blocks = ceil_div(rows, t.rows_per_block);
      // Strips: as few as keep a block's rows <= rows_per_strip, at most kGpuMaxStrips, and none
      // shorter than kGpuMinStripRows, so the partials stay a small fraction of the matrix.
      t.rows_per_strip = std::min(s.rows, std::max(ceil_div(s.rows, kGpuMaxStrips), kGpuMinStripRows));
      t.strips = ceil_div(s.rows, t.rows_per_strip);
      const int64_t columns = t.matrices * s.cols;
      const int64_t per_thread = std::max<int64_t>(1, kGpuBlockElements / (kGpuThreads * t.rows_per_strip));
      t.columns_per_block = kGpuThreads * per_thread;
      t.column_tiles = ceil_div(columns, t.columns_per_block);
      if (t.strips > 1) {
        t.columns_per_combine = kGpuThreads * std::max<int64_t>(1, kGpuBlockElements / (kGpuThreads * t.strips));
        t.combine_blocks = ceil_div(columns, t.columns_per_combine);
        t.partial_offset = plan.column_partial_floats;
        plan.column_partial_floats += t.strips * columns;
      }
      if (s.rows > 1) {
        t.mean_blocks = ceil_div(t.matrices, kGpuMatricesPerMeanBlock);
        t.mean_offset = plan.row_mean_floats;
        plan.row_mean_floats += t.matrices;
      }
    }
    plan.row_first[i + 1] = plan.row_first[i] + t.row_blocks;
    plan.column_first[i + 1] = plan.column_first[i] + t.strips * t.column_tiles;
    plan.combine_first[i + 1] = plan.combine_first[i] + t.combine_blocks;
    plan.mean_first[i + 1] = plan.mean_first[i] + t.mean_blocks;
  }
  return plan;
}

}  // namespace dldna_fused

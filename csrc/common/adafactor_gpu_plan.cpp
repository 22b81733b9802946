#include "common/adafactor_gpu_plan.h"

#include <algorithm>

namespace dldna_fused {
namespace {

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The largest power of two <= n (n >= 1).
int64_t floor_pow2(int64_t n) {
  int64_t p = 1;
  while (p * 2 <= n) {
    p *= 2;
  }
  return p;
}

// The smallest power of two >= n (n >= 1).
int64_t ceil_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) {
    p *= 2;
  }
  return p;
}

// Threads per column when `columns` columns of `rows` rows share a block: as many as leave one
// pass over the columns (kGpuThreads / lanes >= columns), but no more than the rows. A power of
// two, so that kGpuThreads / lanes is whole.
int64_t lanes_for(int64_t columns, int64_t rows) {
  const int64_t by_columns = columns >= kGpuThreads ? 1 : kGpuThreads / ceil_pow2(std::max<int64_t>(columns, 1));
  return std::min(by_columns, floor_pow2(std::max<int64_t>(rows, 1)));
}

}  // namespace

AdafactorGpuPlan plan_adafactor_gpu(const std::vector<AdafactorShape>& shapes) {
  AdafactorGpuPlan plan;
  const size_t n = shapes.size();
  plan.tensors.resize(n);
  for (auto* first : {&plan.row_first, &plan.column_first, &plan.combine_first, &plan.mean_first,
                      &plan.row_combine_first}) {
    first->assign(n + 1, 0);
  }
  int64_t& most = plan.max_block_elements;
  for (size_t i = 0; i < n; ++i) {
    const AdafactorShape& s = shapes[i];
    AdafactorGpuTensor& t = plan.tensors[i];
    const bool factored = s.rows > 0 && s.cols > 0 && s.numel > 0;
    if (s.numel > 0 && !factored) {
      t.rows_per_block = kGpuBlockElements;
      t.row_blocks = ceil_div(s.numel, kGpuBlockElements);
      most = std::max(most, std::min(s.numel, kGpuBlockElements));
    } else if (factored) {
      t.matrices = s.matrices();
      const int64_t rows = t.matrices * s.rows;
      // Rows mode: at least a row per warp (long rows) or per thread (short rows). Rows so long
      // that a warp each would put more than kGpuBlockElements in a block go to segment mode.
      const bool warp_rows = s.cols >= kGpuWarpRowCols;
      const int64_t min_rows = warp_rows ? kGpuThreads / 32 : kGpuThreads;
      if (warp_rows && min_rows * s.cols > kGpuBlockElements) {
        t.segments = ceil_div(s.cols, kGpuBlockElements);
        t.segment_cols = ceil_div(s.cols, t.segments);
        t.rows_per_block = 1;
        t.row_blocks = rows * t.segments;
        most = std::max(most, t.segment_cols);
        if (t.segments > 1) {
          t.row_partial_offset = plan.row_partial_floats;
          plan.row_partial_floats += rows * t.segments;
          t.row_combine_blocks = ceil_div(rows, kGpuThreads);
          most = std::max(most, std::min(rows, int64_t{kGpuThreads}) * t.segments);
        }
      } else {
        t.rows_per_block = std::max<int64_t>(min_rows, kGpuBlockElements / s.cols);
        t.row_blocks = ceil_div(rows, t.rows_per_block);
        most = std::max(most, std::min(rows, t.rows_per_block) * s.cols);
      }
      // Column blocks: lanes threads per column, each adding at most kGpuStripRowsPerThread rows
      // of it; a strip is what one block's threads cover.
      const int64_t columns = t.matrices * s.cols;
      t.column_lanes = lanes_for(columns, s.rows);
      t.rows_per_strip = std::min(s.rows, kGpuStripRowsPerThread * t.column_lanes);
      t.strips = ceil_div(s.rows, t.rows_per_strip);
      const int64_t columns_per_pass = kGpuThreads / t.column_lanes;
      const int64_t passes = std::max<int64_t>(1, kGpuBlockElements / (columns_per_pass * t.rows_per_strip));
      t.columns_per_block = columns_per_pass * passes;
      t.column_tiles = ceil_div(columns, t.columns_per_block);
      most = std::max(most, t.rows_per_strip * std::min(columns, t.columns_per_block));
      if (t.strips > 1) {
        // The strips' partials of a column are added by combine_lanes threads (each at most
        // kGpuStripRowsPerThread of them, every lanes-th), then in lane order.
        t.combine_lanes = std::min<int64_t>(kGpuThreads, ceil_pow2(ceil_div(t.strips, kGpuStripRowsPerThread)));
        const int64_t combine_per_pass = kGpuThreads / t.combine_lanes;
        t.columns_per_combine =
            combine_per_pass * std::max<int64_t>(1, kGpuBlockElements / (combine_per_pass * t.strips));
        t.combine_blocks = ceil_div(columns, t.columns_per_combine);
        t.partial_offset = plan.column_partial_floats;
        plan.column_partial_floats += t.strips * columns;
        most = std::max(most, t.strips * std::min(columns, t.columns_per_combine));
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
    plan.row_combine_first[i + 1] = plan.row_combine_first[i] + t.row_combine_blocks;
  }
  return plan;
}

}  // namespace dldna_fused

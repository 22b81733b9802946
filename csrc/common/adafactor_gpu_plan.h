#pragma once
// How a fused_adafactor_ call is cut into CUDA thread blocks: host code, so that a launch's block
// counts and workspace can be computed (and tested) on any machine.
//
// [Note: AdaFactor on the GPU]
// The passes of [Note: AdaFactor passes] run as 1-D launches over per-tensor runs of blocks; a
// block finds its tensor by a binary search over the runs' first blocks, and its rows or columns
// from its place in the run, so a launch describes each tensor once, not each block. With
// kGpuBlockElements the work of a block:
// - row blocks: whole rows (of a factored tensor's matrices, all stacked) or, unfactored,
//   elements. Pass 1 takes R's row sums there (a warp per row, or a thread per row when rows are
//   short, so a stack of tiny matrices fills its threads), pass 2 the sum of U^2 and pass 3 the
//   update. Each block writes one double partial of sum p^2 and of sum U^2.
// - column blocks: one strip of rows times a run of columns, counted over all matrices of the
//   tensor (so tiny matrices share a block). With one strip the block finishes C's EMA itself;
//   with several (tall matrices, at most kGpuMaxStrips) it writes a partial per column and strip,
//   and a combine launch adds the strips in order.
// - mean blocks: the mean of R per matrix (a warp per matrix, in double), for matrices of more
//   than one row (a one-row matrix's mean is its row).
// Every partial has its own slot and is added in a fixed order, so results do not depend on
// scheduling. The workspace is the partials: 16 bytes per row block, strips x columns floats for
// tall matrices, one float per matrix of more than one row, two floats per tensor. Pass 1 reads
// g twice (rows, then columns), so a factored step reads g four times; the CPU, which keeps a
// unit's column sums in cache, reads it three times.

#include <cstdint>
#include <vector>

#include "common/adafactor_args.h"

namespace dldna_fused {

constexpr int kGpuThreads = 256;
constexpr int64_t kGpuBlockElements = 8192;
constexpr int64_t kGpuMaxStrips = 8;
constexpr int64_t kGpuMinStripRows = 512;
constexpr int kGpuMatricesPerMeanBlock = kGpuThreads / 32;  // a warp per matrix
// Rows of at least this many columns take a warp each in the row passes; shorter ones a thread.
constexpr int64_t kGpuWarpRowCols = 64;

// One tensor's blocks in each launch and the geometry they share.
struct AdafactorGpuTensor {
  int64_t matrices = 0;         // factored: stacked matrices of rows x cols
  int64_t rows_per_block = 0;   // row blocks: rows (factored) or elements (unfactored) per block
  int64_t row_blocks = 0;
  int64_t rows_per_strip = 0;   // column blocks (factored only)
  int64_t strips = 0;
  int64_t columns_per_block = 0;  // over matrices x cols
  int64_t column_tiles = 0;     // column blocks = strips x column_tiles
  int64_t columns_per_combine = 0;
  int64_t combine_blocks = 0;   // strips > 1 only
  int64_t mean_blocks = 0;      // rows > 1 only
  int64_t partial_offset = -1;  // floats of column partials (strips > 1)
  int64_t mean_offset = -1;     // floats of row means (rows > 1)
};

struct AdafactorGpuPlan {
  std::vector<AdafactorGpuTensor> tensors;
  // The first block of each tensor in each launch (n + 1 entries: the last is the launch's size).
  std::vector<int64_t> row_first, column_first, combine_first, mean_first;
  int64_t column_partial_floats = 0;
  int64_t row_mean_floats = 0;

  int64_t row_blocks() const { return row_first.back(); }
  int64_t column_blocks() const { return column_first.back(); }
  int64_t combine_blocks() const { return combine_first.back(); }
  int64_t mean_blocks() const { return mean_first.back(); }
  // Bytes of the per-step workspace: p^2 and U^2 partials (double) per row block, column
  // partials, row means, and alpha and the update scale per tensor.
  int64_t workspace_bytes() const {
    return 16 * row_blocks() + 4 * (column_partial_floats + row_mean_floats) +
           8 * static_cast<int64_t>(tensors.size());
  }
};

AdafactorGpuPlan plan_adafactor_gpu(const std::vector<AdafactorShape>& shapes);

}  // namespace dldna_fused

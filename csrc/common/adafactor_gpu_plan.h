#pragma once
// How a fused_adafactor_ call is cut into CUDA thread blocks: host code, so that a launch's block
// counts and workspace can be computed (and tested) on any machine.
//
// [Note: AdaFactor on the GPU]
// The passes of [Note: AdaFactor passes] run as 1-D launches over per-tensor runs of blocks; a
// block finds its tensor by a binary search over the runs' first blocks, and its rows or columns
// from its place in the run, so a launch describes each tensor once, not each block. No block
// reads more than kGpuMaxBlockElements elements of g (or of partials) in any pass, whatever the
// shape: a [1, N] row, an [N, 1] column and a tall [32000, 4096] matrix are cut into as many
// blocks as their size asks, so none runs on one warp or one thread while the GPU idles (the host
// test checks max_block_elements on those shapes). The work of a block:
// - row blocks, in one of two modes. Rows: whole rows (of a factored tensor's matrices, all
//   stacked) or, unfactored, kGpuBlockElements elements; a warp per row, or a thread per row when
//   rows are short, so a stack of tiny matrices fills its threads. Segments, for rows too long for
//   a block of warp rows (cols > kGpuBlockElements / warps): one segment of one row per block, of
//   at most kGpuBlockElements columns, all threads across it. Pass 1 takes R's row sums there (in
//   segment mode a partial per segment, which a row-combine launch adds in segment order), pass 2
//   the sum of U^2 and pass 3 the update. Each block writes one double partial of sum p^2 and of
//   sum U^2.
// - column blocks: one strip of rows times a run of columns, counted over all matrices of the
//   tensor (so tiny matrices share a block). A thread walks at most kGpuStripRowsPerThread rows of
//   a column; where there are fewer columns than threads, `column_lanes` threads share a column
//   (each every lanes-th row) and add their sums in lane order. With one strip the block finishes
//   C's EMA itself; with several it writes a partial per column and strip, and a combine launch
//   adds them, its threads again at most kGpuStripRowsPerThread strips each (several per column
//   for very tall matrices), in a fixed order.
// - mean blocks: the mean of R per matrix (a warp per matrix, in double), for matrices of more
//   than one row (a one-row matrix's mean is its row).
// Every partial has its own slot and is added in a fixed order, so results do not depend on
// scheduling. The workspace is the partials: 16 bytes per row block, a float per row segment of
// segmented rows, strips x columns floats for tall matrices, one float per matrix of more than
// one row, two floats per tensor: under 1% of the params' bytes. Pass 1 reads g twice (rows, then
// columns), so a factored step reads g four times; the CPU, which keeps a unit's column sums in
// cache, reads it three times.

#include <cstdint>
#include <vector>

#include "common/adafactor_args.h"

namespace dldna_fused {

constexpr int kGpuThreads = 256;
constexpr int64_t kGpuBlockElements = 8192;
// Rows of a column one thread adds in a column block: 256 keeps the strips' partials (4 bytes
// per column per 256 rows) under 1% of bf16 params and a column block's reads bounded.
constexpr int64_t kGpuStripRowsPerThread = 256;
// The most elements any block reads in one pass: a column block's kGpuThreads x
// kGpuStripRowsPerThread (64 x 256 threads x 16 bytes of fp32); row blocks read at most twice
// kGpuBlockElements.
constexpr int64_t kGpuMaxBlockElements = kGpuThreads * kGpuStripRowsPerThread;
constexpr int kGpuMatricesPerMeanBlock = kGpuThreads / 32;  // a warp per matrix
// Rows of at least this many columns take a warp each in the row passes; shorter ones a thread.
constexpr int64_t kGpuWarpRowCols = 64;

// One tensor's blocks in each launch and the geometry they share.
struct AdafactorGpuTensor {
  int64_t matrices = 0;         // factored: stacked matrices of rows x cols
  int64_t rows_per_block = 0;   // row blocks: rows (factored) or elements (unfactored) per block
  int64_t row_blocks = 0;
  // Segment mode (factored, long rows): row blocks = matrices x rows x segments, each one segment
  // of segment_cols columns (the last may be shorter) of one row. 0 in rows mode.
  int64_t segments = 0;
  int64_t segment_cols = 0;
  int64_t row_partial_offset = -1;  // floats of row-segment partials (segments > 1)
  int64_t row_combine_blocks = 0;   // segments > 1 only: a thread per row
  int64_t rows_per_strip = 0;   // column blocks (factored only)
  int64_t strips = 0;
  int64_t column_lanes = 0;     // threads per column (a power of two; 1 when columns fill the block)
  int64_t columns_per_block = 0;  // over matrices x cols
  int64_t column_tiles = 0;     // column blocks = strips x column_tiles
  int64_t combine_lanes = 0;    // threads per column in the combine (strips > 1)
  int64_t columns_per_combine = 0;
  int64_t combine_blocks = 0;   // strips > 1 only
  int64_t mean_blocks = 0;      // rows > 1 only
  int64_t partial_offset = -1;  // floats of column partials (strips > 1)
  int64_t mean_offset = -1;     // floats of row means (rows > 1)
};

struct AdafactorGpuPlan {
  std::vector<AdafactorGpuTensor> tensors;
  // The first block of each tensor in each launch (n + 1 entries: the last is the launch's size).
  std::vector<int64_t> row_first, column_first, combine_first, mean_first, row_combine_first;
  int64_t column_partial_floats = 0;
  int64_t row_partial_floats = 0;
  int64_t row_mean_floats = 0;
  // The most elements of g (or of partials) one block of any launch reads; see the note.
  int64_t max_block_elements = 0;

  int64_t row_blocks() const { return row_first.back(); }
  int64_t column_blocks() const { return column_first.back(); }
  int64_t combine_blocks() const { return combine_first.back(); }
  int64_t mean_blocks() const { return mean_first.back(); }
  int64_t row_combine_blocks() const { return row_combine_first.back(); }
  // Bytes of the per-step workspace: p^2 and U^2 partials (double) per row block, column and
  // row-segment partials, row means, and alpha and the update scale per tensor.
  int64_t workspace_bytes() const {
    return 16 * row_blocks() + 4 * (column_partial_floats + row_partial_floats + row_mean_floats) +
           8 * static_cast<int64_t>(tensors.size());
  }
};

AdafactorGpuPlan plan_adafactor_gpu(const std::vector<AdafactorShape>& shapes);

}  // namespace dldna_fused

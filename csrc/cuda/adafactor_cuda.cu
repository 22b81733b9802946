// dldna_fused::fused_adafactor_ on CUDA: the passes of [Note: AdaFactor passes]
// (common/adafactor_math.h) as five kernels over all tensors of a call, with no host sync.
//
// Work is cut as on the CPU (common/adafactor_args.h: units of whole rows, here at most kMaxRows of
// them) and each unit of a factored tensor further into column tiles of kTileCols: block
// (unit, tile) = grid (x, y). Every partial sum (per block: sum p^2, sum U^2, the row sums of its
// tile; per unit: the column sums) has its own slot in one workspace buffer and is combined by
// the finalize kernels in a fixed order, so results do not depend on scheduling. The step
// counters are read by the first two kernels (t = step + 1) and incremented by the fourth.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/adafactor_args.h"
#include "common/adafactor_math.h"
#include "cuda/unscaled_grads.h"

namespace dldna_fused::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRows = 32;                 // rows per unit: one register each for row sums
constexpr int kColsPerThread = 4;
constexpr int kTileCols = kThreads * kColsPerThread;
constexpr int64_t kUnitElements = 32768;     // unfactored units, and the rows-per-unit target

struct TensorDesc {
  void* param;
  const void* grad;
  float* row;     // factored: matrices x rows
  float* col;     // factored: matrices x cols
  float* sq;      // unfactored
  float* exp_avg; // nullptr without a first moment
  float* rms;
  float* step;
  int64_t numel;
  int64_t rows;   // 0 when unfactored
  int64_t cols;
  int64_t rows_per_unit;
  int64_t units_per_matrix;
  int64_t unit_begin;
  int64_t unit_end;
  int64_t tiles;  // column tiles per unit (1 when unfactored)
  int64_t matrix_offset;  // into the per-matrix mean(R) buffer
  int64_t column_offset;  // into the rsqrt(C) buffer
};

struct UnitDesc {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t col_offset;
};

// Where each kind of partial result lives in the workspace (float offsets).
struct Workspace {
  float* p2;            // [unit][tile]
  float* u2;            // [unit][tile]
  float* row_partials;  // [unit][tile][kMaxRows]
  float* col_partials;  // per unit, cols floats at UnitDesc::col_offset
  float* row_mean;      // per matrix
  float* col_rsqrt;     // per matrix and column
  float* alpha;         // per tensor
  float* scale;         // per tensor
};

struct Args {
  const TensorDesc* tensors;
  const UnitDesc* units;
  Workspace ws;
  int64_t max_tiles;  // gridDim.y
  AdafactorOptions options;
  float eps1;
  const float* grad_scale;  // nullptr without GradScaler
  const float* found_inf;
};

__device__ __forceinline__ bool skipped(const Args& a) {
  return a.found_inf != nullptr && *a.found_inf != 0.f;
}

__device__ __forceinline__ float inv_grad_scale(const Args& a) {
  return a.grad_scale != nullptr ? 1.f / *a.grad_scale : 1.f;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// The block's sum of v, valid in thread 0. Ends with a barrier, so it can be called in a row.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  v = warp_sum(v);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = v;
  }
  __syncthreads();
  float total = 0.f;
  if (warp == 0) {
    total = warp_sum(lane < kThreads / 32 ? warp_sums[lane] : 0.f);
  }
  __syncthreads();
  return total;
}

__device__ __forceinline__ size_t slot(const Args& a, int64_t unit) {
  return static_cast<size_t>(unit * a.max_tiles + blockIdx.y);
}

// Rows [first_row, first_row + rows) and the block's column tile of a factored unit.
struct FactoredTile {
  int64_t first_row;  // row index within the tensor (over all matrices)
  int rows;
  int64_t col_begin;
  int64_t col_end;
  __device__ FactoredTile(const TensorDesc& t, const UnitDesc& u) {
    first_row = u.begin / t.cols;
    rows = static_cast<int>((u.end - u.begin) / t.cols);
    col_begin = static_cast<int64_t>(blockIdx.y) * kTileCols;
    col_end = min(t.cols, col_begin + kTileCols);
  }
};

// ---- Pass 1 ----------------------------------------------------------------------------------

template <typename P>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const int64_t k = blockIdx.x;
  const UnitDesc u = a.units[k];
  const TensorDesc& t = a.tensors[u.tensor];
  if (blockIdx.y >= t.tiles) {
    return;
  }
  const float inv = inv_grad_scale(a);
  const auto* grad = static_cast<const P*>(t.grad);
  const auto* param = static_cast<const P*>(t.param);
  const AdafactorDecay decay = adafactor_decay(a.options, static_cast<double>(*t.step) + 1.0);
  float p2 = 0.f;
  if (t.rows == 0) {
    float u2 = 0.f;
    for (int64_t i = u.begin + threadIdx.x; i < u.end; i += kThreads) {
      const float g = static_cast<float>(grad[i]) * inv;
      const float v = adafactor_ema(t.sq[i], adafactor_g2(g, a.eps1), decay);
      t.sq[i] = v;
      const float update = g * (1.f / sqrtf(v));
      u2 += update * update;
      const float p = static_cast<float>(param[i]);
      p2 += p * p;
    }
    p2 = block_sum(p2);
    u2 = block_sum(u2);
    if (threadIdx.x == 0) {
      a.ws.p2[slot(a, k)] = p2;
      a.ws.u2[slot(a, k)] = u2;
    }
    return;
  }
  const FactoredTile tile(t, u);
  float row_sums[kMaxRows];
  float col_sums[kColsPerThread] = {};
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    row_sums[r] = 0.f;
    if (r < tile.rows) {
      const int64_t row_offset = (tile.first_row + r) * t.cols;
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        const int64_t c = tile.col_begin + threadIdx.x + j * kThreads;
        if (c < tile.col_end) {
          const float x = adafactor_g2(static_cast<float>(grad[row_offset + c]) * inv, a.eps1);
          row_sums[r] += x;
          col_sums[j] += x;
          const float p = static_cast<float>(param[row_offset + c]);
          p2 += p * p;
        }
      }
    }
  }
  float* col_partials = a.ws.col_partials + u.col_offset;
#pragma unroll
  for (int j = 0; j < kColsPerThread; ++j) {
    const int64_t c = tile.col_begin + threadIdx.x + j * kThreads;
    if (c < tile.col_end) {
      col_partials[c] = col_sums[j];
    }
  }
  float* row_partials = a.ws.row_partials + slot(a, k) * kMaxRows;
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r < tile.rows) {
      const float s = block_sum(row_sums[r]);
      if (threadIdx.x == 0) {
        row_partials[r] = s;
      }
    }
  }
  p2 = block_sum(p2);
  if (threadIdx.x == 0) {
    a.ws.p2[slot(a, k)] = p2;
  }
}

// ---- Finalize 1: one block per tensor ----------------------------------------------------------

// Tensor t's total of a per-block partial (p2 or u2) over its units and tiles, in thread 0.
__device__ float tensor_sum(const Args& a, const TensorDesc& t, const float* partials) {
  float sum = 0.f;
  for (int64_t k = t.unit_begin + threadIdx.x; k < t.unit_end; k += kThreads) {
    for (int64_t y = 0; y < t.tiles; ++y) {
      sum += partials[k * a.max_tiles + y];
    }
  }
  return block_sum(sum);
}

__global__ void __launch_bounds__(kThreads) finalize_statistics_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const int64_t i = blockIdx.x;
  const TensorDesc& t = a.tensors[i];
  const double step = static_cast<double>(*t.step) + 1.0;
  const float p2 = tensor_sum(a, t, a.ws.p2);
  if (threadIdx.x == 0) {
    const double rms_p = adafactor_rms(p2, t.numel);
    a.ws.alpha[i] = static_cast<float>(adafactor_alpha(a.options, step, rms_p));
    *t.rms = static_cast<float>(rms_p);
  }
  if (t.rows == 0 || t.numel == 0) {
    return;
  }
  const AdafactorDecay decay = adafactor_decay(a.options, step);
  const int64_t matrices = t.numel / (t.rows * t.cols);
  // R's EMA: a row's sum is spread over the column tiles of its unit.
  for (int64_t row = threadIdx.x; row < matrices * t.rows; row += kThreads) {
    const int64_t b = row / t.rows;
    const int64_t in_matrix = row % t.rows;
    const int64_t k = t.unit_begin + b * t.units_per_matrix + in_matrix / t.rows_per_unit;
    const int64_t r = in_matrix % t.rows_per_unit;
    float sum = 0.f;
    for (int64_t y = 0; y < t.tiles; ++y) {
      sum += a.ws.row_partials[(k * a.max_tiles + y) * kMaxRows + r];
    }
    t.row[row] = adafactor_ema(t.row[row], sum / static_cast<float>(t.cols), decay);
  }
  // C's EMA and rsqrt(C): a column's sum is spread over the units of its matrix.
  for (int64_t bc = threadIdx.x; bc < matrices * t.cols; bc += kThreads) {
    const int64_t b = bc / t.cols;
    const int64_t c = bc % t.cols;
    const int64_t first = t.unit_begin + b * t.units_per_matrix;
    float sum = 0.f;
    for (int64_t k = first; k < first + t.units_per_matrix; ++k) {
      sum += a.ws.col_partials[a.units[k].col_offset + c];
    }
    const float col = adafactor_ema(t.col[bc], sum / static_cast<float>(t.rows), decay);
    t.col[bc] = col;
    a.ws.col_rsqrt[t.column_offset + bc] = 1.f / sqrtf(col);
  }
  __syncthreads();  // every row of R is final
  for (int64_t b = threadIdx.x; b < matrices; b += kThreads) {
    double sum = 0.0;
    for (int64_t r = 0; r < t.rows; ++r) {
      sum += t.row[b * t.rows + r];
    }
    a.ws.row_mean[t.matrix_offset + b] = static_cast<float>(sum / static_cast<double>(t.rows));
  }
}

// ---- Pass 2 (factored): sum U^2 ---------------------------------------------------------------

__device__ __forceinline__ float row_factor(const Args& a, const TensorDesc& t, int64_t row) {
  return 1.f / sqrtf(t.row[row] / a.ws.row_mean[t.matrix_offset + row / t.rows]);
}

template <typename P>
__global__ void __launch_bounds__(kThreads) update_norm_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const int64_t k = blockIdx.x;
  const UnitDesc u = a.units[k];
  const TensorDesc& t = a.tensors[u.tensor];
  if (t.rows == 0 || blockIdx.y >= t.tiles) {
    return;
  }
  const float inv = inv_grad_scale(a);
  const auto* grad = static_cast<const P*>(t.grad);
  const FactoredTile tile(t, u);
  float u2 = 0.f;
  for (int r = 0; r < tile.rows; ++r) {
    const int64_t row = tile.first_row + r;
    const float rf = row_factor(a, t, row);
    const float* col_rsqrt = a.ws.col_rsqrt + t.column_offset + (row / t.rows) * t.cols;
    for (int64_t c = tile.col_begin + threadIdx.x; c < tile.col_end; c += kThreads) {
      const float update = static_cast<float>(grad[row * t.cols + c]) * inv * (rf * col_rsqrt[c]);
      u2 += update * update;
    }
  }
  u2 = block_sum(u2);
  if (threadIdx.x == 0) {
    a.ws.u2[slot(a, k)] = u2;
  }
}

// ---- Finalize 2: the clip; the steps advance ---------------------------------------------------

__global__ void __launch_bounds__(kThreads) finalize_scale_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const int64_t i = blockIdx.x;
  const TensorDesc& t = a.tensors[i];
  const float u2 = tensor_sum(a, t, a.ws.u2);
  if (threadIdx.x == 0) {
    a.ws.scale[i] = adafactor_update_scale(a.options, a.ws.alpha[i], u2, t.numel);
    *t.step += 1.f;
  }
}

// ---- Pass 3 ------------------------------------------------------------------------------------

template <typename P>
__global__ void __launch_bounds__(kThreads) apply_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const int64_t k = blockIdx.x;
  const UnitDesc u = a.units[k];
  const int64_t i = u.tensor;
  const TensorDesc& t = a.tensors[i];
  if (blockIdx.y >= t.tiles) {
    return;
  }
  const float inv = inv_grad_scale(a);
  const double alpha = a.ws.alpha[i];
  const AdafactorApply c = adafactor_apply_constants(a.options, alpha, a.ws.scale[i]);
  auto* param = static_cast<P*>(t.param);
  const auto* grad = static_cast<const P*>(t.grad);
  auto apply_at = [&](int64_t e, float update) {
    float p = static_cast<float>(param[e]);
    float m = c.use_first_moment ? t.exp_avg[e] : 0.f;
    adafactor_apply(p, update, m, c);
    param[e] = static_cast<P>(p);
    if (c.use_first_moment) {
      t.exp_avg[e] = m;
    }
  };
  if (t.rows == 0) {
    for (int64_t e = u.begin + threadIdx.x; e < u.end; e += kThreads) {
      apply_at(e, static_cast<float>(grad[e]) * inv * (1.f / sqrtf(t.sq[e])));
    }
    return;
  }
  const FactoredTile tile(t, u);
  for (int r = 0; r < tile.rows; ++r) {
    const int64_t row = tile.first_row + r;
    const float rf = row_factor(a, t, row);
    const float* col_rsqrt = a.ws.col_rsqrt + t.column_offset + (row / t.rows) * t.cols;
    for (int64_t col = tile.col_begin + threadIdx.x; col < tile.col_end; col += kThreads) {
      const int64_t e = row * t.cols + col;
      apply_at(e, static_cast<float>(grad[e]) * inv * (rf * col_rsqrt[col]));
    }
  }
}

// ---- Host ---------------------------------------------------------------------------------------

template <typename P>
void launch(const Args& args, int64_t num_units, int64_t num_tensors, bool factored) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 unit_grid(static_cast<unsigned>(num_units), static_cast<unsigned>(args.max_tiles));
  const auto tensor_grid = static_cast<unsigned>(num_tensors);
  if (num_units > 0) {
    reduce_kernel<P><<<unit_grid, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finalize_statistics_kernel<<<tensor_grid, kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (factored && num_units > 0) {
    update_norm_kernel<P><<<unit_grid, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finalize_scale_kernel<<<tensor_grid, kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_units > 0) {
    apply_kernel<P><<<unit_grid, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void fused_adafactor_cuda(at::TensorList params, at::TensorList grads,
                          at::TensorList exp_avg_sq_rows, at::TensorList exp_avg_sq_cols,
                          at::TensorList exp_avg_sqs, at::TensorList exp_avgs, at::TensorList rms,
                          at::TensorList state_steps, std::optional<double> lr, double eps1,
                          double eps2, double clip_threshold, double decay_rate,
                          std::optional<double> beta1, double weight_decay, bool scale_parameter,
                          bool relative_step, bool warmup_init,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf,
                          const std::optional<at::Tensor>& clip_coef) {
  const AdafactorCall call = check_adafactor_call(
      params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs, rms, state_steps, lr,
      eps1, eps2, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter, relative_step,
      warmup_init, grad_scale, found_inf);
  const AdafactorOptions& o = call.options;
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const size_t n = params.size();
  DenseLayout layout({params, grads, exp_avgs, exp_avg_sqs}, {true, false, true, true},
                     /*contiguous=*/call.factored);
  std::vector<AdafactorShape> shapes(n);
  for (size_t i = 0; i < n; ++i) {
    shapes[i] = adafactor_shape(params[i], call.factored);
  }
  const AdafactorPlan plan = plan_adafactor(shapes, kUnitElements, kMaxRows);
  const auto num_units = static_cast<int64_t>(plan.units.size());

  std::vector<TensorDesc> tensors(n);
  int64_t max_tiles = 1;
  for (size_t i = 0; i < n; ++i) {
    TensorDesc& t = tensors[i];
    t = TensorDesc{};
    t.param = layout.get(0, i).data_ptr();
    t.grad = layout.get(1, i).const_data_ptr();
    t.exp_avg = o.use_first_moment ? layout.get(2, i).data_ptr<float>() : nullptr;
    t.rms = rms[i].data_ptr<float>();
    t.step = state_steps[i].data_ptr<float>();
    t.numel = shapes[i].numel;
    t.unit_begin = plan.unit_begin[i];
    t.unit_end = plan.unit_begin[i + 1];
    t.tiles = 1;
    if (call.factored) {
      t.row = exp_avg_sq_rows[i].data_ptr<float>();
      t.col = exp_avg_sq_cols[i].data_ptr<float>();
      t.rows = shapes[i].rows;
      t.cols = shapes[i].cols;
      t.rows_per_unit = plan.rows_per_unit[i];
      t.units_per_matrix = plan.units_per_matrix[i];
      t.tiles = std::max<int64_t>(1, (t.cols + kTileCols - 1) / kTileCols);
      t.matrix_offset = plan.matrix_offset[i];
      t.column_offset = plan.column_offset[i];
      if (t.numel == 0) {
        t.rows = 0;  // nothing to factor: finalize only records RMS and the step
      }
    } else {
      t.sq = layout.get(3, i).data_ptr<float>();
    }
    max_tiles = std::max(max_tiles, t.tiles);
  }
  TORCH_CHECK(max_tiles <= 65535, "dldna_fused::fused_adafactor_: params[i].size(-1) up to ",
              65535 * kTileCols, " is supported on CUDA");
  std::vector<UnitDesc> units(num_units);
  for (int64_t k = 0; k < num_units; ++k) {
    const AdafactorUnit& u = plan.units[k];
    units[k] = {u.tensor, u.begin, u.end, u.col_offset};
  }

  // One device buffer for the descriptors (copied from pinned memory) and one for the workspace.
  const size_t tensor_bytes = n * sizeof(TensorDesc);
  const size_t unit_bytes = units.size() * sizeof(UnitDesc);
  at::Tensor host = at::empty({static_cast<int64_t>(tensor_bytes + unit_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), tensors.data(), tensor_bytes);
  if (unit_bytes > 0) {
    std::memcpy(static_cast<uint8_t*>(host.data_ptr()) + tensor_bytes, units.data(), unit_bytes);
  }
  const at::Tensor descriptors =
      host.to(at::TensorOptions().device(params[0].device()), /*non_blocking=*/true);

  const int64_t slots = num_units * max_tiles;
  const int64_t floats = 2 * slots + slots * kMaxRows + plan.col_partials + plan.num_matrices +
                         plan.num_columns + 2 * static_cast<int64_t>(n);
  const at::Tensor workspace =
      at::empty({floats}, at::TensorOptions().dtype(at::kFloat).device(params[0].device()));
  float* w = workspace.data_ptr<float>();
  Args args{};
  args.tensors = reinterpret_cast<const TensorDesc*>(descriptors.const_data_ptr());
  args.units = reinterpret_cast<const UnitDesc*>(
      static_cast<const uint8_t*>(descriptors.const_data_ptr()) + tensor_bytes);
  args.ws.p2 = w;
  args.ws.u2 = args.ws.p2 + slots;
  args.ws.row_partials = args.ws.u2 + slots;
  args.ws.col_partials = args.ws.row_partials + slots * kMaxRows;
  args.ws.row_mean = args.ws.col_partials + plan.col_partials;
  args.ws.col_rsqrt = args.ws.row_mean + plan.num_matrices;
  args.ws.alpha = args.ws.col_rsqrt + plan.num_columns;
  args.ws.scale = args.ws.alpha + n;
  args.max_tiles = max_tiles;
  args.options = o;
  args.eps1 = static_cast<float>(eps1);
  check_clip_coef("dldna_fused::fused_adafactor_", clip_coef, params[0].device());
  const std::optional<at::Tensor> divisor = gradient_divisor(grad_scale, clip_coef);
  args.grad_scale = divisor.has_value() ? divisor->const_data_ptr<float>() : nullptr;
  args.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;

  switch (call.dtypes.param) {
    case at::kFloat:
      launch<float>(args, num_units, static_cast<int64_t>(n), call.factored);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(args, num_units, static_cast<int64_t>(n), call.factored);
      break;
    case at::kHalf:
      launch<c10::Half>(args, num_units, static_cast<int64_t>(n), call.factored);
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", call.dtypes.param);
  }
  layout.copy_back();
  store_unscaled_grads(grads, grad_scale, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(dldna_fused, CUDA, m) {
  m.impl("fused_adafactor_", &fused_adafactor_cuda);
}

}  // namespace dldna_fused::cuda

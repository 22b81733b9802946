// dldna_fused::fused_adafactor_ on CUDA: the passes of [Note: AdaFactor passes]
// (common/adafactor_math.h) as 1-D launches over per-tensor runs of blocks, cut as
// [Note: AdaFactor on the GPU] (common/adafactor_gpu_plan.h) says, with no host sync. The step
// counters are read by the passes before finalize_scale (t = step + 1), which increments them.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/adafactor_args.h"
#include "common/adafactor_gpu_plan.h"
#include "common/adafactor_math.h"
#include "cuda/param_write.cuh"
#include "cuda/unscaled_grads.h"

namespace dldna_fused::cuda {
namespace {

constexpr int kThreads = kGpuThreads;
constexpr int kWarps = kThreads / 32;

struct TensorDesc {
  void* param;
  const void* grad;
  float* row;      // factored: matrices x rows
  float* col;      // factored: matrices x cols
  float* sq;       // unfactored
  float* exp_avg;  // nullptr without a first moment
  float* rms;
  float* step;
  int64_t numel;
  int64_t rows;  // 0 when unfactored
  int64_t cols;
  AdafactorGpuTensor plan;
  void* comp;   // Kahan summation: the param's compensation ([Note: bf16 param writes])
  int64_t key;  // stochastic rounding: the param's key
};

// The launches' first block per tensor (n + 1 entries each), in one device buffer.
struct Runs {
  const int64_t* row;
  const int64_t* column;
  const int64_t* combine;
  const int64_t* mean;
  const int64_t* row_combine;
};
constexpr int kRunArrays = 5;

struct Workspace {
  double* p2;  // per row block
  double* u2;  // per row block
  float* column_partials;
  float* row_partials;  // per segment of segmented rows (segments > 1)
  float* row_means;
  float* alpha;  // per tensor
  float* scale;  // per tensor
};

struct Args {
  const TensorDesc* tensors;
  int64_t num_tensors;
  Runs runs;
  Workspace ws;
  AdafactorOptions options;
  float eps1;
  const float* grad_scale;  // the divisor (grad_scale / clip_coef), or nullptr
  const float* found_inf;
  RoundMode round_mode;
};

__device__ __forceinline__ bool skipped(const Args& a) {
  return a.found_inf != nullptr && *a.found_inf != 0.f;
}

__device__ __forceinline__ float inv_grad_scale(const Args& a) {
  return a.grad_scale != nullptr ? 1.f / *a.grad_scale : 1.f;
}

// The tensor whose run of `first` holds `block`: the last i with first[i] <= block < first[i + 1].
__device__ __forceinline__ int64_t tensor_of(const int64_t* first, int64_t n, int64_t block) {
  int64_t low = 0, high = n - 1;
  while (low < high) {
    const int64_t mid = (low + high + 1) / 2;
    if (first[mid] <= block) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  return low;  // a tensor with no blocks has first[i] == first[i + 1] and is passed over
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// The block's sum of v (in a fixed order), valid in thread 0; ends with a barrier.
__device__ double block_sum(double v) {
  __shared__ double warp_sums[kWarps];
  v = warp_sum(v);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = v;
  }
  __syncthreads();
  double total = 0.0;
  if (warp == 0) {
    total = warp_sum(lane < kWarps ? warp_sums[lane] : 0.0);
  }
  __syncthreads();
  return total;
}

// The rows [begin, end) of row block `block` of tensor i, and in segment mode the columns
// [col_begin, col_end) of its one row (else all of them).
struct RowBlock {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t segment;
  int64_t col_begin;
  int64_t col_end;
};

__device__ __forceinline__ RowBlock row_block(const Args& a) {
  const int64_t block = blockIdx.x;
  const int64_t i = tensor_of(a.runs.row, a.num_tensors, block);
  const TensorDesc& t = a.tensors[i];
  const int64_t local = block - a.runs.row[i];
  if (t.plan.segments > 0) {
    const int64_t row = local / t.plan.segments;
    const int64_t segment = local % t.plan.segments;
    const int64_t col_begin = segment * t.plan.segment_cols;
    return {i, row, row + 1, segment, col_begin, min(t.cols, col_begin + t.plan.segment_cols)};
  }
  const int64_t total = t.rows > 0 ? t.plan.matrices * t.rows : t.numel;
  const int64_t begin = local * t.plan.rows_per_block;
  return {i, begin, min(total, begin + t.plan.rows_per_block), 0, 0, t.cols};
}

// Calls f(row, first, stride, end, warp) for every row of the block a warp (long rows), a thread
// (short rows) or, in segment mode, all threads own: the owner walks columns first, first +
// stride, ... below end.
template <typename RowFn>
__device__ __forceinline__ void for_owned_rows(const TensorDesc& t, const RowBlock& rb, RowFn&& f) {
  if (t.plan.segments > 0) {
    f(rb.begin, rb.col_begin + static_cast<int64_t>(threadIdx.x), int64_t{kThreads}, rb.col_end, false);
  } else if (t.cols >= kGpuWarpRowCols) {
    for (int64_t row = rb.begin + threadIdx.x / 32; row < rb.end; row += kWarps) {
      f(row, static_cast<int64_t>(threadIdx.x % 32), int64_t{32}, t.cols, true);
    }
  } else {
    for (int64_t row = rb.begin + threadIdx.x; row < rb.end; row += kThreads) {
      f(row, int64_t{0}, int64_t{1}, t.cols, false);
    }
  }
}

// What every row-block kernel starts from: its rows, tensor, 1 / grad scale and data.
template <typename P>
struct RowContext {
  RowBlock rb;
  const TensorDesc& t;
  float inv;
  const P* grad;
  P* param;
  __device__ explicit RowContext(const Args& a)
      : rb(row_block(a)), t(a.tensors[rb.tensor]), inv(inv_grad_scale(a)),
        grad(static_cast<const P*>(t.grad)), param(static_cast<P*>(t.param)) {}
  // The EMA decay of this step (t = step + 1; the counters advance in finalize_scale_kernel).
  __device__ AdafactorDecay decay(const Args& a) const {
    return adafactor_decay(a.options, static_cast<double>(*t.step) + 1.0);
  }
  // How p is read (the passes before finalize_scale_kernel) and, in apply_kernel, after the
  // counters advanced, written.
  __device__ DeviceParamWrite write(const Args& a) const {
    DeviceParamWrite w{a.round_mode, t.comp, 0};
    if (a.round_mode == RoundMode::Stochastic) {
      w.salt = rounding_salt(t.key, *t.step);
    }
    return w;
  }
};

// 1 / sqrt(R / mean(R)) of a global row (one-row matrices: their row is their mean).
__device__ __forceinline__ float row_factor(const Args& a, const TensorDesc& t, int64_t row) {
  const float mean = t.rows == 1 ? t.row[row] : a.ws.row_means[t.plan.mean_offset + row / t.rows];
  return 1.f / sqrtf(t.row[row] / mean);
}

// ---- Pass 1, factored: R's EMA per row and sum p^2 ------------------------------------------------

template <typename P>
__global__ void __launch_bounds__(kThreads) row_pass_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const RowContext<P> ctx(a);
  const auto& [rb, t, inv, grad, param] = ctx;
  const AdafactorDecay decay = ctx.decay(a);
  const DeviceParamWrite w = ctx.write(a);
  float p2 = 0.f;
  float segment_sum = 0.f;
  for_owned_rows(t, rb, [&](int64_t row, int64_t first, int64_t stride, int64_t end, bool warp) {
    const int64_t offset = row * t.cols;
    float sum = 0.f;
    for (int64_t c = first; c < end; c += stride) {
      sum += adafactor_g2(static_cast<float>(grad[offset + c]) * inv, a.eps1);
      const float p = load_param(param, w, offset + c);
      p2 += p * p;
    }
    if (t.plan.segments > 0) {
      segment_sum = sum;  // the block's threads share the row: added below
      return;
    }
    if (warp) {
      sum = warp_sum(sum);
    }
    if (!warp || threadIdx.x % 32 == 0) {
      t.row[row] = adafactor_ema(t.row[row], sum / static_cast<float>(t.cols), decay);
    }
  });
  if (t.plan.segments > 0) {
    // One segment of one row: its sum, in a fixed order; the row's EMA here when it is the only
    // segment, else in combine_rows_kernel, which adds the segments in order.
    const double sum = block_sum(segment_sum);
    if (threadIdx.x == 0) {
      if (t.plan.segments == 1) {
        t.row[rb.begin] = adafactor_ema(t.row[rb.begin], static_cast<float>(sum) / static_cast<float>(t.cols), decay);
      } else {
        a.ws.row_partials[t.plan.row_partial_offset + rb.begin * t.plan.segments + rb.segment] = static_cast<float>(sum);
      }
    }
  }
  const double total = block_sum(p2);
  if (threadIdx.x == 0) {
    a.ws.p2[blockIdx.x] = total;
  }
}

// Where `lanes` threads share a value (thread = lane * per_pass + slot), the sum over lanes of
// their `sum`s in lane order, valid in lane 0. Every thread of the block must call it (barriers).
__device__ __forceinline__ float lane_ordered_sum(float sum, int64_t lanes, int64_t per_pass, int64_t slot,
                                                  int64_t lane, float* lane_sums) {
  if (lanes == 1) {
    return sum;
  }
  lane_sums[threadIdx.x] = sum;
  __syncthreads();
  if (lane == 0) {
    sum = 0.f;
    for (int64_t l = 0; l < lanes; ++l) {
      sum += lane_sums[l * per_pass + slot];
    }
  }
  __syncthreads();
  return sum;
}

// ---- Pass 1, factored: the row sums of segmented rows, added in segment order --------------------

__global__ void __launch_bounds__(kThreads) combine_rows_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const int64_t block = blockIdx.x;
  const int64_t i = tensor_of(a.runs.row_combine, a.num_tensors, block);
  const TensorDesc& t = a.tensors[i];
  const int64_t row = (block - a.runs.row_combine[i]) * kThreads + threadIdx.x;
  if (row >= t.plan.matrices * t.rows) {
    return;
  }
  const AdafactorDecay decay = adafactor_decay(a.options, static_cast<double>(*t.step) + 1.0);
  const float* partials = a.ws.row_partials + t.plan.row_partial_offset + row * t.plan.segments;
  float sum = 0.f;
  for (int64_t s = 0; s < t.plan.segments; ++s) {
    sum += partials[s];
  }
  t.row[row] = adafactor_ema(t.row[row], sum / static_cast<float>(t.cols), decay);
}

// ---- Pass 1, factored: column sums over one strip of rows --------------------------------------

template <typename P>
__global__ void __launch_bounds__(kThreads) column_pass_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const int64_t block = blockIdx.x;
  const int64_t i = tensor_of(a.runs.column, a.num_tensors, block);
  const TensorDesc& t = a.tensors[i];
  const AdafactorGpuTensor& plan = t.plan;
  const int64_t local = block - a.runs.column[i];
  const int64_t strip = local / plan.column_tiles;
  const int64_t columns = plan.matrices * t.cols;
  const int64_t col_begin = (local % plan.column_tiles) * plan.columns_per_block;
  const int64_t col_end = min(columns, col_begin + plan.columns_per_block);
  const int64_t row_begin = strip * plan.rows_per_strip;
  const int64_t row_end = min(t.rows, row_begin + plan.rows_per_strip);
  const float inv = inv_grad_scale(a);
  const auto* grad = static_cast<const P*>(t.grad);
  const AdafactorDecay decay = adafactor_decay(a.options, static_cast<double>(*t.step) + 1.0);
  // `lanes` threads per column (narrow tensors), each adding every lanes-th row; their sums are
  // added in lane order. The loop runs the same passes on every thread, so its barriers are safe.
  const int64_t lanes = plan.column_lanes;
  const int64_t per_pass = kThreads / lanes;
  const int64_t slot = threadIdx.x % per_pass;
  const int64_t lane = threadIdx.x / per_pass;
  __shared__ float lane_sums[kThreads];
  for (int64_t pass_begin = col_begin; pass_begin < col_end; pass_begin += per_pass) {
    const int64_t column = pass_begin + slot;
    float sum = 0.f;
    if (column < col_end) {
      const int64_t matrix = column / t.cols;
      const int64_t base = (matrix * t.rows) * t.cols + column % t.cols;
      for (int64_t r = row_begin + lane; r < row_end; r += lanes) {
        sum += adafactor_g2(static_cast<float>(grad[base + r * t.cols]) * inv, a.eps1);
      }
    }
    sum = lane_ordered_sum(sum, lanes, per_pass, slot, lane, lane_sums);
    if (lane != 0 || column >= col_end) {
      continue;
    }
    if (plan.strips == 1) {
      t.col[column] = adafactor_ema(t.col[column], sum / static_cast<float>(t.rows), decay);
    } else {
      a.ws.column_partials[plan.partial_offset + strip * columns + column] = sum;
    }
  }
}

// The strips' partials of tall matrices: combine_lanes threads per column each add every
// lanes-th strip, in strip order, and their sums are added in lane order.
__global__ void __launch_bounds__(kThreads) combine_columns_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const int64_t block = blockIdx.x;
  const int64_t i = tensor_of(a.runs.combine, a.num_tensors, block);
  const TensorDesc& t = a.tensors[i];
  const AdafactorGpuTensor& plan = t.plan;
  const int64_t columns = plan.matrices * t.cols;
  const int64_t begin = (block - a.runs.combine[i]) * plan.columns_per_combine;
  const int64_t end = min(columns, begin + plan.columns_per_combine);
  const AdafactorDecay decay = adafactor_decay(a.options, static_cast<double>(*t.step) + 1.0);
  const int64_t lanes = plan.combine_lanes;
  const int64_t per_pass = kThreads / lanes;
  const int64_t slot = threadIdx.x % per_pass;
  const int64_t lane = threadIdx.x / per_pass;
  __shared__ float lane_sums[kThreads];
  for (int64_t pass_begin = begin; pass_begin < end; pass_begin += per_pass) {
    const int64_t column = pass_begin + slot;
    float sum = 0.f;
    if (column < end) {
      for (int64_t s = lane; s < plan.strips; s += lanes) {
        sum += a.ws.column_partials[plan.partial_offset + s * columns + column];
      }
    }
    sum = lane_ordered_sum(sum, lanes, per_pass, slot, lane, lane_sums);
    if (lane == 0 && column < end) {
      t.col[column] = adafactor_ema(t.col[column], sum / static_cast<float>(t.rows), decay);
    }
  }
}

// mean(R) per matrix of more than one row, a warp per matrix, in double. After row_pass_kernel.
__global__ void __launch_bounds__(kThreads) row_means_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const int64_t block = blockIdx.x;
  const int64_t i = tensor_of(a.runs.mean, a.num_tensors, block);
  const TensorDesc& t = a.tensors[i];
  const int64_t matrix = (block - a.runs.mean[i]) * kGpuMatricesPerMeanBlock + threadIdx.x / 32;
  if (matrix >= t.plan.matrices) {
    return;
  }
  double sum = 0.0;
  for (int64_t r = threadIdx.x % 32; r < t.rows; r += 32) {
    sum += t.row[matrix * t.rows + r];
  }
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) {
    a.ws.row_means[t.plan.mean_offset + matrix] = static_cast<float>(sum / static_cast<double>(t.rows));
  }
}

// ---- Pass 1, unfactored: V's EMA, sum U^2 and sum p^2 -------------------------------------------

template <typename P>
__global__ void __launch_bounds__(kThreads) unfactored_pass_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const RowContext<P> ctx(a);
  const auto& [rb, t, inv, grad, param] = ctx;
  const AdafactorDecay decay = ctx.decay(a);
  const DeviceParamWrite w = ctx.write(a);
  float p2 = 0.f, u2 = 0.f;
  for (int64_t e = rb.begin + threadIdx.x; e < rb.end; e += kThreads) {
    const float g = static_cast<float>(grad[e]) * inv;
    const float v = adafactor_ema(t.sq[e], adafactor_g2(g, a.eps1), decay);
    t.sq[e] = v;
    const float update = g * (1.f / sqrtf(v));
    u2 += update * update;
    const float p = load_param(param, w, e);
    p2 += p * p;
  }
  const double p2_total = block_sum(p2);
  const double u2_total = block_sum(u2);
  if (threadIdx.x == 0) {
    a.ws.p2[blockIdx.x] = p2_total;
    a.ws.u2[blockIdx.x] = u2_total;
  }
}

// ---- Finalize: alpha (RMS of p), then the update scale; a block per tensor -----------------------

// Tensor i's total of a per-row-block partial, in thread 0.
__device__ double tensor_total(const Args& a, int64_t i, const double* partials) {
  double sum = 0.0;
  for (int64_t b = a.runs.row[i] + threadIdx.x; b < a.runs.row[i + 1]; b += kThreads) {
    sum += partials[b];
  }
  return block_sum(sum);
}

__global__ void __launch_bounds__(kThreads) finalize_alpha_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const int64_t i = blockIdx.x;
  const TensorDesc& t = a.tensors[i];
  const double p2 = tensor_total(a, i, a.ws.p2);
  if (threadIdx.x == 0) {
    const double rms_p = adafactor_rms(p2, t.numel);
    a.ws.alpha[i] = static_cast<float>(adafactor_alpha(a.options, static_cast<double>(*t.step) + 1.0, rms_p));
    *t.rms = static_cast<float>(rms_p);
  }
}

// ---- Pass 2, factored: sum U^2 -----------------------------------------------------------------

template <typename P>
__global__ void __launch_bounds__(kThreads) update_norm_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const RowContext<P> ctx(a);
  const auto& [rb, t, inv, grad, param] = ctx;
  float u2 = 0.f;
  for_owned_rows(t, rb, [&](int64_t row, int64_t first, int64_t stride, int64_t end, bool) {
    const float rf = row_factor(a, t, row);
    const float* col = t.col + (row / t.rows) * t.cols;
    for (int64_t c = first; c < end; c += stride) {
      const float update = static_cast<float>(grad[row * t.cols + c]) * inv * (rf * (1.f / sqrtf(col[c])));
      u2 += update * update;
    }
  });
  const double total = block_sum(u2);
  if (threadIdx.x == 0) {
    a.ws.u2[blockIdx.x] = total;
  }
}

__global__ void __launch_bounds__(kThreads) finalize_scale_kernel(const Args a) {
  if (skipped(a)) {
    return;
  }
  const int64_t i = blockIdx.x;
  const TensorDesc& t = a.tensors[i];
  const double u2 = tensor_total(a, i, a.ws.u2);
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
  const RowContext<P> ctx(a);
  const auto& [rb, t, inv, grad, param] = ctx;
  const AdafactorApply c = adafactor_apply_constants(a.options, a.ws.alpha[rb.tensor], a.ws.scale[rb.tensor]);
  const DeviceParamWrite w = ctx.write(a);
  auto apply_at = [&](int64_t e, float update) {
    float p = load_param(param, w, e);
    float m = c.use_first_moment ? t.exp_avg[e] : 0.f;
    adafactor_apply(p, update, m, c);
    store_param(param, w, e, p);
    if (c.use_first_moment) {
      t.exp_avg[e] = m;
    }
  };
  if (t.rows == 0) {
    for (int64_t e = rb.begin + threadIdx.x; e < rb.end; e += kThreads) {
      apply_at(e, static_cast<float>(grad[e]) * inv * (1.f / sqrtf(t.sq[e])));
    }
    return;
  }
  for_owned_rows(t, rb, [&](int64_t row, int64_t first, int64_t stride, int64_t end, bool) {
    const float rf = row_factor(a, t, row);
    const float* col = t.col + (row / t.rows) * t.cols;
    for (int64_t cc = first; cc < end; cc += stride) {
      const int64_t e = row * t.cols + cc;
      apply_at(e, static_cast<float>(grad[e]) * inv * (rf * (1.f / sqrtf(col[cc]))));
    }
  });
}

// ---- Host ---------------------------------------------------------------------------------------

template <typename Kernel>
void launch_over(Kernel kernel, int64_t blocks, const Args& args, cudaStream_t stream) {
  if (blocks > 0) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename P>
void launch(const Args& args, const AdafactorGpuPlan& plan, bool factored) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tensors = args.num_tensors;
  if (factored) {
    launch_over(row_pass_kernel<P>, plan.row_blocks(), args, stream);
    launch_over(combine_rows_kernel, plan.row_combine_blocks(), args, stream);
    launch_over(column_pass_kernel<P>, plan.column_blocks(), args, stream);
    launch_over(combine_columns_kernel, plan.combine_blocks(), args, stream);
    launch_over(row_means_kernel, plan.mean_blocks(), args, stream);
    launch_over(finalize_alpha_kernel, tensors, args, stream);
    launch_over(update_norm_kernel<P>, plan.row_blocks(), args, stream);
  } else {
    launch_over(unfactored_pass_kernel<P>, plan.row_blocks(), args, stream);
    launch_over(finalize_alpha_kernel, tensors, args, stream);
  }
  launch_over(finalize_scale_kernel, tensors, args, stream);
  launch_over(apply_kernel<P>, plan.row_blocks(), args, stream);
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
  const c10::cuda::CUDAGuard guard(params[0].device());
  const size_t n = params.size();
  // Rounding other than to nearest numbers elements in row-major order ([Note: bf16 param writes]).
  DenseLayout layout({params, grads, exp_avgs, exp_avg_sqs, comps_or_none(mode, kahan_comps)},
                     {true, false, true, true, true},
                     /*contiguous=*/call.factored || mode != RoundMode::Nearest);
  std::vector<AdafactorShape> shapes(n);
  for (size_t i = 0; i < n; ++i) {
    shapes[i] = adafactor_shape(params[i], call.factored);
  }
  const AdafactorGpuPlan plan = plan_adafactor_gpu(shapes);

  std::vector<TensorDesc> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    TensorDesc& t = tensors[i];
    t = TensorDesc{};
    t.param = layout.get(0, i).data_ptr();
    t.grad = layout.get(1, i).const_data_ptr();
    t.exp_avg = o.use_first_moment ? layout.get(2, i).data_ptr<float>() : nullptr;
    t.rms = rms[i].data_ptr<float>();
    t.step = state_steps[i].data_ptr<float>();
    t.numel = shapes[i].numel;
    t.plan = plan.tensors[i];
    t.comp = mode == RoundMode::Kahan ? layout.get(4, i).data_ptr() : nullptr;
    t.key = mode == RoundMode::Stochastic ? (*sr_keys)[i] : 0;
    if (call.factored) {
      t.row = exp_avg_sq_rows[i].data_ptr<float>();
      t.col = exp_avg_sq_cols[i].data_ptr<float>();
      // A zero-size tensor has no blocks: the finalize kernels only record its RMS and step.
      t.rows = t.numel == 0 ? 0 : shapes[i].rows;
      t.cols = shapes[i].cols;
    } else {
      t.sq = layout.get(3, i).data_ptr<float>();
    }
  }

  // The descriptors and the runs in one pinned host buffer, copied to the device at once.
  const size_t tensor_bytes = n * sizeof(TensorDesc);
  const size_t run_bytes = (n + 1) * sizeof(int64_t);
  at::Tensor host = at::empty({static_cast<int64_t>(tensor_bytes + kRunArrays * run_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* bytes = static_cast<uint8_t*>(host.data_ptr());
  std::memcpy(bytes, tensors.data(), tensor_bytes);
  const std::vector<int64_t>* runs[kRunArrays] = {&plan.row_first, &plan.column_first, &plan.combine_first,
                                                  &plan.mean_first, &plan.row_combine_first};
  for (int k = 0; k < kRunArrays; ++k) {
    std::memcpy(bytes + tensor_bytes + k * run_bytes, runs[k]->data(), run_bytes);
  }
  const at::Tensor descriptors = host.to(at::TensorOptions().device(params[0].device()), /*non_blocking=*/true);
  const auto* device_bytes = static_cast<const uint8_t*>(descriptors.const_data_ptr());

  // The workspace: doubles first (8-byte aligned), then floats.
  const at::Tensor workspace = at::empty({plan.workspace_bytes()},
                                         at::TensorOptions().dtype(at::kByte).device(params[0].device()));
  auto* w = static_cast<uint8_t*>(workspace.data_ptr());
  Args args{};
  args.tensors = reinterpret_cast<const TensorDesc*>(device_bytes);
  args.num_tensors = static_cast<int64_t>(n);
  args.runs.row = reinterpret_cast<const int64_t*>(device_bytes + tensor_bytes);
  args.runs.column = args.runs.row + (n + 1);
  args.runs.combine = args.runs.column + (n + 1);
  args.runs.mean = args.runs.combine + (n + 1);
  args.runs.row_combine = args.runs.mean + (n + 1);
  args.ws.p2 = reinterpret_cast<double*>(w);
  args.ws.u2 = args.ws.p2 + plan.row_blocks();
  args.ws.column_partials = reinterpret_cast<float*>(args.ws.u2 + plan.row_blocks());
  args.ws.row_partials = args.ws.column_partials + plan.column_partial_floats;
  args.ws.row_means = args.ws.row_partials + plan.row_partial_floats;
  args.ws.alpha = args.ws.row_means + plan.row_mean_floats;
  args.ws.scale = args.ws.alpha + n;
  args.options = o;
  args.eps1 = static_cast<float>(eps1);
  check_clip_coef("dldna_fused::fused_adafactor_", clip_coef, params[0].device());
  const std::optional<at::Tensor> divisor = gradient_divisor(grad_scale, clip_coef);
  args.grad_scale = divisor.has_value() ? divisor->const_data_ptr<float>() : nullptr;
  args.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  args.round_mode = mode;

  switch (call.dtypes.param) {
    case at::kFloat:
      launch<float>(args, plan, call.factored);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(args, plan, call.factored);
      break;
    case at::kHalf:
      launch<c10::Half>(args, plan, call.factored);
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

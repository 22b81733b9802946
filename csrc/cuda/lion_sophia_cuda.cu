// dldna_fused::fused_lion_, fused_sophia_ and fused_sophia_hessian_ on CUDA: functors for the
// multi-tensor launcher (cuda/multi_tensor_apply.cuh) and the host entry points.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common/lion_math.h"
#include "common/lion_sophia_args.h"
#include "common/sophia_math.h"
#include "cuda/multi_tensor_apply.cuh"

namespace dldna_fused::cuda {
namespace {

// Arguments every functor here reads on the device: the rule's coefficients, except the
// GradScaler scale, which stays a device pointer so nothing is read on the host.
template <typename Coefficients>
struct DeviceArgs {
  Coefficients coefficients;
  const float* grad_scale;  // nullptr without GradScaler
  const float* found_inf;
  RoundMode round_mode = RoundMode::Nearest;  // [Note: bf16 param writes]
};

template <typename Coefficients>
__device__ __forceinline__ bool skipped(const DeviceArgs<Coefficients>& a) {
  return a.found_inf != nullptr && *a.found_inf != 0.f;
}

template <typename Coefficients>
__device__ __forceinline__ Coefficients scaled(const DeviceArgs<Coefficients>& a) {
  Coefficients c = a.coefficients;
  if (a.grad_scale != nullptr) {
    c.inv_grad_scale = 1.f / *a.grad_scale;
  }
  return c;
}

// The chunk of this block: [begin, end) of tensor `tensor`.
template <int kDepth>
struct BlockChunk {
  int tensor;
  int64_t begin;
  int64_t end;
  __device__ explicit BlockChunk(const TensorListMetadata<kDepth>& meta) {
    tensor = meta.block_to_tensor[blockIdx.x];
    begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    end = min(meta.numel[tensor], begin + kChunkSize);
  }
};

template <typename P, typename S>
struct LionFunctor {
  static constexpr int kIlp = 16 / sizeof(P);

  __device__ __forceinline__ void operator()(const TensorListMetadata<3>& meta,
                                             const DeviceArgs<LionCoefficients>& a) const {
    if (skipped(a)) {
      return;
    }
    const LionCoefficients c = scaled(a);
    const BlockChunk<3> chunk(meta);
    auto* param = static_cast<P*>(meta.addresses[0][chunk.tensor]);
    const auto* grad = static_cast<const P*>(meta.addresses[1][chunk.tensor]);
    auto* exp_avg = static_cast<S*>(meta.addresses[2][chunk.tensor]);
    const DeviceParamWrite w = param_write(meta, chunk.tensor, a.round_mode);
    int64_t i = chunk.begin;
    // The vector path writes to nearest; the other modes take the per-element one.
    if (a.round_mode == RoundMode::Nearest && is_pack_aligned<kIlp>(param + i) &&
        is_pack_aligned<kIlp>(grad + i) && is_pack_aligned<kIlp>(exp_avg + i)) {
      const int64_t vector_end = i + (chunk.end - i) / kIlp * kIlp;
      for (int64_t j = i + static_cast<int64_t>(threadIdx.x) * kIlp; j < vector_end;
           j += static_cast<int64_t>(blockDim.x) * kIlp) {
        float p[kIlp], g[kIlp], m[kIlp];
        load_ilp<kIlp>(param + j, p);
        load_ilp<kIlp>(grad + j, g);
        load_ilp<kIlp>(exp_avg + j, m);
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          lion_update(p[k], g[k], m[k], c);
        }
        store_ilp<kIlp>(param + j, p);
        store_ilp<kIlp>(exp_avg + j, m);
      }
      i = vector_end;
    }
    for (int64_t j = i + threadIdx.x; j < chunk.end; j += blockDim.x) {
      float p = load_param(param, w, j);
      float m = static_cast<float>(exp_avg[j]);
      lion_update(p, static_cast<float>(grad[j]), m, c);
      store_param(param, w, j, p);
      exp_avg[j] = static_cast<S>(m);
    }
  }
};

// Adds the block's count to *total with one atomic (warp shuffles, then shared memory).
__device__ __forceinline__ void block_add(unsigned long long count, unsigned long long* total) {
  __shared__ unsigned long long warp_sums[kBlockSize / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    count += __shfl_down_sync(0xffffffffu, count, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = count;
  }
  __syncthreads();
  if (warp == 0) {
    count = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0ull;
    for (int offset = 16; offset > 0; offset /= 2) {
      count += __shfl_down_sync(0xffffffffu, count, offset);
    }
    if (lane == 0 && count != 0) {
      atomicAdd(total, count);
    }
  }
}

struct SophiaDeviceArgs {
  DeviceArgs<SophiaCoefficients> base;
  unsigned long long* unclipped;  // nullptr: not counted
};

template <typename P, typename S>
struct SophiaFunctor {
  static constexpr int kIlp = 16 / sizeof(P);

  __device__ __forceinline__ void operator()(const TensorListMetadata<4>& meta,
                                             const SophiaDeviceArgs& a) const {
    if (skipped(a.base)) {
      return;
    }
    const SophiaCoefficients c = scaled(a.base);
    const BlockChunk<4> chunk(meta);
    auto* param = static_cast<P*>(meta.addresses[0][chunk.tensor]);
    const auto* grad = static_cast<const P*>(meta.addresses[1][chunk.tensor]);
    auto* exp_avg = static_cast<S*>(meta.addresses[2][chunk.tensor]);
    const auto* hessian = static_cast<const S*>(meta.addresses[3][chunk.tensor]);
    const DeviceParamWrite w = param_write(meta, chunk.tensor, a.base.round_mode);
    unsigned long long unclipped = 0;
    int64_t i = chunk.begin;
    if (a.base.round_mode == RoundMode::Nearest && is_pack_aligned<kIlp>(param + i) &&
        is_pack_aligned<kIlp>(grad + i) && is_pack_aligned<kIlp>(exp_avg + i) &&
        is_pack_aligned<kIlp>(hessian + i)) {
      const int64_t vector_end = i + (chunk.end - i) / kIlp * kIlp;
      for (int64_t j = i + static_cast<int64_t>(threadIdx.x) * kIlp; j < vector_end;
           j += static_cast<int64_t>(blockDim.x) * kIlp) {
        float p[kIlp], g[kIlp], m[kIlp], h[kIlp];
        load_ilp<kIlp>(param + j, p);
        load_ilp<kIlp>(grad + j, g);
        load_ilp<kIlp>(exp_avg + j, m);
        load_ilp<kIlp>(hessian + j, h);
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          unclipped += sophia_update(p[k], g[k], m[k], h[k], c) < 1.f;
        }
        store_ilp<kIlp>(param + j, p);
        store_ilp<kIlp>(exp_avg + j, m);
      }
      i = vector_end;
    }
    for (int64_t j = i + threadIdx.x; j < chunk.end; j += blockDim.x) {
      float p = load_param(param, w, j);
      float m = static_cast<float>(exp_avg[j]);
      unclipped += sophia_update(p, static_cast<float>(grad[j]), m,
                                 static_cast<float>(hessian[j]), c) < 1.f;
      store_param(param, w, j, p);
      exp_avg[j] = static_cast<S>(m);
    }
    if (a.unclipped != nullptr) {
      block_add(unclipped, a.unclipped);
    }
  }
};

// E: the estimates' storage (the params' dtype), H: the hessians' (the state dtype).
template <typename E, typename H>
struct SophiaHessianFunctor {
  static constexpr int kIlp = 16 / sizeof(E);

  __device__ __forceinline__ void operator()(const TensorListMetadata<2>& meta,
                                             const DeviceArgs<SophiaHessianCoefficients>& a) const {
    if (skipped(a)) {
      return;
    }
    const SophiaHessianCoefficients c = scaled(a);
    const BlockChunk<2> chunk(meta);
    const auto* estimate = static_cast<const E*>(meta.addresses[0][chunk.tensor]);
    auto* hessian = static_cast<H*>(meta.addresses[1][chunk.tensor]);
    int64_t i = chunk.begin;
    if (is_pack_aligned<kIlp>(estimate + i) && is_pack_aligned<kIlp>(hessian + i)) {
      const int64_t vector_end = i + (chunk.end - i) / kIlp * kIlp;
      for (int64_t j = i + static_cast<int64_t>(threadIdx.x) * kIlp; j < vector_end;
           j += static_cast<int64_t>(blockDim.x) * kIlp) {
        float x[kIlp], h[kIlp];
        load_ilp<kIlp>(estimate + j, x);
        load_ilp<kIlp>(hessian + j, h);
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          sophia_hessian_update(h[k], x[k], c);
        }
        store_ilp<kIlp>(hessian + j, h);
      }
      i = vector_end;
    }
    for (int64_t j = i + threadIdx.x; j < chunk.end; j += blockDim.x) {
      float h = static_cast<float>(hessian[j]);
      sophia_hessian_update(h, static_cast<float>(estimate[j]), c);
      hessian[j] = static_cast<H>(h);
    }
  }
};

// Calls f(P{}, S{}) with the storage types of a call's (param, state) dtypes.
template <typename F>
void dispatch_param_state(const CallDtypes& dtypes, F&& f) {
  const bool fp32_state = dtypes.state == at::kFloat;
  switch (dtypes.param) {
    case at::kFloat:
      return f(float{}, float{});
    case at::kBFloat16:
      return fp32_state ? f(c10::BFloat16{}, float{}) : f(c10::BFloat16{}, c10::BFloat16{});
    case at::kHalf:
      return fp32_state ? f(c10::Half{}, float{}) : f(c10::Half{}, c10::Half{});
    default:
      TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", dtypes.param);
  }
}

const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

std::vector<std::vector<at::Tensor>> dense_lists(const DenseLayout& layout, size_t count) {
  std::vector<std::vector<at::Tensor>> lists;
  for (size_t k = 0; k < count; ++k) {
    lists.push_back(layout.list(k));
  }
  return lists;
}

void fused_lion_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList state_steps, double lr, double beta1, double beta2,
                     double weight_decay, bool maximize,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& clip_coef,
                     std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  const CallDtypes dtypes = check_lion_args(params, grads, exp_avgs, state_steps, lr, beta1, beta2,
                                            weight_decay, grad_scale, found_inf);
  const RoundMode mode = check_param_writes("dldna_fused::fused_lion_", params, kahan_comps, sr_keys);
  if (params.empty()) {
    return;
  }
  check_clip_coef("dldna_fused::fused_lion_", clip_coef, params[0].device());
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  DenseLayout layout({params, grads, exp_avgs, comps_or_none(mode, kahan_comps)}, {true, false, true, true},
                     mode != RoundMode::Nearest);
  const std::optional<at::Tensor> divisor = gradient_divisor(grad_scale, clip_coef);
  const DeviceArgs<LionCoefficients> args{
      lion_coefficients(lr, beta1, beta2, weight_decay, 1.f, maximize), optional_ptr(divisor),
      optional_ptr(found_inf), mode};
  const auto lists = dense_lists(layout, 3);
  const std::vector<at::Tensor> steps(state_steps.begin(), state_steps.end());  // read for the salt
  const ParamWriteLists writes = param_write_lists(layout, 3, mode, sr_keys);
  dispatch_param_state(dtypes, [&](auto p_tag, auto s_tag) {
    multi_tensor_apply_writes<3>(lists, steps, writes, LionFunctor<decltype(p_tag), decltype(s_tag)>{}, args);
  });
  increment_state_steps(std::vector<at::Tensor>(state_steps.begin(), state_steps.end()),
                        args.found_inf);
  layout.copy_back();
  store_unscaled_grads(grads, grad_scale, found_inf);
}

void fused_sophia_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList hessians, at::TensorList state_steps, double lr,
                       double beta1, double rho, double bs, double weight_decay, bool maximize,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& unclipped,
                       const std::optional<at::Tensor>& clip_coef,
                       std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  const CallDtypes dtypes =
      check_sophia_args(params, grads, exp_avgs, hessians, state_steps, lr, beta1, rho, bs,
                        weight_decay, grad_scale, found_inf, unclipped);
  const RoundMode mode = check_param_writes("dldna_fused::fused_sophia_", params, kahan_comps, sr_keys);
  if (params.empty()) {
    return;
  }
  check_clip_coef("dldna_fused::fused_sophia_", clip_coef, params[0].device());
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  DenseLayout layout({params, grads, exp_avgs, hessians, comps_or_none(mode, kahan_comps)},
                     {true, false, true, false, true}, mode != RoundMode::Nearest);
  const std::optional<at::Tensor> divisor = gradient_divisor(grad_scale, clip_coef);
  // int64 and unsigned long long share a representation, so atomicAdd of counts is exact.
  const SophiaDeviceArgs args{
      {sophia_coefficients(lr, beta1, rho, bs, weight_decay, 1.f, maximize),
       optional_ptr(divisor), optional_ptr(found_inf), mode},
      unclipped.has_value()
          ? reinterpret_cast<unsigned long long*>(unclipped->data_ptr<int64_t>())
          : nullptr};
  const auto lists = dense_lists(layout, 4);
  const std::vector<at::Tensor> steps(state_steps.begin(), state_steps.end());  // read for the salt
  const ParamWriteLists writes = param_write_lists(layout, 4, mode, sr_keys);
  dispatch_param_state(dtypes, [&](auto p_tag, auto s_tag) {
    multi_tensor_apply_writes<4>(lists, steps, writes, SophiaFunctor<decltype(p_tag), decltype(s_tag)>{}, args);
  });
  increment_state_steps(std::vector<at::Tensor>(state_steps.begin(), state_steps.end()),
                        args.base.found_inf);
  layout.copy_back();
  store_unscaled_grads(grads, grad_scale, found_inf);
}

void fused_sophia_hessian_cuda(at::TensorList hessians, at::TensorList estimates, double beta2,
                               bool square, const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf) {
  const CallDtypes dtypes =
      check_sophia_hessian_args(hessians, estimates, beta2, grad_scale, found_inf);
  if (hessians.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(estimates[0].device());
  DenseLayout layout({estimates, hessians}, {false, true});
  const DeviceArgs<SophiaHessianCoefficients> args{
      {static_cast<float>(beta2), static_cast<float>(1.0 - beta2), 1.f, square},
      optional_ptr(grad_scale), optional_ptr(found_inf)};
  const auto lists = dense_lists(layout, 2);
  dispatch_param_state(dtypes, [&](auto e_tag, auto h_tag) {
    multi_tensor_apply<2>(lists, {},
                          SophiaHessianFunctor<decltype(e_tag), decltype(h_tag)>{}, args);
  });
  layout.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(dldna_fused, CUDA, m) {
  m.impl("fused_lion_", &fused_lion_cuda);
  m.impl("fused_sophia_", &fused_sophia_cuda);
  m.impl("fused_sophia_hessian_", &fused_sophia_hessian_cuda);
}

}  // namespace dldna_fused::cuda

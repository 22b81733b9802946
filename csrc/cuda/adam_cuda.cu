// dldna_fused::fused_adam_ on CUDA: the Adam functor for the multi-tensor launcher, and the host
// entry point registered for the CUDA dispatch key.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common/adam_args.h"
#include "common/adam_math.h"
#include "cuda/device_lr.h"
#include "cuda/multi_tensor_apply.cuh"

namespace dldna_fused::cuda {
namespace {

// Hyperparameters stay double until adam_coefficients rounds the derived constants once.
struct AdamDeviceArgs {
  DeviceHyperparameters h;
  const float* grad_scale;  // nullptr without GradScaler
  const float* found_inf;
  RoundMode round_mode;     // [Note: bf16 param writes]
};

// P: param and grad storage, S: state storage; both computed in fp32.
template <typename P, typename S, bool kAmsgrad>
struct AdamFunctor {
  static constexpr int kDepth = kAmsgrad ? 5 : 4;
  static constexpr int kIlp = 16 / sizeof(P);  // one 16-byte access of the param per step

  __device__ __forceinline__ void operator()(const TensorListMetadata<kDepth>& meta,
                                             const AdamDeviceArgs& a) const {
    if (a.found_inf != nullptr && *a.found_inf != 0.f) {
      return;
    }
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(meta.numel[tensor], begin + kChunkSize);
    auto* param = static_cast<P*>(meta.addresses[0][tensor]);
    const auto* grad = static_cast<const P*>(meta.addresses[1][tensor]);
    auto* exp_avg = static_cast<S*>(meta.addresses[2][tensor]);
    auto* exp_avg_sq = static_cast<S*>(meta.addresses[3][tensor]);
    S* max_exp_avg_sq = kAmsgrad ? static_cast<S*>(meta.addresses[kDepth - 1][tensor]) : nullptr;

    // The counter is incremented after this launch (increment_state_steps), so step t is old + 1.
    const double step = static_cast<double>(*meta.state_steps[tensor]) + 1.0;
    const AdamCoefficients c = adam_coefficients(
        a.h.learning_rate(), a.h.beta1, a.h.beta2, a.h.weight_decay, a.h.eps, step,
        a.grad_scale != nullptr ? 1.f / *a.grad_scale : 1.f, kAmsgrad, a.h.maximize,
        a.h.decoupled_weight_decay);

    const DeviceParamWrite w = param_write(meta, tensor, a.round_mode);
    int64_t i = begin;
    // The vector path writes to nearest; the other modes take the per-element one.
    const bool aligned = a.round_mode == RoundMode::Nearest && is_pack_aligned<kIlp>(param + begin) &&
                         is_pack_aligned<kIlp>(grad + begin) &&
                         is_pack_aligned<kIlp>(exp_avg + begin) &&
                         is_pack_aligned<kIlp>(exp_avg_sq + begin) &&
                         (!kAmsgrad || is_pack_aligned<kIlp>(max_exp_avg_sq + begin));
    if (aligned) {
      const int64_t vector_end = begin + (end - begin) / kIlp * kIlp;
      for (int64_t j = begin + static_cast<int64_t>(threadIdx.x) * kIlp; j < vector_end;
           j += static_cast<int64_t>(blockDim.x) * kIlp) {
        float p[kIlp], g[kIlp], m[kIlp], v[kIlp], v_max[kIlp];
        load_ilp<kIlp>(param + j, p);
        load_ilp<kIlp>(grad + j, g);
        load_ilp<kIlp>(exp_avg + j, m);
        load_ilp<kIlp>(exp_avg_sq + j, v);
        if constexpr (kAmsgrad) {
          load_ilp<kIlp>(max_exp_avg_sq + j, v_max);
        }
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          adam_update(p[k], g[k], m[k], v[k], v_max[k], c);
        }
        store_ilp<kIlp>(param + j, p);
        store_ilp<kIlp>(exp_avg + j, m);
        store_ilp<kIlp>(exp_avg_sq + j, v);
        if constexpr (kAmsgrad) {
          store_ilp<kIlp>(max_exp_avg_sq + j, v_max);
        }
      }
      i = vector_end;
    }
    // Unaligned chunks (views at odd offsets), the tail, and stochastic or Kahan writes: one
    // element per thread, coalesced.
    for (int64_t j = i + threadIdx.x; j < end; j += blockDim.x) {
      float p = load_param(param, w, j);
      float m = static_cast<float>(exp_avg[j]);
      float v = static_cast<float>(exp_avg_sq[j]);
      float v_max = kAmsgrad ? static_cast<float>(max_exp_avg_sq[j]) : 0.f;
      adam_update(p, static_cast<float>(grad[j]), m, v, v_max, c);
      store_param(param, w, j, p);
      exp_avg[j] = static_cast<S>(m);
      exp_avg_sq[j] = static_cast<S>(v);
      if constexpr (kAmsgrad) {
        max_exp_avg_sq[j] = static_cast<S>(v_max);
      }
    }
  }
};

template <typename P, typename S>
void launch_adam(const std::vector<std::vector<at::Tensor>>& lists,
                 const std::vector<at::Tensor>& steps, const ParamWriteLists& writes, bool amsgrad,
                 const AdamDeviceArgs& args) {
  if (amsgrad) {
    multi_tensor_apply_writes<5>(lists, steps, writes, AdamFunctor<P, S, true>{}, args);
  } else {
    multi_tensor_apply_writes<4>(lists, steps, writes, AdamFunctor<P, S, false>{}, args);
  }
}

void fused_adam_cuda_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                          at::TensorList state_steps, double lr, const at::Tensor* lr_tensor,
                          const AdamHyperparameters& hp,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf,
                          const std::optional<at::Tensor>& clip_coef,
                          const std::optional<at::TensorList>& kahan_comps,
                          at::OptionalIntArrayRef sr_keys) {
  constexpr const char* op = "dldna_fused::fused_adam_";
  const CallDtypes dtypes = check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                            state_steps, hp, grad_scale, found_inf);
  const RoundMode mode = check_param_writes(op, params, kahan_comps, sr_keys);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const DeviceLr device_lr_value = device_lr(op, lr, lr_tensor, params[0].device());
  AdamDeviceArgs args{};
  args.h = device_hyperparameters(device_lr_value, hp);
  check_clip_coef(op, clip_coef, params[0].device());
  const std::optional<at::Tensor> divisor = gradient_divisor(grad_scale, clip_coef);
  args.grad_scale = divisor.has_value() ? divisor->const_data_ptr<float>() : nullptr;
  args.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  args.round_mode = mode;

  std::vector<at::TensorList> originals{params, grads, exp_avgs, exp_avg_sqs};
  if (hp.amsgrad) {
    originals.push_back(max_exp_avg_sqs);
  }
  const size_t depth = originals.size();
  originals.push_back(comps_or_none(mode, kahan_comps));
  std::vector<bool> written(originals.size(), true);
  written[1] = false;  // grads are read only
  // Rounding other than to nearest numbers elements in row-major order ([Note: bf16 param writes]).
  DenseLayout layout(originals, written, mode != RoundMode::Nearest);
  std::vector<std::vector<at::Tensor>> lists;
  for (size_t k = 0; k < depth; ++k) {
    lists.push_back(layout.list(k));
  }
  const ParamWriteLists writes = param_write_lists(layout, depth, mode, sr_keys);
  const std::vector<at::Tensor> steps(state_steps.begin(), state_steps.end());

  const auto p = dtypes.param;
  const bool fp32_state = dtypes.state == at::kFloat;
  if (p == at::kFloat) {
    launch_adam<float, float>(lists, steps, writes, hp.amsgrad, args);
  } else if (p == at::kBFloat16) {
    fp32_state ? launch_adam<c10::BFloat16, float>(lists, steps, writes, hp.amsgrad, args)
               : launch_adam<c10::BFloat16, c10::BFloat16>(lists, steps, writes, hp.amsgrad, args);
  } else {
    fp32_state ? launch_adam<c10::Half, float>(lists, steps, writes, hp.amsgrad, args)
               : launch_adam<c10::Half, c10::Half>(lists, steps, writes, hp.amsgrad, args);
  }
  increment_state_steps(steps, args.found_inf);
  layout.copy_back();
  store_unscaled_grads(grads, grad_scale, found_inf);
}

void fused_adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList state_steps, double lr, double beta1, double beta2,
                     double weight_decay, double eps, bool amsgrad, bool maximize,
                     bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& clip_coef,
                     std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  fused_adam_cuda_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                       nullptr,
                       {beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay},
                       grad_scale, found_inf, clip_coef, kahan_comps, sr_keys);
}

void fused_adam_cuda_tensor_lr(at::TensorList params, at::TensorList grads,
                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                               at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                               const at::Tensor& lr, double beta1, double beta2,
                               double weight_decay, double eps, bool amsgrad, bool maximize,
                               bool decoupled_weight_decay,
                               const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf,
                               const std::optional<at::Tensor>& clip_coef,
                               std::optional<at::TensorList> kahan_comps,
                               at::OptionalIntArrayRef sr_keys) {
  fused_adam_cuda_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, 0.0, &lr,
                       {beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay},
                       grad_scale, found_inf, clip_coef, kahan_comps, sr_keys);
}

}  // namespace
}  // namespace dldna_fused::cuda

TORCH_LIBRARY_IMPL(dldna_fused, CUDA, m) {
  m.impl("fused_adam_", &dldna_fused::cuda::fused_adam_cuda);
  m.impl("fused_adam_.tensor_lr", &dldna_fused::cuda::fused_adam_cuda_tensor_lr);
}

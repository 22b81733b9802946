#include "cuda/multi_tensor_apply.cuh"

#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/div.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/where.h>

namespace dldna_fused::cuda {
namespace {

constexpr int kMaxStepsPerLaunch = 2048;

struct StepList {
  float* steps[kMaxStepsPerLaunch];
  int count;
};

__global__ void increment_state_steps_kernel(const __grid_constant__ StepList list,
                                             const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.f) {
    return;
  }
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < list.count) {
    *list.steps[i] += 1.f;
  }
}

}  // namespace

void increment_state_steps(const std::vector<at::Tensor>& state_steps, const float* found_inf) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  for (size_t begin = 0; begin < state_steps.size(); begin += kMaxStepsPerLaunch) {
    StepList list{};
    list.count = static_cast<int>(std::min<size_t>(kMaxStepsPerLaunch, state_steps.size() - begin));
    for (int k = 0; k < list.count; ++k) {
      list.steps[k] = state_steps[begin + k].data_ptr<float>();
    }
    const int blocks = (list.count + kThreads - 1) / kThreads;
    increment_state_steps_kernel<<<blocks, kThreads, 0, stream>>>(list, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void store_unscaled_grads(at::TensorList grads, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf) {
  if (!grad_scale.has_value() || grads.empty()) {
    return;
  }
  // The foreach Tensor overload takes a 0-dim factor; GradScaler's tensors have one element.
  at::Tensor factor = at::reciprocal(grad_scale->reshape({}));
  if (found_inf.has_value()) {
    factor = at::where(at::ne(found_inf->reshape({}), 0), at::ones_like(factor), factor);
  }
  at::_foreach_mul_(grads, factor);
}

std::optional<at::Tensor> gradient_divisor(const std::optional<at::Tensor>& grad_scale,
                                           const std::optional<at::Tensor>& clip_coef) {
  if (!clip_coef.has_value()) {
    return grad_scale;
  }
  const at::Tensor clip = clip_coef->reshape({1});
  return grad_scale.has_value() ? at::div(grad_scale->reshape({1}), clip) : at::reciprocal(clip);
}

}  // namespace dldna_fused::cuda

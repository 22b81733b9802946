// dldna_fused::fused_grad_norm and fused_scale_ on CUDA: the norm takes one partial per chunk from
// the multi-tensor launcher, then one block adds them up in a fixed order, so it is deterministic
// and never read back to the host.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "common/grad_norm_args.h"
#include "common/opmath.h"
#include "cuda/multi_tensor_apply.cuh"

namespace dldna_fused::cuda {
namespace {

using cpu::NormKind;

// OpMath's max lets NaN through, as torch.linalg.vector_norm(inf) does.
__device__ __forceinline__ float combine(float a, float b, NormKind kind) {
  return kind == NormKind::Inf ? OpMath<float>::max(a, b) : a + b;
}

// Each block reduces its chunk: every thread a fixed stride of elements, then a fixed tree over
// the block, so the same inputs give the same bits.
template <typename T>
struct NormFunctor {
  __device__ __forceinline__ void operator()(const TensorListMetadata<1>& meta, float* partials,
                                             NormKind kind) const {
    __shared__ float shared[kBlockSize];
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(meta.numel[tensor], begin + kChunkSize);
    const auto* x = static_cast<const T*>(meta.addresses[0][tensor]);
    float acc = 0.f;
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
      const float v = static_cast<float>(x[j]);
      acc = kind == NormKind::L2 ? acc + v * v : combine(acc, OpMath<float>::abs(v), kind);
    }
    shared[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) {
        shared[threadIdx.x] = combine(shared[threadIdx.x], shared[threadIdx.x + stride], kind);
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      partials[meta.block_offset + blockIdx.x] = shared[0];
    }
  }
};

// Sums in double; an inf norm's partials are float maxima, combined as floats.
__device__ __forceinline__ double combine_partials(double a, double b, NormKind kind) {
  return kind == NormKind::Inf ? OpMath<float>::max(static_cast<float>(a), static_cast<float>(b)) : a + b;
}

// One block: the partials in double, the root for L2, the division by the scale.
__global__ void __launch_bounds__(kBlockSize)
    finalize_norm_kernel(const float* partials, int64_t count, NormKind kind,
                         const float* grad_scale, float* out) {
  __shared__ double shared[kBlockSize];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const double v = partials[i];
    acc = combine_partials(acc, v, kind);
  }
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shared[threadIdx.x] = combine_partials(shared[threadIdx.x], shared[threadIdx.x + stride], kind);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double norm = kind == NormKind::L2 ? sqrt(shared[0]) : shared[0];
    if (grad_scale != nullptr) {
      norm /= static_cast<double>(*grad_scale);
    }
    *out = static_cast<float>(norm);
  }
}

at::Tensor fused_grad_norm_cuda(at::TensorList tensors, double norm_type,
                                const std::optional<at::Tensor>& grad_scale) {
  const GradNormCall call = check_grad_norm_args(tensors, norm_type, grad_scale);
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  const auto options = at::TensorOptions().dtype(at::kFloat).device(tensors[0].device());
  // Any dense order will do for a norm; other layouts are read through a contiguous copy.
  std::vector<at::Tensor> dense;
  dense.reserve(tensors.size());
  int64_t chunks = 0;
  for (const at::Tensor& t : tensors) {
    dense.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
    chunks += (t.numel() + kChunkSize - 1) / kChunkSize;
  }
  at::Tensor out = at::empty({}, options);
  at::Tensor partials = at::empty({chunks > 0 ? chunks : 1}, options);
  float* partials_ptr = partials.data_ptr<float>();
  const std::vector<std::vector<at::Tensor>> lists{dense};
  switch (call.dtype) {
    case at::kFloat:
      multi_tensor_apply<1>(lists, {}, NormFunctor<float>{}, partials_ptr, call.kind);
      break;
    case at::kBFloat16:
      multi_tensor_apply<1>(lists, {}, NormFunctor<c10::BFloat16>{}, partials_ptr, call.kind);
      break;
    case at::kHalf:
      multi_tensor_apply<1>(lists, {}, NormFunctor<c10::Half>{}, partials_ptr, call.kind);
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", call.dtype);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  finalize_norm_kernel<<<1, kBlockSize, 0, stream>>>(
      partials_ptr, chunks, call.kind,
      grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr,
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename T>
struct ScaleFunctor {
  __device__ __forceinline__ void operator()(const TensorListMetadata<1>& meta, const float* factor) const {
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(meta.numel[tensor], begin + kChunkSize);
    auto* x = static_cast<T*>(meta.addresses[0][tensor]);
    const float f = *factor;
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
      x[j] = static_cast<T>(static_cast<float>(x[j]) * f);
    }
  }
};

void fused_scale_cuda(at::TensorList tensors, const at::Tensor& factor) {
  const at::ScalarType dtype = check_scale_args(tensors, factor);
  if (tensors.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  std::vector<at::Tensor> dense;
  for (const at::Tensor& t : tensors) {
    if (t.is_non_overlapping_and_dense()) {
      dense.push_back(t);
    } else {
      t.mul_(factor.reshape({}));  // a strided view: its own op (rare: grads are dense)
    }
  }
  const std::vector<std::vector<at::Tensor>> lists{dense};
  const float* f = factor.const_data_ptr<float>();
  switch (dtype) {
    case at::kFloat:
      multi_tensor_apply<1>(lists, {}, ScaleFunctor<float>{}, f);
      break;
    case at::kBFloat16:
      multi_tensor_apply<1>(lists, {}, ScaleFunctor<c10::BFloat16>{}, f);
      break;
    case at::kHalf:
      multi_tensor_apply<1>(lists, {}, ScaleFunctor<c10::Half>{}, f);
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", dtype);
  }
}

}  // namespace
}  // namespace dldna_fused::cuda

TORCH_LIBRARY_IMPL(dldna_fused, CUDA, m) {
  m.impl("fused_grad_norm", &dldna_fused::cuda::fused_grad_norm_cuda);
  m.impl("fused_scale_", &dldna_fused::cuda::fused_scale_cuda);
}

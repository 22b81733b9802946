#pragma once
// The CUDA multi-tensor launcher, written once for every optimizer.
//
// [Note: multi-tensor apply]
// Each thread block works on one chunk of kChunkSize elements of one tensor. A launch carries, by
// value in its kernel arguments, the base pointers of up to kMaxTensors tensors (one per list:
// param, grad, states), their element counts and step counters, and a map from block to
// (tensor, chunk). Lists that need more tensors or blocks than one launch holds are split over
// several launches; a tensor cut between two launches continues in the next one. Zero-size tensors
// take no block and no slot. Sizes and offsets are 64-bit, so tensors over 2^31 elements work.
// CUDA 12.1 raised the kernel-argument limit from 4 KiB to 32764 bytes on every architecture CUDA
// 13 supports. The tensor slots take what the block map and the functor's own arguments leave
// (kFunctorArgBytes; none uses 200 bytes, so large tables go to constant memory instead): 407
// tensors per Adam launch, so a 2000-tensor step takes 5 launches instead of 10. Each slot also
// carries the tensor's Kahan compensation and stochastic-rounding key ([Note: bf16 param writes]
// in common/rounding_math.h), unused (null, 0) by launches without them.
// multi_tensor_apply checks the total at compile time.
// The launcher never reads device memory on the host, so a step can be captured in a CUDA graph.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>

#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/rounding_math.h"
#include "cuda/param_write.cuh"
#include "cuda/unscaled_grads.h"

static_assert(CUDA_VERSION >= 12010, "dldna_fused needs CUDA 12.1+ (32 KiB kernel arguments)");

namespace dldna_fused::cuda {

constexpr int kBlockSize = 512;
constexpr int64_t kChunkSize = 65536;
constexpr int kMaxBlocks = 1024;

constexpr int kMaxKernelArgBytes = 32764;
constexpr int kFunctorArgBytes = 512;

template <int kDepth>
struct TensorListMetadata {
  // The block map and block_offset, then one slot per tensor: kDepth addresses, numel, step,
  // compensation and key.
  static constexpr int kFixedBytes = kMaxBlocks * (sizeof(uint16_t) + sizeof(int32_t)) + sizeof(int64_t);
  static constexpr int kMaxTensors =
      (kMaxKernelArgBytes - kFunctorArgBytes - kFixedBytes) / (8 * kDepth + 32);
  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  float* state_steps[kMaxTensors];  // nullptr for optimizers without step counters
  void* comps[kMaxTensors];         // the param's Kahan compensation, or nullptr
  int64_t keys[kMaxTensors];        // the param's stochastic-rounding key, or 0
  uint16_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
  // Blocks of the same call in earlier launches: block_offset + blockIdx.x numbers the chunks of
  // all tensors in order (reductions write one partial per chunk there).
  int64_t block_offset;
};
static_assert(TensorListMetadata<6>::kMaxTensors < 65536, "block_to_tensor is 16-bit");

template <typename Metadata, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_apply_kernel(const __grid_constant__ Metadata metadata, Functor functor,
                              Args... args) {
  functor(metadata, args...);
}

// How the params of a launch are written: per tensor, its Kahan compensation or its
// stochastic-rounding key (either list may be empty).
struct ParamWriteLists {
  std::vector<at::Tensor> comps;
  std::vector<int64_t> keys;
};

// A launch's ParamWriteLists: the compensations (list k of `layout`) under Kahan summation, the
// keys under stochastic rounding.
inline ParamWriteLists param_write_lists(const DenseLayout& layout, size_t k, RoundMode mode,
                                         at::OptionalIntArrayRef sr_keys) {
  ParamWriteLists writes;
  if (mode == RoundMode::Kahan) {
    writes.comps = layout.list(k);
  } else if (mode == RoundMode::Stochastic) {
    writes.keys.assign(sr_keys->begin(), sr_keys->end());
  }
  return writes;
}

// Launches `functor(metadata, args...)` over every chunk of every tensor of `lists` (all lists the
// same length, list k's tensors at metadata.addresses[k]). `state_steps` may be empty.
template <int kDepth, typename Functor, typename... Args>
void multi_tensor_apply_writes(const std::vector<std::vector<at::Tensor>>& lists,
                               const std::vector<at::Tensor>& state_steps, const ParamWriteLists& writes,
                               Functor functor, Args... args) {
  TORCH_INTERNAL_ASSERT(lists.size() == kDepth);
  using Metadata = TensorListMetadata<kDepth>;
  static_assert(sizeof(Metadata) + sizeof(Functor) + (sizeof(Args) + ... + 0) <= kMaxKernelArgBytes,
                "kernel arguments over CUDA's 32764-byte limit: raise kFunctorArgBytes");
  const size_t n = lists[0].size();
  size_t last = n;  // the last non-empty tensor: its final chunk closes the last launch
  for (size_t i = 0; i < n; ++i) {
    if (lists[0][i].numel() > 0) {
      last = i;
    }
  }
  if (last == n) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Metadata metadata{};
  int tensors = 0;
  int blocks = 0;
  int64_t launched = 0;
  for (size_t i = 0; i <= last; ++i) {
    const int64_t numel = lists[0][i].numel();
    if (numel == 0) {
      continue;
    }
    for (int k = 0; k < kDepth; ++k) {
      metadata.addresses[k][tensors] = lists[k][i].data_ptr();
    }
    metadata.numel[tensors] = numel;
    metadata.state_steps[tensors] = state_steps.empty() ? nullptr : state_steps[i].data_ptr<float>();
    metadata.comps[tensors] = writes.comps.empty() ? nullptr : writes.comps[i].data_ptr();
    metadata.keys[tensors] = writes.keys.empty() ? 0 : writes.keys[i];
    ++tensors;
    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      metadata.block_to_tensor[blocks] = static_cast<uint16_t>(tensors - 1);
      metadata.block_to_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      const bool tensor_done = chunk == chunks - 1;
      if (blocks == kMaxBlocks || (tensor_done && tensors == Metadata::kMaxTensors) ||
          (tensor_done && i == last)) {
        metadata.block_offset = launched;
        multi_tensor_apply_kernel<<<blocks, kBlockSize, 0, stream>>>(metadata, functor, args...);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launched += blocks;
        blocks = 0;
        if (tensor_done) {
          tensors = 0;
        } else {
          // The current tensor continues in the next launch, in slot 0.
          for (int k = 0; k < kDepth; ++k) {
            metadata.addresses[k][0] = metadata.addresses[k][tensors - 1];
          }
          metadata.numel[0] = metadata.numel[tensors - 1];
          metadata.state_steps[0] = metadata.state_steps[tensors - 1];
          metadata.comps[0] = metadata.comps[tensors - 1];
          metadata.keys[0] = metadata.keys[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
}

template <int kDepth, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists,
                        const std::vector<at::Tensor>& state_steps, Functor functor, Args... args) {
  multi_tensor_apply_writes<kDepth>(lists, state_steps, ParamWriteLists{}, functor, args...);
}

// Adds 1 to every step counter unless *found_inf is nonzero. Run after the update kernels, which
// read the old value and use old + 1: a block cannot increment a counter that other blocks of the
// same tensor still read.
void increment_state_steps(const std::vector<at::Tensor>& state_steps, const float* found_inf);

// ---- Loads and stores in fp32 registers, ILP elements per thread -------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T per (at most) 16-byte access.
template <typename T, int kIlp>
__host__ __device__ constexpr int pack_size() {
  return (16 / static_cast<int>(sizeof(T))) < kIlp ? 16 / static_cast<int>(sizeof(T)) : kIlp;
}

template <int kIlp, typename T>
__device__ __forceinline__ bool is_pack_aligned(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * pack_size<T, kIlp>()) == 0;
}

template <int kIlp, typename T>
__device__ __forceinline__ void load_ilp(const T* src, float (&dst)[kIlp]) {
  constexpr int kPack = pack_size<T, kIlp>();
#pragma unroll
  for (int j = 0; j < kIlp; j += kPack) {
    const Pack<T, kPack> pack = *reinterpret_cast<const Pack<T, kPack>*>(src + j);
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      dst[j + k] = static_cast<float>(pack.v[k]);
    }
  }
}

template <int kIlp, typename T>
__device__ __forceinline__ void store_ilp(T* dst, const float (&src)[kIlp]) {
  constexpr int kPack = pack_size<T, kIlp>();
#pragma unroll
  for (int j = 0; j < kIlp; j += kPack) {
    Pack<T, kPack> pack;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      pack.v[k] = static_cast<T>(src[j + k]);
    }
    *reinterpret_cast<Pack<T, kPack>*>(dst + j) = pack;
  }
}

// ---- Param writes ([Note: bf16 param writes] in common/rounding_math.h) --------------------------

// Tensor `tensor`'s write: its salt is drawn from its key and its step count after this step
// (the counters are incremented after the launch, so old + 1).
template <int kDepth>
__device__ __forceinline__ DeviceParamWrite param_write(const TensorListMetadata<kDepth>& meta, int tensor,
                                                       RoundMode mode) {
  DeviceParamWrite w{mode, meta.comps[tensor], 0};
  if (mode == RoundMode::Stochastic) {
    w.salt = rounding_salt(meta.keys[tensor], *meta.state_steps[tensor] + 1.f);
  }
  return w;
}

}  // namespace dldna_fused::cuda

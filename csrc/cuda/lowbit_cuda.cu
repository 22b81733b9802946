// The low-bit ops on CUDA ([Note: blockwise quantized states] in common/quantization.h): Adam and
// Lion functors for the multi-tensor launcher, and quantize/dequantize_blockwise.
//
// One warp per quantization block: the lanes run the update rule over the block twice, first for
// the new absmax (a warp max), then again, bit for bit the same, to write the param and the codes
// quantized with it. Recomputing costs reads that hit L1 and keeps no block in registers, so every
// block size works. Each lane takes pairs of elements, so a 4-bit byte has one writer. The maps
// and midpoints sit in shared memory; the nearest code is a binary search over the midpoints,
// which is the rule the CPU's lookup table implements.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <mutex>
#include <tuple>

#include "common/adam_args.h"
#include "common/adam_math.h"
#include "common/lion_math.h"
#include "common/lowbit_args.h"
#include "common/quantization.h"
#include "cuda/device_lr.h"
#include "cuda/multi_tensor_apply.cuh"

namespace dldna_fused::cuda {
namespace {

constexpr int kWarps = kBlockSize / 32;
static_assert(kChunkSize % kMaxQuantBlock == 0, "chunks must hold whole quantization blocks");

// A map as the device holds it (in kMaps); each thread block copies the ones it uses into shared
// memory.
struct DeviceMap {
  int num_codes;
  float low;  // -1 (signed) or 0
  float values[kMaxCodes];
  float midpoints[kMaxCodes - 1];
};

DeviceMap device_map(int64_t bits, bool is_signed) {
  const QuantMap& map = quant_map(static_cast<int>(bits), is_signed);
  DeviceMap out{};
  out.num_codes = map.num_codes;
  out.low = is_signed ? -1.f : 0.f;
  for (int i = 0; i < map.num_codes; ++i) {
    out.values[i] = map.values[i];
  }
  for (int i = 0; i + 1 < map.num_codes; ++i) {
    out.midpoints[i] = map.midpoints[i];
  }
  return out;
}

// The four maps, at map_index(bits, signed), in constant memory: a map passed as a by-value kernel
// argument and indexed per thread would be copied into every thread's local memory.
__constant__ DeviceMap kMaps[4];

int map_index(int64_t bits, bool is_signed) {
  return (bits == 8 ? 2 : 0) + (is_signed ? 1 : 0);
}

// Uploads kMaps to the current device, once per device, on the current stream, and waits for it.
// cudaMemcpyToSymbol runs on the legacy default stream, which torch's side streams (created
// non-blocking: CUDA-graph warm-up, torch.cuda.stream(s)) do not wait for, so the first kernel
// there could read an unfilled map and write wrong codes without a sound. The wait makes every
// later launch, on any stream, see the map. It is a sync, so a step captured in a CUDA graph needs
// one eager step on that device first (as torch's do, for states).
void upload_maps() {
  static std::once_flag uploaded[C10_COMPILE_TIME_MAX_GPUS];
  std::call_once(uploaded[c10::cuda::current_device()], [] {
    const DeviceMap maps[4] = {device_map(4, false), device_map(4, true), device_map(8, false),
                               device_map(8, true)};
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(cudaMemcpyToSymbolAsync(kMaps, maps, sizeof(maps), 0, cudaMemcpyHostToDevice, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  });
}

struct SharedMap {
  float values[kMaxCodes];
  float midpoints[kMaxCodes - 1];
  int num_codes;
  float low;
};

__device__ __forceinline__ void load_map(const DeviceMap& map, SharedMap& shared) {
  for (int i = threadIdx.x; i < map.num_codes; i += blockDim.x) {
    shared.values[i] = map.values[i];
    if (i + 1 < map.num_codes) {
      shared.midpoints[i] = map.midpoints[i];
    }
  }
  if (threadIdx.x == 0) {
    shared.num_codes = map.num_codes;
    shared.low = map.low;
  }
}

// #{ i : midpoints[i] < y } after the NaN and clamp rules of the note.
__device__ __forceinline__ int nearest_code(float y, const SharedMap& map) {
  y = y != y ? 1.f : fminf(fmaxf(y, map.low), 1.f);
  int low = 0, high = map.num_codes - 1;
  while (low < high) {
    const int mid = (low + high) / 2;
    if (map.midpoints[mid] < y) {
      low = mid + 1;
    } else {
      high = mid;
    }
  }
  return low;
}

__device__ __forceinline__ int read_code(const uint8_t* codes, int bits, int64_t i) {
  return bits == 8 ? codes[i] : (codes[i / 2] >> ((i % 2) * 4)) & 15;
}

// Max over the warp, NaN winning as OpMath's max does.
__device__ __forceinline__ float warp_absmax(float value) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value = OpMath<float>::max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

__device__ __forceinline__ float inverse_absmax(float absmax) {
  return absmax > 0.f ? 1.f / absmax : 0.f;
}

// Writes the codes of elements i, i + 1 (i even; i + 1 < n or not).
__device__ __forceinline__ void write_codes(uint8_t* codes, int bits, int64_t i, bool second, int c0, int c1) {
  if (bits == 8) {
    codes[i] = static_cast<uint8_t>(c0);
    if (second) {
      codes[i + 1] = static_cast<uint8_t>(c1);
    }
  } else {
    codes[i / 2] = static_cast<uint8_t>(c0 | (second ? c1 << 4 : 0));
  }
}

struct LowbitDeviceArgs {
  DeviceHyperparameters h;
  bool lion;
  int bits;
  int64_t block_size;
  const float* grad_scale;  // the divisor (grad_scale / clip_coef), or nullptr
  const float* found_inf;
  int exp_avg_map;     // index into kMaps
  int exp_avg_sq_map;  // Adam only
  RoundMode round_mode;  // [Note: bf16 param writes]
};

// kDepth 6 (Adam: p, g, m codes, m absmax, v codes, v absmax) or 4 (Lion: p, g, m codes, absmax).
template <typename P, int kDepth>
struct LowbitFunctor {
  __device__ void operator()(const TensorListMetadata<kDepth>& meta, const LowbitDeviceArgs& a) const {
    if (a.found_inf != nullptr && *a.found_inf != 0.f) {
      return;
    }
    __shared__ SharedMap m_map, v_map;
    load_map(kMaps[a.exp_avg_map], m_map);
    if constexpr (kDepth == 6) {
      load_map(kMaps[a.exp_avg_sq_map], v_map);
    }
    __syncthreads();
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t end = min(meta.numel[tensor], begin + kChunkSize);
    auto* param = static_cast<P*>(meta.addresses[0][tensor]);
    const auto* grad = static_cast<const P*>(meta.addresses[1][tensor]);
    auto* m_codes = static_cast<uint8_t*>(meta.addresses[2][tensor]);
    auto* m_absmax = static_cast<float*>(meta.addresses[3][tensor]);
    uint8_t* v_codes = kDepth == 6 ? static_cast<uint8_t*>(meta.addresses[4][tensor]) : nullptr;
    float* v_absmax = kDepth == 6 ? static_cast<float*>(meta.addresses[5][tensor]) : nullptr;
    const float factor = a.grad_scale != nullptr ? 1.f / *a.grad_scale : 1.f;
    const DeviceParamWrite w = param_write(meta, tensor, a.round_mode);
    const DeviceHyperparameters& h = a.h;
    AdamCoefficients adam{};
    LionCoefficients lion{};
    if (a.lion) {
      lion = lion_coefficients(h.learning_rate(), h.beta1, h.beta2, h.weight_decay, factor, h.maximize);
    } else {
      const double step = static_cast<double>(*meta.state_steps[tensor]) + 1.0;
      adam = adam_coefficients(h.learning_rate(), h.beta1, h.beta2, h.weight_decay, h.eps, step, factor,
                               false, h.maximize, h.decoupled_weight_decay);
    }
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    // The new p, m, v of element i: the same arithmetic in both passes.
    auto update = [&](int64_t i, float m_scale, float v_scale, float& p, float& m, float& v) {
      p = load_param(param, w, i);
      m = m_map.values[read_code(m_codes, a.bits, i)] * m_scale;
      const float g = static_cast<float>(grad[i]);
      if (a.lion) {
        lion_update(p, g, m, lion);
      } else {
        float unused = 0.f;
        v = v_map.values[read_code(v_codes, a.bits, i)] * v_scale;
        adam_update(p, g, m, v, unused, adam);
      }
    };
    for (int64_t first = begin + warp * a.block_size; first < end; first += kWarps * a.block_size) {
      const int64_t last = min(end, first + a.block_size);
      const int64_t block = first / a.block_size;
      const float m_scale = m_absmax[block];
      const float v_scale = kDepth == 6 ? v_absmax[block] : 0.f;
      float m_max = 0.f, v_max = 0.f;
      for (int64_t i = first + 2 * lane; i < last; i += 64) {
        for (int64_t j = i; j < min(i + 2, last); ++j) {
          float p, m, v = 0.f;
          update(j, m_scale, v_scale, p, m, v);
          m_max = OpMath<float>::max(m_max, OpMath<float>::abs(m));
          v_max = OpMath<float>::max(v_max, OpMath<float>::abs(v));
        }
      }
      m_max = warp_absmax(m_max);
      v_max = warp_absmax(v_max);
      __syncwarp();  // every lane has read the old codes before any writes new ones
      const float m_inverse = inverse_absmax(m_max), v_inverse = inverse_absmax(v_max);
      for (int64_t i = first + 2 * lane; i < last; i += 64) {
        int m_code[2] = {0, 0}, v_code[2] = {0, 0};
        float p_new[2], m_new[2], v_new[2] = {0.f, 0.f};
        const bool second = i + 1 < last;
        for (int k = 0; k < 1 + second; ++k) {
          update(i + k, m_scale, v_scale, p_new[k], m_new[k], v_new[k]);
          m_code[k] = nearest_code(m_new[k] * m_inverse, m_map);
          if constexpr (kDepth == 6) {
            v_code[k] = nearest_code(v_new[k] * v_inverse, v_map);
          }
        }
        for (int k = 0; k < 1 + second; ++k) {
          store_param(param, w, i + k, p_new[k]);
        }
        write_codes(m_codes, a.bits, i, second, m_code[0], m_code[1]);
        if constexpr (kDepth == 6) {
          write_codes(v_codes, a.bits, i, second, v_code[0], v_code[1]);
        }
      }
      if (lane == 0) {
        m_absmax[block] = m_max;
        if constexpr (kDepth == 6) {
          v_absmax[block] = v_max;
        }
      }
    }
  }
};

template <int kDepth>
void launch_lowbit(at::ScalarType dtype, const std::vector<std::vector<at::Tensor>>& lists,
                   const std::vector<at::Tensor>& steps, const ParamWriteLists& writes,
                   const LowbitDeviceArgs& args) {
  if (dtype == at::kFloat) {
    multi_tensor_apply_writes<kDepth>(lists, steps, writes, LowbitFunctor<float, kDepth>{}, args);
  } else if (dtype == at::kBFloat16) {
    multi_tensor_apply_writes<kDepth>(lists, steps, writes, LowbitFunctor<c10::BFloat16, kDepth>{}, args);
  } else {
    multi_tensor_apply_writes<kDepth>(lists, steps, writes, LowbitFunctor<c10::Half, kDepth>{}, args);
  }
}

// The shared part of both ops: layout, GradScaler and clip tensors, launch, step counters.
void run_lowbit(const char* op, at::ScalarType dtype, at::TensorList params, at::TensorList grads,
                const std::vector<at::TensorList>& states, at::TensorList state_steps,
                LowbitDeviceArgs& args, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                RoundMode mode, const std::optional<at::TensorList>& kahan_comps,
                at::OptionalIntArrayRef sr_keys) {
  check_clip_coef(op, clip_coef, params[0].device());
  args.round_mode = mode;
  upload_maps();
  const std::optional<at::Tensor> divisor = gradient_divisor(grad_scale, clip_coef);
  args.grad_scale = divisor.has_value() ? divisor->const_data_ptr<float>() : nullptr;
  args.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  DenseLayout layout({params, grads, comps_or_none(mode, kahan_comps)}, {true, false, true}, /*contiguous=*/true);
  const ParamWriteLists writes = param_write_lists(layout, 2, mode, sr_keys);
  std::vector<std::vector<at::Tensor>> lists{layout.list(0), layout.list(1)};
  for (const at::TensorList& state : states) {
    lists.emplace_back(state.begin(), state.end());
  }
  const std::vector<at::Tensor> steps(state_steps.begin(), state_steps.end());
  if (lists.size() == 6) {
    launch_lowbit<6>(dtype, lists, steps, writes, args);
  } else {
    launch_lowbit<4>(dtype, lists, steps, writes, args);
  }
  increment_state_steps(steps, args.found_inf);
  layout.copy_back();
  store_unscaled_grads(grads, grad_scale, found_inf);
}

void fused_adam_lowbit_cuda_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sqs,
                                 at::TensorList exp_avg_sq_absmaxes, at::TensorList state_steps,
                                 double lr, const at::Tensor* lr_tensor, const AdamHyperparameters& hp,
                                 int64_t bits, int64_t block_size,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf,
                                 const std::optional<at::Tensor>& clip_coef,
                                 const std::optional<at::TensorList>& kahan_comps,
                                 at::OptionalIntArrayRef sr_keys) {
  constexpr const char* op = "dldna_fused::fused_adam_lowbit_";
  const at::ScalarType dtype =
      check_adam_lowbit_args(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes,
                             state_steps, hp, bits, block_size, grad_scale, found_inf);
  const RoundMode mode = check_param_writes(op, params, kahan_comps, sr_keys);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const DeviceLr device_lr_value = device_lr(op, lr, lr_tensor, params[0].device());
  LowbitDeviceArgs args{};
  args.h = device_hyperparameters(device_lr_value, hp);
  args.bits = static_cast<int>(bits);
  args.block_size = block_size;
  args.exp_avg_map = map_index(bits, true);
  args.exp_avg_sq_map = map_index(bits, false);
  run_lowbit(op, dtype, params, grads, {exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes},
             state_steps, args, grad_scale, found_inf, clip_coef, mode, kahan_comps, sr_keys);
}

void fused_adam_lowbit_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sqs,
                            at::TensorList exp_avg_sq_absmaxes, at::TensorList state_steps, double lr,
                            double beta1, double beta2, double weight_decay, double eps, bool maximize,
                            bool decoupled_weight_decay, int64_t bits, int64_t block_size,
                            const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf,
                            const std::optional<at::Tensor>& clip_coef,
                            std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  fused_adam_lowbit_cuda_impl(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes,
                              state_steps, lr, nullptr,
                              {beta1, beta2, weight_decay, eps, false, maximize, decoupled_weight_decay},
                              bits, block_size, grad_scale, found_inf, clip_coef, kahan_comps, sr_keys);
}

void fused_adam_lowbit_cuda_tensor_lr(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_absmaxes,
    at::TensorList exp_avg_sqs, at::TensorList exp_avg_sq_absmaxes, at::TensorList state_steps,
    const at::Tensor& lr, double beta1, double beta2, double weight_decay, double eps, bool maximize,
    bool decoupled_weight_decay, int64_t bits, int64_t block_size,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& clip_coef, std::optional<at::TensorList> kahan_comps,
    at::OptionalIntArrayRef sr_keys) {
  fused_adam_lowbit_cuda_impl(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes,
                              state_steps, 0.0, &lr,
                              {beta1, beta2, weight_decay, eps, false, maximize, decoupled_weight_decay},
                              bits, block_size, grad_scale, found_inf, clip_coef, kahan_comps, sr_keys);
}

void fused_lion_lowbit_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_absmaxes, at::TensorList state_steps, double lr,
                            double beta1, double beta2, double weight_decay, bool maximize, int64_t bits,
                            int64_t block_size, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf,
                            const std::optional<at::Tensor>& clip_coef,
                            std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  constexpr const char* op = "dldna_fused::fused_lion_lowbit_";
  const at::ScalarType dtype = check_lion_lowbit_args(params, grads, exp_avgs, exp_avg_absmaxes, state_steps, lr,
                                                      beta1, beta2, weight_decay, bits, block_size, grad_scale,
                                                      found_inf);
  const RoundMode mode = check_param_writes(op, params, kahan_comps, sr_keys);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  LowbitDeviceArgs args{};
  args.h = {lr, nullptr, beta1, beta2, weight_decay, 0.0, maximize, false};
  args.lion = true;
  args.bits = static_cast<int>(bits);
  args.block_size = block_size;
  args.exp_avg_map = map_index(bits, true);
  run_lowbit(op, dtype, params, grads, {exp_avgs, exp_avg_absmaxes}, state_steps, args, grad_scale,
             found_inf, clip_coef, mode, kahan_comps, sr_keys);
}

// ---- quantize_blockwise / dequantize_blockwise: one warp per block -----------------------------

template <typename T>
__global__ void quantize_kernel(const T* input, int64_t numel, int bits, int64_t block_size, int map,
                                uint8_t* codes, float* absmax) {
  __shared__ SharedMap shared;
  load_map(kMaps[map], shared);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t first = block * block_size;
  if (first >= numel) {
    return;
  }
  const int64_t last = min(numel, first + block_size);
  float local = 0.f;
  for (int64_t i = first + lane; i < last; i += 32) {
    local = OpMath<float>::max(local, OpMath<float>::abs(static_cast<float>(input[i])));
  }
  const float block_max = warp_absmax(local);
  const float inverse = inverse_absmax(block_max);
  for (int64_t i = first + 2 * lane; i < last; i += 64) {
    const bool second = i + 1 < last;
    const int c0 = nearest_code(static_cast<float>(input[i]) * inverse, shared);
    const int c1 = second ? nearest_code(static_cast<float>(input[i + 1]) * inverse, shared) : 0;
    write_codes(codes, bits, i, second, c0, c1);
  }
  if (lane == 0) {
    absmax[block] = block_max;
  }
}

__global__ void dequantize_kernel(const uint8_t* codes, const float* absmax, int64_t numel, int bits,
                                  int64_t block_size, int map, float* output) {
  __shared__ SharedMap shared;
  load_map(kMaps[map], shared);
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < numel) {
    output[i] = shared.values[read_code(codes, bits, i)] * absmax[i / block_size];
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& input, int64_t bits,
                                                           bool is_signed, int64_t block_size) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  QuantizeTensors tensors = prepare_quantize(input, bits, block_size);
  const at::Tensor& flat = tensors.flat;
  at::Tensor& codes = tensors.codes;
  at::Tensor& absmax = tensors.absmax;
  const int64_t numel = flat.numel();
  const int64_t blocks = absmax.numel();
  if (numel == 0) {
    return {codes, absmax};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t grid = (blocks + kWarps - 1) / kWarps;
  upload_maps();
  const int map = map_index(bits, is_signed);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    quantize_kernel<T><<<grid, kBlockSize, 0, stream>>>(flat.const_data_ptr<T>(), numel, static_cast<int>(bits),
                                                       block_size, map, codes.data_ptr<uint8_t>(),
                                                       absmax.data_ptr<float>());
  };
  if (flat.scalar_type() == at::kFloat) {
    launch(float{});
  } else if (flat.scalar_type() == at::kBFloat16) {
    launch(c10::BFloat16{});
  } else {
    launch(c10::Half{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax, int64_t bits,
                                     bool is_signed, int64_t block_size, int64_t numel) {
  check_quantized("dldna_fused::dequantize_blockwise", codes, absmax, numel, bits, block_size);
  const c10::cuda::CUDAGuard device_guard(codes.device());
  at::Tensor output = at::empty({numel}, absmax.options());
  if (numel == 0) {
    return output;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  upload_maps();
  dequantize_kernel<<<(numel + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      codes.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), numel, static_cast<int>(bits),
      block_size, map_index(bits, is_signed), output.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return output;
}

}  // namespace
}  // namespace dldna_fused::cuda

TORCH_LIBRARY_IMPL(dldna_fused, CUDA, m) {
  m.impl("fused_adam_lowbit_", &dldna_fused::cuda::fused_adam_lowbit_cuda);
  m.impl("fused_adam_lowbit_.tensor_lr", &dldna_fused::cuda::fused_adam_lowbit_cuda_tensor_lr);
  m.impl("fused_lion_lowbit_", &dldna_fused::cuda::fused_lion_lowbit_cuda);
  m.impl("quantize_blockwise", &dldna_fused::cuda::quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dldna_fused::cuda::dequantize_blockwise_cuda);
}

#include "cpu/parallel.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <string>

namespace dldna_fused::cpu {

bool found_inf_set(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.f;
}

float inverse_grad_scale(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale.has_value() ? 1.f / *grad_scale->const_data_ptr<float>() : 1.f;
}

float gradient_factor(const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& clip_coef) {
  const float clip = clip_coef.has_value() ? *clip_coef->const_data_ptr<float>() : 1.f;
  return clip * inverse_grad_scale(grad_scale);
}

std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  int64_t count = 0;
  for (const at::Tensor& t : tensors) {
    count += (t.numel() + kChunkElements - 1) / kChunkElements;
  }
  chunks.reserve(count);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t numel = tensors[i].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunkElements) {
      chunks.push_back({static_cast<int64_t>(i), begin, std::min(begin + kChunkElements, numel)});
    }
  }
  return chunks;
}

void parallel_over_chunks(const Chunk* chunks, int64_t num_chunks,
                          void (*kernel)(const void* launch, const Chunk* chunks, int64_t n),
                          const void* launch) {
  if (num_chunks == 0) {
    return;
  }
  int64_t total_elements = 0;
  for (int64_t k = 0; k < num_chunks; ++k) {
    total_elements += chunks[k].end - chunks[k].begin;
  }
  const int64_t mean_chunk = std::max<int64_t>(1, total_elements / num_chunks);
  const int64_t grain = std::max<int64_t>(1, 2 * kChunkElements / mean_chunk);
  at::parallel_for(0, num_chunks, grain, [&](int64_t begin, int64_t end) {
    kernel(launch, chunks + begin, end - begin);
  });
}

const KernelTable& cpu_kernels() {
  static const KernelTable& table = [&]() -> const KernelTable& {
    // Follow torch's own choice (which honours ATEN_CPU_CAPABILITY), and the CPU's.
    const std::string torch_capability = at::get_cpu_capability();
    const bool torch_uses_avx = torch_capability.rfind("AVX", 0) == 0;
#if defined(__x86_64__) && defined(__GNUC__)
    const bool cpu_has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                              __builtin_cpu_supports("f16c");
#else
    const bool cpu_has_avx2 = false;
#endif
    if (const KernelTable* avx512 = kernels_avx512(); avx512 && torch_capability == "AVX512") {
      return *avx512;
    }
    if (const KernelTable* avx2 = kernels_avx2(); avx2 && torch_uses_avx && cpu_has_avx2) {
      return *avx2;
    }
    return kernels_default();
  }();
  return table;
}

}  // namespace dldna_fused::cpu

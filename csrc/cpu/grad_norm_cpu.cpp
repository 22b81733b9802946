// dldna_fused::fused_grad_norm and fused_scale_ on the CPU: one parallel pass of a chunk kernel
// (cpu/kernels_impl.h) over all tensors; the norm's per-chunk partials are added up in chunk
// order, so it is the same for any thread count.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/grad_norm_args.h"
#include "common/opmath.h"
#include "cpu/parallel.h"

namespace dldna_fused {
namespace {

at::Tensor fused_grad_norm_cpu(at::TensorList tensors, double norm_type,
                               const std::optional<at::Tensor>& grad_scale) {
  const GradNormCall call = check_grad_norm_args(tensors, norm_type, grad_scale);
  // Any dense order will do for a norm; other layouts are read through a contiguous copy.
  std::vector<at::Tensor> copies;
  std::vector<const void*> pointers(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.is_non_overlapping_and_dense()) {
      pointers[i] = t.const_data_ptr();
    } else {
      copies.push_back(t.contiguous());
      pointers[i] = copies.back().const_data_ptr();
    }
  }
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(tensors);
  std::vector<double> partials(chunks.size(), 0.0);
  const cpu::GradNormLaunch launch{kernel_dtype(call.dtype), call.kind, pointers.data(),
                                   chunks.data(), partials.data()};
  cpu::parallel_over_chunks(chunks, cpu::cpu_kernels().grad_norm, launch);

  double total = 0.0;
  for (double partial : partials) {
    // An inf norm's partials are float maxima: OpMath's max keeps a NaN, as torch's norm does.
    total = call.kind == cpu::NormKind::Inf
                ? OpMath<float>::max(static_cast<float>(total), static_cast<float>(partial))
                : total + partial;
  }
  double norm = call.kind == cpu::NormKind::L2 ? std::sqrt(total) : total;
  if (grad_scale.has_value()) {
    norm /= static_cast<double>(*grad_scale->const_data_ptr<float>());
  }
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *out.data_ptr<float>() = static_cast<float>(norm);
  return out;
}

void fused_scale_cpu(at::TensorList tensors, const at::Tensor& factor) {
  const at::ScalarType dtype = check_scale_args(tensors, factor);
  const float value = *factor.const_data_ptr<float>();
  std::vector<void*> pointers(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    // Any dense order will do; a strided view is scaled by its own op (rare: grads are dense).
    if (t.is_non_overlapping_and_dense()) {
      pointers[i] = t.data_ptr();
    } else {
      t.mul_(factor.reshape({}));
      pointers[i] = nullptr;
    }
  }
  std::vector<cpu::Chunk> chunks = cpu::make_chunks(tensors);
  chunks.erase(std::remove_if(chunks.begin(), chunks.end(),
                              [&](const cpu::Chunk& c) { return pointers[c.tensor] == nullptr; }),
               chunks.end());
  const cpu::ScaleLaunch launch{kernel_dtype(dtype), value, pointers.data()};
  cpu::parallel_over_chunks(chunks, cpu::cpu_kernels().scale, launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(dldna_fused, CPU, m) {
  m.impl("fused_grad_norm", &fused_grad_norm_cpu);
  m.impl("fused_scale_", &fused_scale_cpu);
}

}  // namespace dldna_fused

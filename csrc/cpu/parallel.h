#pragma once
// The CPU multi-tensor launcher, written once for every optimizer: all tensors of a call are cut
// into one flat list of chunks, and the chunks are spread over torch's intra-op threads together.
// A step over 2000 small tensors therefore costs one parallel region, not 2000.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "cpu/kernel_table.h"

namespace dldna_fused::cpu {

// Elements per chunk: large enough to amortize the per-chunk call, small enough that one large
// tensor still splits over every thread.
constexpr int64_t kChunkElements = 32768;

// GradScaler's tensors as the CPU ops read them: whether found_inf is set (the whole step is then
// skipped) and 1 / grad_scale (1 without a scaler).
bool found_inf_set(const std::optional<at::Tensor>& found_inf);
float inverse_grad_scale(const std::optional<at::Tensor>& grad_scale);
// What the update rules multiply the gradient by: clip_coef / grad_scale (either may be absent).
float gradient_factor(const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& clip_coef);
// A launch's unscale_grads ([Note: unscaled grads] in cpu/kernel_table.h): 1 / grad_scale, or 0.
inline float unscale_factor(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale.has_value() ? inverse_grad_scale(grad_scale) : 0.f;
}

// The grad's data for a kernel: mutable when the kernel stores the unscaled gradient back
// ([Note: unscaled grads] in cpu/kernel_table.h), else read through const_data_ptr, which leaves
// a copy-on-write grad unmaterialized.
inline void* grad_pointer(const at::Tensor& grad, bool store_grads) {
  return store_grads ? grad.data_ptr() : const_cast<void*>(grad.const_data_ptr());
}

// How tensor i's param is written: its compensation (list k of `layout`) under Kahan summation,
// its salt (from its key and its step count after this step's increment) under stochastic rounding.
inline ParamWrite param_write(const DenseLayout& layout, size_t k, RoundMode mode,
                              at::OptionalIntArrayRef sr_keys, size_t i, float step) {
  ParamWrite write;
  if (mode == RoundMode::Kahan) {
    write.comp = layout.get(k, i).data_ptr();
  } else if (mode == RoundMode::Stochastic) {
    write.salt = rounding_salt((*sr_keys)[i], step);
  }
  return write;
}

// Chunks covering every element of each tensor; zero-size tensors get none.
std::vector<Chunk> make_chunks(at::TensorList tensors);

// Runs `kernel(chunks + b, e - b)` over the threads; each thread gets a contiguous run of chunks
// and at least ~kChunkElements * 2 elements of work, so tiny calls stay on the calling thread.
// The kernel sees pointers into `chunks` itself.
void parallel_over_chunks(const Chunk* chunks, int64_t num_chunks,
                          void (*kernel)(const void* launch, const Chunk* chunks, int64_t n),
                          const void* launch);

template <typename Launch>
void parallel_over_chunks(const Chunk* chunks, int64_t num_chunks,
                          void (*kernel)(const Launch&, const Chunk*, int64_t), const Launch& launch) {
  // One erased signature keeps the threading code out of the headers.
  struct Thunk {
    void (*kernel)(const Launch&, const Chunk*, int64_t);
    const Launch* launch;
  } thunk{kernel, &launch};
  parallel_over_chunks(
      chunks, num_chunks,
      [](const void* t, const Chunk* c, int64_t n) {
        const auto* self = static_cast<const Thunk*>(t);
        self->kernel(*self->launch, c, n);
      },
      &thunk);
}

template <typename Launch>
void parallel_over_chunks(const std::vector<Chunk>& chunks,
                          void (*kernel)(const Launch&, const Chunk*, int64_t), const Launch& launch) {
  parallel_over_chunks(chunks.data(), static_cast<int64_t>(chunks.size()), kernel, launch);
}

}  // namespace dldna_fused::cpu

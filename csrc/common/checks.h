#pragma once
// Argument checks shared by every op and device. A check a user can trigger names the op, the
// argument and the list index, says what was expected and what was given (TORCH_CHECK); internal
// invariants use TORCH_INTERNAL_ASSERT.

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "common/rounding_math.h"
#include "cpu/kernel_table.h"

namespace dldna_fused {

// The dtypes of one multi-tensor call, validated.
struct CallDtypes {
  at::ScalarType param;
  at::ScalarType state;
};

// float32, bfloat16 or float16: the dtypes the kernels take.
bool is_supported_param_dtype(at::ScalarType dtype);

// A named tensor list of an op call, e.g. {"exp_avgs", exp_avgs}.
struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// Checks that params are fp32/bf16/fp16 and all of one dtype and device, that grads match their
// params (shape, dtype, device, dense layout), and that every state list matches the params in
// length, shape and device and has one dtype: the params' or, for bf16/fp16 params, float32.
// params_name/grads_name name the two lists in messages (ops whose lists are not params/grads).
CallDtypes check_param_lists(const char* op, at::TensorList params, at::TensorList grads,
                             const std::vector<NamedList>& states, const char* params_name = "params",
                             const char* grads_name = "grads");

// Per-parameter step counters: one float32 element each, on `device`.
void check_state_steps(const char* op, at::TensorList state_steps, size_t expected,
                       const at::Device& device);

// GradScaler's optional scale and found-inf flags: float32 single-element tensors on `device`.
void check_amp_tensors(const char* op, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, const at::Device& device);

// A folded clip factor: a float32 tensor of one element on `device`.
void check_clip_coef(const char* op, const std::optional<at::Tensor>& clip_coef, const at::Device& device);

// The param-write arguments of a step op ([Note: bf16 param writes] in common/rounding_math.h):
// kahan_comps, one compensation per param of its dtype, shape and device, or sr_keys, one key per
// param; not both, and only for bfloat16 params. Returns the mode they ask for.
RoundMode check_param_writes(const char* op, at::TensorList params,
                             const std::optional<at::TensorList>& kahan_comps,
                             at::OptionalIntArrayRef sr_keys);

void check_lr(const char* op, double lr);
void check_beta(const char* op, const char* name, double beta);
void check_nonnegative(const char* op, const char* name, double value);

cpu::Dtype kernel_dtype(at::ScalarType dtype);

// [Note: dense layouts]
// The kernels walk memory linearly, so every tensor of one parameter (param, grad, states) must be
// dense and laid out like the param. That holds for contiguous tensors, and for channels-last or
// transposed params whose grads and states were made with preserve_format, even when strides of
// size-1 dimensions differ (they never address memory). When it does not hold, the op runs on
// contiguous copies and copies the results back into the caller's tensors, so an update never
// lands only in a temporary.
class DenseLayout {
 public:
  // lists[k][i] is the tensor of parameter i in list k (a list may be empty when the call does
  // not use it); written[k] says whether list k is updated in place. With `contiguous`, a param
  // counts as laid out right only when contiguous (kernels that walk rows and columns need the
  // logical order, not just a dense one).
  DenseLayout(std::vector<at::TensorList> lists, std::vector<bool> written, bool contiguous = false);
  // The tensor the kernel runs on: lists[k][i] itself or, when that is not laid out like its
  // param, a contiguous copy. Copies are rare, so nothing is allocated for lists without one.
  const at::Tensor& get(size_t k, size_t i) const {
    const std::vector<at::Tensor>& copies = copies_[k];
    return copies.empty() || !copies[i].defined() ? lists_[k][i] : copies[i];
  }
  // List k as get() sees it.
  std::vector<at::Tensor> list(size_t k) const;
  // Copies results from the temporaries back into the original tensors of the written lists.
  void copy_back();

 private:
  std::vector<at::TensorList> lists_;
  std::vector<bool> written_;
  std::vector<std::vector<at::Tensor>> copies_;  // copies_[k] is empty unless list k has a copy
};

// kahan_comps as a DenseLayout list: the list under Kahan summation, else empty.
inline at::TensorList comps_or_none(RoundMode mode, const std::optional<at::TensorList>& kahan_comps) {
  return mode == RoundMode::Kahan ? *kahan_comps : at::TensorList{};
}

}  // namespace dldna_fused

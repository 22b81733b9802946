// The schemas of every dldna_fused op, declared once. Each device registers its implementation
// beside its kernels (cpu/*_cpu.cpp, cuda/*_cuda.cu); Python reaches the ops only through
// torch.ops.dldna_fused (wrapped in dldna_fused/ops.py), so torch.compile and opcheck see them.
//
// Conventions: lists are per parameter and the same length; `(a!)` marks lists updated in place;
// hyperparameters are keyword-only; `grad_scale`/`found_inf` are GradScaler's tensors: grads are
// divided by grad_scale inside the kernel and, as torch's fused optimizers do, left unscaled in
// place afterwards (so `grads` are mutable; [Note: unscaled grads] in cpu/kernel_table.h); when
// found_inf is nonzero nothing changes at all, not even the step counters or the grads.
// `clip_coef` (float32, one element) multiplies the gradient the update sees, after unscaling, and
// is never written into the grads: a folded clip_grad_norm_ ([Note: folded clipping] in
// dldna_fused/optim/_fused.py). Every step op takes `kahan_comps` (a compensation per param, updated
// in place) or `sr_keys` (a 64-bit key per param) for bf16 params: how the new params are written
// ([Note: bf16 param writes] in common/rounding_math.h); neither rounds to nearest.

#include <torch/library.h>

TORCH_LIBRARY(dldna_fused, m) {
  // Adam (decoupled_weight_decay=False: L2 added to the gradient) and AdamW (True).
  // state_steps are incremented by the op; bias corrections use the incremented value.
  m.def(
      "fused_adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, "
      "float lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? clip_coef=None, "
      "Tensor(g!)[]? kahan_comps=None, int[]? sr_keys=None) -> ()");
  // The same with lr as a one-element tensor (read on the device under CUDA, so a scheduler can
  // change it between replays of a captured CUDA graph).
  m.def(
      "fused_adam_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, "
      "Tensor lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? clip_coef=None, "
      "Tensor(g!)[]? kahan_comps=None, int[]? sr_keys=None) -> ()");

  // Lion: p <- p(1 - lr wd) - lr sign(b1 m + (1-b1) g); m <- b2 m + (1-b2) g. state_steps are
  // incremented (Lion's rule does not read them; they keep torch.optim's state layout).
  m.def(
      "fused_lion_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] state_steps, *, float lr, float beta1, float beta2, float weight_decay, "
      "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, "
      "Tensor(e!)[]? kahan_comps=None, int[]? sr_keys=None) -> ()");
  // SophiaG's step: p <- p(1 - lr wd); m <- b1 m + (1-b1) g;
  // p <- p - lr sign(m) min(|m| / (rho bs h + 1e-15), 1). `unclipped` (int64, one element), when
  // given, is increased by the number of coordinates whose ratio was below 1.
  m.def(
      "fused_sophia_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor[] hessians, Tensor(d!)[] state_steps, *, float lr, float beta1, float rho, "
      "float bs, float weight_decay, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(e!)? unclipped=None, Tensor? clip_coef=None, "
      "Tensor(f!)[]? kahan_comps=None, int[]? sr_keys=None) -> ()");
  // SophiaG's Hessian EMA: h <- b2 h + (1-b2) e, with e = (x / grad_scale)^2 when `square` (the
  // GNB estimator, x the gradients) and e = x / grad_scale otherwise (x = z * Hz, Hutchinson).
  m.def(
      "fused_sophia_hessian_(Tensor(a!)[] hessians, Tensor[] estimates, *, float beta2, "
      "bool square, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // AdaFactor as transformers/fairseq define it (see common/adafactor_math.h). A call is either
  // factored (exp_avg_sq_rows/exp_avg_sq_cols given, exp_avg_sqs empty; params of >= 2 dims, the
  // statistics over the last two) or unfactored (exp_avg_sqs given, the rows/cols lists empty).
  // exp_avgs is empty unless beta1 is given. `rms` receives RMS(p) before the step; lr is used
  // (and required) only when relative_step is false. All states are float32.
  m.def(
      "fused_adafactor_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avg_sq_rows, "
      "Tensor(d!)[] exp_avg_sq_cols, Tensor(e!)[] exp_avg_sqs, Tensor(f!)[] exp_avgs, "
      "Tensor(g!)[] rms, Tensor(h!)[] state_steps, *, float? lr, float eps1, float eps2, "
      "float clip_threshold, float decay_rate, float? beta1, float weight_decay, "
      "bool scale_parameter, bool relative_step, bool warmup_init, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? clip_coef=None, "
      "Tensor(i!)[]? kahan_comps=None, int[]? sr_keys=None) -> ()");

  // The norm of all `tensors` together, as one 0-dim float32 tensor on their device: norm_type 1,
  // 2 or inf, accumulated in fp32 lanes and double partials whatever the tensors' dtype, added up
  // in a fixed order (the same result for any thread count), and divided by grad_scale when given
  // (the norm of GradScaler-unscaled gradients). Reads nothing back to the host on CUDA.
  m.def("fused_grad_norm(Tensor[] tensors, float norm_type, Tensor? grad_scale=None) -> Tensor");
  // tensors *= factor (float32, one element, on their device; read there on CUDA), in place: the
  // scaling pass of clip_grad_norm_ as one multi-tensor launch.
  m.def("fused_scale_(Tensor(a!)[] tensors, Tensor factor) -> ()");

  // Adam/AdamW and Lion with 8- or 4-bit states ([Note: blockwise quantized states] in
  // common/quantization.h): each state is a contiguous uint8 tensor of codes (one per element at
  // 8 bits, two per byte at 4) and a float32 absmax per block of block_size elements. The update
  // rules are fused_adam_'s (without amsgrad) and fused_lion_'s.
  m.def(
      "fused_adam_lowbit_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_absmaxes, Tensor(e!)[] exp_avg_sqs, Tensor(f!)[] exp_avg_sq_absmaxes, "
      "Tensor(g!)[] state_steps, *, float lr, float beta1, float beta2, float weight_decay, "
      "float eps, bool maximize, bool decoupled_weight_decay, int bits, int block_size, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, "
      "Tensor(h!)[]? kahan_comps=None, int[]? sr_keys=None) -> ()");
  m.def(
      "fused_adam_lowbit_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, "
      "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_absmaxes, Tensor(e!)[] exp_avg_sqs, "
      "Tensor(f!)[] exp_avg_sq_absmaxes, Tensor(g!)[] state_steps, *, Tensor lr, float beta1, "
      "float beta2, float weight_decay, float eps, bool maximize, bool decoupled_weight_decay, "
      "int bits, int block_size, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? clip_coef=None, "
      "Tensor(h!)[]? kahan_comps=None, int[]? sr_keys=None) -> ()");
  m.def(
      "fused_lion_lowbit_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_absmaxes, Tensor(e!)[] state_steps, *, float lr, float beta1, "
      "float beta2, float weight_decay, bool maximize, int bits, int block_size, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, "
      "Tensor(f!)[]? kahan_comps=None, int[]? sr_keys=None) -> ()");
  // The flattened input as codes and per-block absmax with the signed or unsigned map of `bits`,
  // and back to float32 (numel elements; the codes alone cannot tell an odd count at 4 bits).
  m.def(
      "quantize_blockwise(Tensor input, *, int bits, bool signed, int block_size) "
      "-> (Tensor codes, Tensor absmax)");
  m.def(
      "dequantize_blockwise(Tensor codes, Tensor absmax, *, int bits, bool signed, int block_size, "
      "int numel) -> Tensor");
}

// The ops never record autograd history (the optimizers call them under no_grad, as torch.optim
// does its fused step), so the Autograd key falls through to the device kernel. Without this the
// dispatcher's default autograd fallback boxes the call and reads requires_grad of every tensor
// in every list: ~10000 scattered TensorImpls per step of a 2000-param model.
TORCH_LIBRARY_IMPL(dldna_fused, Autograd, m) {
  m.impl("fused_adam_", torch::CppFunction::makeFallthrough());
  m.impl("fused_adam_.tensor_lr", torch::CppFunction::makeFallthrough());
  m.impl("fused_lion_", torch::CppFunction::makeFallthrough());
  m.impl("fused_sophia_", torch::CppFunction::makeFallthrough());
  m.impl("fused_sophia_hessian_", torch::CppFunction::makeFallthrough());
  m.impl("fused_adafactor_", torch::CppFunction::makeFallthrough());
  m.impl("fused_grad_norm", torch::CppFunction::makeFallthrough());
  m.impl("fused_scale_", torch::CppFunction::makeFallthrough());
  m.impl("fused_adam_lowbit_", torch::CppFunction::makeFallthrough());
  m.impl("fused_adam_lowbit_.tensor_lr", torch::CppFunction::makeFallthrough());
  m.impl("fused_lion_lowbit_", torch::CppFunction::makeFallthrough());
}

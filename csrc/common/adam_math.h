#pragma once
// The Adam/AdamW update rule, written once for every device and dtype.
// See [Note: one update rule, every device] in common/opmath.h.

#include "common/opmath.h"

namespace dldna_fused {

// Per-tensor constants of one step. The bias corrections depend on the tensor's own step count, so
// the CPU computes these per tensor on the host and the CUDA functor per block on the device (the
// step lives there, which keeps the step CUDA-graph capturable).
struct AdamCoefficients {
  float beta1;
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float weight_decay;           // L2 coefficient (Adam)
  float decay_factor;           // 1 - lr * weight_decay (AdamW)
  float eps;
  float step_size;              // lr / (1 - beta1^t)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  float inv_grad_scale;         // 1 / GradScaler's scale, or 1
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;  // AdamW: shrink p; Adam: add wd * p to the gradient
};

// Every derived constant in double, then rounded once, as torch.optim does: 1 - beta2 computed in
// fp32 from fp32(0.999) is off by 1.3e-5 relative, and 1 - beta2^t at large t loses digits.
DLDNA_HOST_DEVICE AdamCoefficients adam_coefficients(double lr, double beta1, double beta2,
                                                     double weight_decay, double eps, double step,
                                                     float inv_grad_scale, bool amsgrad,
                                                     bool maximize, bool decoupled_weight_decay) {
  AdamCoefficients c{};
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.weight_decay = static_cast<float>(weight_decay);
  c.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  c.eps = static_cast<float>(eps);
  c.step_size = static_cast<float>(lr / (1.0 - ::pow(beta1, step)));
  c.bias_correction2_sqrt = static_cast<float>(::sqrt(1.0 - ::pow(beta2, step)));
  c.inv_grad_scale = inv_grad_scale;
  c.amsgrad = amsgrad;
  c.maximize = maximize;
  c.decoupled_weight_decay = decoupled_weight_decay;
  return c;
}

// The configuration of nearly every step: no amsgrad, no maximize, no grad scale or folded clip
// factor, and weight decay decoupled or zero. A kernel that checks this once per tensor can run
// adam_update<true>, whose loop keeps no tests of these flags.
DLDNA_HOST_DEVICE bool adam_is_common(const AdamCoefficients& c) {
  return !c.amsgrad && !c.maximize && c.inv_grad_scale == 1.f && (c.decoupled_weight_decay || c.weight_decay == 0.f);
}

// One element (or one SIMD vector of elements) of an Adam step, in place on p, m, v and v_max.
// v_max is only read and written when c.amsgrad is set. With kCommon (adam_is_common(c) holds) the
// rule is the same, bit for bit: g * 1 is g, and p * decay_factor is p when weight_decay is 0
// (decay_factor is then exactly 1), so that multiply replaces the test.
template <bool kCommon = false, typename V>
DLDNA_HOST_DEVICE void adam_update(V& p, V g, V& m, V& v, V& v_max, const AdamCoefficients& c) {
  using M = OpMath<V>;
  if constexpr (kCommon) {
    p = p * V(c.decay_factor);
  } else {
    g = g * V(c.inv_grad_scale);
    if (c.maximize) {
      g = V(0.f) - g;
    }
    if (c.weight_decay != 0.f) {
      if (c.decoupled_weight_decay) {
        p = p * V(c.decay_factor);
      } else {
        g = g + V(c.weight_decay) * p;
      }
    }
  }
  m = V(c.beta1) * m + V(c.one_minus_beta1) * g;
  v = V(c.beta2) * v + V(c.one_minus_beta2) * g * g;
  V second_moment = v;
  if (!kCommon && c.amsgrad) {
    v_max = M::max(v_max, v);
    second_moment = v_max;
  }
  const V denom = M::sqrt(second_moment) / V(c.bias_correction2_sqrt) + V(c.eps);
  p = p - V(c.step_size) * m / denom;
}

}  // namespace dldna_fused

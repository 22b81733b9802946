#pragma once
// The Adam/AdamW update rule, written once for every device and dtype.
// See [Note: one update rule, every device] in common/opmath.h.

#include "common/opmath.h"

namespace dldna_fused {

// Per-tensor constants of one step. The bias corrections depend on the tensor's own step count, so
// the CPU computes these per tensor on the host and the CUDA functor per block on the device (the
// step lives there, which keeps the step CUDA-graph capturable).
struct AdamCoefficients {
  float lr;
  float beta1;
  float beta2;
  float weight_decay;
  float eps;
  float step_size;              // lr / (1 - beta1^t)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  float inv_grad_scale;         // 1 / GradScaler's scale, or 1
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;  // AdamW: shrink p; Adam: add wd * p to the gradient
};

// Bias corrections in double, as torch.optim does, so long runs (beta2^t near 1) round the same.
DLDNA_HOST_DEVICE void adam_bias_corrections(double lr, double beta1, double beta2, double step,
                                             float& step_size, float& bias_correction2_sqrt) {
  const double bias_correction1 = 1.0 - ::pow(beta1, step);
  const double bias_correction2 = 1.0 - ::pow(beta2, step);
  step_size = static_cast<float>(lr / bias_correction1);
  bias_correction2_sqrt = static_cast<float>(::sqrt(bias_correction2));
}

// One element (or one SIMD vector of elements) of an Adam step, in place on p, m, v and v_max.
// v_max is only read and written when c.amsgrad is set.
template <typename V>
DLDNA_HOST_DEVICE void adam_update(V& p, V g, V& m, V& v, V& v_max, const AdamCoefficients& c) {
  using M = OpMath<V>;
  g = g * V(c.inv_grad_scale);
  if (c.maximize) {
    g = V(0.f) - g;
  }
  if (c.weight_decay != 0.f) {
    if (c.decoupled_weight_decay) {
      p = p * V(1.f - c.lr * c.weight_decay);
    } else {
      g = g + V(c.weight_decay) * p;
    }
  }
  m = V(c.beta1) * m + V(1.f - c.beta1) * g;
  v = V(c.beta2) * v + V(1.f - c.beta2) * g * g;
  V second_moment = v;
  if (c.amsgrad) {
    v_max = M::max(v_max, v);
    second_moment = v_max;
  }
  const V denom = M::sqrt(second_moment) / V(c.bias_correction2_sqrt) + V(c.eps);
  p = p - V(c.step_size) * m / denom;
}

}  // namespace dldna_fused

#pragma once
// The Lion update rule (Chen et al. 2023, the authors' code), written once for every device and
// dtype. See [Note: one update rule, every device] in common/opmath.h.

#include "common/opmath.h"

namespace dldna_fused {

struct LionCoefficients {
  float lr;
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float decay_factor;    // 1 - lr * weight_decay: decoupled, scaled by lr
  float inv_grad_scale;  // 1 / GradScaler's scale, or 1
  bool maximize;
};

// Derived constants in double, rounded once (see adam_coefficients).
DLDNA_HOST_DEVICE LionCoefficients lion_coefficients(double lr, double beta1, double beta2,
                                                     double weight_decay, float inv_grad_scale,
                                                     bool maximize) {
  LionCoefficients c{};
  c.lr = static_cast<float>(lr);
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  c.inv_grad_scale = inv_grad_scale;
  c.maximize = maximize;
  return c;
}

// p <- p(1 - lr wd) - lr sign(b1 m + (1-b1) g);  m <- b2 m + (1-b2) g.
template <typename V>
DLDNA_HOST_DEVICE void lion_update(V& p, V g, V& m, const LionCoefficients& c) {
  using M = OpMath<V>;
  g = g * V(c.inv_grad_scale);
  if (c.maximize) {
    g = V(0.f) - g;
  }
  p = p * V(c.decay_factor);
  const V interpolated = m * V(c.beta1) + g * V(c.one_minus_beta1);
  p = p - V(c.lr) * M::sign(interpolated);
  m = m * V(c.beta2) + g * V(c.one_minus_beta2);
}

}  // namespace dldna_fused

#pragma once
// The SophiaG update rule and its Hessian EMA (Liu et al. 2023, the authors' code), written once
// for every device and dtype. See [Note: one update rule, every device] in common/opmath.h.

#include "common/opmath.h"

namespace dldna_fused {

struct SophiaCoefficients {
  float lr;
  float beta1;
  float one_minus_beta1;
  float rho_bs;          // rho * bs: the clip threshold's scale
  float decay_factor;    // 1 - lr * weight_decay
  float inv_grad_scale;  // 1 / GradScaler's scale, or 1
  bool maximize;
};

DLDNA_HOST_DEVICE SophiaCoefficients sophia_coefficients(double lr, double beta1, double rho,
                                                         double bs, double weight_decay,
                                                         float inv_grad_scale, bool maximize) {
  SophiaCoefficients c{};
  c.lr = static_cast<float>(lr);
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.rho_bs = static_cast<float>(rho * bs);
  c.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  c.inv_grad_scale = inv_grad_scale;
  c.maximize = maximize;
  return c;
}

// The authors' epsilon: where h = 0 the ratio is |m| / 1e-15, clipped to 1 (a sign step).
constexpr float kSophiaEps = 1e-15f;

// p <- p(1 - lr wd);  m <- b1 m + (1-b1) g;  ratio = min(|m| / (rho bs h + 1e-15), 1);
// p <- p - lr sign(m) ratio. Returns ratio, so callers can count the unclipped (ratio < 1)
// coordinates.
template <typename V>
DLDNA_HOST_DEVICE V sophia_update(V& p, V g, V& m, V h, const SophiaCoefficients& c) {
  using M = OpMath<V>;
  g = g * V(c.inv_grad_scale);
  if (c.maximize) {
    g = V(0.f) - g;
  }
  p = p * V(c.decay_factor);
  m = m * V(c.beta1) + g * V(c.one_minus_beta1);
  const V ratio = M::min(M::abs(m) / (V(c.rho_bs) * h + V(kSophiaEps)), V(1.f));
  p = p - V(c.lr) * M::sign(m) * ratio;
  return ratio;
}

struct SophiaHessianCoefficients {
  float beta2;
  float one_minus_beta2;
  float inv_grad_scale;
  bool square;  // estimate = (x / scale)^2 (GNB, from gradients) or x / scale (Hutchinson)
};

// h <- b2 h + (1-b2) estimate.
template <typename V>
DLDNA_HOST_DEVICE void sophia_hessian_update(V& h, V x, const SophiaHessianCoefficients& c) {
  x = x * V(c.inv_grad_scale);
  const V estimate = c.square ? x * x : x;
  h = h * V(c.beta2) + estimate * V(c.one_minus_beta2);
}

}  // namespace dldna_fused

#pragma once
// The AdaFactor rule in its transformers/fairseq form (Shazeer & Stern 2018 with relative step
// size, parameter scale and update clipping), written once for every device and dtype.
// See [Note: one update rule, every device] in common/opmath.h.
//
// [Note: AdaFactor passes]
// One step of one tensor is, with t the incremented step and G2 = g*g + eps1:
//   pass 1 (reads g, p):  row sums of G2 -> R's EMA; column sums of G2 (per work unit); sum p^2
//   finalize (small):     C's EMA from the column sums; mean(R) per matrix; RMS(p) -> alpha
//   pass 2 (reads g):     sum U^2, U = g * rsqrt(R / mean(R)) * rsqrt(C)
//   finalize (scalars):   scale = alpha / max(1, RMS(U) / clip_threshold)
//   pass 3 (reads g, p, m; writes p, m):  U * scale, momentum, weight decay, apply
// Three passes over g is the minimum for a factored tensor: U depends on every row and column
// sum (so it cannot exist before pass 1 ends), and the clip divides U by its own RMS (so no
// element can be written before pass 2 ends). Keeping U between passes 2 and 3 would trade a read
// of g for a write and a read of U. An unfactored tensor needs two passes: its V is elementwise,
// so pass 1 updates V and sums U^2 at once. Sums are kept as partials per work unit (fp32 within a
// row or a thread block; sums of squares in double between rows on the CPU) and combined in a
// fixed order, so results do not depend on the thread count. On the CPU a tensor of one work unit
// runs its three passes back to back on one thread, so passes 2 and 3 read g from cache.

#include <cstdint>

#include "common/opmath.h"

namespace dldna_fused {

// The hyperparameters of one call, as transformers' Adafactor takes them.
struct AdafactorOptions {
  double lr;  // used when !relative_step
  double eps1;
  double eps2;
  double clip_threshold;
  double decay_rate;
  double beta1;  // used when use_first_moment
  double weight_decay;
  bool use_first_moment;
  bool scale_parameter;
  bool relative_step;
  bool warmup_init;
};

// beta2_t = 1 - t^decay_rate, and 1 - beta2_t, for the EMAs of step t (1 at t = 1: the first EMA
// is the statistic itself).
struct AdafactorDecay {
  float beta2t;
  float one_minus_beta2t;
};

DLDNA_HOST_DEVICE AdafactorDecay adafactor_decay(const AdafactorOptions& o, double t) {
  const double beta2t = 1.0 - ::pow(t, o.decay_rate);
  return {static_cast<float>(beta2t), static_cast<float>(1.0 - beta2t)};
}

// alpha_t = (scale_parameter ? max(eps2, RMS(p)) : 1) * rho_t, with
// rho_t = relative_step ? min(warmup_init ? 1e-6 t : 1e-2, 1/sqrt(t)) : lr.
DLDNA_HOST_DEVICE double adafactor_alpha(const AdafactorOptions& o, double t, double rms_p) {
  double rho = o.lr;
  if (o.relative_step) {
    const double cap = o.warmup_init ? 1e-6 * t : 1e-2;
    const double inv_sqrt_t = 1.0 / ::sqrt(t);
    rho = cap < inv_sqrt_t ? cap : inv_sqrt_t;
  }
  const double scale = o.scale_parameter ? (rms_p > o.eps2 ? rms_p : o.eps2) : 1.0;
  return scale * rho;
}

// RMS(x) = sqrt(sum x^2 / n); 0 for an empty tensor.
DLDNA_HOST_DEVICE double adafactor_rms(double sum_squares, int64_t numel) {
  return numel > 0 ? ::sqrt(sum_squares / static_cast<double>(numel)) : 0.0;
}

// The factor U is multiplied by in pass 3: alpha / max(1, RMS(U) / clip_threshold). Dividing by
// max(1, ...) only ever shrinks U (some libraries shipped the inverse, which amplifies it).
// A NaN ratio (a NaN or inf in g) propagates, as torch's clamp(min=1) in transformers and the
// reference does: such a gradient turns the whole tensor NaN, not only its own coordinates.
DLDNA_HOST_DEVICE float adafactor_update_scale(const AdafactorOptions& o, double alpha,
                                               double sum_u2, int64_t numel) {
  const double ratio = adafactor_rms(sum_u2, numel) / o.clip_threshold;
  const bool clip = ratio > 1.0 || ratio != ratio;
  return static_cast<float>(alpha / (clip ? ratio : 1.0));
}

// G2 = g*g + eps1 (g already unscaled).
template <typename V>
DLDNA_HOST_DEVICE V adafactor_g2(V g, float eps1) {
  return g * g + V(eps1);
}

// avg <- beta2t avg + (1 - beta2t) x.
template <typename V>
DLDNA_HOST_DEVICE V adafactor_ema(V avg, V x, const AdafactorDecay& d) {
  return avg * V(d.beta2t) + x * V(d.one_minus_beta2t);
}

// The per-tensor constants of pass 3.
struct AdafactorApply {
  float scale;         // adafactor_update_scale
  float decay_factor;  // 1 - weight_decay * alpha
  float beta1;
  float one_minus_beta1;
  bool use_first_moment;
};

DLDNA_HOST_DEVICE AdafactorApply adafactor_apply_constants(const AdafactorOptions& o, double alpha,
                                                           float scale) {
  return {scale, static_cast<float>(1.0 - o.weight_decay * alpha), static_cast<float>(o.beta1),
          static_cast<float>(1.0 - o.beta1), o.use_first_moment};
}

// u is the unclipped update g * rsqrt(V) (or its factored form):
// u <- u * scale;  m <- beta1 m + (1-beta1) u and u <- m (with a first moment);
// p <- p (1 - wd alpha) - u.
template <typename V>
DLDNA_HOST_DEVICE void adafactor_apply(V& p, V u, V& m, const AdafactorApply& c) {
  u = u * V(c.scale);
  if (c.use_first_moment) {
    m = m * V(c.beta1) + u * V(c.one_minus_beta1);
    u = m;
  }
  p = p * V(c.decay_factor) - u;
}

}  // namespace dldna_fused

#pragma once
// AdaFactor's three CPU passes.
// Included through cpu/kernels_impl.h only, which each cpu/kernels_<capability>.cpp compiles once
// under its own namespace ([Note: CPU capability builds] in cpu/kernel_table.h).

#include <algorithm>

#include "common/adafactor_math.h"
#include "cpu/kernels_common.h"
#include "cpu/param_write.h"

namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE {

// ---- AdaFactor: see [Note: AdaFactor passes] in common/adafactor_math.h ----

// Sums of squares are kept per vector lane in fp32 over at most one row (or kFlushElements) and
// then added up in double, so a unit's sum does not lose digits over ~10^5 elements.
constexpr int64_t kFlushElements = 4096;

// Pass 1 of a factored unit: R's EMA for its rows, its column sums of G2, and sum p^2 (p as the
// update sees it: with Kahan summation, p + c).
template <typename P, RoundMode M>
void adafactor_reduce_factored(const AdafactorLaunch& launch, const AdafactorTensorArgs& t,
                               const Chunk& unit, int64_t k) {
  const auto* param = static_cast<const P*>(t.param);
  const auto* grad = static_cast<const P*>(t.grad);
  const int64_t cols = t.cols;
  float* col_sum = launch.col_partials + launch.col_offsets[k];
  std::fill(col_sum, col_sum + cols, 0.f);
  const FloatVec inv(launch.inv_grad_scale);
  const float inv_scale = launch.inv_grad_scale;
  double p2 = 0.0;
  for (int64_t row = unit.begin / cols; row < unit.end / cols; ++row) {
    const P* g = grad + row * cols;
    const int64_t offset = row * cols;
    FloatVec row_lanes(0.f), p2_lanes(0.f);
    float row_tail = 0.f, p2_tail = 0.f;
    int64_t c = 0;
    for (; c + kVecBlock <= cols; c += kVecBlock) {
      FloatVec gv[2], pv[2];
      load_block(g + c, gv[0], gv[1]);
      load_param_block<M>(param, t.write, offset + c, pv[0], pv[1]);
      for (int h = 0; h < 2; ++h) {
        const FloatVec x = adafactor_g2(gv[h] * inv, launch.eps1);
        row_lanes = row_lanes + x;
        float* cs = col_sum + c + h * FloatVec::size();
        (FloatVec::loadu(cs) + x).store(cs);
        p2_lanes = p2_lanes + pv[h] * pv[h];
      }
    }
    for (; c < cols; ++c) {
      const float x = adafactor_g2(load_float(g, c) * inv_scale, launch.eps1);
      row_tail += x;
      col_sum[c] += x;
      const float pc = load_param<M>(param, t.write, offset + c);
      p2_tail += pc * pc;
    }
    const float row_mean = (horizontal_sum(row_lanes) + row_tail) / static_cast<float>(cols);
    t.exp_avg_sq_row[row] = adafactor_ema(t.exp_avg_sq_row[row], row_mean, t.decay);
    p2 += static_cast<double>(horizontal_sum(p2_lanes)) + p2_tail;
  }
  launch.unit_p2[k] = p2;
}

// Pass 1 of an unfactored unit: V's EMA, sum U^2 (U = g rsqrt(V)) and sum p^2.
template <typename P, RoundMode M>
void adafactor_reduce_unfactored(const AdafactorLaunch& launch, const AdafactorTensorArgs& t,
                                 const Chunk& unit, int64_t k) {
  const auto* param = static_cast<const P*>(t.param);
  const auto* grad = static_cast<const P*>(t.grad);
  float* sq = t.exp_avg_sq;
  const FloatVec inv(launch.inv_grad_scale), one(1.f);
  double p2 = 0.0, u2 = 0.0;
  for (int64_t begin = unit.begin; begin < unit.end; begin += kFlushElements) {
    const int64_t end = std::min(begin + kFlushElements, unit.end);
    FloatVec p2_lanes(0.f), u2_lanes(0.f);
    float p2_tail = 0.f, u2_tail = 0.f;
    int64_t i = begin;
    for (; i + kVecBlock <= end; i += kVecBlock) {
      FloatVec gv[2], pv[2], v[2];
      load_block(grad + i, gv[0], gv[1]);
      load_param_block<M>(param, t.write, i, pv[0], pv[1]);
      load_block(sq + i, v[0], v[1]);
      for (int h = 0; h < 2; ++h) {
        const FloatVec g = gv[h] * inv;
        v[h] = adafactor_ema(v[h], adafactor_g2(g, launch.eps1), t.decay);
        const FloatVec u = g * (one / v[h].sqrt());
        u2_lanes = u2_lanes + u * u;
        p2_lanes = p2_lanes + pv[h] * pv[h];
      }
      store_block(sq + i, v[0], v[1]);
    }
    for (; i < end; ++i) {
      const float g = load_float(grad, i) * launch.inv_grad_scale;
      sq[i] = adafactor_ema(sq[i], adafactor_g2(g, launch.eps1), t.decay);
      const float u = g * (1.f / OpMath<float>::sqrt(sq[i]));
      u2_tail += u * u;
      const float p = load_param<M>(param, t.write, i);
      p2_tail += p * p;
    }
    p2 += static_cast<double>(horizontal_sum(p2_lanes)) + p2_tail;
    u2 += static_cast<double>(horizontal_sum(u2_lanes)) + u2_tail;
  }
  launch.unit_p2[k] = p2;
  launch.unit_u2[k] = u2;
}

inline void adafactor_reduce_units(const AdafactorLaunch& launch, const Chunk* units,
                                   int64_t num_units) {
  // This pass only reads p: Kahan reads p + c, every other mode reads as Nearest does.
  const RoundMode read = launch.round_mode == RoundMode::Kahan ? RoundMode::Kahan : RoundMode::Nearest;
  dispatch_param_round(launch.param_dtype, read, [&](auto p_tag, auto mode) {
    using P = decltype(p_tag);
    for (int64_t j = 0; j < num_units; ++j) {
      const Chunk& unit = units[j];
      const int64_t k = &unit - launch.units;
      const AdafactorTensorArgs& t = launch.tensors[unit.tensor];
      if (t.rows > 0) {
        adafactor_reduce_factored<P, decltype(mode)::value>(launch, t, unit, k);
      } else {
        adafactor_reduce_unfactored<P, decltype(mode)::value>(launch, t, unit, k);
      }
    }
  });
}

// Calls f(row, g, p, col_rsqrt, r_factor) for each row of a factored unit, where
// U = g * (r_factor * col_rsqrt[c]) on that row.
template <typename P, typename F>
void for_each_factored_row(const AdafactorTensorArgs& t, const Chunk& unit, F&& f) {
  const int64_t cols = t.cols;
  for (int64_t row = unit.begin / cols; row < unit.end / cols; ++row) {
    const int64_t matrix = row / t.rows;
    const float r_factor = 1.f / OpMath<float>::sqrt(t.exp_avg_sq_row[row] / t.row_mean[matrix]);
    f(row * cols, t.col_rsqrt + matrix * cols, r_factor);
  }
}

// Pass 2 of a factored unit: sum U^2.
template <typename P>
void adafactor_update_norm_factored(const AdafactorLaunch& launch, const AdafactorTensorArgs& t,
                                    const Chunk& unit, int64_t k) {
  const auto* grad = static_cast<const P*>(t.grad);
  const int64_t cols = t.cols;
  const FloatVec inv(launch.inv_grad_scale);
  double u2 = 0.0;
  for_each_factored_row<P>(t, unit, [&](int64_t offset, const float* col_rsqrt, float r_factor) {
    const P* g = grad + offset;
    const FloatVec r(r_factor);
    FloatVec lanes(0.f);
    float tail = 0.f;
    int64_t c = 0;
    for (; c + kVecBlock <= cols; c += kVecBlock) {
      FloatVec gv[2];
      load_block(g + c, gv[0], gv[1]);
      for (int h = 0; h < 2; ++h) {
        const FloatVec u = gv[h] * inv * (r * FloatVec::loadu(col_rsqrt + c + h * FloatVec::size()));
        lanes = lanes + u * u;
      }
    }
    for (; c < cols; ++c) {
      const float u = load_float(g, c) * launch.inv_grad_scale * (r_factor * col_rsqrt[c]);
      tail += u * u;
    }
    u2 += static_cast<double>(horizontal_sum(lanes)) + tail;
  });
  launch.unit_u2[k] = u2;
}

inline void adafactor_update_norm_units(const AdafactorLaunch& launch, const Chunk* units,
                                        int64_t num_units) {
  dispatch_param(launch.param_dtype, [&](auto p_tag) {
    for (int64_t j = 0; j < num_units; ++j) {
      const Chunk& unit = units[j];
      const AdafactorTensorArgs& t = launch.tensors[unit.tensor];
      if (t.rows > 0) {
        adafactor_update_norm_factored<decltype(p_tag)>(launch, t, unit, &unit - launch.units);
      }
    }
  });
}

// Pass 3 over elements [0, n) from `offset` of one row (factored) or one unit (unfactored):
// u_block(i, u) fills u[0..1] with U's block of kVecBlock elements at i, u_scalar(i) is U at i.
template <typename P, RoundMode M, typename UBlock, typename UScalar>
inline void adafactor_apply_range(const AdafactorTensorArgs& t, int64_t offset, int64_t n,
                                  UBlock&& u_block, UScalar&& u_scalar) {
  auto* param = static_cast<P*>(t.param);
  float* exp_avg = t.exp_avg == nullptr ? nullptr : t.exp_avg + offset;
  const AdafactorApply& c = t.apply;
  int64_t i = 0;
  for (; i + kVecBlock <= n; i += kVecBlock) {
    FloatVec p[2], m[2], u[2];
    load_param_block<M>(param, t.write, offset + i, p[0], p[1]);
    if (c.use_first_moment) {
      load_block(exp_avg + i, m[0], m[1]);
    }
    u_block(i, u);
    for (int h = 0; h < 2; ++h) {
      adafactor_apply(p[h], u[h], m[h], c);
    }
    store_param_block<M>(param, t.write, offset + i, p[0], p[1]);
    if (c.use_first_moment) {
      store_block(exp_avg + i, m[0], m[1]);
    }
  }
  for (; i < n; ++i) {
    float p = load_param<M>(param, t.write, offset + i);
    float m = c.use_first_moment ? exp_avg[i] : 0.f;
    adafactor_apply(p, u_scalar(i), m, c);
    store_param<M>(param, t.write, offset + i, p);
    if (c.use_first_moment) {
      exp_avg[i] = m;
    }
  }
}

template <typename P, RoundMode M>
void adafactor_apply_unit(const AdafactorLaunch& launch, const AdafactorTensorArgs& t,
                          const Chunk& unit) {
  // The last pass that reads g, so the one that stores it back unscaled.
  auto* grad = static_cast<P*>(t.grad);
  const float unscale = launch.unscale_grads;
  const FloatVec inv(launch.inv_grad_scale), one(1.f);
  const float inv_scale = launch.inv_grad_scale;
  constexpr int64_t kHalf = FloatVec::size();
  if (t.rows > 0) {
    for_each_factored_row<P>(t, unit, [&](int64_t offset, const float* col_rsqrt, float r_factor) {
      P* g = grad + offset;
      const FloatVec r(r_factor);
      adafactor_apply_range<P, M>(
          t, offset, t.cols,
          [&](int64_t i, FloatVec* u) {
            load_block(g + i, u[0], u[1]);
            if (unscale != 0.f) {
              store_unscaled_block(g + i, u, unscale);
            }
            for (int h = 0; h < 2; ++h) {
              u[h] = u[h] * inv * (r * FloatVec::loadu(col_rsqrt + i + h * kHalf));
            }
          },
          [&](int64_t i) {
            const float scaled = load_float(g, i);
            if (unscale != 0.f) {
              store_unscaled(g, i, unscale);
            }
            return scaled * inv_scale * (r_factor * col_rsqrt[i]);
          });
    });
    return;
  }
  P* g = grad + unit.begin;
  const float* sq = t.exp_avg_sq + unit.begin;
  adafactor_apply_range<P, M>(
      t, unit.begin, unit.end - unit.begin,
      [&](int64_t i, FloatVec* u) {
        load_block(g + i, u[0], u[1]);
        if (unscale != 0.f) {
          store_unscaled_block(g + i, u, unscale);
        }
        for (int h = 0; h < 2; ++h) {
          u[h] = u[h] * inv * (one / FloatVec::loadu(sq + i + h * kHalf).sqrt());
        }
      },
      [&](int64_t i) {
        const float scaled = load_float(g, i);
        if (unscale != 0.f) {
          store_unscaled(g, i, unscale);
        }
        return scaled * inv_scale * (1.f / OpMath<float>::sqrt(sq[i]));
      });
}

inline void adafactor_apply_units(const AdafactorLaunch& launch, const Chunk* units,
                                  int64_t num_units) {
  dispatch_param_round(launch.param_dtype, launch.round_mode, [&](auto p, auto mode) {
    for (int64_t j = 0; j < num_units; ++j) {
      adafactor_apply_unit<decltype(p), decltype(mode)::value>(launch, launch.tensors[units[j].tensor], units[j]);
    }
  });
}

}  // namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE

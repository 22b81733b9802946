#pragma once
// Every optimizer's CPU chunk kernels, compiled once per CPU capability by cpu/kernels_*.cpp.
// See [Note: CPU capability builds] in cpu/kernel_table.h. Must be included inside
// DLDNA_KERNELS_NAMESPACE (a namespace unique to the capability) by those files only.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>

#include "common/adafactor_math.h"
#include "common/adam_math.h"
#include "common/lion_math.h"
#include "common/sophia_math.h"
#include "cpu/kernel_table.h"
#include "cpu/vec_io.h"
#if defined(DLDNA_LOWBIT_AVX512)
#include "cpu/vec512.h"
#endif

namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE {

// Calls f(P{}, S{}) with the storage types of params and states.
template <typename F>
void dispatch_param_state(Dtype param, Dtype state, F&& f) {
  switch (param) {
    case Dtype::Float:
      return f(float{}, float{});
    case Dtype::BFloat16:
      return state == Dtype::Float ? f(c10::BFloat16{}, float{}) : f(c10::BFloat16{}, c10::BFloat16{});
    case Dtype::Half:
      return state == Dtype::Float ? f(c10::Half{}, float{}) : f(c10::Half{}, c10::Half{});
  }
}

// See [Note: unscaled grads] in cpu/kernel_table.h: g * unscale (1 / GradScaler's scale) stored
// back into the grad's block or element.
template <typename P>
inline void store_unscaled_block(P* grad, const FloatVec* g, float unscale) {
  const FloatVec factor(unscale);
  store_block(grad, g[0] * factor, g[1] * factor);
}

template <typename P>
inline void store_unscaled(P* grad, int64_t i, float unscale) {
  grad[i] = static_cast<P>(static_cast<float>(grad[i]) * unscale);
}

template <typename P, typename S>
void adam_range(const AdamTensorArgs& t, int64_t begin, int64_t end, float unscale) {
  auto* param = static_cast<P*>(t.param);
  auto* grad = static_cast<P*>(t.grad);
  auto* exp_avg = static_cast<S*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<S*>(t.exp_avg_sq);
  auto* max_exp_avg_sq = static_cast<S*>(t.max_exp_avg_sq);
  const AdamCoefficients c = t.coefficients;

  int64_t i = begin;
  for (; i + kVecBlock <= end; i += kVecBlock) {
    FloatVec p[2], g[2], m[2], v[2], v_max[2];
    load_block(param + i, p[0], p[1]);
    load_block(grad + i, g[0], g[1]);
    load_block(exp_avg + i, m[0], m[1]);
    load_block(exp_avg_sq + i, v[0], v[1]);
    if (c.amsgrad) {
      load_block(max_exp_avg_sq + i, v_max[0], v_max[1]);
    }
    for (int k = 0; k < 2; ++k) {
      adam_update(p[k], g[k], m[k], v[k], v_max[k], c);
    }
    store_block(param + i, p[0], p[1]);
    store_block(exp_avg + i, m[0], m[1]);
    store_block(exp_avg_sq + i, v[0], v[1]);
    if (c.amsgrad) {
      store_block(max_exp_avg_sq + i, v_max[0], v_max[1]);
    }
    if (unscale != 0.f) {
      store_unscaled_block(grad + i, g, unscale);
    }
  }
  // The tail runs the same rule on scalars.
  for (; i < end; ++i) {
    float p = static_cast<float>(param[i]);
    float m = static_cast<float>(exp_avg[i]);
    float v = static_cast<float>(exp_avg_sq[i]);
    float v_max = c.amsgrad ? static_cast<float>(max_exp_avg_sq[i]) : 0.f;
    adam_update(p, static_cast<float>(grad[i]), m, v, v_max, c);
    param[i] = static_cast<P>(p);
    exp_avg[i] = static_cast<S>(m);
    exp_avg_sq[i] = static_cast<S>(v);
    if (c.amsgrad) {
      max_exp_avg_sq[i] = static_cast<S>(v_max);
    }
    if (unscale != 0.f) {
      store_unscaled(grad, i, unscale);
    }
  }
}

inline void adam_chunks(const AdamLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  dispatch_param_state(launch.param_dtype, launch.state_dtype, [&](auto p_tag, auto s_tag) {
    using P = decltype(p_tag);
    using S = decltype(s_tag);
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      adam_range<P, S>(launch.tensors[chunk.tensor], chunk.begin, chunk.end,
                       launch.unscale_grads);
    }
  });
}

template <typename P, typename S>
void lion_range(const LionTensorArgs& t, const LionCoefficients& c, int64_t begin, int64_t end,
                float unscale) {
  auto* param = static_cast<P*>(t.param);
  auto* grad = static_cast<P*>(t.grad);
  auto* exp_avg = static_cast<S*>(t.exp_avg);
  int64_t i = begin;
  for (; i + kVecBlock <= end; i += kVecBlock) {
    FloatVec p[2], g[2], m[2];
    load_block(param + i, p[0], p[1]);
    load_block(grad + i, g[0], g[1]);
    load_block(exp_avg + i, m[0], m[1]);
    for (int k = 0; k < 2; ++k) {
      lion_update(p[k], g[k], m[k], c);
    }
    store_block(param + i, p[0], p[1]);
    store_block(exp_avg + i, m[0], m[1]);
    if (unscale != 0.f) {
      store_unscaled_block(grad + i, g, unscale);
    }
  }
  for (; i < end; ++i) {
    float p = static_cast<float>(param[i]);
    float m = static_cast<float>(exp_avg[i]);
    lion_update(p, static_cast<float>(grad[i]), m, c);
    param[i] = static_cast<P>(p);
    exp_avg[i] = static_cast<S>(m);
    if (unscale != 0.f) {
      store_unscaled(grad, i, unscale);
    }
  }
}

inline void lion_chunks(const LionLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  dispatch_param_state(launch.param_dtype, launch.state_dtype, [&](auto p_tag, auto s_tag) {
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      lion_range<decltype(p_tag), decltype(s_tag)>(launch.tensors[chunk.tensor],
                                                   launch.coefficients, chunk.begin, chunk.end,
                                                   launch.unscale_grads);
    }
  });
}

// Returns the number of coordinates whose ratio was below 1 (not clipped).
template <typename P, typename S>
int64_t sophia_range(const SophiaTensorArgs& t, const SophiaCoefficients& c, int64_t begin,
                     int64_t end, float unscale) {
  auto* param = static_cast<P*>(t.param);
  auto* grad = static_cast<P*>(t.grad);
  auto* exp_avg = static_cast<S*>(t.exp_avg);
  const auto* hessian = static_cast<const S*>(t.hessian);
  // Per-lane counts stay exact in fp32: a chunk has at most kChunkElements coordinates.
  const FloatVec one(1.f);
  FloatVec unclipped_lanes(0.f);
  int64_t unclipped = 0;
  int64_t i = begin;
  for (; i + kVecBlock <= end; i += kVecBlock) {
    FloatVec p[2], g[2], m[2], h[2];
    load_block(param + i, p[0], p[1]);
    load_block(grad + i, g[0], g[1]);
    load_block(exp_avg + i, m[0], m[1]);
    load_block(hessian + i, h[0], h[1]);
    for (int k = 0; k < 2; ++k) {
      const FloatVec ratio = sophia_update(p[k], g[k], m[k], h[k], c);
      unclipped_lanes = unclipped_lanes + ((ratio < one) & one);
    }
    store_block(param + i, p[0], p[1]);
    store_block(exp_avg + i, m[0], m[1]);
    if (unscale != 0.f) {
      store_unscaled_block(grad + i, g, unscale);
    }
  }
  float lanes[FloatVec::size()];
  unclipped_lanes.store(lanes);
  for (float lane : lanes) {
    unclipped += static_cast<int64_t>(lane);
  }
  for (; i < end; ++i) {
    float p = static_cast<float>(param[i]);
    float m = static_cast<float>(exp_avg[i]);
    const float ratio = sophia_update(p, static_cast<float>(grad[i]), m, static_cast<float>(hessian[i]), c);
    unclipped += ratio < 1.f;
    param[i] = static_cast<P>(p);
    exp_avg[i] = static_cast<S>(m);
    if (unscale != 0.f) {
      store_unscaled(grad, i, unscale);
    }
  }
  return unclipped;
}

inline void sophia_chunks(const SophiaLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  int64_t unclipped = 0;
  dispatch_param_state(launch.param_dtype, launch.state_dtype, [&](auto p_tag, auto s_tag) {
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      unclipped += sophia_range<decltype(p_tag), decltype(s_tag)>(
          launch.tensors[chunk.tensor], launch.coefficients, chunk.begin, chunk.end,
          launch.unscale_grads);
    }
  });
  if (launch.unclipped != nullptr) {
    launch.unclipped->fetch_add(unclipped, std::memory_order_relaxed);
  }
}

template <typename E, typename H>
void sophia_hessian_range(const SophiaHessianTensorArgs& t, const SophiaHessianCoefficients& c,
                          int64_t begin, int64_t end) {
  auto* hessian = static_cast<H*>(t.hessian);
  const auto* estimate = static_cast<const E*>(t.estimate);
  int64_t i = begin;
  for (; i + kVecBlock <= end; i += kVecBlock) {
    FloatVec h[2], x[2];
    load_block(hessian + i, h[0], h[1]);
    load_block(estimate + i, x[0], x[1]);
    for (int k = 0; k < 2; ++k) {
      sophia_hessian_update(h[k], x[k], c);
    }
    store_block(hessian + i, h[0], h[1]);
  }
  for (; i < end; ++i) {
    float h = static_cast<float>(hessian[i]);
    sophia_hessian_update(h, static_cast<float>(estimate[i]), c);
    hessian[i] = static_cast<H>(h);
  }
}

inline void sophia_hessian_chunks(const SophiaHessianLaunch& launch, const Chunk* chunks,
                                  int64_t num_chunks) {
  dispatch_param_state(launch.estimate_dtype, launch.hessian_dtype, [&](auto e_tag, auto h_tag) {
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      sophia_hessian_range<decltype(e_tag), decltype(h_tag)>(
          launch.tensors[chunk.tensor], launch.coefficients, chunk.begin, chunk.end);
    }
  });
}

// ---- AdaFactor: see [Note: AdaFactor passes] in common/adafactor_math.h ----

inline float horizontal_sum(const FloatVec& v) {
  float lanes[FloatVec::size()];
  v.store(lanes);
  float sum = 0.f;
  for (float lane : lanes) {
    sum += lane;
  }
  return sum;
}

// Sums of squares are kept per vector lane in fp32 over at most one row (or kFlushElements) and
// then added up in double, so a unit's sum does not lose digits over ~10^5 elements.
constexpr int64_t kFlushElements = 4096;

template <typename T>
inline float load_float(const T* ptr, int64_t i) {
  return static_cast<float>(ptr[i]);
}

// Pass 1 of a factored unit: R's EMA for its rows, its column sums of G2, and sum p^2.
template <typename P>
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
    const P* p = param + row * cols;
    FloatVec row_lanes(0.f), p2_lanes(0.f);
    float row_tail = 0.f, p2_tail = 0.f;
    int64_t c = 0;
    for (; c + kVecBlock <= cols; c += kVecBlock) {
      FloatVec gv[2], pv[2];
      load_block(g + c, gv[0], gv[1]);
      load_block(p + c, pv[0], pv[1]);
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
      const float pc = load_float(p, c);
      p2_tail += pc * pc;
    }
    const float row_mean = (horizontal_sum(row_lanes) + row_tail) / static_cast<float>(cols);
    t.exp_avg_sq_row[row] = adafactor_ema(t.exp_avg_sq_row[row], row_mean, t.decay);
    p2 += static_cast<double>(horizontal_sum(p2_lanes)) + p2_tail;
  }
  launch.unit_p2[k] = p2;
}

// Pass 1 of an unfactored unit: V's EMA, sum U^2 (U = g rsqrt(V)) and sum p^2.
template <typename P>
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
      load_block(param + i, pv[0], pv[1]);
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
      const float p = load_float(param, i);
      p2_tail += p * p;
    }
    p2 += static_cast<double>(horizontal_sum(p2_lanes)) + p2_tail;
    u2 += static_cast<double>(horizontal_sum(u2_lanes)) + u2_tail;
  }
  launch.unit_p2[k] = p2;
  launch.unit_u2[k] = u2;
}

// Calls f(P{}) with the params' storage type.
template <typename F>
void dispatch_param(Dtype param, F&& f) {
  switch (param) {
    case Dtype::Float:
      return f(float{});
    case Dtype::BFloat16:
      return f(c10::BFloat16{});
    case Dtype::Half:
      return f(c10::Half{});
  }
}

inline void adafactor_reduce_units(const AdafactorLaunch& launch, const Chunk* units,
                                   int64_t num_units) {
  dispatch_param(launch.param_dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    for (int64_t j = 0; j < num_units; ++j) {
      const Chunk& unit = units[j];
      const int64_t k = &unit - launch.units;
      const AdafactorTensorArgs& t = launch.tensors[unit.tensor];
      if (t.rows > 0) {
        adafactor_reduce_factored<P>(launch, t, unit, k);
      } else {
        adafactor_reduce_unfactored<P>(launch, t, unit, k);
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
template <typename P, typename UBlock, typename UScalar>
inline void adafactor_apply_range(const AdafactorTensorArgs& t, int64_t offset, int64_t n,
                                  UBlock&& u_block, UScalar&& u_scalar) {
  auto* param = static_cast<P*>(t.param) + offset;
  float* exp_avg = t.exp_avg == nullptr ? nullptr : t.exp_avg + offset;
  const AdafactorApply& c = t.apply;
  int64_t i = 0;
  for (; i + kVecBlock <= n; i += kVecBlock) {
    FloatVec p[2], m[2], u[2];
    load_block(param + i, p[0], p[1]);
    if (c.use_first_moment) {
      load_block(exp_avg + i, m[0], m[1]);
    }
    u_block(i, u);
    for (int h = 0; h < 2; ++h) {
      adafactor_apply(p[h], u[h], m[h], c);
    }
    store_block(param + i, p[0], p[1]);
    if (c.use_first_moment) {
      store_block(exp_avg + i, m[0], m[1]);
    }
  }
  for (; i < n; ++i) {
    float p = static_cast<float>(param[i]);
    float m = c.use_first_moment ? exp_avg[i] : 0.f;
    adafactor_apply(p, u_scalar(i), m, c);
    param[i] = static_cast<P>(p);
    if (c.use_first_moment) {
      exp_avg[i] = m;
    }
  }
}

template <typename P>
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
      adafactor_apply_range<P>(
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
  adafactor_apply_range<P>(
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
  dispatch_param(launch.param_dtype, [&](auto p_tag) {
    for (int64_t j = 0; j < num_units; ++j) {
      adafactor_apply_unit<decltype(p_tag)>(launch, launch.tensors[units[j].tensor], units[j]);
    }
  });
}

// ---- fused_grad_norm: one partial per chunk ----

template <typename T>
double grad_norm_range(const T* x, int64_t begin, int64_t end, NormKind kind) {
  // Lanes accumulate in fp32 over at most kFlushElements, then flush into double (as AdaFactor's
  // sums), so a 32768-element chunk keeps ~1e-7 relative accuracy. The inf norm uses OpMath's max,
  // which lets NaN through as torch.linalg.vector_norm does.
  using VecMath = OpMath<FloatVec>;
  using Math = OpMath<float>;
  double total = 0.0;
  for (int64_t flush = begin; flush < end; flush += kFlushElements) {
    const int64_t stop = std::min(flush + kFlushElements, end);
    FloatVec lanes(0.f);
    float tail = 0.f;
    int64_t i = flush;
    for (; i + kVecBlock <= stop; i += kVecBlock) {
      FloatVec v[2];
      load_block(x + i, v[0], v[1]);
      for (int h = 0; h < 2; ++h) {
        if (kind == NormKind::L2) {
          lanes = lanes + v[h] * v[h];
        } else {
          const FloatVec a = VecMath::abs(v[h]);
          lanes = kind == NormKind::L1 ? lanes + a : VecMath::max(lanes, a);
        }
      }
    }
    for (; i < stop; ++i) {
      const float v = static_cast<float>(x[i]);
      if (kind == NormKind::L2) {
        tail += v * v;
      } else if (kind == NormKind::L1) {
        tail += Math::abs(v);
      } else {
        tail = Math::max(tail, Math::abs(v));
      }
    }
    if (kind == NormKind::Inf) {
      float lane_values[FloatVec::size()];
      lanes.store(lane_values);
      for (float lane : lane_values) {
        tail = Math::max(tail, lane);
      }
      total = Math::max(static_cast<float>(total), tail);  // partial maxima are floats
    } else {
      total += static_cast<double>(horizontal_sum(lanes)) + tail;
    }
  }
  return total;
}

inline void grad_norm_chunks(const GradNormLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  dispatch_param(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      launch.partials[&chunk - launch.chunks] = grad_norm_range(
          static_cast<const T*>(launch.tensors[chunk.tensor]), chunk.begin, chunk.end, launch.kind);
    }
  });
}

inline void scale_chunks(const ScaleLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  dispatch_param(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    const FloatVec factor(launch.factor);
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      T* x = static_cast<T*>(launch.tensors[chunk.tensor]);
      int64_t i = chunk.begin;
      for (; i + kVecBlock <= chunk.end; i += kVecBlock) {
        FloatVec v[2];
        load_block(x + i, v[0], v[1]);
        store_block(x + i, v[0] * factor, v[1] * factor);
      }
      for (; i < chunk.end; ++i) {
        x[i] = static_cast<T>(static_cast<float>(x[i]) * launch.factor);
      }
    }
  });
}

// ---- Low-bit states: see [Note: blockwise quantized states] in common/quantization.h ----

using IntVec = at::vec::Vectorized<int32_t>;

// The per-element helpers below run once per vector; a call each (GCC does not inline them on its
// own) costs as much as their work.
#ifndef DLDNA_ALWAYS_INLINE
#define DLDNA_ALWAYS_INLINE inline __attribute__((always_inline))
#endif
static_assert(IntVec::size() == FloatVec::size());

// The nearest code of y (see [Note: nearest-code lookup] in cpu/kernel_table.h), as a scalar.
DLDNA_ALWAYS_INLINE int32_t nearest_code(float y, const QuantLut& lut) {
  if (y != y) {
    y = 1.f;
  }
  y = std::min(std::max(y, lut.low), 1.f);
  int32_t bits;
  std::memcpy(&bits, &y, sizeof(bits));
  const int32_t sign = bits >> 31;  // -1 for negative values (and -0.0), else 0
  const int32_t relative = std::max(bits & 0x7fffffff, kQuantLowBits) - kQuantLowBits;
  const int32_t bucket = relative >> lut.shift;
  const int32_t offset = relative & ((1 << lut.shift) - 1);
  const int32_t entry = lut.entries[bucket + (sign & lut.num_buckets)];
  const int32_t past = offset > (entry & 0xfffff) - 1 ? 1 : 0;
  return (entry >> 20) + ((past ^ sign) - sign);
}

// The same for vectors, in three steps around the table read, which is a scalar loop: on this
// project's machine (AMD EPYC) an AVX2 gather of 8 lanes took 0.40 ns per element, 8 scalar loads
// 0.20 ns (BENCHMARKS.md, issue 16).
// Step 1: y with the NaN and clamp rules, and its bucket (entry index).
DLDNA_ALWAYS_INLINE FloatVec clamped_codes_input(FloatVec y, const QuantLut& lut) {
  const FloatVec one(1.f);
  y = FloatVec::blendv(y, one, y != y);
  return at::vec::clamp(y, FloatVec(lut.low), one);
}

DLDNA_ALWAYS_INLINE IntVec bucket_index(const FloatVec& y, const QuantLut& lut) {
  const IntVec bits = at::vec::cast<int32_t>(y);
  const IntVec relative = at::vec::maximum(bits & IntVec(0x7fffffff), IntVec(kQuantLowBits)) -
                          IntVec(kQuantLowBits);
  return (relative >> IntVec(lut.shift)) + ((bits >> IntVec(31)) & IntVec(lut.num_buckets));
}

// Step 3: the code from y and its bucket's entry.
DLDNA_ALWAYS_INLINE IntVec decode_entry(const FloatVec& y, const IntVec& entry, const QuantLut& lut) {
  const IntVec bits = at::vec::cast<int32_t>(y);
  const IntVec sign = bits >> IntVec(31);
  const IntVec relative = at::vec::maximum(bits & IntVec(0x7fffffff), IntVec(kQuantLowBits)) -
                          IntVec(kQuantLowBits);
  const IntVec offset = relative & IntVec((1 << lut.shift) - 1);
  const IntVec past = (offset > ((entry & IntVec(0xfffff)) - IntVec(1))) & IntVec(1);
  return (entry >> IntVec(20)) + ((past ^ sign) - sign);
}

// Step 2, and the map lookups of dequantization: scalar loads, kept out of the vectorizer's
// reach so that it does not turn them back into gathers.
__attribute__((noinline, optimize("no-tree-vectorize"))) inline void read_entries(const int32_t* table,
                                                                                 int32_t* index, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    index[i] = table[index[i]];
  }
}

// Codes of elements [first, first + n) of a state (first even at 4 bits) into int32 lanes.
DLDNA_ALWAYS_INLINE void unpack_codes(const uint8_t* codes, int bits, int64_t first, int64_t n, int32_t* out) {
  if (bits == 8) {
    const uint8_t* src = codes + first;
    for (int64_t i = 0; i < n; ++i) {
      out[i] = src[i];
    }
    return;
  }
  const uint8_t* src = codes + first / 2;
  for (int64_t i = 0; i < n / 2; ++i) {
    out[2 * i] = src[i] & 15;
    out[2 * i + 1] = src[i] >> 4;
  }
  if (n % 2 != 0) {
    out[n - 1] = src[n / 2] & 15;
  }
}

DLDNA_ALWAYS_INLINE void pack_codes(const int32_t* in, int bits, int64_t first, int64_t n, uint8_t* codes) {
  if (bits == 8) {
    uint8_t* dst = codes + first;
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<uint8_t>(in[i]);
    }
    return;
  }
  uint8_t* dst = codes + first / 2;
  for (int64_t i = 0; i < n / 2; ++i) {
    dst[i] = static_cast<uint8_t>(in[2 * i] | (in[2 * i + 1] << 4));
  }
  if (n % 2 != 0) {
    dst[n / 2] = static_cast<uint8_t>(in[n - 1]);  // a tensor's odd last element: high nibble 0
  }
}

// Scratch of one block: its dequantized values and its codes.
struct QuantBlock {
  float values[kMaxQuantBlock];
  int32_t codes[kMaxQuantBlock];
};

// out[i] = map[codes[i]] * absmax for i < n.
__attribute__((noinline, optimize("no-tree-vectorize"))) inline void lookup_values(const float* map,
                                                                                  const int32_t* codes,
                                                                                  float absmax, int64_t n,
                                                                                  float* out) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = map[codes[i]] * absmax;
  }
}

#if defined(DLDNA_LOWBIT_AVX512)
#include "cpu/lowbit_avx512.h"
#endif

DLDNA_ALWAYS_INLINE void dequantize_block(const uint8_t* codes, float absmax, const QuantLut& lut, int bits,
                                          int64_t first, int64_t n, QuantBlock& scratch) {
#if defined(DLDNA_LOWBIT_AVX512)
  dequantize_block_avx512(codes, absmax, lut, bits, first, n, scratch.values);
#else
  unpack_codes(codes, bits, first, n, scratch.codes);
  lookup_values(lut.values, scratch.codes, absmax, n, scratch.values);
#endif
}

// Requantizes values[0, n): returns the block's absmax and leaves the packed codes at `codes`.
DLDNA_ALWAYS_INLINE float quantize_block(QuantBlock& scratch, const QuantLut& lut, int bits, int64_t first,
                            int64_t n, uint8_t* codes) {
#if defined(DLDNA_LOWBIT_AVX512)
  return quantize_block_avx512(scratch.values, lut, bits, first, n, codes);
#else
  using VecMath = OpMath<FloatVec>;
  using Math = OpMath<float>;
  FloatVec lanes(0.f);
  float absmax = 0.f;
  int64_t i = 0;
  for (; i + FloatVec::size() <= n; i += FloatVec::size()) {
    lanes = VecMath::max(lanes, VecMath::abs(FloatVec::loadu(scratch.values + i)));
  }
  for (; i < n; ++i) {
    absmax = Math::max(absmax, Math::abs(scratch.values[i]));
  }
  float lane_values[FloatVec::size()];
  lanes.store(lane_values);
  for (float lane : lane_values) {
    absmax = Math::max(absmax, lane);
  }
  const float scale = absmax > 0.f ? 1.f / absmax : 0.f;
  const FloatVec scale_vec(scale);
  // values become the clamped y, codes their bucket, then the bucket's entry, then the code.
  const int64_t vector_end = n / FloatVec::size() * FloatVec::size();
  for (i = 0; i < vector_end; i += FloatVec::size()) {
    const FloatVec y = clamped_codes_input(FloatVec::loadu(scratch.values + i) * scale_vec, lut);
    y.store(scratch.values + i);
    bucket_index(y, lut).store(scratch.codes + i);
  }
  read_entries(lut.entries, scratch.codes, vector_end);
  for (i = 0; i < vector_end; i += FloatVec::size()) {
    decode_entry(FloatVec::loadu(scratch.values + i), IntVec::loadu(scratch.codes + i), lut)
        .store(scratch.codes + i);
  }
  for (i = vector_end; i < n; ++i) {
    scratch.codes[i] = nearest_code(scratch.values[i] * scale, lut);
  }
  pack_codes(scratch.codes, bits, first, n, codes);
  return absmax;
#endif
}

template <typename P>
void adam_lowbit_block(const LowbitLaunch& launch, const LowbitTensorArgs& t, int64_t first,
                       int64_t n, QuantBlock& m, QuantBlock& v) {
  const int64_t block = first / launch.block_size;
  const QuantLut& m_lut = *launch.exp_avg_lut;
  const QuantLut& v_lut = *launch.exp_avg_sq_lut;
  dequantize_block(t.exp_avg.codes, t.exp_avg.absmax[block], m_lut, launch.bits, first, n, m);
  dequantize_block(t.exp_avg_sq.codes, t.exp_avg_sq.absmax[block], v_lut, launch.bits, first, n, v);
  auto* param = static_cast<P*>(t.param) + first;
  auto* grad = static_cast<P*>(t.grad) + first;
  const AdamCoefficients& c = t.adam;
  const float unscale = launch.unscale_grads;
  int64_t i = 0;
  for (; i + kVecBlock <= n; i += kVecBlock) {
    FloatVec p[2], g[2], mv[2], vv[2], unused[2];
    load_block(param + i, p[0], p[1]);
    load_block(grad + i, g[0], g[1]);
    for (int h = 0; h < 2; ++h) {
      const int64_t at = i + h * FloatVec::size();
      mv[h] = FloatVec::loadu(m.values + at);
      vv[h] = FloatVec::loadu(v.values + at);
      adam_update(p[h], g[h], mv[h], vv[h], unused[h], c);
      mv[h].store(m.values + at);
      vv[h].store(v.values + at);
    }
    store_block(param + i, p[0], p[1]);
    if (unscale != 0.f) {
      store_unscaled_block(grad + i, g, unscale);
    }
  }
  for (; i < n; ++i) {
    float p = static_cast<float>(param[i]);
    float unused = 0.f;
    adam_update(p, static_cast<float>(grad[i]), m.values[i], v.values[i], unused, c);
    param[i] = static_cast<P>(p);
    if (unscale != 0.f) {
      store_unscaled(grad, i, unscale);
    }
  }
  t.exp_avg.absmax[block] = quantize_block(m, m_lut, launch.bits, first, n, t.exp_avg.codes);
  t.exp_avg_sq.absmax[block] = quantize_block(v, v_lut, launch.bits, first, n, t.exp_avg_sq.codes);
}

template <typename P>
void lion_lowbit_block(const LowbitLaunch& launch, const LowbitTensorArgs& t, int64_t first,
                       int64_t n, QuantBlock& m) {
  const int64_t block = first / launch.block_size;
  const QuantLut& lut = *launch.exp_avg_lut;
  dequantize_block(t.exp_avg.codes, t.exp_avg.absmax[block], lut, launch.bits, first, n, m);
  auto* param = static_cast<P*>(t.param) + first;
  auto* grad = static_cast<P*>(t.grad) + first;
  const float unscale = launch.unscale_grads;
  int64_t i = 0;
  for (; i + kVecBlock <= n; i += kVecBlock) {
    FloatVec p[2], g[2];
    load_block(param + i, p[0], p[1]);
    load_block(grad + i, g[0], g[1]);
    for (int h = 0; h < 2; ++h) {
      float* at = m.values + i + h * FloatVec::size();
      FloatVec mv = FloatVec::loadu(at);
      lion_update(p[h], g[h], mv, launch.lion);
      mv.store(at);
    }
    store_block(param + i, p[0], p[1]);
    if (unscale != 0.f) {
      store_unscaled_block(grad + i, g, unscale);
    }
  }
  for (; i < n; ++i) {
    float p = static_cast<float>(param[i]);
    lion_update(p, static_cast<float>(grad[i]), m.values[i], launch.lion);
    param[i] = static_cast<P>(p);
    if (unscale != 0.f) {
      store_unscaled(grad, i, unscale);
    }
  }
  t.exp_avg.absmax[block] = quantize_block(m, lut, launch.bits, first, n, t.exp_avg.codes);
}

// Calls block(tensor args, first element, count) for each quantization block of the chunks.
template <typename F>
void for_each_quant_block(const Chunk* chunks, int64_t num_chunks, int64_t block_size, F&& block) {
  for (int64_t k = 0; k < num_chunks; ++k) {
    const Chunk& chunk = chunks[k];
    for (int64_t first = chunk.begin; first < chunk.end; first += block_size) {
      block(chunk.tensor, first, std::min(block_size, chunk.end - first));
    }
  }
}

inline void adam_lowbit_chunks(const LowbitLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  // thread_local: 64 KiB of scratch per thread, too much for a worker's stack.
  thread_local QuantBlock m_scratch, v_scratch;
  QuantBlock& m = m_scratch;  // one TLS lookup per call, not per block
  QuantBlock& v = v_scratch;
  dispatch_param(launch.param_dtype, [&](auto p_tag) {
    for_each_quant_block(chunks, num_chunks, launch.block_size, [&](int64_t tensor, int64_t first, int64_t n) {
#if defined(DLDNA_LOWBIT_AVX512)
      adam_lowbit_block_avx512<decltype(p_tag)>(launch, launch.tensors[tensor], first, n, m, v);
#else
      adam_lowbit_block<decltype(p_tag)>(launch, launch.tensors[tensor], first, n, m, v);
#endif
    });
  });
}

inline void lion_lowbit_chunks(const LowbitLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  thread_local QuantBlock m_scratch;
  QuantBlock& m = m_scratch;
  dispatch_param(launch.param_dtype, [&](auto p_tag) {
    for_each_quant_block(chunks, num_chunks, launch.block_size, [&](int64_t tensor, int64_t first, int64_t n) {
#if defined(DLDNA_LOWBIT_AVX512)
      lion_lowbit_block_avx512<decltype(p_tag)>(launch, launch.tensors[tensor], first, n, m);
#else
      lion_lowbit_block<decltype(p_tag)>(launch, launch.tensors[tensor], first, n, m);
#endif
    });
  });
}

inline void quantize_chunks(const QuantizeLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  thread_local QuantBlock tls_scratch;
  QuantBlock& scratch = tls_scratch;
  dispatch_param(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* input = static_cast<const T*>(launch.input);
    for_each_quant_block(chunks, num_chunks, launch.block_size, [&](int64_t, int64_t first, int64_t n) {
      for (int64_t i = 0; i < n; ++i) {
        scratch.values[i] = static_cast<float>(input[first + i]);
      }
      launch.output.absmax[first / launch.block_size] =
          quantize_block(scratch, *launch.lut, launch.bits, first, n, launch.output.codes);
    });
  });
}

inline void dequantize_chunks(const DequantizeLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  thread_local QuantBlock tls_scratch;
  QuantBlock& scratch = tls_scratch;
  for_each_quant_block(chunks, num_chunks, launch.block_size, [&](int64_t, int64_t first, int64_t n) {
    dequantize_block(launch.codes, launch.absmax[first / launch.block_size], *launch.lut, launch.bits,
                     first, n, scratch);
    std::copy(scratch.values, scratch.values + n, launch.output + first);
  });
}

inline const KernelTable& table(const char* name) {
  static const KernelTable kTable{name,
                                  &adam_chunks,
                                  &lion_chunks,
                                  &sophia_chunks,
                                  &sophia_hessian_chunks,
                                  &adafactor_reduce_units,
                                  &adafactor_update_norm_units,
                                  &adafactor_apply_units,
                                  &grad_norm_chunks,
                                  &scale_chunks,
                                  &adam_lowbit_chunks,
                                  &lion_lowbit_chunks,
                                  &quantize_chunks,
                                  &dequantize_chunks};
  return kTable;
}

}  // namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE

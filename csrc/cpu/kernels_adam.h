#pragma once
// Adam/AdamW's CPU chunk kernel (fp32, bf16 and fp16 params and states).
// Included through cpu/kernels_impl.h only, which each cpu/kernels_<capability>.cpp compiles once
// under its own namespace ([Note: CPU capability builds] in cpu/kernel_table.h).

#include "common/adam_math.h"
#include "cpu/kernels_common.h"
#include "cpu/param_write.h"

namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE {

template <typename P, typename S, RoundMode M, bool kCommon>
void adam_range_impl(const AdamTensorArgs& t, int64_t begin, int64_t end, float unscale) {
  auto* param = static_cast<P*>(t.param);
  auto* grad = static_cast<P*>(t.grad);
  auto* exp_avg = static_cast<S*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<S*>(t.exp_avg_sq);
  auto* max_exp_avg_sq = static_cast<S*>(t.max_exp_avg_sq);
  const AdamCoefficients c = t.coefficients;

  int64_t i = begin;
  for (; i + kVecBlock <= end; i += kVecBlock) {
    FloatVec p[2], g[2], m[2], v[2], v_max[2];
    load_param_block<M>(param, t.write, i, p[0], p[1]);
    load_block(grad + i, g[0], g[1]);
    load_block(exp_avg + i, m[0], m[1]);
    load_block(exp_avg_sq + i, v[0], v[1]);
    if (!kCommon && c.amsgrad) {
      load_block(max_exp_avg_sq + i, v_max[0], v_max[1]);
    }
    for (int k = 0; k < 2; ++k) {
      adam_update<kCommon>(p[k], g[k], m[k], v[k], v_max[k], c);
    }
    store_param_block<M>(param, t.write, i, p[0], p[1]);
    store_block(exp_avg + i, m[0], m[1]);
    store_block(exp_avg_sq + i, v[0], v[1]);
    if (!kCommon && c.amsgrad) {
      store_block(max_exp_avg_sq + i, v_max[0], v_max[1]);
    }
    if (!kCommon && unscale != 0.f) {
      store_unscaled_block(grad + i, g, unscale);
    }
  }
  // The tail runs the same rule on scalars.
  for (; i < end; ++i) {
    float p = load_param<M>(param, t.write, i);
    float m = static_cast<float>(exp_avg[i]);
    float v = static_cast<float>(exp_avg_sq[i]);
    float v_max = c.amsgrad ? static_cast<float>(max_exp_avg_sq[i]) : 0.f;
    adam_update(p, static_cast<float>(grad[i]), m, v, v_max, c);
    store_param<M>(param, t.write, i, p);
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

// Without amsgrad, maximize, grad scaling and L2 decay (adam_is_common), the loop has no tests of
// them. Those tests and the spills they caused made the bf16 step 17% slower on one thread, and
// left so little slack on two that stochastic rounding cost 1.22x instead of 1.05x (BENCHMARKS.md).
template <typename P, typename S, RoundMode M>
void adam_range(const AdamTensorArgs& t, int64_t begin, int64_t end, float unscale) {
  if (unscale == 0.f && adam_is_common(t.coefficients)) {
    adam_range_impl<P, S, M, true>(t, begin, end, unscale);
  } else {
    adam_range_impl<P, S, M, false>(t, begin, end, unscale);
  }
}

inline void adam_chunks(const AdamLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  dispatch_param_state_round(launch.param_dtype, launch.state_dtype, launch.round_mode, [&](auto p, auto s, auto mode) {
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      adam_range<decltype(p), decltype(s), decltype(mode)::value>(launch.tensors[chunk.tensor], chunk.begin,
                                                                  chunk.end, launch.unscale_grads);
    }
  });
}

}  // namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE

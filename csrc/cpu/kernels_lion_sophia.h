#pragma once
// Lion's and SophiaG's CPU chunk kernels, and SophiaG's Hessian EMA.
// Included through cpu/kernels_impl.h only, which each cpu/kernels_<capability>.cpp compiles once
// under its own namespace ([Note: CPU capability builds] in cpu/kernel_table.h).

#include "common/lion_math.h"
#include "common/sophia_math.h"
#include "cpu/kernels_common.h"
#include "cpu/param_write.h"

namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE {

template <typename P, typename S, RoundMode M>
void lion_range(const LionTensorArgs& t, const LionCoefficients& c, int64_t begin, int64_t end,
                float unscale) {
  auto* param = static_cast<P*>(t.param);
  auto* grad = static_cast<P*>(t.grad);
  auto* exp_avg = static_cast<S*>(t.exp_avg);
  int64_t i = begin;
  for (; i + kVecBlock <= end; i += kVecBlock) {
    FloatVec p[2], g[2], m[2];
    load_param_block<M>(param, t.write, i, p[0], p[1]);
    load_block(grad + i, g[0], g[1]);
    load_block(exp_avg + i, m[0], m[1]);
    for (int k = 0; k < 2; ++k) {
      lion_update(p[k], g[k], m[k], c);
    }
    store_param_block<M>(param, t.write, i, p[0], p[1]);
    store_block(exp_avg + i, m[0], m[1]);
    if (unscale != 0.f) {
      store_unscaled_block(grad + i, g, unscale);
    }
  }
  for (; i < end; ++i) {
    float p = load_param<M>(param, t.write, i);
    float m = static_cast<float>(exp_avg[i]);
    lion_update(p, static_cast<float>(grad[i]), m, c);
    store_param<M>(param, t.write, i, p);
    exp_avg[i] = static_cast<S>(m);
    if (unscale != 0.f) {
      store_unscaled(grad, i, unscale);
    }
  }
}

inline void lion_chunks(const LionLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  dispatch_param_state_round(launch.param_dtype, launch.state_dtype, launch.round_mode, [&](auto p, auto s, auto mode) {
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      lion_range<decltype(p), decltype(s), decltype(mode)::value>(
          launch.tensors[chunk.tensor], launch.coefficients, chunk.begin, chunk.end, launch.unscale_grads);
    }
  });
}

// Returns the number of coordinates whose ratio was below 1 (not clipped).
template <typename P, typename S, RoundMode M>
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
    load_param_block<M>(param, t.write, i, p[0], p[1]);
    load_block(grad + i, g[0], g[1]);
    load_block(exp_avg + i, m[0], m[1]);
    load_block(hessian + i, h[0], h[1]);
    for (int k = 0; k < 2; ++k) {
      const FloatVec ratio = sophia_update(p[k], g[k], m[k], h[k], c);
      unclipped_lanes = unclipped_lanes + ((ratio < one) & one);
    }
    store_param_block<M>(param, t.write, i, p[0], p[1]);
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
    float p = load_param<M>(param, t.write, i);
    float m = static_cast<float>(exp_avg[i]);
    const float ratio = sophia_update(p, static_cast<float>(grad[i]), m, static_cast<float>(hessian[i]), c);
    unclipped += ratio < 1.f;
    store_param<M>(param, t.write, i, p);
    exp_avg[i] = static_cast<S>(m);
    if (unscale != 0.f) {
      store_unscaled(grad, i, unscale);
    }
  }
  return unclipped;
}

inline void sophia_chunks(const SophiaLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  int64_t unclipped = 0;
  dispatch_param_state_round(launch.param_dtype, launch.state_dtype, launch.round_mode, [&](auto p, auto s, auto mode) {
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      unclipped += sophia_range<decltype(p), decltype(s), decltype(mode)::value>(
          launch.tensors[chunk.tensor], launch.coefficients, chunk.begin, chunk.end, launch.unscale_grads);
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

}  // namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE

#pragma once
// Every optimizer's CPU chunk kernels, compiled once per CPU capability by cpu/kernels_*.cpp.
// See [Note: CPU capability builds] in cpu/kernel_table.h. Must be included inside
// DLDNA_KERNELS_NAMESPACE (a namespace unique to the capability) by those files only.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/adam_math.h"
#include "common/lion_math.h"
#include "common/sophia_math.h"
#include "cpu/kernel_table.h"
#include "cpu/vec_io.h"

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

template <typename P, typename S>
void adam_range(const AdamTensorArgs& t, int64_t begin, int64_t end) {
  auto* param = static_cast<P*>(t.param);
  const auto* grad = static_cast<const P*>(t.grad);
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
  }
}

inline void adam_chunks(const AdamLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  dispatch_param_state(launch.param_dtype, launch.state_dtype, [&](auto p_tag, auto s_tag) {
    using P = decltype(p_tag);
    using S = decltype(s_tag);
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      adam_range<P, S>(launch.tensors[chunk.tensor], chunk.begin, chunk.end);
    }
  });
}

template <typename P, typename S>
void lion_range(const LionTensorArgs& t, const LionCoefficients& c, int64_t begin, int64_t end) {
  auto* param = static_cast<P*>(t.param);
  const auto* grad = static_cast<const P*>(t.grad);
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
  }
  for (; i < end; ++i) {
    float p = static_cast<float>(param[i]);
    float m = static_cast<float>(exp_avg[i]);
    lion_update(p, static_cast<float>(grad[i]), m, c);
    param[i] = static_cast<P>(p);
    exp_avg[i] = static_cast<S>(m);
  }
}

inline void lion_chunks(const LionLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  dispatch_param_state(launch.param_dtype, launch.state_dtype, [&](auto p_tag, auto s_tag) {
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      lion_range<decltype(p_tag), decltype(s_tag)>(launch.tensors[chunk.tensor],
                                                   launch.coefficients, chunk.begin, chunk.end);
    }
  });
}

// Returns the number of coordinates whose ratio was below 1 (not clipped).
template <typename P, typename S>
int64_t sophia_range(const SophiaTensorArgs& t, const SophiaCoefficients& c, int64_t begin,
                     int64_t end) {
  auto* param = static_cast<P*>(t.param);
  const auto* grad = static_cast<const P*>(t.grad);
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
  }
  return unclipped;
}

inline void sophia_chunks(const SophiaLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  int64_t unclipped = 0;
  dispatch_param_state(launch.param_dtype, launch.state_dtype, [&](auto p_tag, auto s_tag) {
    for (int64_t k = 0; k < num_chunks; ++k) {
      const Chunk& chunk = chunks[k];
      unclipped += sophia_range<decltype(p_tag), decltype(s_tag)>(
          launch.tensors[chunk.tensor], launch.coefficients, chunk.begin, chunk.end);
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

inline const KernelTable& table(const char* name) {
  static const KernelTable kTable{name, &adam_chunks, &lion_chunks, &sophia_chunks,
                                  &sophia_hessian_chunks};
  return kTable;
}

}  // namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE

#pragma once
// fused_grad_norm's and fused_scale_'s CPU chunk kernels.
// Included through cpu/kernels_impl.h only, which each cpu/kernels_<capability>.cpp compiles once
// under its own namespace ([Note: CPU capability builds] in cpu/kernel_table.h).

#include "cpu/kernels_common.h"

namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE {

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

}  // namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE

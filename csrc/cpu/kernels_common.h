#pragma once
// What every optimizer's CPU chunk kernels share: dtype dispatch and the grad write-back.
// Included through cpu/kernels_impl.h only, which each cpu/kernels_<capability>.cpp compiles once
// under its own namespace ([Note: CPU capability builds] in cpu/kernel_table.h).

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

inline float horizontal_sum(const FloatVec& v) {
  float lanes[FloatVec::size()];
  v.store(lanes);
  float sum = 0.f;
  for (float lane : lanes) {
    sum += lane;
  }
  return sum;
}

template <typename T>
inline float load_float(const T* ptr, int64_t i) {
  return static_cast<float>(ptr[i]);
}

}  // namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE

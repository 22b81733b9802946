#pragma once
// How a CUDA kernel reads and writes one param element under a RoundMode ([Note: bf16 param
// writes] in common/rounding_math.h): the device side of cpu/param_write.h, one element at a time.

#include <cstdint>

#include "common/rounding_math.h"

namespace dldna_fused::cuda {

// How one tensor's param is written in this launch. The mode is the launch's (uniform, so the
// branches below never diverge); only bf16 params ever get one other than Nearest.
struct DeviceParamWrite {
  RoundMode mode;
  void* comp;
  uint64_t salt;
};

// The value the update starts from: p, plus its compensation under Kahan summation.
template <typename P>
__device__ __forceinline__ float load_param(const P* param, const DeviceParamWrite& w, int64_t j) {
  float p = static_cast<float>(param[j]);
  if (w.mode == RoundMode::Kahan) {
    p += static_cast<float>(static_cast<const P*>(w.comp)[j]);
  }
  return p;
}

template <typename P>
__device__ __forceinline__ void store_param(P* param, const DeviceParamWrite& w, int64_t j, float p) {
  if (w.mode == RoundMode::Stochastic) {
    p = stochastic_round_value(p, w.salt, j);
  }
  const P written = static_cast<P>(p);
  param[j] = written;
  if (w.mode == RoundMode::Kahan) {
    static_cast<P*>(w.comp)[j] = static_cast<P>(write_compensation(p, static_cast<float>(written)));
  }
}

}  // namespace dldna_fused::cuda

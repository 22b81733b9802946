#pragma once
// SIMD side of the CPU kernels: OpMath for at::vec::Vectorized<float>, and loads/stores that move
// fp32, bf16 or fp16 memory into fp32 registers two vectors at a time (one reduced-precision
// vector widens into two fp32 vectors, so two is the common block size of every dtype).
//
// Included only by the per-capability kernel files (cpu/kernels_*.cpp); see
// [Note: CPU capability builds] in cpu/kernel_table.h.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <tuple>

#include "common/opmath.h"

namespace dldna_fused {

using FloatVec = at::vec::Vectorized<float>;

template <>
struct OpMath<FloatVec> {
  static inline FloatVec sqrt(const FloatVec& x) { return x.sqrt(); }
  static inline FloatVec max(const FloatVec& a, const FloatVec& b) { return at::vec::maximum(a, b); }
  static inline FloatVec min(const FloatVec& a, const FloatVec& b) { return at::vec::minimum(a, b); }
  static inline FloatVec abs(const FloatVec& x) { return x.abs(); }
  // Same as OpMath<float>::sign, lane by lane.
  static inline FloatVec sign(const FloatVec& x) {
    const FloatVec zero(0.f);
    const FloatVec with_zeros = FloatVec::blendv(zero, FloatVec(1.f), x > zero);
    return FloatVec::blendv(with_zeros, FloatVec(-1.f), x < zero);
  }
};

// Elements covered by one block of the vector loop, whatever the storage dtype.
constexpr int64_t kVecBlock = 2 * FloatVec::size();

template <typename T>
inline void load_block(const T* ptr, FloatVec& lo, FloatVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = FloatVec::loadu(ptr);
    hi = FloatVec::loadu(ptr + FloatVec::size());
  } else {
    std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(ptr));
  }
}

template <typename T>
inline void store_block(T* ptr, const FloatVec& lo, const FloatVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(ptr);
    hi.store(ptr + FloatVec::size());
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(ptr);
  }
}

}  // namespace dldna_fused

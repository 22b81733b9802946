#pragma once
// 16 fp32 lanes in one AVX-512 register, with the operators and OpMath that the update rules of
// common/*_math.h use, so the AVX-512 low-bit kernels (cpu/lowbit_avx512.h) run those rules
// unchanged. Only for cpu/kernels_avx512.cpp, whose target pragma enables AVX-512; loads and stores
// of bf16 and fp16 go through vec_io.h's AVX2 conversions, so they round as every other kernel.

#include <immintrin.h>

#include "common/opmath.h"
#include "cpu/vec_io.h"

// Always inlined: these live outside the build's own namespace, so an out-of-line AVX-512 copy
// would be a weak symbol the linker might pick for another caller (csrc/tests/check_kernel_symbols.sh).
#define DLDNA_VEC512_INLINE inline __attribute__((always_inline))

namespace dldna_fused {

struct Vec512 {
  __m512 v;
  Vec512() = default;
  explicit Vec512(float x) : v(_mm512_set1_ps(x)) {}
  explicit Vec512(__m512 x) : v(x) {}
};

DLDNA_VEC512_INLINE Vec512 operator+(Vec512 a, Vec512 b) { return Vec512(_mm512_add_ps(a.v, b.v)); }
DLDNA_VEC512_INLINE Vec512 operator-(Vec512 a, Vec512 b) { return Vec512(_mm512_sub_ps(a.v, b.v)); }
DLDNA_VEC512_INLINE Vec512 operator*(Vec512 a, Vec512 b) { return Vec512(_mm512_mul_ps(a.v, b.v)); }
DLDNA_VEC512_INLINE Vec512 operator/(Vec512 a, Vec512 b) { return Vec512(_mm512_div_ps(a.v, b.v)); }

template <>
struct OpMath<Vec512> {
  static DLDNA_VEC512_INLINE Vec512 sqrt(Vec512 x) { return Vec512(_mm512_sqrt_ps(x.v)); }
  // NaN in either input propagates, as OpMath<float> and at::vec::maximum do.
  static DLDNA_VEC512_INLINE Vec512 max(Vec512 a, Vec512 b) {
    const __mmask16 nan = _mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q);
    return Vec512(_mm512_mask_add_ps(_mm512_max_ps(a.v, b.v), nan, a.v, b.v));
  }
  static DLDNA_VEC512_INLINE Vec512 min(Vec512 a, Vec512 b) {
    const __mmask16 nan = _mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q);
    return Vec512(_mm512_mask_add_ps(_mm512_min_ps(a.v, b.v), nan, a.v, b.v));
  }
  static DLDNA_VEC512_INLINE Vec512 abs(Vec512 x) { return Vec512(_mm512_abs_ps(x.v)); }
  // 1, -1, and 0 for ±0 and NaN, as OpMath<float>::sign.
  static DLDNA_VEC512_INLINE Vec512 sign(Vec512 x) {
    const __m512 zero = _mm512_setzero_ps();
    const __m512 positive = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, zero, _CMP_GT_OQ), _mm512_set1_ps(1.f));
    return Vec512(_mm512_mask_mov_ps(positive, _mm512_cmp_ps_mask(x.v, zero, _CMP_LT_OQ), _mm512_set1_ps(-1.f)));
  }
};

// 16 elements of fp32, bf16 or fp16 memory as fp32 lanes, and back.
template <typename T>
DLDNA_VEC512_INLINE Vec512 load16(const T* ptr) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec512(_mm512_loadu_ps(ptr));
  } else {
    FloatVec lo, hi;
    load_block(ptr, lo, hi);
    return Vec512(_mm512_insertf32x8(_mm512_castps256_ps512(__m256(lo)), __m256(hi), 1));
  }
}

template <typename T>
DLDNA_VEC512_INLINE void store16(T* ptr, Vec512 x) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(ptr, x.v);
  } else {
    store_block(ptr, FloatVec(_mm512_castps512_ps256(x.v)), FloatVec(_mm512_extractf32x8_ps(x.v, 1)));
  }
}

}  // namespace dldna_fused

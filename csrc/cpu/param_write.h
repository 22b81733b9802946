#pragma once
// How the CPU kernels read and write params under each RoundMode ([Note: bf16 param writes] in
// common/rounding_math.h), two vectors or one element at a time. `index` is the element's index in
// the param; the scalar and vector paths compute the same bits for it.
// Included through cpu/kernels_impl.h only, which each cpu/kernels_<capability>.cpp compiles once
// under its own namespace ([Note: CPU capability builds] in cpu/kernel_table.h).

#include <c10/util/BFloat16.h>

#include <type_traits>

#include "common/rounding_math.h"
#include "cpu/kernel_table.h"
#include "cpu/kernels_common.h"
#include "cpu/vec_io.h"

namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE {

// Run once per vector or element: GCC does not inline them on its own, and a call costs as much as
// their work (one thread, 2M elements: the stochastic-rounding AdamW step took 1.54x the plain one
// without, 1.24x with).
#define DLDNA_WRITE_INLINE inline __attribute__((always_inline))

using IntVec = at::vec::Vectorized<int32_t>;
static_assert(IntVec::size() == FloatVec::size());

// Calls f(std::integral_constant<RoundMode, M>{}) with the launch's mode; params other than bf16
// only ever write to nearest (the ops refuse the other modes for them), so only that is compiled.
template <typename P, typename F>
void dispatch_round(RoundMode mode, F&& f) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    switch (mode) {
      case RoundMode::Stochastic:
        return f(std::integral_constant<RoundMode, RoundMode::Stochastic>{});
      case RoundMode::Kahan:
        return f(std::integral_constant<RoundMode, RoundMode::Kahan>{});
      case RoundMode::Nearest:
        break;
    }
  }
  f(std::integral_constant<RoundMode, RoundMode::Nearest>{});
}

// dispatch_param, then dispatch_round: calls f(P{}, mode) with mode's value a constant.
template <typename F>
void dispatch_param_round(Dtype param, RoundMode mode, F&& f) {
  dispatch_param(param, [&](auto p_tag) { dispatch_round<decltype(p_tag)>(mode, [&](auto m) { f(p_tag, m); }); });
}

// dispatch_param_state, then dispatch_round: calls f(P{}, S{}, mode).
template <typename F>
void dispatch_param_state_round(Dtype param, Dtype state, RoundMode mode, F&& f) {
  dispatch_param_state(param, state, [&](auto p_tag, auto s_tag) {
    dispatch_round<decltype(p_tag)>(mode, [&](auto m) { f(p_tag, s_tag, m); });
  });
}

// random_bits16 of elements index .. index + 15: the first 8 in `lo`, the next 8 in `hi`.
DLDNA_WRITE_INLINE void random_bits16_block(uint64_t salt, int64_t index, IntVec& lo, IntVec& hi) {
#if defined(CPU_CAPABILITY_AVX2)
  static_assert(IntVec::size() == 8);
  if (index % 16 == 0) {
    // [Note: paired random bits]: lanes j of lo and hi share pair (index / 16) * 8 + j, whose 8
    // numbers never cross a multiple of 2^32 (they start at a multiple of 8).
    const uint64_t first = static_cast<uint64_t>(index) / 16 * 8;
    const auto lanes = [](uint32_t v) { return _mm256_set1_epi32(static_cast<int32_t>(v)); };
    const __m256i pairs =
        _mm256_add_epi32(lanes(static_cast<uint32_t>(first)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const auto high = static_cast<uint32_t>(salt >> 32) ^ static_cast<uint32_t>(first >> 32);
    __m256i x = _mm256_add_epi32(_mm256_xor_si256(pairs, lanes(static_cast<uint32_t>(salt))), lanes(high));
    // lowbias32 (common/rounding_math.h), 8 lanes at once.
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int32_t>(0x846ca68bu)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    lo = IntVec(_mm256_and_si256(x, _mm256_set1_epi32(0xffff)));
    hi = IntVec(_mm256_srli_epi32(x, 16));
    return;
  }
#endif
  // The portable build, and blocks that do not start at a multiple of 16: element by element.
  int32_t bits[2 * IntVec::size()];
  for (int k = 0; k < 2 * IntVec::size(); ++k) {
    bits[k] = static_cast<int32_t>(random_bits16(salt, index + k));
  }
  lo = IntVec::loadu(bits);
  hi = IntVec::loadu(bits + IntVec::size());
}

// A NaN whose low 16 bits are zero (bf16 0xffff, the NaN at::vec's conversion writes).
DLDNA_WRITE_INLINE FloatVec bf16_nan() {
  return FloatVec(bits_float(0xffff0000u));
}

// x stochastically rounded with random bits r: a float whose low 16 bits are zero (a NaN stays
// a NaN).
DLDNA_WRITE_INLINE FloatVec stochastic_round_vec(const FloatVec& x, const IntVec& r) {
  const IntVec bits = at::vec::cast<int32_t>(x);
  const IntVec rounded = (bits + r) & IntVec(static_cast<int32_t>(0xffff0000u));
  return FloatVec::blendv(at::vec::cast<float>(rounded), bf16_nan(), x != x);
}

// x rounded to the nearest bf16 (ties to even), as a float with its low 16 bits zero: c10's
// conversion, kept in registers.
DLDNA_WRITE_INLINE FloatVec round_nearest_bf16(const FloatVec& x) {
  const IntVec bits = at::vec::cast<int32_t>(x);
  const IntVec odd = (bits >> IntVec(16)) & IntVec(1);
  const IntVec rounded = (bits + IntVec(0x7fff) + odd) & IntVec(static_cast<int32_t>(0xffff0000u));
  return FloatVec::blendv(at::vec::cast<float>(rounded), bf16_nan(), x != x);
}

// Stores 16 floats whose low 16 bits are zero as bf16: the conversion is exact, so the AVX2 build
// truncates (two shifts, a pack and a permute) instead of rounding.
DLDNA_WRITE_INLINE void store_bf16_exact(c10::BFloat16* ptr, const FloatVec& lo, const FloatVec& hi) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i a = _mm256_srli_epi32(_mm256_castps_si256(__m256(lo)), 16);
  const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(__m256(hi)), 16);
  // packus interleaves 128-bit halves (a0-3 b0-3 a4-7 b4-7); the permute puts them in order.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ptr), packed);
#else
  store_block(ptr, lo, hi);
#endif
}

// x - its rounded write, 0 where that is NaN (a NaN or infinite x).
DLDNA_WRITE_INLINE FloatVec compensation(const FloatVec& x, const FloatVec& written) {
  const FloatVec c = x - written;
  return FloatVec::blendv(c, FloatVec(0.f), c != c);
}

template <RoundMode M, typename P>
DLDNA_WRITE_INLINE void load_param_block(const P* param, const ParamWrite& w, int64_t index, FloatVec& lo,
                                         FloatVec& hi) {
  load_block(param + index, lo, hi);
  if constexpr (M == RoundMode::Kahan) {
    FloatVec c_lo, c_hi;
    load_block(static_cast<const P*>(w.comp) + index, c_lo, c_hi);
    lo = lo + c_lo;
    hi = hi + c_hi;
  }
}

template <RoundMode M, typename P>
DLDNA_WRITE_INLINE float load_param(const P* param, const ParamWrite& w, int64_t index) {
  float p = static_cast<float>(param[index]);
  if constexpr (M == RoundMode::Kahan) {
    p += static_cast<float>(static_cast<const P*>(w.comp)[index]);
  }
  return p;
}

template <RoundMode M, typename P>
DLDNA_WRITE_INLINE void store_param_block(P* param, const ParamWrite& w, int64_t index, FloatVec lo, FloatVec hi) {
  if constexpr (M == RoundMode::Nearest) {
    store_block(param + index, lo, hi);
  } else if constexpr (M == RoundMode::Stochastic) {
    IntVec r_lo, r_hi;
    random_bits16_block(w.salt, index, r_lo, r_hi);
    store_bf16_exact(param + index, stochastic_round_vec(lo, r_lo), stochastic_round_vec(hi, r_hi));
  } else {
    const FloatVec written_lo = round_nearest_bf16(lo), written_hi = round_nearest_bf16(hi);
    store_bf16_exact(param + index, written_lo, written_hi);
    store_block(static_cast<P*>(w.comp) + index, compensation(lo, written_lo), compensation(hi, written_hi));
  }
}

template <RoundMode M, typename P>
DLDNA_WRITE_INLINE void store_param(P* param, const ParamWrite& w, int64_t index, float p) {
  if constexpr (M == RoundMode::Stochastic) {
    p = stochastic_round_value(p, w.salt, index);
  }
  param[index] = static_cast<P>(p);
  if constexpr (M == RoundMode::Kahan) {
    static_cast<P*>(w.comp)[index] = static_cast<P>(write_compensation(p, static_cast<float>(param[index])));
  }
}

}  // namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE

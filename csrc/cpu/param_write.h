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

// The rare paths of the AVX2 build's blocks, out of line: inlined, their registers spilled the
// update's values to the stack on every block of the common path.
#if defined(CPU_CAPABILITY_AVX2)
#define DLDNA_WRITE_COLD inline __attribute__((noinline, cold))
#else
#define DLDNA_WRITE_COLD DLDNA_WRITE_INLINE
#endif

// random_bits16 of elements index .. index + 15, element by element: the portable build, and
// blocks that do not start at a multiple of 16.
DLDNA_WRITE_COLD void random_bits16_elements(uint64_t salt, int64_t index, IntVec& lo, IntVec& hi) {
  int32_t bits[2 * IntVec::size()];
  for (int k = 0; k < 2 * IntVec::size(); ++k) {
    bits[k] = static_cast<int32_t>(random_bits16(salt, index + k));
  }
  lo = IntVec::loadu(bits);
  hi = IntVec::loadu(bits + IntVec::size());
}

// random_bits16 of elements index .. index + 15: the first 8 in `lo`, the next 8 in `hi`.
DLDNA_WRITE_INLINE void random_bits16_block(uint64_t salt, int64_t index, IntVec& lo, IntVec& hi) {
#if defined(CPU_CAPABILITY_AVX2)
  static_assert(IntVec::size() == 8);
  if (index % 16 == 0) {
    // [Note: paired random bits]: lanes j of lo and hi share pair index / 2 + j; the block's 8
    // pairs start at a multiple of 8, so they have one pair_key.
    const uint64_t first = static_cast<uint64_t>(index) / 2;
    const uint32_t start = static_cast<uint32_t>(first) + pair_key(salt, first >> 32);
    __m256i x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(start)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
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
  random_bits16_elements(salt, index, lo, hi);
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

#if defined(CPU_CAPABILITY_AVX2)
// Stores the low 16 bits of 16 int32 lanes, in order.
DLDNA_WRITE_INLINE void store_low16(c10::BFloat16* ptr, __m256i a, __m256i b) {
  // packus interleaves 128-bit halves (a0-3 b0-3 a4-7 b4-7); the permute puts them in order.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ptr), packed);
}
#endif

// Stores 16 floats whose low 16 bits are zero as bf16: the conversion is exact, so the AVX2 build
// truncates (two shifts, a pack and a permute) instead of rounding.
DLDNA_WRITE_INLINE void store_bf16_exact(c10::BFloat16* ptr, const FloatVec& lo, const FloatVec& hi) {
#if defined(CPU_CAPABILITY_AVX2)
  store_low16(ptr, _mm256_srli_epi32(_mm256_castps_si256(__m256(lo)), 16),
              _mm256_srli_epi32(_mm256_castps_si256(__m256(hi)), 16));
#else
  store_block(ptr, lo, hi);
#endif
}

DLDNA_WRITE_COLD void store_stochastic_nan_block(c10::BFloat16* ptr, const FloatVec& lo, const FloatVec& hi,
                                                 const IntVec& r_lo, const IntVec& r_hi) {
  store_bf16_exact(ptr, stochastic_round_vec(lo, r_lo), stochastic_round_vec(hi, r_hi));
}

// Stores lo and hi stochastically rounded with random bits r_lo and r_hi. The rounding is an add
// and a truncation; only a NaN needs the blend of stochastic_round_vec (its low bits could carry
// into the exponent), so the AVX2 build tests the block for one once and skips the blends without.
// Blends on every vector cost this step more than the hash's multiplies.
DLDNA_WRITE_INLINE void store_stochastic_block(c10::BFloat16* ptr, const FloatVec& lo, const FloatVec& hi,
                                               const IntVec& r_lo, const IntVec& r_hi) {
#if defined(CPU_CAPABILITY_AVX2)
  if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(lo, hi, _CMP_UNORD_Q)) == 0, 1)) {
    store_low16(ptr, _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(__m256(lo)), __m256i(r_lo)), 16),
                _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(__m256(hi)), __m256i(r_hi)), 16));
    return;
  }
#endif
  store_stochastic_nan_block(ptr, lo, hi, r_lo, r_hi);
}

// x - its rounded write, 0 where that is NaN (a NaN or infinite x).
DLDNA_WRITE_INLINE FloatVec compensation(const FloatVec& x, const FloatVec& written) {
  const FloatVec c = x - written;
  return FloatVec::blendv(c, FloatVec(0.f), c != c);
}

DLDNA_WRITE_COLD void store_kahan_nan_block(c10::BFloat16* ptr, c10::BFloat16* comp, const FloatVec& lo,
                                            const FloatVec& hi) {
  const FloatVec written_lo = round_nearest_bf16(lo), written_hi = round_nearest_bf16(hi);
  store_bf16_exact(ptr, written_lo, written_hi);
  store_block(comp, compensation(lo, written_lo), compensation(hi, written_hi));
}

#if defined(CPU_CAPABILITY_AVX2)
// A float's bits plus c10's round-to-nearest-even increment: the bf16 is the top 16 bits (for a
// value that is not NaN).
DLDNA_WRITE_INLINE __m256i nearest_bf16_bits(__m256i bits) {
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd);
}
#endif

// Stores lo and hi rounded to nearest, and what that lost as the compensation. As with stochastic
// rounding, the AVX2 build skips the NaN blends unless the block has a NaN compensation (a NaN or
// infinite value), tested once for the block.
DLDNA_WRITE_INLINE void store_kahan_block(c10::BFloat16* ptr, c10::BFloat16* comp, const FloatVec& lo,
                                          const FloatVec& hi) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
  const __m256i rounded_lo = nearest_bf16_bits(_mm256_castps_si256(__m256(lo)));
  const __m256i rounded_hi = nearest_bf16_bits(_mm256_castps_si256(__m256(hi)));
  const __m256 c_lo = _mm256_sub_ps(__m256(lo), _mm256_castsi256_ps(_mm256_and_si256(rounded_lo, high)));
  const __m256 c_hi = _mm256_sub_ps(__m256(hi), _mm256_castsi256_ps(_mm256_and_si256(rounded_hi, high)));
  if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(c_lo, c_hi, _CMP_UNORD_Q)) == 0, 1)) {
    store_low16(ptr, _mm256_srli_epi32(rounded_lo, 16), _mm256_srli_epi32(rounded_hi, 16));
    store_low16(comp, _mm256_srli_epi32(nearest_bf16_bits(_mm256_castps_si256(c_lo)), 16),
                _mm256_srli_epi32(nearest_bf16_bits(_mm256_castps_si256(c_hi)), 16));
    return;
  }
#endif
  store_kahan_nan_block(ptr, comp, lo, hi);
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
    store_stochastic_block(param + index, lo, hi, r_lo, r_hi);
  } else {
    store_kahan_block(param + index, static_cast<P*>(w.comp) + index, lo, hi);
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

#pragma once
// The low-bit kernels with AVX-512 (F, BW, DQ, VBMI): dequantize, update and requantize a block in
// 16-lane registers, by the method of [Note: vectorized nearest code] in cpu/kernel_table.h.
// cpu/kernels_lowbit.h includes this file inside its kernel namespace, in the build of
// cpu/kernels_avx512.cpp only (which enables the instructions and includes cpu/vec512.h). The
// scalar helpers (nearest_code, pack_codes) and the update rules are the ones every build uses, and
// the elements the AVX2 kernels update one at a time (a block's last n % 16) are updated one at a
// time here too, so both builds compute the same values.

static_assert(kVecBlock == 16, "load16/store16 move one kVecBlock");

// The nearest-code tables of one map, in registers for a whole block.
struct QuantRegisters {
  __m512i octave_run[2];
  __m512i octave_boundary[2];
  __m512 run_scale;
  __m512 run_offset;
  __m512i run_last;
  __m512i twice_zero;
  __m512 low;

  explicit QuantRegisters(const QuantLut& lut) {
    const QuantSimd& s = *lut.simd;
    for (int h = 0; h < 2; ++h) {
      octave_run[h] = _mm512_loadu_si512(s.octave_run + 16 * h);
      octave_boundary[h] = _mm512_loadu_si512(s.octave_boundary + 16 * h);
    }
    run_scale = _mm512_loadu_ps(s.run_scale);
    run_offset = _mm512_loadu_ps(s.run_offset);
    run_last = _mm512_loadu_si512(s.run_last);
    twice_zero = _mm512_set1_epi32(2 * s.zero);
    low = _mm512_set1_ps(lut.low);
  }
};

// Codes of y = x * scale for 16 lanes; `near_tie` marks the lanes the caller must redo with
// nearest_code.
template <bool kSigned>
DLDNA_ALWAYS_INLINE __m512i nearest_codes16(__m512 x, __m512 scale, const QuantRegisters& r,
                                            __mmask16& near_tie) {
  const __m512i one = _mm512_set1_epi32(1);
  // vminps returns its second operand when either is NaN: NaN -> 1, then the clamp.
  __m512 y = _mm512_mul_ps(x, scale);
  y = _mm512_max_ps(_mm512_min_ps(y, _mm512_set1_ps(1.f)), r.low);
  const __m512i bits = _mm512_castps_si512(y);
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  // The octave: exponent bits, clamped below at 96; the permutes read the low 5 bits.
  const __m512i octave = _mm512_max_epi32(_mm512_srli_epi32(magnitude, 23), _mm512_set1_epi32(96));
  __m512i run = _mm512_permutex2var_epi32(r.octave_run[0], octave, r.octave_run[1]);
  __m512i boundary = _mm512_permutex2var_epi32(r.octave_boundary[0], octave, r.octave_boundary[1]);
  __mmask16 negative = 0;
  if constexpr (kSigned) {
    negative = _mm512_movepi32_mask(bits);
    // a >= boundary on negative lanes: a > boundary - 1 (boundaries are positive floats).
    boundary = _mm512_mask_sub_epi32(boundary, negative, boundary, one);
  }
  run = _mm512_mask_add_epi32(run, _mm512_cmpgt_epi32_mask(magnitude, boundary), run, one);
  const __m512 t = _mm512_fmadd_ps(_mm512_castsi512_ps(magnitude), _mm512_permutexvar_ps(run, r.run_scale),
                                   _mm512_permutexvar_ps(run, r.run_offset));
  // t - round(t) in one vreduceps (imm 8: round to nearest, no precision exception).
  const __m512 from_integer = _mm512_abs_ps(_mm512_reduce_ps(t, 8));
  near_tie = _mm512_cmp_ps_mask(from_integer, _mm512_set1_ps(kNearTie), _CMP_LT_OQ);
  __m512i code = _mm512_min_epi32(_mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                                  _mm512_permutexvar_epi32(run, r.run_last));
  if constexpr (kSigned) {
    // zero + rank -> max(2 zero - code, 0) on negative lanes.
    code = _mm512_mask_sub_epi32(code, negative, r.twice_zero, code);
    code = _mm512_mask_max_epi32(code, negative, code, _mm512_setzero_si512());
  }
  return code;
}

// Stores 16 codes of elements [first, first + 16) (first even at 4 bits).
template <int kBits>
DLDNA_ALWAYS_INLINE void store_codes16(__m512i c, int64_t first, uint8_t* codes) {
  if constexpr (kBits == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + first), _mm512_cvtepi32_epi8(c));
  } else {
    // Lanes 2k, 2k + 1 -> low, high nibble of byte k: in each 64-bit pair, x | x >> 28.
    const __m512i packed = _mm512_or_si512(c, _mm512_srli_epi64(c, 28));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + first / 2), _mm512_cvtepi64_epi8(packed));
  }
}

// Replaces the near-tie lanes of c (16 codes of values[0, 16)) with nearest_code's.
DLDNA_ALWAYS_INLINE __m512i redo_near_ties(__m512i c, __mmask16 near_tie, const float* values, float scale,
                                           const QuantLut& lut) {
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, c);
  for (unsigned m = near_tie; m != 0; m &= m - 1) {
    const int lane = __builtin_ctz(m);
    lanes[lane] = nearest_code(values[lane] * scale, lut);
  }
  return _mm512_load_si512(lanes);
}

// Codes of values[0, n), the elements [first, first + n) of a state.
template <int kBits, bool kSigned>
void quantize_values(const float* values, int64_t n, float scale, const QuantLut& lut, int64_t first,
                     uint8_t* codes) {
  const QuantRegisters r(lut);
  const __m512 scale_vec = _mm512_set1_ps(scale);
  // Two vectors per iteration: independent chains, and one branch for both tie masks (four
  // measured no faster).
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __mmask16 tie0, tie1;
    __m512i c0 = nearest_codes16<kSigned>(_mm512_loadu_ps(values + i), scale_vec, r, tie0);
    __m512i c1 = nearest_codes16<kSigned>(_mm512_loadu_ps(values + i + 16), scale_vec, r, tie1);
    if ((tie0 | tie1) != 0) {  // about 6% of iterations
      c0 = redo_near_ties(c0, tie0, values + i, scale, lut);
      c1 = redo_near_ties(c1, tie1, values + i + 16, scale, lut);
    }
    store_codes16<kBits>(c0, first + i, codes);
    store_codes16<kBits>(c1, first + i + 16, codes);
  }
  for (; i + 16 <= n; i += 16) {
    __mmask16 tie;
    __m512i c = nearest_codes16<kSigned>(_mm512_loadu_ps(values + i), scale_vec, r, tie);
    if (tie != 0) {
      c = redo_near_ties(c, tie, values + i, scale, lut);
    }
    store_codes16<kBits>(c, first + i, codes);
  }
  if (i < n) {
    int32_t tail[16];
    for (int64_t k = i; k < n; ++k) {
      tail[k - i] = nearest_code(values[k] * scale, lut);
    }
    pack_codes(tail, kBits, first + i, n - i, codes);
  }
}

// A block's absmax is the largest |x| bit pattern: the order of non-negative floats, with NaN (of
// any sign) above all, as OpMath<float>::max lets NaN through.
DLDNA_ALWAYS_INLINE __m512i magnitude_bits(__m512 x) {
  return _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
}

inline float float_of_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Requantizes with the block's absmax (given as its bits): stores the codes, returns the absmax.
template <int kBits, bool kSigned>
float requantize(const float* values, int64_t n, uint32_t absmax_bits, const QuantLut& lut, int64_t first,
                 uint8_t* codes) {
  const float absmax = float_of_bits(absmax_bits);
  const float scale = absmax > 0.f ? 1.f / absmax : 0.f;  // 0 for a NaN absmax too
  quantize_values<kBits, kSigned>(values, n, scale, lut, first, codes);
  return absmax;
}

// quantize_block's work for the quantize_blockwise op.
inline float quantize_block_avx512(const float* values, const QuantLut& lut, int bits, int64_t first,
                                   int64_t n, uint8_t* codes) {
  __m512i largest = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    largest = _mm512_max_epu32(largest, magnitude_bits(_mm512_loadu_ps(values + i)));
  }
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    largest = _mm512_max_epu32(largest, magnitude_bits(_mm512_maskz_loadu_ps(tail, values + i)));
  }
  const uint32_t absmax_bits = _mm512_reduce_max_epu32(largest);
  if (bits == 8) {
    return lut.simd->is_signed ? requantize<8, true>(values, n, absmax_bits, lut, first, codes)
                               : requantize<8, false>(values, n, absmax_bits, lut, first, codes);
  }
  return lut.simd->is_signed ? requantize<4, true>(values, n, absmax_bits, lut, first, codes)
                             : requantize<4, false>(values, n, absmax_bits, lut, first, codes);
}

// A map's values in registers, for dequantizing 64 codes at a time.
template <int kBits>
struct DequantRegisters;

template <>
struct DequantRegisters<8> {
  // Byte b of every code's value from four 256-entry byte tables. The unpacks that assemble the
  // floats interleave within 128-bit lanes, so the codes are first put in the order that makes
  // their output natural: position 16L + 4k + j takes code 16k + 4L + j.
  __m512i table[4][4];
  __m512i reorder;

  explicit DequantRegisters(const QuantLut& lut) {
    alignas(64) static constexpr std::array<uint8_t, 64> kOrder = [] {
      std::array<uint8_t, 64> order{};
      for (int lane = 0; lane < 4; ++lane) {
        for (int k = 0; k < 4; ++k) {
          for (int j = 0; j < 4; ++j) {
            order[16 * lane + 4 * k + j] = static_cast<uint8_t>(16 * k + 4 * lane + j);
          }
        }
      }
      return order;
    }();
    reorder = _mm512_load_si512(kOrder.data());
    for (int b = 0; b < 4; ++b) {
      for (int q = 0; q < 4; ++q) {
        table[b][q] = _mm512_loadu_si512(lut.simd->value_bytes[b] + 64 * q);
      }
    }
  }

  // out[k] = values of the codes of elements [element + 16k, element + 16k + 16), times absmax.
  DLDNA_ALWAYS_INLINE void dequantize64(const uint8_t* codes, int64_t element, __m512 absmax, __m512* out) const {
    const __m512i c = _mm512_permutexvar_epi8(reorder, _mm512_loadu_si512(codes + element));
    const __mmask64 upper = _mm512_movepi8_mask(c);  // codes 128-255
    __m512i byte[4];
    for (int b = 0; b < 4; ++b) {
      byte[b] = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(table[b][0], c, table[b][1]),
                                       _mm512_permutex2var_epi8(table[b][2], c, table[b][3]));
    }
    const __m512i low01 = _mm512_unpacklo_epi8(byte[0], byte[1]);
    const __m512i high01 = _mm512_unpackhi_epi8(byte[0], byte[1]);
    const __m512i low23 = _mm512_unpacklo_epi8(byte[2], byte[3]);
    const __m512i high23 = _mm512_unpackhi_epi8(byte[2], byte[3]);
    const __m512i value_bits[4] = {_mm512_unpacklo_epi16(low01, low23), _mm512_unpackhi_epi16(low01, low23),
                                   _mm512_unpacklo_epi16(high01, high23), _mm512_unpackhi_epi16(high01, high23)};
    for (int k = 0; k < 4; ++k) {
      out[k] = _mm512_mul_ps(_mm512_castsi512_ps(value_bits[k]), absmax);
    }
  }
};

template <>
struct DequantRegisters<4> {
  __m512 map;  // all 16 values

  explicit DequantRegisters(const QuantLut& lut) : map(_mm512_loadu_ps(lut.values)) {}

  DLDNA_ALWAYS_INLINE void dequantize64(const uint8_t* codes, int64_t element, __m512 absmax, __m512* out) const {
    // 16 codes in 8 bytes; each byte becomes a 64-bit pair (low nibble, high nibble).
    const __m512i low_nibble = _mm512_set1_epi64(0x0f);
    const __m512i high_nibble = _mm512_set1_epi64(0xf0);
    for (int k = 0; k < 4; ++k) {
      const __m512i bytes = _mm512_cvtepu8_epi64(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + (element + 16 * k) / 2)));
      const __m512i c = _mm512_or_si512(_mm512_and_si512(bytes, low_nibble),
                                        _mm512_slli_epi64(_mm512_and_si512(bytes, high_nibble), 28));
      out[k] = _mm512_mul_ps(_mm512_permutexvar_ps(c, map), absmax);
    }
  }
};

// dequantize_block's work for the dequantize_blockwise op.
inline void dequantize_block_avx512(const uint8_t* codes, float absmax, const QuantLut& lut, int bits,
                                    int64_t first, int64_t n, float* out) {
  const __m512 scale = _mm512_set1_ps(absmax);
  int64_t i = 0;
  auto vectors = [&](const auto& regs) {
    for (; i + 64 <= n; i += 64) {
      __m512 values[4];
      regs.dequantize64(codes, first + i, scale, values);
      for (int k = 0; k < 4; ++k) {
        _mm512_storeu_ps(out + i + 16 * k, values[k]);
      }
    }
  };
  if (bits == 8) {
    vectors(DequantRegisters<8>(lut));
  } else {
    vectors(DequantRegisters<4>(lut));
  }
  for (; i < n; ++i) {
    out[i] = dequantize_one(codes, bits, first + i, lut, absmax);
  }
}

// A param's 16 lanes at `index`, read and written as cpu/param_write.h does for two AVX2 vectors
// (kVecBlock is 16 here), so both builds write the same bits.
template <RoundMode M, typename P>
inline Vec512 load_param16(const P* param, const ParamWrite& w, int64_t index) {
  FloatVec lo, hi;
  load_param_block<M>(param, w, index, lo, hi);
  return Vec512(_mm512_insertf32x8(_mm512_castps256_ps512(__m256(lo)), __m256(hi), 1));
}

template <RoundMode M, typename P>
inline void store_param16(P* param, const ParamWrite& w, int64_t index, Vec512 x) {
  store_param_block<M>(param, w, index, FloatVec(_mm512_castps512_ps256(x.v)), FloatVec(_mm512_extractf32x8_ps(x.v, 1)));
}

// One low-bit Adam or Lion block: elements [first, first + n) of tensor t, with the rule's states
// (AdamLowbitRule, LionLowbitRule). The new fp32 states go to scratch[s], then are requantized with
// their new absmax.
template <typename P, RoundMode M, int kBits, typename Rule>
void lowbit_block_avx512(const LowbitLaunch& launch, const LowbitTensorArgs& t, int64_t first, int64_t n,
                         float* const* scratch, const Rule& rule) {
  constexpr int kStates = Rule::kStates;
  const int64_t block = first / launch.block_size;
  const QuantState* states[2] = {&t.exp_avg, &t.exp_avg_sq};
  const QuantLut* luts[2] = {launch.exp_avg_lut, launch.exp_avg_sq_lut};
  P* param = static_cast<P*>(t.param);  // element first + i at param[first + i]
  P* grad = static_cast<P*>(t.grad) + first;
  const float unscale = launch.unscale_grads;
  const Vec512 unscale_vec(unscale);
  __m512 absmax[kStates];
  __m512i largest[kStates];
  for (int s = 0; s < kStates; ++s) {
    absmax[s] = _mm512_set1_ps(states[s]->absmax[block]);
    largest[s] = _mm512_setzero_si512();
  }
  // Rule on 16 lanes whose states are in registers; the new states go to the scratch.
  auto lanes16 = [&](int64_t at, Vec512* state) {
    Vec512 p = load_param16<M>(param, t.write, first + at);
    const Vec512 g = load16(grad + at);
    rule(p, g, state);
    store_param16<M>(param, t.write, first + at, p);
    if (unscale != 0.f) {
      store16(grad + at, g * unscale_vec);
    }
    for (int s = 0; s < kStates; ++s) {
      _mm512_storeu_ps(scratch[s] + at, state[s].v);
      largest[s] = _mm512_max_epu32(largest[s], magnitude_bits(state[s].v));
    }
  };
  int64_t i = 0;
  {
    // The signed map is exp_avg's, the unsigned one exp_avg_sq's, at either width.
    const DequantRegisters<kBits> m_regs(*luts[0]);
    const DequantRegisters<kBits> v_regs(*luts[kStates - 1]);
    for (; i + 64 <= n; i += 64) {
      __m512 values[kStates][4];
      m_regs.dequantize64(states[0]->codes, first + i, absmax[0], values[0]);
      if constexpr (kStates == 2) {
        v_regs.dequantize64(states[1]->codes, first + i, absmax[1], values[1]);
      }
      for (int k = 0; k < 4; ++k) {
        Vec512 state[kStates];
        for (int s = 0; s < kStates; ++s) {
          state[s] = Vec512(values[s][k]);
        }
        lanes16(i + 16 * k, state);
      }
    }
  }
  // The block's last n % 64: whole vectors of 16, then one element at a time, as the AVX2 kernels.
  for (; i + 16 <= n; i += 16) {
    Vec512 state[kStates];
    for (int s = 0; s < kStates; ++s) {
      alignas(64) float values[16];
      for (int k = 0; k < 16; ++k) {
        values[k] = dequantize_one(states[s]->codes, kBits, first + i + k, *luts[s], states[s]->absmax[block]);
      }
      state[s] = Vec512(_mm512_load_ps(values));
    }
    lanes16(i, state);
  }
  uint32_t largest_bits[kStates];
  for (int s = 0; s < kStates; ++s) {
    largest_bits[s] = _mm512_reduce_max_epu32(largest[s]);
  }
  lowbit_elements<P, M, kBits>(launch, t, first, i, n, scratch, rule, largest_bits);
  states[0]->absmax[block] = requantize<kBits, true>(scratch[0], n, largest_bits[0], *luts[0], first,
                                                     states[0]->codes);
  if constexpr (kStates == 2) {
    states[1]->absmax[block] = requantize<kBits, false>(scratch[1], n, largest_bits[1], *luts[1], first,
                                                        states[1]->codes);
  }
}

#pragma once
// The low-bit kernels with AVX2: dequantize, update and requantize a block 8 lanes at a time, by
// the method of [Note: vectorized nearest code] in cpu/kernel_table.h (its AVX2 paragraph).
// cpu/kernels_lowbit.h includes this file inside its kernel namespace, in the build of
// cpu/kernels_avx2.cpp only. The scalar helpers (nearest_code, pack_codes, dequantize_one) and the
// update rules are the ones every build uses, and the vector and element-by-element parts of a
// block are the same as in the other builds (vectors of kVecBlock, then one element at a time), so
// every build computes the same values.

static_assert(FloatVec::size() == 8 && kVecBlock == 16, "the AVX2 low-bit kernels run 8-lane vectors");

// The nearest-code tables of one map, as registers (the compiler keeps some on the stack).
struct Avx2QuantRegisters {
  __m256i boundary[8];  // the run boundaries, each in every lane
  __m256 run_scale;
  __m256 run_offset;
  __m256i run_last;
  __m256i twice_zero;
  __m256 low;

  explicit Avx2QuantRegisters(const QuantLut& lut) {
    const QuantSimd& s = *lut.simd;
    for (int k = 0; k < 8; ++k) {
      boundary[k] = _mm256_set1_epi32(s.run_boundary[k]);
    }
    run_scale = _mm256_loadu_ps(s.run_scale);
    run_offset = _mm256_loadu_ps(s.run_offset);
    run_last = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.run_last));
    twice_zero = _mm256_set1_epi32(2 * s.zero);
    low = _mm256_set1_ps(lut.low);
  }
};

// -(the number of boundaries [kFirst, kFirst + kCount) below each lane), summed as a tree of the
// compares' -1s (written out at compile time: as loops GCC kept the partial sums on the stack).
template <int kFirst, int kCount>
DLDNA_ALWAYS_INLINE __m256i boundaries_below(__m256i compared, const Avx2QuantRegisters& r) {
  if constexpr (kCount == 1) {
    return _mm256_cmpgt_epi32(compared, r.boundary[kFirst]);
  } else {
    return _mm256_add_epi32(boundaries_below<kFirst, kCount / 2>(compared, r),
                            boundaries_below<kFirst + kCount / 2, kCount - kCount / 2>(compared, r));
  }
}

// Codes of y = x * scale for 8 lanes; `near_tie` gets a bit for each lane the caller must redo
// with nearest_code. kCompares boundaries are counted; with kNinthRun, boundary 7 starts the ninth
// run (the value 1 alone), whose code is one past the eighth run's last.
template <bool kSigned, int kCompares, bool kNinthRun>
DLDNA_ALWAYS_INLINE __m256i nearest_codes8(__m256 x, __m256 scale, const Avx2QuantRegisters& r, int& near_tie) {
  // vminps returns its second operand when either is NaN: NaN -> 1, then the clamp.
  __m256 y = _mm256_mul_ps(x, scale);
  y = _mm256_max_ps(_mm256_min_ps(y, _mm256_set1_ps(1.f)), r.low);
  const __m256i bits = _mm256_castps_si256(y);
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  // a >= boundary on negative lanes: a + 1 > boundary (boundaries are positive floats).
  __m256i negative = _mm256_setzero_si256();
  __m256i compared = magnitude;
  if constexpr (kSigned) {
    negative = _mm256_srai_epi32(bits, 31);
    compared = _mm256_sub_epi32(magnitude, negative);
  }
  const __m256i run = _mm256_sub_epi32(_mm256_setzero_si256(), boundaries_below<0, kCompares>(compared, r));
  const __m256 t = _mm256_fmadd_ps(_mm256_castsi256_ps(magnitude), _mm256_permutevar8x32_ps(r.run_scale, run),
                                   _mm256_permutevar8x32_ps(r.run_offset, run));
  const __m256 from_integer = _mm256_and_ps(_mm256_sub_ps(t, _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)),
                                            _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
  near_tie = _mm256_movemask_ps(_mm256_cmp_ps(from_integer, _mm256_set1_ps(kNearTie), _CMP_LT_OQ));
  // t >= 0 but for lanes within kNearTie below 0, which are redone: truncation is floor.
  __m256i code = _mm256_min_epi32(_mm256_cvttps_epi32(t), _mm256_permutevar8x32_epi32(r.run_last, run));
  if constexpr (kNinthRun) {
    code = _mm256_sub_epi32(code, _mm256_cmpgt_epi32(compared, r.boundary[7]));
  }
  if constexpr (kSigned) {
    // zero + rank -> max(2 zero - code, 0) on negative lanes.
    const __m256i mirrored = _mm256_max_epi32(_mm256_sub_epi32(r.twice_zero, code), _mm256_setzero_si256());
    code = _mm256_blendv_epi8(code, mirrored, negative);
  }
  return code;
}

// Stores the 32 codes of c[0..3], elements [first, first + 32) of a state (first even at 4 bits).
template <int kBits>
DLDNA_ALWAYS_INLINE void store_codes32(const __m256i* c, int64_t first, uint8_t* codes) {
  // The packs interleave 128-bit lanes; the permute puts the 4-byte groups back in order.
  const __m256i bytes = _mm256_permutevar8x32_epi32(
      _mm256_packus_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if constexpr (kBits == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + first), bytes);
  } else {
    // Bytes 2k, 2k + 1 -> low, high nibble of byte k: in each 16-bit pair, (x | x >> 4) & 0xff.
    const __m256i pairs = _mm256_and_si256(_mm256_or_si256(bytes, _mm256_srli_epi16(bytes, 4)), _mm256_set1_epi16(0xff));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(pairs, pairs), 0x08);  // qwords 0, 2
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + first / 2), _mm256_castsi256_si128(packed));
  }
}

// Replaces the near-tie lanes of c (8 codes of values[0, 8)) with nearest_code's.
DLDNA_WRITE_COLD __m256i redo_near_ties8(__m256i c, int near_tie, const float* values, float scale, const QuantLut& lut) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), c);
  for (unsigned m = static_cast<unsigned>(near_tie); m != 0; m &= m - 1) {
    const int lane = __builtin_ctz(m);
    lanes[lane] = nearest_code(values[lane] * scale, lut);
  }
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
}

// Codes of values[0, n), the elements [first, first + n) of a state.
template <int kBits, bool kSigned, int kCompares, bool kNinthRun>
void quantize_values_avx2(const float* values, int64_t n, float scale, const QuantLut& lut, int64_t first,
                          uint8_t* codes) {
  const Avx2QuantRegisters r(lut);
  const __m256 scale_vec = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i c[4];
    int tie[4];
    for (int k = 0; k < 4; ++k) {
      c[k] = nearest_codes8<kSigned, kCompares, kNinthRun>(_mm256_loadu_ps(values + i + 8 * k), scale_vec, r, tie[k]);
    }
    if (__builtin_expect((tie[0] | tie[1] | tie[2] | tie[3]) != 0, 0)) {  // about 6% of iterations
      for (int k = 0; k < 4; ++k) {
        if (tie[k] != 0) {
          c[k] = redo_near_ties8(c[k], tie[k], values + i + 8 * k, scale, lut);
        }
      }
    }
    store_codes32<kBits>(c, first + i, codes);
  }
  if (i < n) {  // a tensor's last block
    int32_t tail[32];
    for (int64_t k = i; k < n; ++k) {
      tail[k - i] = nearest_code(values[k] * scale, lut);
    }
    pack_codes(tail, kBits, first + i, n - i, codes);
  }
}

// Requantizes values[0, n) with `absmax` (a block's largest |x| as bits: NaN above all, as
// OpMath<float>::max lets NaN through): stores the codes, returns the absmax. The number of
// compares follows the map's runs (at most 9; a ninth is the value 1 alone, checked when the tables
// are built): 8-bit maps have 9, the signed 4-bit map 5, the unsigned one 2.
template <int kBits, bool kSigned>
float requantize_avx2(const float* values, int64_t n, uint32_t absmax_bits, const QuantLut& lut, int64_t first,
                      uint8_t* codes) {
  float absmax;
  std::memcpy(&absmax, &absmax_bits, sizeof(absmax));
  const float scale = absmax > 0.f ? 1.f / absmax : 0.f;  // 0 for a NaN absmax too
  const int runs = lut.simd->num_runs;
  if (runs <= 2) {
    quantize_values_avx2<kBits, kSigned, 1, false>(values, n, scale, lut, first, codes);
  } else if (runs <= 5) {
    quantize_values_avx2<kBits, kSigned, 4, false>(values, n, scale, lut, first, codes);
  } else {
    quantize_values_avx2<kBits, kSigned, 7, true>(values, n, scale, lut, first, codes);
  }
  return absmax;
}

DLDNA_ALWAYS_INLINE __m256i magnitude_bits8(__m256 x) {
  return _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff));
}

DLDNA_ALWAYS_INLINE uint32_t reduce_max_u32(__m256i x) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// quantize_block's work for the quantize_blockwise op.
inline float quantize_block_avx2(const float* values, const QuantLut& lut, int bits, int64_t first, int64_t n,
                                 uint8_t* codes) {
  __m256i largest = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    largest = _mm256_max_epu32(largest, magnitude_bits8(_mm256_loadu_ps(values + i)));
  }
  uint32_t absmax_bits = reduce_max_u32(largest);
  for (; i < n; ++i) {
    uint32_t value_bits;
    std::memcpy(&value_bits, values + i, sizeof(value_bits));
    absmax_bits = std::max(absmax_bits, value_bits & 0x7fffffffu);
  }
  const bool is_signed = lut.simd->is_signed;
  if (bits == 8) {
    return is_signed ? requantize_avx2<8, true>(values, n, absmax_bits, lut, first, codes)
                     : requantize_avx2<8, false>(values, n, absmax_bits, lut, first, codes);
  }
  return is_signed ? requantize_avx2<4, true>(values, n, absmax_bits, lut, first, codes)
                   : requantize_avx2<4, false>(values, n, absmax_bits, lut, first, codes);
}

// The values of the 8 codes of elements [element, element + 8), times absmax (element even at
// 4 bits). 8-bit maps are gathered (the dequantize op, signed map, one thread: 0.62-0.83 ns per element
// against 0.92-1.00 for the scalar table reads it replaced); a 4-bit map is two registers, indexed
// by permutes.
template <int kBits>
DLDNA_ALWAYS_INLINE __m256 dequantize8(const uint8_t* codes, int64_t element, const float* map, __m256 absmax) {
  if constexpr (kBits == 8) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + element)));
    return _mm256_mul_ps(_mm256_i32gather_ps(map, c, 4), absmax);
  } else {
    int32_t word;
    std::memcpy(&word, codes + element / 2, sizeof(word));
    // Lane k takes nibble k of the 4 bytes (element 2j in the low nibble of byte j).
    const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                       _mm256_set1_epi32(15));
    const __m256 low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(map), c);
    const __m256 high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(map + 8), c);
    // Codes 8-15 have bit 3 set: moved to the sign, it picks the upper half.
    return _mm256_mul_ps(_mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28))), absmax);
  }
}

// dequantize_block's work for the dequantize_blockwise op.
inline void dequantize_block_avx2(const uint8_t* codes, float absmax, const QuantLut& lut, int bits, int64_t first,
                                  int64_t n, float* out) {
  const __m256 scale = _mm256_set1_ps(absmax);
  int64_t i = 0;
  if (bits == 8) {
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(out + i, dequantize8<8>(codes, first + i, lut.values, scale));
    }
  } else {
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(out + i, dequantize8<4>(codes, first + i, lut.values, scale));
    }
  }
  for (; i < n; ++i) {
    out[i] = dequantize_one(codes, bits, first + i, lut, absmax);
  }
}

// One low-bit Adam or Lion block: elements [first, first + n) of tensor t, with the rule's states
// (AdamLowbitRule, LionLowbitRule). The new fp32 states go to scratch[s], then are requantized with
// their new absmax.
template <typename P, RoundMode M, int kBits, typename Rule>
void lowbit_block_avx2(const LowbitLaunch& launch, const LowbitTensorArgs& t, int64_t first, int64_t n,
                       float* const* scratch, const Rule& rule) {
  constexpr int kStates = Rule::kStates;
  const int64_t block = first / launch.block_size;
  const QuantState* states[2] = {&t.exp_avg, &t.exp_avg_sq};
  const QuantLut* luts[2] = {launch.exp_avg_lut, launch.exp_avg_sq_lut};
  P* param = static_cast<P*>(t.param);  // element first + i at param[first + i]
  P* grad = static_cast<P*>(t.grad) + first;
  const float unscale = launch.unscale_grads;
  __m256 absmax[kStates];
  __m256i largest[kStates];
  for (int s = 0; s < kStates; ++s) {
    absmax[s] = _mm256_set1_ps(states[s]->absmax[block]);
    largest[s] = _mm256_setzero_si256();
  }
  // 8-bit codes: their values into the scratch by scalar loads first. That cost less than a gather
  // per 8 codes inside the loop below, where the update's divides run (4M elements, one thread,
  // three alternating runs: AdamW8bit 3.11-3.21 against 3.33-3.47 ns per element; no difference
  // beyond the noise on two).
  if constexpr (kBits == 8) {
    for (int s = 0; s < kStates; ++s) {
      lookup_values(luts[s]->values, states[s]->codes + first, states[s]->absmax[block], n, scratch[s]);
    }
  }
  int64_t i = 0;
  for (; i + kVecBlock <= n; i += kVecBlock) {
    FloatVec p[2], g[2];
    load_param_block<M>(param, t.write, first + i, p[0], p[1]);
    load_block(grad + i, g[0], g[1]);
    for (int h = 0; h < 2; ++h) {
      const int64_t at = i + h * FloatVec::size();
      FloatVec state[kStates];
      for (int s = 0; s < kStates; ++s) {
        if constexpr (kBits == 8) {
          state[s] = FloatVec::loadu(scratch[s] + at);
        } else {
          state[s] = FloatVec(dequantize8<kBits>(states[s]->codes, first + at, luts[s]->values, absmax[s]));
        }
      }
      rule(p[h], g[h], state);
      for (int s = 0; s < kStates; ++s) {
        state[s].store(scratch[s] + at);
        largest[s] = _mm256_max_epu32(largest[s], magnitude_bits8(state[s]));
      }
    }
    store_param_block<M>(param, t.write, first + i, p[0], p[1]);
    if (unscale != 0.f) {
      store_unscaled_block(grad + i, g, unscale);
    }
  }
  uint32_t largest_bits[kStates];
  for (int s = 0; s < kStates; ++s) {
    largest_bits[s] = reduce_max_u32(largest[s]);
  }
  lowbit_elements<P, M, kBits>(launch, t, first, i, n, scratch, rule, largest_bits);
  // exp_avg takes the signed map, exp_avg_sq the unsigned one.
  states[0]->absmax[block] = requantize_avx2<kBits, true>(scratch[0], n, largest_bits[0], *luts[0], first,
                                                          states[0]->codes);
  if constexpr (kStates == 2) {
    states[1]->absmax[block] = requantize_avx2<kBits, false>(scratch[1], n, largest_bits[1], *luts[1], first,
                                                             states[1]->codes);
  }
}

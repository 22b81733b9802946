#pragma once
// Dequantizing and requantizing one block with AVX-512 (F, BW, DQ, VBMI): the method is
// [Note: vectorized nearest code] in cpu/kernel_table.h. cpu/kernels_impl.h includes this file
// inside its kernel namespace, in the build of cpu/kernels_avx512.cpp only, where <immintrin.h> is
// already included and the instructions are enabled. The scalar helpers (nearest_code,
// pack_codes) are kernels_impl.h's, so tails and near-tie lanes follow the AVX2 kernels exactly.

// Tables of one map, held in registers for a whole block.
struct QuantRegisters {
  __m512i octave_run[2];
  __m512i octave_boundary[2];
  __m512 run_scale;
  __m512 run_offset;
  __m512i run_base;
  __m512i run_last;
  __m512i zero;
  __m512 low;

  explicit QuantRegisters(const QuantLut& lut) {
    const QuantSimd& s = *lut.simd;
    for (int h = 0; h < 2; ++h) {
      octave_run[h] = _mm512_loadu_si512(s.octave_run + 16 * h);
      octave_boundary[h] = _mm512_loadu_si512(s.octave_boundary + 16 * h);
    }
    run_scale = _mm512_loadu_ps(s.run_scale);
    run_offset = _mm512_loadu_ps(s.run_offset);
    run_base = _mm512_loadu_si512(s.run_base);
    run_last = _mm512_loadu_si512(s.run_last);
    zero = _mm512_set1_epi32(s.zero);
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
  const __mmask16 negative = kSigned ? _mm512_movepi32_mask(bits) : __mmask16{0};
  // a >= boundary on negative lanes: a > boundary - 1 (boundaries are positive floats).
  boundary = _mm512_mask_sub_epi32(boundary, negative, boundary, one);
  run = _mm512_mask_add_epi32(run, _mm512_cmpgt_epi32_mask(magnitude, boundary), run, one);
  const __m512 t = _mm512_fmadd_ps(_mm512_castsi512_ps(magnitude), _mm512_permutexvar_ps(run, r.run_scale),
                                   _mm512_permutexvar_ps(run, r.run_offset));
  const __m512 floor_t = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 fraction = _mm512_sub_ps(t, floor_t);
  near_tie = _mm512_cmp_ps_mask(fraction, _mm512_set1_ps(kNearTie), _CMP_LT_OQ) |
             _mm512_cmp_ps_mask(fraction, _mm512_set1_ps(1.f - kNearTie), _CMP_GT_OQ);
  const __m512i step = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvttps_epi32(floor_t), _mm512_set1_epi32(-1)),
                                        _mm512_permutexvar_epi32(run, r.run_last));
  const __m512i rank = _mm512_add_epi32(step, _mm512_permutexvar_epi32(run, r.run_base));
  if constexpr (!kSigned) {
    return rank;
  }
  const __m512i below_zero = _mm512_sub_epi32(r.zero, _mm512_min_epi32(rank, r.zero));
  return _mm512_mask_blend_epi32(negative, _mm512_add_epi32(r.zero, rank), below_zero);
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

template <int kBits, bool kSigned>
void quantize_vectors(const float* values, int64_t n, float scale, const QuantLut& lut, int64_t first,
                      uint8_t* codes) {
  const QuantRegisters r(lut);
  const __m512 scale_vec = _mm512_set1_ps(scale);
  // Two vectors per iteration: independent chains, and one branch for both tie masks.
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

// Requantizes values[0, n) as quantize_block does: returns the block's absmax and writes the
// packed codes of elements [first, first + n) at `codes`.
inline float quantize_block_avx512(const float* values, const QuantLut& lut, int bits, int64_t first,
                                   int64_t n, uint8_t* codes) {
  // absmax as the largest |x| bit pattern: the order of non-negative floats, with NaN above all.
  __m512i largest = _mm512_setzero_si512();
  const __m512i magnitude_mask = _mm512_set1_epi32(0x7fffffff);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    largest = _mm512_max_epu32(largest, _mm512_and_si512(_mm512_loadu_si512(values + i), magnitude_mask));
  }
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    largest = _mm512_max_epu32(largest, _mm512_and_si512(_mm512_maskz_loadu_epi32(tail, values + i),
                                                         magnitude_mask));
  }
  const uint32_t absmax_bits = _mm512_reduce_max_epu32(largest);
  float absmax;
  std::memcpy(&absmax, &absmax_bits, sizeof(absmax));
  const float scale = absmax > 0.f ? 1.f / absmax : 0.f;  // 0 for a NaN absmax too
  if (bits == 8) {
    lut.simd->is_signed ? quantize_vectors<8, true>(values, n, scale, lut, first, codes)
                        : quantize_vectors<8, false>(values, n, scale, lut, first, codes);
  } else {
    lut.simd->is_signed ? quantize_vectors<4, true>(values, n, scale, lut, first, codes)
                        : quantize_vectors<4, false>(values, n, scale, lut, first, codes);
  }
  return absmax;
}

// out[i] = values[code of element first + i] * absmax for i < n, as dequantize_block computes.
inline void dequantize_block_avx512(const uint8_t* codes, float absmax, const QuantLut& lut, int bits,
                                    int64_t first, int64_t n, float* out) {
  const __m512 scale = _mm512_set1_ps(absmax);
  int64_t i = 0;
  if (bits == 8) {
    // Byte b of every code's value from four 256-entry byte tables. The unpacks interleave within
    // 128-bit lanes, so the codes are first put in the order that makes their output natural:
    // position 16L + 4k + j takes code 16k + 4L + j.
    alignas(64) uint8_t order[64];
    for (int lane = 0; lane < 4; ++lane) {
      for (int k = 0; k < 4; ++k) {
        for (int j = 0; j < 4; ++j) {
          order[16 * lane + 4 * k + j] = static_cast<uint8_t>(16 * k + 4 * lane + j);
        }
      }
    }
    const __m512i reorder = _mm512_load_si512(order);
    __m512i table[4][4];
    for (int b = 0; b < 4; ++b) {
      for (int q = 0; q < 4; ++q) {
        table[b][q] = _mm512_loadu_si512(lut.simd->value_bytes[b] + 64 * q);
      }
    }
    const uint8_t* src = codes + first;
    for (; i + 64 <= n; i += 64) {
      const __m512i c = _mm512_permutexvar_epi8(reorder, _mm512_loadu_si512(src + i));
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
        _mm512_storeu_ps(out + i + 16 * k, _mm512_mul_ps(_mm512_castsi512_ps(value_bits[k]), scale));
      }
    }
    for (; i < n; ++i) {
      out[i] = lut.values[src[i]] * absmax;
    }
    return;
  }
  // 4 bits: 16 codes in 8 bytes; each byte becomes a 64-bit pair (low nibble, high nibble).
  const __m512 map = _mm512_loadu_ps(lut.values);
  const uint8_t* src = codes + first / 2;
  const __m512i low_nibble = _mm512_set1_epi64(0x0f);
  const __m512i high_nibble = _mm512_set1_epi64(0xf0);
  for (; i + 16 <= n; i += 16) {
    const __m512i bytes = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i / 2)));
    const __m512i c = _mm512_or_si512(_mm512_and_si512(bytes, low_nibble),
                                      _mm512_slli_epi64(_mm512_and_si512(bytes, high_nibble), 28));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_permutexvar_ps(c, map), scale));
  }
  for (; i < n; ++i) {
    const uint8_t byte = src[i / 2];
    out[i] = lut.values[i % 2 == 0 ? byte & 15 : byte >> 4] * absmax;
  }
}

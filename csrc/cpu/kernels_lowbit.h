#pragma once
// The 8- and 4-bit Adam/Lion CPU kernels and blockwise (de)quantization: the portable block loops
// here; with DLDNA_LOWBIT_AVX2 (cpu/kernels_avx2.cpp) those of cpu/lowbit_avx2.h, with
// DLDNA_LOWBIT_AVX512 (cpu/kernels_avx512.cpp) those of cpu/lowbit_avx512.h.
// Included through cpu/kernels_impl.h only, which each cpu/kernels_<capability>.cpp compiles once
// under its own namespace ([Note: CPU capability builds] in cpu/kernel_table.h).

#include <algorithm>
#include <cstring>

#include "common/adam_math.h"
#include "common/lion_math.h"
#include "cpu/kernels_common.h"
#include "cpu/param_write.h"
#if defined(DLDNA_LOWBIT_AVX512)
#include "cpu/vec512.h"
#endif

namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE {

// ---- Low-bit states: see [Note: blockwise quantized states] in common/quantization.h ----

// The per-element helpers below run once per vector; a call each (GCC does not inline them on its
// own) costs as much as their work.
#ifndef DLDNA_ALWAYS_INLINE
#define DLDNA_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

// The nearest code of y (see [Note: nearest-code lookup] in cpu/kernel_table.h), as a scalar.
DLDNA_ALWAYS_INLINE int32_t nearest_code(float y, const QuantLut& lut) {
  if (y != y) {
    y = 1.f;
  }
  y = std::min(std::max(y, lut.low), 1.f);
  int32_t bits;
  std::memcpy(&bits, &y, sizeof(bits));
  const int32_t sign = bits >> 31;  // -1 for negative values (and -0.0), else 0
  const int32_t relative = std::max(bits & 0x7fffffff, kQuantLowBits) - kQuantLowBits;
  const int32_t bucket = relative >> lut.shift;
  const int32_t offset = relative & ((1 << lut.shift) - 1);
  const int32_t entry = lut.entries[bucket + (sign & lut.num_buckets)];
  const int32_t past = offset > (entry & 0xfffff) - 1 ? 1 : 0;
  return (entry >> 20) + ((past ^ sign) - sign);
}

// The same for vectors, in three steps around the table read, which is a scalar loop: on this
// project's machine (AMD EPYC) an AVX2 gather of 8 lanes took 0.40 ns per element, 8 scalar loads
// 0.20 ns (BENCHMARKS.md, issue 16).
// Step 1: y with the NaN and clamp rules, and its bucket (entry index).
DLDNA_ALWAYS_INLINE FloatVec clamped_codes_input(FloatVec y, const QuantLut& lut) {
  const FloatVec one(1.f);
  y = FloatVec::blendv(y, one, y != y);
  return at::vec::clamp(y, FloatVec(lut.low), one);
}

DLDNA_ALWAYS_INLINE IntVec bucket_index(const FloatVec& y, const QuantLut& lut) {
  const IntVec bits = at::vec::cast<int32_t>(y);
  const IntVec relative = at::vec::maximum(bits & IntVec(0x7fffffff), IntVec(kQuantLowBits)) -
                          IntVec(kQuantLowBits);
  return (relative >> IntVec(lut.shift)) + ((bits >> IntVec(31)) & IntVec(lut.num_buckets));
}

// Step 3: the code from y and its bucket's entry.
DLDNA_ALWAYS_INLINE IntVec decode_entry(const FloatVec& y, const IntVec& entry, const QuantLut& lut) {
  const IntVec bits = at::vec::cast<int32_t>(y);
  const IntVec sign = bits >> IntVec(31);
  const IntVec relative = at::vec::maximum(bits & IntVec(0x7fffffff), IntVec(kQuantLowBits)) -
                          IntVec(kQuantLowBits);
  const IntVec offset = relative & IntVec((1 << lut.shift) - 1);
  const IntVec past = (offset > ((entry & IntVec(0xfffff)) - IntVec(1))) & IntVec(1);
  return (entry >> IntVec(20)) + ((past ^ sign) - sign);
}

// Step 2, and the map lookups of dequantization: scalar loads, kept out of the vectorizer's
// reach so that it does not turn them back into gathers.
__attribute__((noinline, optimize("no-tree-vectorize"))) inline void read_entries(const int32_t* table,
                                                                                 int32_t* index, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    index[i] = table[index[i]];
  }
}

// Codes of elements [first, first + n) of a state (first even at 4 bits) into int32 lanes.
DLDNA_ALWAYS_INLINE void unpack_codes(const uint8_t* codes, int bits, int64_t first, int64_t n, int32_t* out) {
  if (bits == 8) {
    const uint8_t* src = codes + first;
    for (int64_t i = 0; i < n; ++i) {
      out[i] = src[i];
    }
    return;
  }
  const uint8_t* src = codes + first / 2;
  for (int64_t i = 0; i < n / 2; ++i) {
    out[2 * i] = src[i] & 15;
    out[2 * i + 1] = src[i] >> 4;
  }
  if (n % 2 != 0) {
    out[n - 1] = src[n / 2] & 15;
  }
}

DLDNA_ALWAYS_INLINE void pack_codes(const int32_t* in, int bits, int64_t first, int64_t n, uint8_t* codes) {
  if (bits == 8) {
    uint8_t* dst = codes + first;
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<uint8_t>(in[i]);
    }
    return;
  }
  uint8_t* dst = codes + first / 2;
  for (int64_t i = 0; i < n / 2; ++i) {
    dst[i] = static_cast<uint8_t>(in[2 * i] | (in[2 * i + 1] << 4));
  }
  if (n % 2 != 0) {
    dst[n / 2] = static_cast<uint8_t>(in[n - 1]);  // a tensor's odd last element: high nibble 0
  }
}

// Scratch of one block: its dequantized values and its codes.
struct QuantBlock {
  float values[kMaxQuantBlock];
  int32_t codes[kMaxQuantBlock];
};

// out[i] = map[codes[i]] * absmax for i < n, by scalar loads: the portable build's dequantization
// (int32 codes, unpacked), and the AVX2 step's for 8-bit codes (bytes). Kept from the vectorizer,
// which would turn the loads into gathers.
template <typename Code>
__attribute__((noinline, optimize("no-tree-vectorize"))) inline void lookup_values(const float* map,
                                                                                  const Code* codes,
                                                                                  float absmax, int64_t n,
                                                                                  float* out) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = map[codes[i]] * absmax;
  }
}

// The value of one element's code, times absmax.
inline float dequantize_one(const uint8_t* codes, int bits, int64_t element, const QuantLut& lut, float absmax) {
  const uint8_t byte = codes[bits == 8 ? element : element / 2];
  const int code = bits == 8 ? byte : (element % 2 == 0 ? byte & 15 : byte >> 4);
  return lut.values[code] * absmax;
}

// The update rules of the low-bit steps, on one float or a vector of lanes (FloatVec, Vec512), with
// the states in an array: Adam's two (exp_avg, exp_avg_sq), Lion's one. kCommon: adam_is_common(c),
// the rule without flag tests (common/adam_math.h), as the fp32 kernels run it.
template <bool kCommon>
struct AdamLowbitRule {
  static constexpr int kStates = 2;
  const AdamCoefficients& c;
  template <typename V>
  DLDNA_ALWAYS_INLINE void operator()(V& p, V g, V* state) const {
    V unused(0.f);  // v_max: no amsgrad in the low-bit classes
    adam_update<kCommon>(p, g, state[0], state[1], unused, c);
  }
};

struct LionLowbitRule {
  static constexpr int kStates = 1;
  const LionCoefficients& c;
  template <typename V>
  DLDNA_ALWAYS_INLINE void operator()(V& p, V g, V* state) const {
    lion_update(p, g, state[0], c);
  }
};

// Elements [i, n) of a block that the vector kernels update one at a time (its last n % kVecBlock,
// as in every build): the new states go to scratch[s], their magnitude bits into largest[s].
template <typename P, RoundMode M, int kBits, typename Rule>
DLDNA_ALWAYS_INLINE void lowbit_elements(const LowbitLaunch& launch, const LowbitTensorArgs& t, int64_t first,
                                         int64_t i, int64_t n, float* const* scratch, const Rule& rule,
                                         uint32_t* largest) {
  const int64_t block = first / launch.block_size;
  const QuantState* states[2] = {&t.exp_avg, &t.exp_avg_sq};
  const QuantLut* luts[2] = {launch.exp_avg_lut, launch.exp_avg_sq_lut};
  P* param = static_cast<P*>(t.param);  // element first + i at param[first + i]
  P* grad = static_cast<P*>(t.grad) + first;
  for (; i < n; ++i) {
    float p = load_param<M>(param, t.write, first + i);
    float state[Rule::kStates];
    for (int s = 0; s < Rule::kStates; ++s) {
      state[s] = dequantize_one(states[s]->codes, kBits, first + i, *luts[s], states[s]->absmax[block]);
    }
    rule(p, static_cast<float>(grad[i]), state);
    store_param<M>(param, t.write, first + i, p);
    if (launch.unscale_grads != 0.f) {
      store_unscaled(grad, i, launch.unscale_grads);
    }
    for (int s = 0; s < Rule::kStates; ++s) {
      scratch[s][i] = state[s];
      uint32_t bits;
      std::memcpy(&bits, &state[s], sizeof(bits));
      largest[s] = std::max(largest[s], bits & 0x7fffffffu);
    }
  }
}

#if defined(DLDNA_LOWBIT_AVX512)
#include "cpu/lowbit_avx512.h"
#elif defined(DLDNA_LOWBIT_AVX2)
#include "cpu/lowbit_avx2.h"
#endif

DLDNA_ALWAYS_INLINE void dequantize_block(const uint8_t* codes, float absmax, const QuantLut& lut, int bits,
                                          int64_t first, int64_t n, QuantBlock& scratch) {
#if defined(DLDNA_LOWBIT_AVX512)
  dequantize_block_avx512(codes, absmax, lut, bits, first, n, scratch.values);
#elif defined(DLDNA_LOWBIT_AVX2)
  dequantize_block_avx2(codes, absmax, lut, bits, first, n, scratch.values);
#else
  unpack_codes(codes, bits, first, n, scratch.codes);
  lookup_values(lut.values, scratch.codes, absmax, n, scratch.values);
#endif
}

// Requantizes values[0, n): returns the block's absmax and leaves the packed codes at `codes`.
DLDNA_ALWAYS_INLINE float quantize_block(QuantBlock& scratch, const QuantLut& lut, int bits, int64_t first,
                            int64_t n, uint8_t* codes) {
#if defined(DLDNA_LOWBIT_AVX512)
  return quantize_block_avx512(scratch.values, lut, bits, first, n, codes);
#elif defined(DLDNA_LOWBIT_AVX2)
  return quantize_block_avx2(scratch.values, lut, bits, first, n, codes);
#else
  using VecMath = OpMath<FloatVec>;
  using Math = OpMath<float>;
  FloatVec lanes(0.f);
  float absmax = 0.f;
  int64_t i = 0;
  for (; i + FloatVec::size() <= n; i += FloatVec::size()) {
    lanes = VecMath::max(lanes, VecMath::abs(FloatVec::loadu(scratch.values + i)));
  }
  for (; i < n; ++i) {
    absmax = Math::max(absmax, Math::abs(scratch.values[i]));
  }
  float lane_values[FloatVec::size()];
  lanes.store(lane_values);
  for (float lane : lane_values) {
    absmax = Math::max(absmax, lane);
  }
  const float scale = absmax > 0.f ? 1.f / absmax : 0.f;
  const FloatVec scale_vec(scale);
  // values become the clamped y, codes their bucket, then the bucket's entry, then the code.
  const int64_t vector_end = n / FloatVec::size() * FloatVec::size();
  for (i = 0; i < vector_end; i += FloatVec::size()) {
    const FloatVec y = clamped_codes_input(FloatVec::loadu(scratch.values + i) * scale_vec, lut);
    y.store(scratch.values + i);
    bucket_index(y, lut).store(scratch.codes + i);
  }
  read_entries(lut.entries, scratch.codes, vector_end);
  for (i = 0; i < vector_end; i += FloatVec::size()) {
    decode_entry(FloatVec::loadu(scratch.values + i), IntVec::loadu(scratch.codes + i), lut)
        .store(scratch.codes + i);
  }
  for (i = vector_end; i < n; ++i) {
    scratch.codes[i] = nearest_code(scratch.values[i] * scale, lut);
  }
  pack_codes(scratch.codes, bits, first, n, codes);
  return absmax;
#endif
}

// The portable build's block: its states dequantized into scratch, updated there in vectors of
// kVecBlock and then one element at a time, and requantized.
template <typename P, RoundMode M, typename Rule>
void lowbit_block_portable(const LowbitLaunch& launch, const LowbitTensorArgs& t, int64_t first, int64_t n,
                           QuantBlock* scratch, const Rule& rule) {
  const int64_t block = first / launch.block_size;
  const QuantState* states[2] = {&t.exp_avg, &t.exp_avg_sq};
  const QuantLut* luts[2] = {launch.exp_avg_lut, launch.exp_avg_sq_lut};
  for (int s = 0; s < Rule::kStates; ++s) {
    dequantize_block(states[s]->codes, states[s]->absmax[block], *luts[s], launch.bits, first, n, scratch[s]);
  }
  auto* param = static_cast<P*>(t.param);  // element first + i at param[first + i]
  auto* grad = static_cast<P*>(t.grad) + first;
  const float unscale = launch.unscale_grads;
  int64_t i = 0;
  for (; i + kVecBlock <= n; i += kVecBlock) {
    FloatVec p[2], g[2];
    load_param_block<M>(param, t.write, first + i, p[0], p[1]);
    load_block(grad + i, g[0], g[1]);
    for (int h = 0; h < 2; ++h) {
      const int64_t at = i + h * FloatVec::size();
      FloatVec state[Rule::kStates];
      for (int s = 0; s < Rule::kStates; ++s) {
        state[s] = FloatVec::loadu(scratch[s].values + at);
      }
      rule(p[h], g[h], state);
      for (int s = 0; s < Rule::kStates; ++s) {
        state[s].store(scratch[s].values + at);
      }
    }
    store_param_block<M>(param, t.write, first + i, p[0], p[1]);
    if (unscale != 0.f) {
      store_unscaled_block(grad + i, g, unscale);
    }
  }
  for (; i < n; ++i) {
    float p = load_param<M>(param, t.write, first + i);
    float state[Rule::kStates];
    for (int s = 0; s < Rule::kStates; ++s) {
      state[s] = scratch[s].values[i];
    }
    rule(p, static_cast<float>(grad[i]), state);
    for (int s = 0; s < Rule::kStates; ++s) {
      scratch[s].values[i] = state[s];
    }
    store_param<M>(param, t.write, first + i, p);
    if (unscale != 0.f) {
      store_unscaled(grad, i, unscale);
    }
  }
  for (int s = 0; s < Rule::kStates; ++s) {
    states[s]->absmax[block] = quantize_block(scratch[s], *luts[s], launch.bits, first, n, states[s]->codes);
  }
}

// One block of a low-bit step, by this build's kernel.
template <typename P, RoundMode M, typename Rule>
DLDNA_ALWAYS_INLINE void lowbit_block(const LowbitLaunch& launch, const LowbitTensorArgs& t, int64_t first, int64_t n,
                                      QuantBlock* scratch, const Rule& rule) {
#if defined(DLDNA_LOWBIT_AVX512) || defined(DLDNA_LOWBIT_AVX2)
  float* const values[2] = {scratch[0].values, scratch[1].values};
#if defined(DLDNA_LOWBIT_AVX512)
  launch.bits == 8 ? lowbit_block_avx512<P, M, 8>(launch, t, first, n, values, rule)
                   : lowbit_block_avx512<P, M, 4>(launch, t, first, n, values, rule);
#else
  launch.bits == 8 ? lowbit_block_avx2<P, M, 8>(launch, t, first, n, values, rule)
                   : lowbit_block_avx2<P, M, 4>(launch, t, first, n, values, rule);
#endif
#else
  lowbit_block_portable<P, M>(launch, t, first, n, scratch, rule);
#endif
}

// Calls block(tensor args, first element, count) for each quantization block of the chunks.
template <typename F>
void for_each_quant_block(const Chunk* chunks, int64_t num_chunks, int64_t block_size, F&& block) {
  for (int64_t k = 0; k < num_chunks; ++k) {
    const Chunk& chunk = chunks[k];
    for (int64_t first = chunk.begin; first < chunk.end; first += block_size) {
      block(chunk.tensor, first, std::min(block_size, chunk.end - first));
    }
  }
}

// A low-bit step over the chunks; with_rule(tensor args, f) calls f(the tensor's rule).
template <typename WithRule>
void lowbit_step_chunks(const LowbitLaunch& launch, const Chunk* chunks, int64_t num_chunks, WithRule&& with_rule) {
  // thread_local: 64 KiB of scratch per thread, too much for a worker's stack.
  thread_local QuantBlock tls_scratch[2];
  QuantBlock* scratch = tls_scratch;  // one TLS lookup per call, not per block
  dispatch_param_round(launch.param_dtype, launch.round_mode, [&](auto p_tag, auto mode) {
    using P = decltype(p_tag);
    constexpr RoundMode M = decltype(mode)::value;
    for_each_quant_block(chunks, num_chunks, launch.block_size, [&](int64_t tensor, int64_t first, int64_t n) {
      const LowbitTensorArgs& t = launch.tensors[tensor];
      with_rule(t, [&](const auto& rule) { lowbit_block<P, M>(launch, t, first, n, scratch, rule); });
    });
  });
}

inline void adam_lowbit_chunks(const LowbitLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  lowbit_step_chunks(launch, chunks, num_chunks, [](const LowbitTensorArgs& t, auto&& block) {
    if (adam_is_common(t.adam)) {
      block(AdamLowbitRule<true>{t.adam});
    } else {
      block(AdamLowbitRule<false>{t.adam});
    }
  });
}

inline void lion_lowbit_chunks(const LowbitLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  lowbit_step_chunks(launch, chunks, num_chunks,
                     [&](const LowbitTensorArgs&, auto&& block) { block(LionLowbitRule{launch.lion}); });
}

inline void quantize_chunks(const QuantizeLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  thread_local QuantBlock tls_scratch;
  QuantBlock& scratch = tls_scratch;
  dispatch_param(launch.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* input = static_cast<const T*>(launch.input);
    for_each_quant_block(chunks, num_chunks, launch.block_size, [&](int64_t, int64_t first, int64_t n) {
      for (int64_t i = 0; i < n; ++i) {
        scratch.values[i] = static_cast<float>(input[first + i]);
      }
      launch.output.absmax[first / launch.block_size] =
          quantize_block(scratch, *launch.lut, launch.bits, first, n, launch.output.codes);
    });
  });
}

inline void dequantize_chunks(const DequantizeLaunch& launch, const Chunk* chunks, int64_t num_chunks) {
  thread_local QuantBlock tls_scratch;
  QuantBlock& scratch = tls_scratch;
  for_each_quant_block(chunks, num_chunks, launch.block_size, [&](int64_t, int64_t first, int64_t n) {
    dequantize_block(launch.codes, launch.absmax[first / launch.block_size], *launch.lut, launch.bits,
                     first, n, scratch);
    std::copy(scratch.values, scratch.values + n, launch.output + first);
  });
}

}  // namespace dldna_fused::cpu::DLDNA_KERNELS_NAMESPACE

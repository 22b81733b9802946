#pragma once
// How a step writes bf16 params: round to nearest, stochastic rounding, or Kahan-compensated.
// Scalar versions for every device; the CPU's vector versions are in cpu/param_write.h.
//
// [Note: bf16 param writes]
// Every update rule computes the new param in fp32. A bf16 param keeps 8 bits of mantissa, so an
// update below half an ulp of the param is lost when that value is rounded to nearest: with a
// small lr, pure-bf16 training stalls. Two cures, chosen per op call:
// - Stochastic rounding (bf16_stochastic_round=True): the fp32 value x goes to the bf16 neighbour
//   above or below it in magnitude with probability proportional to its distance from the other
//   one, so E[write] = x and small updates survive on average. With r uniform in [0, 2^16), that
//   is (bits(x) + r) with the low 16 bits cleared. r comes from a counter-based generator keyed by
//   (seed, param, step, element): the Python class turns (seed, group, position in group, shard
//   rank) into a 64-bit key per param (param_key in dldna_fused/_rounding.py), the op mixes in the
//   param's step count after the increment, and random_bits16 hashes that salt with the element's
//   row-major index in the param (the ops run a non-contiguous param on a contiguous copy under
//   these modes). No state, no stream, no thread id: the same bits for any thread count, chunking
//   or launch split, and for the references, which draw them in torch ops (dldna_fused/_rounding.py).
// - Kahan summation (kahan_sum=True): a bf16 compensation state c per param holds what the last
//   write lost. The update runs on x = p + c (fp32), then p = round_nearest(x) and
//   c = round_nearest(x - p), so p + c carries ~16 significant bits between steps; x - p is exact
//   in fp32 (Sterbenz). A NaN or infinite x leaves c = 0.
// Both apply to bf16 params only (the ops refuse other dtypes) and never together.

#include <cstdint>

#include "common/opmath.h"

namespace dldna_fused {

enum class RoundMode : int8_t { Nearest, Stochastic, Kahan };

DLDNA_HOST_DEVICE uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The salt of one param at one step: its 64-bit key and its step count (after the increment).
DLDNA_HOST_DEVICE uint64_t rounding_salt(int64_t key, float step) {
  return splitmix64(static_cast<uint64_t>(key) ^ splitmix64(static_cast<uint64_t>(step)));
}

// A 32-bit integer hash with low bias (Wellons' "lowbias32"), a bijection of uint32.
DLDNA_HOST_DEVICE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// [Note: paired random bits]
// Elements 16b + j and 16b + j + 8 (j < 8) of a param share one 32-bit hash: the lower element
// takes its low 16 bits, the upper one its high 16. A CPU block of two 8-lane vectors (16
// elements) then costs 8 hashes and no shuffle; the bits of an element still depend only on
// (salt, index). The hash input is the pair's number plus a 32-bit key of the salt: the 8 pairs of
// a block are one broadcast and one add from consecutive numbers. The key is the same for every
// pair below 2^32 (a param of fewer than 2^33 elements), an xor of the salt's halves. Another
// salt's stream is this one shifted by the keys' difference, over data that differs. The key of
// pairs at and above 2^32 comes from a fresh splitmix64, so those do not repeat the first 2^32.
DLDNA_HOST_DEVICE uint32_t pair_key(uint64_t salt, uint64_t pair_high) {
  const uint64_t s = pair_high == 0 ? salt : splitmix64(salt ^ pair_high);
  return static_cast<uint32_t>(s) ^ static_cast<uint32_t>(s >> 32);
}

DLDNA_HOST_DEVICE uint32_t pair_hash(uint64_t salt, uint64_t pair) {
  return lowbias32(static_cast<uint32_t>(pair) + pair_key(salt, pair >> 32));
}

// 16 random bits for element `index` of a param whose salt is `salt`.
DLDNA_HOST_DEVICE uint32_t random_bits16(uint64_t salt, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  const uint32_t x = pair_hash(salt, (i >> 4) * 8 + (i & 7));
  return (i & 8) != 0 ? x >> 16 : x & 0xffffu;
}

// The float bits of x stochastically rounded to bf16 with random bits r (< 2^16): the result's
// low 16 bits are zero, so it converts to bf16 exactly. NaN stays as it is (the conversion keeps
// it NaN); infinities stay infinite.
DLDNA_HOST_DEVICE uint32_t stochastic_round_bits(uint32_t bits, uint32_t r) {
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return bits;
  }
  return (bits + r) & 0xffff0000u;
}

DLDNA_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

DLDNA_HOST_DEVICE float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  __builtin_memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// x stochastically rounded to a bf16 value (returned as a float that converts to bf16 exactly),
// with the bits element `index` of a param with this salt draws.
DLDNA_HOST_DEVICE float stochastic_round_value(float x, uint64_t salt, int64_t index) {
  return bits_float(stochastic_round_bits(float_bits(x), random_bits16(salt, index)));
}

// Kahan's compensation of a write: x - what was written, 0 where that is NaN (x NaN or infinite).
DLDNA_HOST_DEVICE float write_compensation(float x, float written) {
  const float c = x - written;
  return c != c ? 0.f : c;
}

}  // namespace dldna_fused

#pragma once
// Blockwise quantization of optimizer states to 8 or 4 bits: the code maps, the nearest-code rule
// every device follows, and the block layout.
//
// [Note: blockwise quantized states]
// A state tensor of n elements is cut into blocks of `block_size` consecutive elements (the last
// may be shorter). Each block keeps its absmax (float32) and one code per element: 8-bit codes one
// per byte, 4-bit codes two per byte (element 2k in the low nibble, 2k+1 in the high one). An
// element is map[code] * absmax. Inside a step a block is dequantized to fp32, the update rule
// from common/*_math.h runs unchanged, and the block is requantized with its new absmax:
//   y = x * (1 / absmax) (x * 0 where absmax is 0 or NaN), NaN -> 1, clamped to [lo, 1] (lo = -1
//   for a signed map, 0 for an unsigned one);
//   code = #{ i : mid[i] < y }, mid[i] = (map[i] + map[i+1]) / 2 rounded to fp32.
// So the code is the nearest one (ties go to the lower code), and it is the same on every device,
// thread count and SIMD width. dldna_fused/reference/lowbit.py writes this rule in torch ops.
//
// The maps (built by quant_map, and in Python by reference/lowbit.py, value for value):
// - "dynamic" maps (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022, the
//   dynamic tree quantization of Dettmers 2016), the maps bitsandbytes and torchao use. With E
//   exponents (7 for 8 bits, 3 for 4 bits), exponent i = 0..E-1 covers the decade
//   [10^(i-E), 10^(i-E+1)) with n_i evenly spaced levels, the midpoints of n_i equal steps of
//   [0.1, 1] scaled by 10^(i-E+1); n_i = 2^i for a signed map (both signs) and 2^(i+1) for an
//   unsigned one. 0 and 1 complete the map: 2 * (2^E - 1) + 2 = 2^bits codes signed,
//   (2^(E+1) - 2) + 2 = 256 unsigned. Large values get fine steps, small ones a wide range.
// - "linear without zero" for the 4-bit second moment: (k + 1) / 16, k = 0..15 (Li et al.,
//   "Memory Efficient Optimizers with 4-bit States", 2023). A map with 0 rounds small entries of v
//   to 0 and the step m / (sqrt(v) + eps) explodes; without 0 a small v is overestimated, which
//   only shortens that coordinate's step.
// Which map a state uses: exp_avg (signed) -> dynamic signed; exp_avg_sq (unsigned) -> dynamic
// unsigned at 8 bits, linear without zero at 4 bits.

#include <cstdint>
#include <vector>

namespace dldna_fused {

constexpr int kMaxCodes = 256;
// Block sizes: powers of two, so blocks tile the CPU and CUDA chunks exactly.
constexpr int64_t kMinQuantBlock = 64;
constexpr int64_t kMaxQuantBlock = 4096;

struct QuantMap {
  int num_codes;  // 2^bits
  bool is_signed;
  float values[kMaxCodes];        // ascending
  float midpoints[kMaxCodes - 1];  // (values[i] + values[i + 1]) / 2 in fp32
};

// The map of a state kind; built once, on the host.
const QuantMap& quant_map(int bits, bool is_signed);

// The map's non-negative values, in ascending order, are runs of evenly spaced values: one per
// exponent of a dynamic map, with 0 and 1 alone at the ends; all 16 of the linear map. Their lengths.
std::vector<int> quant_map_runs(int bits, bool is_signed);

// Bytes of codes for n elements.
inline int64_t code_bytes(int64_t n, int bits) {
  return bits == 8 ? n : (n + 1) / 2;
}

inline int64_t num_blocks(int64_t n, int64_t block_size) {
  return (n + block_size - 1) / block_size;
}

}  // namespace dldna_fused

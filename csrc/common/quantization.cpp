#include "common/quantization.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace dldna_fused {
namespace {

// The map's values in double, before the one rounding to float (reference/lowbit.py computes the
// same expressions in Python floats).
std::vector<double> map_values(int bits, bool is_signed) {
  std::vector<double> values;
  if (bits == 4 && !is_signed) {  // linear without zero
    for (int k = 0; k < 16; ++k) {
      values.push_back((k + 1) / 16.0);
    }
    return values;
  }
  const int exponents = bits - 1;
  for (int i = 0; i < exponents; ++i) {
    const int levels = is_signed ? 1 << i : 1 << (i + 1);
    const double scale = std::pow(10.0, i - exponents + 1);
    for (int j = 0; j < levels; ++j) {
      const double level = scale * (0.1 + 0.9 * (j + 0.5) / levels);
      values.push_back(level);
      if (is_signed) {
        values.push_back(-level);
      }
    }
  }
  values.push_back(0.0);
  values.push_back(1.0);
  return values;
}

QuantMap build_map(int bits, bool is_signed) {
  std::vector<double> values = map_values(bits, is_signed);
  TORCH_INTERNAL_ASSERT(values.size() == (size_t{1} << bits));
  std::sort(values.begin(), values.end());
  QuantMap map{};
  map.num_codes = static_cast<int>(values.size());
  map.is_signed = is_signed;
  for (int i = 0; i < map.num_codes; ++i) {
    map.values[i] = static_cast<float>(values[i]);
  }
  for (int i = 0; i + 1 < map.num_codes; ++i) {
    map.midpoints[i] = (map.values[i] + map.values[i + 1]) * 0.5f;
  }
  return map;
}

}  // namespace

std::vector<int> quant_map_runs(int bits, bool is_signed) {
  if (bits == 4 && !is_signed) {
    return {16};
  }
  std::vector<int> runs{1};  // 0
  for (int i = 0; i < bits - 1; ++i) {
    runs.push_back(is_signed ? 1 << i : 1 << (i + 1));
  }
  runs.push_back(1);  // 1
  return runs;
}

const QuantMap& quant_map(int bits, bool is_signed) {
  TORCH_CHECK(bits == 8 || bits == 4, "dldna_fused: quantized states have 8 or 4 bits, got ", bits);
  static const QuantMap maps[2][2] = {{build_map(4, false), build_map(4, true)},
                                      {build_map(8, false), build_map(8, true)}};
  return maps[bits == 8][is_signed];
}

}  // namespace dldna_fused

// The low-bit ops on the CPU: fused_adam_lowbit_, fused_lion_lowbit_, quantize_blockwise and
// dequantize_blockwise (see [Note: blockwise quantized states] in common/quantization.h), and the
// tables of [Note: nearest-code lookup] and [Note: vectorized nearest code] in cpu/kernel_table.h.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "common/adam_args.h"
#include "common/adam_math.h"
#include "common/lion_math.h"
#include "common/lowbit_args.h"
#include "common/quantization.h"
#include "cpu/parallel.h"

namespace dldna_fused {
namespace cpu {
namespace {

float float_from_bits(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

int32_t bits_of(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// The tables of [Note: vectorized nearest code] in cpu/kernel_table.h.
QuantSimd build_simd(const QuantMap& map, int bits) {
  QuantSimd simd{};
  simd.is_signed = map.is_signed;
  while (map.values[simd.zero] < 0.f) {
    ++simd.zero;
  }
  for (int k = 0; map.is_signed && k < simd.zero; ++k) {
    TORCH_INTERNAL_ASSERT(map.values[simd.zero - 1 - k] == -map.values[simd.zero + 1 + k],
                          "a signed quantization map that is not symmetric");
  }
  const float* magnitudes = map.values + simd.zero;
  const float* midpoints = map.midpoints + simd.zero;  // between magnitudes k and k + 1
  std::vector<int> runs = quant_map_runs(bits, map.is_signed);
  // t must not start below the run's first code (checked below). A first run that starts above 0
  // by more than half a step would at a = 0 (the linear map); alone, its first value does not.
  if (runs[0] > 1 && magnitudes[0] > 0.5 * (magnitudes[1] - magnitudes[0])) {
    runs[0] -= 1;
    runs.insert(runs.begin(), 1);
  }
  TORCH_INTERNAL_ASSERT(runs.size() <= 16);
  std::vector<float> boundaries;  // the midpoint after each run but the last
  int first = 0;
  for (size_t r = 0; r < runs.size(); ++r) {
    const int length = runs[r];
    // code(a) = floor(t) for a in the run: its first code at the first midpoint's left, the next
    // code past each midpoint (at the integers of t).
    const double first_code = simd.zero + first;
    double scale = 0.0;
    double offset = first_code + 0.5;  // a run of one value: t stays half a code above it
    if (length > 1) {
      const double low = magnitudes[first];
      const double step = (static_cast<double>(magnitudes[first + length - 1]) - low) / (length - 1);
      scale = 1.0 / step;
      offset = first_code + 0.5 - low / step;
    }
    // Lanes just above the run's lower end get floor(t) >= its first code, or are near a tie.
    const double lower_end = first == 0 ? 0.0 : midpoints[first - 1];
    TORCH_INTERNAL_ASSERT(lower_end * scale + offset >= first_code - kNearTie / 2,
                          "a quantization map run whose codes need a lower clamp");
    simd.run_scale[r] = static_cast<float>(scale);
    simd.run_offset[r] = static_cast<float>(offset);
    simd.run_last[r] = simd.zero + first + length - 1;
    first += length;
    if (r + 1 < runs.size()) {
      boundaries.push_back(midpoints[first - 1]);
    }
  }
  TORCH_INTERNAL_ASSERT(simd.zero + first == map.num_codes, "the runs do not cover the map");
  // The AVX2 kernels count at most 8 boundaries, and treat a ninth run as the value 1 alone.
  TORCH_INTERNAL_ASSERT(runs.size() <= 8 || (runs.size() == 9 && runs.back() == 1),
                        "a quantization map with runs the AVX2 kernels cannot count");
  simd.num_runs = static_cast<int32_t>(runs.size());
  for (int k = 0; k < 8; ++k) {
    simd.run_boundary[k] = k < static_cast<int>(boundaries.size()) ? bits_of(boundaries[k])
                                                                    : std::numeric_limits<int32_t>::max();
  }
  for (int k = 0; k < 32; ++k) {
    // Octave 0 also holds everything below 2^-30 (exponent bits under 96).
    const float low = k == 0 ? 0.f : std::ldexp(1.f, k - 31);
    const float high = std::ldexp(1.f, k - 30);
    int below = 0;
    int inside = 0;
    simd.octave_boundary[k] = std::numeric_limits<int32_t>::max();
    for (const float boundary : boundaries) {
      below += boundary < low;
      if (boundary >= low && boundary < high) {
        ++inside;
        simd.octave_boundary[k] = bits_of(boundary);
      }
    }
    TORCH_INTERNAL_ASSERT(inside <= 1, "two run boundaries of a quantization map in one octave");
    simd.octave_run[k] = below;
  }
  for (int c = 0; c < map.num_codes; ++c) {
    const uint32_t value_bits = static_cast<uint32_t>(bits_of(map.values[c]));
    for (int byte = 0; byte < 4; ++byte) {
      simd.value_bytes[byte][c] = static_cast<uint8_t>(value_bits >> (8 * byte));
    }
  }
  return simd;
}

// Built in place and never moved: lut points into entries and simd.
struct LutStorage {
  explicit LutStorage(const QuantMap& map, int bits);
  LutStorage(const LutStorage&) = delete;
  LutStorage& operator=(const LutStorage&) = delete;

  std::vector<int32_t> entries;
  QuantSimd simd;
  QuantLut lut;
};

// Fills the entries for `mantissa_bits`; false when some bucket would hold two midpoints.
bool fill_lut(const QuantMap& map, int mantissa_bits, LutStorage& out) {
  const int shift = 23 - mantissa_bits;
  const int32_t buckets = (24 << mantissa_bits) + 1;  // the last one holds exactly 1.0
  const int num_midpoints = map.num_codes - 1;
  out.entries.assign(2 * static_cast<size_t>(buckets), 0);
  for (int negative = 0; negative < 2; ++negative) {
    for (int32_t b = 0; b < buckets; ++b) {
      const int32_t start = kQuantLowBits + (b << shift);
      // The bucket holds magnitudes [low, high); the first also everything below 2^-24.
      const float low = b == 0 ? 0.f : float_from_bits(start);
      const float high = float_from_bits(start + (1 << shift));
      int32_t base = 0;
      int inside = 0;
      int32_t stored = (1 << shift) + 1;  // no midpoint
      for (int i = 0; i < num_midpoints; ++i) {
        const float mid = map.midpoints[i];
        if (!negative) {
          // code(y) = #{mid < y}: past a midpoint t in the bucket once y > t.
          base += mid < low;
          if (mid >= low && mid < high) {
            ++inside;
            stored = bits_of(mid) - start + 1;
          }
        } else {
          // code(-m) = #{mid < -m}: a midpoint -t in the bucket drops out once m >= t.
          base += mid < -low;
          if (-mid > low && -mid < high) {
            ++inside;
            stored = bits_of(-mid) - start;
          }
        }
      }
      if (inside > 1) {
        return false;
      }
      TORCH_INTERNAL_ASSERT(b > 0 || inside == 0, "a quantization midpoint below 2^-24");
      out.entries[b + negative * buckets] = (base << 20) | stored;
    }
  }
  out.lut = {shift, buckets, out.entries.data(), map.values, map.is_signed ? -1.f : 0.f, &out.simd};
  return true;
}

LutStorage::LutStorage(const QuantMap& map, int bits) : simd(build_simd(map, bits)) {
  // 4 mantissa bits at least, so that "no midpoint" (2^shift + 1) fits the entry's 20 bits.
  for (int mantissa_bits = 4; mantissa_bits <= 12; ++mantissa_bits) {
    if (fill_lut(map, mantissa_bits, *this)) {
      return;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "no lookup table fits this quantization map");
}

}  // namespace

const QuantLut& quant_lut(int bits, bool is_signed) {
  static const LutStorage tables[2][2] = {{LutStorage(quant_map(4, false), 4), LutStorage(quant_map(4, true), 4)},
                                          {LutStorage(quant_map(8, false), 8), LutStorage(quant_map(8, true), 8)}};
  return tables[bits == 8][is_signed].lut;
}

}  // namespace cpu

namespace {

// The clip factor's check, then whether GradScaler found inf/nan (the step is skipped whole) or
// there is nothing to do.
bool skip_step(const char* op, at::TensorList params, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef) {
  if (params.empty()) {
    return true;
  }
  check_clip_coef(op, clip_coef, params[0].device());
  return cpu::found_inf_set(found_inf);
}

// Codes follow the params' logical order, so non-contiguous params run on contiguous copies (as do
// their Kahan compensations).
DenseLayout param_layout(at::TensorList params, at::TensorList grads, bool store_grads, RoundMode mode,
                         const std::optional<at::TensorList>& kahan_comps) {
  return DenseLayout({params, grads, comps_or_none(mode, kahan_comps)}, {true, store_grads, true},
                     /*contiguous=*/true);
}

// A launch with exp_avg's (signed) map; Adam adds exp_avg_sq's, Lion its coefficients.
cpu::LowbitLaunch make_launch(at::ScalarType dtype, int64_t bits, int64_t block_size,
                              const std::vector<cpu::LowbitTensorArgs>& args,
                              const std::optional<at::Tensor>& grad_scale, RoundMode mode) {
  cpu::LowbitLaunch launch{};
  launch.round_mode = mode;
  launch.param_dtype = kernel_dtype(dtype);
  launch.bits = static_cast<int>(bits);
  launch.block_size = block_size;
  launch.exp_avg_lut = &cpu::quant_lut(static_cast<int>(bits), true);
  launch.tensors = args.data();
  launch.unscale_grads = cpu::unscale_factor(grad_scale);
  return launch;
}

void fused_adam_lowbit_cpu_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sqs,
                                at::TensorList exp_avg_sq_absmaxes, at::TensorList state_steps,
                                double lr, const AdamHyperparameters& hp, int64_t bits,
                                int64_t block_size, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf,
                                const std::optional<at::Tensor>& clip_coef,
                                const std::optional<at::TensorList>& kahan_comps,
                                at::OptionalIntArrayRef sr_keys) {
  constexpr const char* op = "dldna_fused::fused_adam_lowbit_";
  check_lr(op, lr);
  const at::ScalarType dtype =
      check_adam_lowbit_args(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes,
                             state_steps, hp, bits, block_size, grad_scale, found_inf);
  const RoundMode mode = check_param_writes(op, params, kahan_comps, sr_keys);
  if (skip_step(op, params, grad_scale, found_inf, clip_coef)) {
    return;
  }
  const float factor = cpu::gradient_factor(grad_scale, clip_coef);
  const bool store_grads = grad_scale.has_value();  // [Note: unscaled grads] in cpu/kernel_table.h
  DenseLayout layout = param_layout(params, grads, store_grads, mode, kahan_comps);
  const size_t n = params.size();
  std::vector<cpu::LowbitTensorArgs> args(n);
  float coefficients_step = -1.f;
  AdamCoefficients c{};
  for (size_t i = 0; i < n; ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.f;
    if (*step != coefficients_step) {
      c = adam_coefficients(lr, hp.beta1, hp.beta2, hp.weight_decay, hp.eps, *step, factor, false,
                            hp.maximize, hp.decoupled_weight_decay);
      coefficients_step = *step;
    }
    args[i] = {layout.get(0, i).data_ptr(),
               cpu::grad_pointer(layout.get(1, i), store_grads),
               {exp_avgs[i].data_ptr<uint8_t>(), exp_avg_absmaxes[i].data_ptr<float>()},
               {exp_avg_sqs[i].data_ptr<uint8_t>(), exp_avg_sq_absmaxes[i].data_ptr<float>()},
               c,
               cpu::param_write(layout, 2, mode, sr_keys, i, *step)};
  }
  cpu::LowbitLaunch launch = make_launch(dtype, bits, block_size, args, grad_scale, mode);
  launch.exp_avg_sq_lut = &cpu::quant_lut(static_cast<int>(bits), false);
  cpu::parallel_over_chunks(cpu::make_chunks(params), cpu::cpu_kernels().adam_lowbit, launch);
  layout.copy_back();
}

void fused_adam_lowbit_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sqs,
                           at::TensorList exp_avg_sq_absmaxes, at::TensorList state_steps, double lr,
                           double beta1, double beta2, double weight_decay, double eps,
                           bool maximize, bool decoupled_weight_decay, int64_t bits,
                           int64_t block_size, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::Tensor>& clip_coef,
                           std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  fused_adam_lowbit_cpu_impl(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs,
                             exp_avg_sq_absmaxes, state_steps, lr,
                             {beta1, beta2, weight_decay, eps, false, maximize, decoupled_weight_decay},
                             bits, block_size, grad_scale, found_inf, clip_coef, kahan_comps, sr_keys);
}

void fused_adam_lowbit_cpu_tensor_lr(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sqs, at::TensorList exp_avg_sq_absmaxes,
    at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
    double weight_decay, double eps, bool maximize, bool decoupled_weight_decay, int64_t bits,
    int64_t block_size, const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
    std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  check_lr_tensor("dldna_fused::fused_adam_lowbit_", lr, at::kCPU);
  fused_adam_lowbit_cpu(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes,
                        state_steps, lr.item<double>(), beta1, beta2, weight_decay, eps, maximize,
                        decoupled_weight_decay, bits, block_size, grad_scale, found_inf, clip_coef,
                        kahan_comps, sr_keys);
}

void fused_lion_lowbit_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_absmaxes, at::TensorList state_steps, double lr,
                           double beta1, double beta2, double weight_decay, bool maximize,
                           int64_t bits, int64_t block_size,
                           const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::Tensor>& clip_coef,
                           std::optional<at::TensorList> kahan_comps, at::OptionalIntArrayRef sr_keys) {
  const at::ScalarType dtype = check_lion_lowbit_args(params, grads, exp_avgs, exp_avg_absmaxes, state_steps, lr,
                                                      beta1, beta2, weight_decay, bits, block_size, grad_scale,
                                                      found_inf);
  const RoundMode mode = check_param_writes("dldna_fused::fused_lion_lowbit_", params, kahan_comps, sr_keys);
  if (skip_step("dldna_fused::fused_lion_lowbit_", params, grad_scale, found_inf, clip_coef)) {
    return;
  }
  const bool store_grads = grad_scale.has_value();
  DenseLayout layout = param_layout(params, grads, store_grads, mode, kahan_comps);
  const size_t n = params.size();
  std::vector<cpu::LowbitTensorArgs> args(n);
  for (size_t i = 0; i < n; ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.f;
    args[i] = {layout.get(0, i).data_ptr(),
               cpu::grad_pointer(layout.get(1, i), store_grads),
               {exp_avgs[i].data_ptr<uint8_t>(), exp_avg_absmaxes[i].data_ptr<float>()},
               {nullptr, nullptr},
               {},
               cpu::param_write(layout, 2, mode, sr_keys, i, *step)};
  }
  cpu::LowbitLaunch launch = make_launch(dtype, bits, block_size, args, grad_scale, mode);
  launch.lion = lion_coefficients(lr, beta1, beta2, weight_decay,
                                  cpu::gradient_factor(grad_scale, clip_coef), maximize);
  cpu::parallel_over_chunks(cpu::make_chunks(params), cpu::cpu_kernels().lion_lowbit, launch);
  layout.copy_back();
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& input, int64_t bits,
                                                          bool is_signed, int64_t block_size) {
  QuantizeTensors tensors = prepare_quantize(input, bits, block_size);
  const at::Tensor& flat = tensors.flat;
  at::Tensor& codes = tensors.codes;
  at::Tensor& absmax = tensors.absmax;
  const cpu::QuantizeLaunch launch{kernel_dtype(flat.scalar_type()),
                                   static_cast<int>(bits),
                                   block_size,
                                   &cpu::quant_lut(static_cast<int>(bits), is_signed),
                                   flat.const_data_ptr(),
                                   {codes.data_ptr<uint8_t>(), absmax.data_ptr<float>()}};
  cpu::parallel_over_chunks(cpu::make_chunks({flat}), cpu::cpu_kernels().quantize, launch);
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax, int64_t bits,
                                    bool is_signed, int64_t block_size, int64_t numel) {
  check_quantized("dldna_fused::dequantize_blockwise", codes, absmax, numel, bits, block_size);
  at::Tensor output = at::empty({numel}, absmax.options());
  const cpu::DequantizeLaunch launch{static_cast<int>(bits), block_size,
                                     &cpu::quant_lut(static_cast<int>(bits), is_signed),
                                     codes.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(),
                                     output.data_ptr<float>()};
  cpu::parallel_over_chunks(cpu::make_chunks({output}), cpu::cpu_kernels().dequantize, launch);
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(dldna_fused, CPU, m) {
  m.impl("fused_adam_lowbit_", &fused_adam_lowbit_cpu);
  m.impl("fused_adam_lowbit_.tensor_lr", &fused_adam_lowbit_cpu_tensor_lr);
  m.impl("fused_lion_lowbit_", &fused_lion_lowbit_cpu);
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
}

}  // namespace dldna_fused

#pragma once
// The CPU kernels, reached through a table chosen once per process by the CPU's capability.
//
// [Note: CPU capability builds]
// at::vec::Vectorized<float> is 8 AVX2 lanes only when its headers are compiled for AVX2; a plain
// build gets the portable version. PyTorch compiles its own CPU kernels once per capability and
// picks one at run time; we do the same at a smaller scale. cpu/kernels_impl.h gathers every
// optimizer's chunk kernels (cpu/kernels_<optimizer>.h); cpu/kernels_default.cpp and
// cpu/kernels_avx2.cpp compile it once each (the latter under `#pragma GCC target`, so the build
// needs no per-file flags), and
// cpu_kernels() returns the AVX2 table when torch itself runs AVX2 or better on this CPU
// (ATEN_CPU_CAPABILITY=default therefore forces the portable kernels in both libraries).
// The low-bit kernels are table-bound, not memory-bound, and gain from AVX-512's in-register
// tables: cpu/kernels_avx512.cpp compiles them once more, with AVX-512 and VBMI enabled, and
// cpu_kernels() swaps them into the AVX2 table when torch runs AVX512 and the CPU has VBMI
// (ATEN_CPU_CAPABILITY=avx2 keeps the AVX2 ones). That build names its own at::vec namespace, so
// no inline function compiled for AVX-512 can stand in for the AVX2 build's copy at link time.
// The kernel files see raw pointers only: tensors, checks and threading stay in the host files.
// ctest (csrc/tests/check_kernel_symbols.sh) checks that those files define no weak symbol outside
// their own namespaces, since the linker would keep one copy of it for every caller.

#include <atomic>
#include <cstdint>

#include "common/adafactor_math.h"
#include "common/adam_math.h"
#include "common/lion_math.h"
#include "common/quantization.h"
#include "common/rounding_math.h"
#include "common/sophia_math.h"

namespace dldna_fused::cpu {

// A contiguous range [begin, end) of one tensor's elements: the unit of CPU parallel work.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

enum class Dtype : int8_t { Float, BFloat16, Half };

// [Note: unscaled grads]
// With GradScaler's grad_scale, torch's fused optimizers leave g / scale in p.grad after the step
// (and the scaled g when found_inf skips it). The kernels do the same: `grad` is written back as
// g * unscale_grads when the launch's unscale_grads is nonzero, from the gradient already in
// registers, so it costs one store and no extra pass. A folded clip factor (clip_coef, see
// [Note: folded clipping] in dldna_fused/optim/_fused.py) is in the update's gradient factor but
// not in unscale_grads: the step never writes clipped grads. The CUDA ops write the grads back
// with one foreach multiply after the launch (store_unscaled_grads in cuda/multi_tensor_apply.cu).

// How a tensor's param is written under its launch's RoundMode ([Note: bf16 param writes] in
// common/rounding_math.h).
struct ParamWrite {
  void* comp = nullptr;  // RoundMode::Kahan: the compensation state, of the param's dtype
  uint64_t salt = 0;     // RoundMode::Stochastic: rounding_salt(key, step)
};

struct AdamTensorArgs {
  void* param;
  void* grad;  // written only with unscale_grads
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  AdamCoefficients coefficients;
  ParamWrite write;
};

struct AdamLaunch {
  Dtype param_dtype;  // grads share it
  Dtype state_dtype;  // the param's dtype, or Float
  const AdamTensorArgs* tensors;
  float unscale_grads;  // 0, or 1 / grad_scale: see [Note: unscaled grads]
  RoundMode round_mode = RoundMode::Nearest;
};

struct LionTensorArgs {
  void* param;
  void* grad;
  void* exp_avg;
  ParamWrite write;
};

struct LionLaunch {
  Dtype param_dtype;
  Dtype state_dtype;
  LionCoefficients coefficients;
  const LionTensorArgs* tensors;
  float unscale_grads;
  RoundMode round_mode = RoundMode::Nearest;
};

struct SophiaTensorArgs {
  void* param;
  void* grad;
  void* exp_avg;
  const void* hessian;
  ParamWrite write;
};

struct SophiaLaunch {
  Dtype param_dtype;
  Dtype state_dtype;
  SophiaCoefficients coefficients;
  const SophiaTensorArgs* tensors;
  std::atomic<int64_t>* unclipped;  // += coordinates with ratio < 1; nullptr: not counted
  float unscale_grads;
  RoundMode round_mode = RoundMode::Nearest;
};

struct SophiaHessianTensorArgs {
  void* hessian;
  const void* estimate;
};

struct SophiaHessianLaunch {
  Dtype estimate_dtype;  // the params' dtype
  Dtype hessian_dtype;   // the state dtype
  SophiaHessianCoefficients coefficients;
  const SophiaHessianTensorArgs* tensors;
};

// One tensor of a fused_adafactor_ call. See [Note: AdaFactor passes] in common/adafactor_math.h.
struct AdafactorTensorArgs {
  void* param;
  void* grad;  // written back unscaled by pass 3 with unscale_grads
  float* exp_avg_sq_row;  // factored: matrices x rows
  float* exp_avg_sq_col;  // factored: matrices x cols
  float* exp_avg_sq;      // unfactored
  float* exp_avg;         // nullptr without a first moment
  int64_t rows;           // factored: the last two dims; 0 when unfactored
  int64_t cols;
  AdafactorDecay decay;
  // Written between the passes: the mean of R per matrix and rsqrt(C) (factored), and the
  // constants of pass 3.
  const float* row_mean;
  const float* col_rsqrt;
  AdafactorApply apply;
  ParamWrite write;
};

// The work units are Chunks (whole rows of one matrix in factored tensors); each unit k writes
// its partial sums to unit_p2[k] / unit_u2[k] and, factored, its column sums of G2 to
// col_partials + col_offsets[k].
struct AdafactorLaunch {
  Dtype param_dtype;  // grads share it; states are float32
  float eps1;
  float inv_grad_scale;
  const AdafactorTensorArgs* tensors;
  const Chunk* units;
  const int64_t* col_offsets;
  float* col_partials;
  double* unit_p2;  // sum of p^2
  double* unit_u2;  // sum of U^2
  float unscale_grads;
  RoundMode round_mode = RoundMode::Nearest;
};

// The norm a fused_grad_norm call computes: sum |x|, sum x^2 (the caller takes the root) or
// max |x| (NaN wins, as in torch.linalg.vector_norm).
enum class NormKind : int8_t { L1, L2, Inf };

// fused_grad_norm: each chunk k writes its partial (sum or max) to partials[k], where k counts from
// `chunks`, the call's first chunk; the host combines the partials in chunk order, so the result
// does not depend on how chunks were spread over threads.
struct GradNormLaunch {
  Dtype dtype;
  NormKind kind;
  const void* const* tensors;  // data pointers, one per tensor
  const Chunk* chunks;
  double* partials;
};

// fused_scale_: every element of every tensor times `factor` (the second pass of clip_grad_norm_).
struct ScaleLaunch {
  Dtype dtype;
  float factor;
  void* const* tensors;
};

// [Note: nearest-code lookup]
// The CPU finds a value's code (the rule in [Note: blockwise quantized states]) with one table
// read instead of a binary search. y's magnitude, as float bits clamped below at 2^-24, is cut into
// buckets by its exponent and top `23 - shift` mantissa bits; the table is built (quant_lut) with
// enough mantissa bits that no bucket holds more than one midpoint of the map. An entry holds the
// code at the bucket's low end (bits 20-31) and where in the bucket the midpoint lies, plus one
// (bits 0-19; 2^shift + 1 when there is none), so code = base +/- (offset in bucket past the
// midpoint). Positive magnitudes use entries [0, num_buckets), negative ones the next num_buckets,
// where codes fall as the magnitude grows. The result equals the binary search over midpoints that
// CUDA runs, for every float.
struct QuantSimd;

struct QuantLut {
  int shift;
  int32_t num_buckets;     // per sign
  const int32_t* entries;  // 2 * num_buckets
  const float* values;     // the map
  float low;               // -1 for a signed map, 0 for an unsigned one
  const QuantSimd* simd;   // the same map for the AVX-512 kernels
};

// [Note: vectorized nearest code]
// The AVX-512 kernels (cpu/lowbit_avx512.h) find the codes of 16 lanes with arithmetic and
// in-register tables, with no memory read per element. A signed map is symmetric about its code
// for 0 (the zero code), so each lane needs the rank of a = |y| among the midpoints between the
// map's non-negative values: code = zero + #{mid < a} for y >= 0, zero - min(#{mid <= a}, zero)
// = max(2 zero - (zero + #{mid <= a}), 0) for y < 0 (an unsigned map has zero = 0 and no negative
// lanes). So it suffices to find c(a) = zero + that rank.
// - The non-negative values are runs of evenly spaced values (quant_map_runs). Inside a run the
//   midpoints sit near the integers of t = a * scale + offset, the offset chosen so that
//   c(a) = min(floor(t), the run's last code). No lower clamp is needed: at a run's lower end t
//   is at least its first code, or within kNearTie below it (the builder checks; the first value
//   of the linear 4-bit map is a run of its own for that).
// - Which run a lies in is exact: neighbouring runs are split by a midpoint, and no octave holds
//   two of them, so a's float exponent picks the octave's first run and its one boundary from
//   32-entry tables, and an integer compare of float bits settles the side (a >= boundary for
//   negative lanes, a > boundary for the others).
// - t is off by about 1e-5 of a midpoint spacing (rounding of the map, its midpoints, the tables
//   and the fma), far less than kNearTie. Lanes with t within kNearTie of an integer, ties
//   included, are recomputed with the scalar table, so every float gets the code of [Note:
//   nearest-code lookup]; csrc/tests/test_cpu_kernels.cpp compares both on every float in [-1, 1].
// Dequantizing reads an 8-bit map from registers too: its values as four 256-entry byte tables,
// one per byte of the float, each looked up 64 codes at a time.
// The AVX2 kernels (cpu/lowbit_avx2.h) compute the same t and codes 8 lanes at a time, with two
// differences, both for want of 32-entry and byte permutes:
// - the run is the count of run boundaries below a (integer compares of float bits, the same
//   sides as above), not an octave lookup. The run tables are 8-entry permutes, so a map has at
//   most 9 runs and a ninth must be the value 1 alone: lanes past its boundary take the eighth
//   run's last code plus one (the builder checks).
// - an 8-bit map's values are read by scalar loads in the step and gathered in the dequantize op
//   (whichever measured faster there), a 4-bit map's are two registers indexed by permutes.
struct QuantSimd {
  // Octave k holds magnitudes whose exponent bits E have max(E, 96) % 32 == k.
  int32_t octave_run[32];        // the run at the octave's low end
  int32_t octave_boundary[32];   // float bits of the midpoint that ends that run, if inside the octave
  float run_scale[16];           // t = a * scale + offset
  float run_offset[16];
  int32_t run_last[16];          // the run's last code (zero + its last rank)
  int32_t run_boundary[8];       // float bits of the midpoint after run k (AVX2), INT32_MAX past the last
  int32_t num_runs;
  int32_t zero;                  // the code of 0
  bool is_signed;
  uint8_t value_bytes[4][256];   // byte k of values[c] (8-bit maps)
};
constexpr float kNearTie = 1.f / 1024;
// Float bits of 2^-24: smaller magnitudes share the first bucket (no map has a midpoint there).
constexpr int32_t kQuantLowBits = (127 - 24) << 23;

// Built once per map, on the host (cpu/lowbit_cpu.cpp).
const QuantLut& quant_lut(int bits, bool is_signed);

// One quantized state of a tensor: its codes and per-block absmax ([Note: blockwise quantized
// states] in common/quantization.h).
struct QuantState {
  uint8_t* codes;
  float* absmax;
};

// One tensor of a low-bit Adam or Lion call (exp_avg_sq and adam are Adam's only).
struct LowbitTensorArgs {
  void* param;
  void* grad;  // written only with unscale_grads
  QuantState exp_avg;
  QuantState exp_avg_sq;
  AdamCoefficients adam;
  ParamWrite write;
};

// Chunks start at multiples of kChunkElements, a multiple of every block size, so a chunk is
// whole blocks (and, at 4 bits, whole bytes) except at a tensor's end.
struct LowbitLaunch {
  Dtype param_dtype;
  int bits;
  int64_t block_size;
  const QuantLut* exp_avg_lut;
  const QuantLut* exp_avg_sq_lut;  // nullptr for Lion
  LionCoefficients lion;           // Lion's constants (Adam's are per tensor)
  const LowbitTensorArgs* tensors;
  float unscale_grads;
  RoundMode round_mode = RoundMode::Nearest;
};

// quantize_blockwise / dequantize_blockwise over one flat tensor; the chunks index its elements.
struct QuantizeLaunch {
  Dtype dtype;  // of `input`
  int bits;
  int64_t block_size;
  const QuantLut* lut;
  const void* input;
  QuantState output;
};

struct DequantizeLaunch {
  int bits;
  int64_t block_size;
  const QuantLut* lut;
  const uint8_t* codes;
  const float* absmax;
  float* output;
};

struct KernelTable {
  const char* name;
  void (*adam)(const AdamLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  void (*lion)(const LionLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  void (*sophia)(const SophiaLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  void (*sophia_hessian)(const SophiaHessianLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  // AdaFactor's passes 1, 2 (factored units only) and 3.
  void (*adafactor_reduce)(const AdafactorLaunch& launch, const Chunk* units, int64_t num_units);
  void (*adafactor_update_norm)(const AdafactorLaunch& launch, const Chunk* units, int64_t num_units);
  void (*adafactor_apply)(const AdafactorLaunch& launch, const Chunk* units, int64_t num_units);
  void (*grad_norm)(const GradNormLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  void (*scale)(const ScaleLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  void (*adam_lowbit)(const LowbitLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  void (*lion_lowbit)(const LowbitLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  void (*quantize)(const QuantizeLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  void (*dequantize)(const DequantizeLaunch& launch, const Chunk* chunks, int64_t num_chunks);
};

const KernelTable& kernels_default();
// nullptr where the AVX2 build is not available (not x86-64, or not GCC/Clang).
const KernelTable* kernels_avx2();
// The AVX2 table with the low-bit kernels of cpu/lowbit_avx512.h, where this CPU has AVX-512 F, BW,
// DQ, VL and VBMI; else nullptr.
const KernelTable* kernels_avx512();

// The table this process uses.
const KernelTable& cpu_kernels();

}  // namespace dldna_fused::cpu

#pragma once
// The CPU kernels, reached through a table chosen once per process by the CPU's capability.
//
// [Note: CPU capability builds]
// at::vec::Vectorized<float> is 8 AVX2 lanes only when its headers are compiled for AVX2; a plain
// build gets the portable version. PyTorch compiles its own CPU kernels once per capability and
// picks one at run time; we do the same at a smaller scale. cpu/kernels_impl.h holds every
// optimizer's chunk kernels; cpu/kernels_default.cpp and cpu/kernels_avx2.cpp compile it once each
// (the latter under `#pragma GCC target`, so the build needs no per-file flags), and
// cpu_kernels() returns the AVX2 table when torch itself runs AVX2 or better on this CPU
// (ATEN_CPU_CAPABILITY=default therefore forces the portable kernels in both libraries).
// The kernel files see raw pointers only: tensors, checks and threading stay in the host files.

#include <atomic>
#include <cstdint>

#include "common/adam_math.h"
#include "common/lion_math.h"
#include "common/sophia_math.h"

namespace dldna_fused::cpu {

// A contiguous range [begin, end) of one tensor's elements: the unit of CPU parallel work.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

enum class Dtype : int8_t { Float, BFloat16, Half };

struct AdamTensorArgs {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  AdamCoefficients coefficients;
};

struct AdamLaunch {
  Dtype param_dtype;  // grads share it
  Dtype state_dtype;  // the param's dtype, or Float
  const AdamTensorArgs* tensors;
};

struct LionTensorArgs {
  void* param;
  const void* grad;
  void* exp_avg;
};

struct LionLaunch {
  Dtype param_dtype;
  Dtype state_dtype;
  LionCoefficients coefficients;
  const LionTensorArgs* tensors;
};

struct SophiaTensorArgs {
  void* param;
  const void* grad;
  void* exp_avg;
  const void* hessian;
};

struct SophiaLaunch {
  Dtype param_dtype;
  Dtype state_dtype;
  SophiaCoefficients coefficients;
  const SophiaTensorArgs* tensors;
  std::atomic<int64_t>* unclipped;  // += coordinates with ratio < 1; nullptr: not counted
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

struct KernelTable {
  const char* name;
  void (*adam)(const AdamLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  void (*lion)(const LionLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  void (*sophia)(const SophiaLaunch& launch, const Chunk* chunks, int64_t num_chunks);
  void (*sophia_hessian)(const SophiaHessianLaunch& launch, const Chunk* chunks, int64_t num_chunks);
};

const KernelTable& kernels_default();
// nullptr where the AVX2 build is not available (not x86-64, or not GCC/Clang).
const KernelTable* kernels_avx2();

// The table this process uses.
const KernelTable& cpu_kernels();

}  // namespace dldna_fused::cpu

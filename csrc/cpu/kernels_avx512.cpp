// The low-bit kernels built with AVX-512 and VBMI (cpu/lowbit_avx512.h); every other entry of the
// table stays the AVX2 build's. See [Note: CPU capability builds] in cpu/kernel_table.h.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define DLDNA_HAVE_AVX512_KERNELS 1
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")
#include "cpu/avx2_feature_macros.h"
// GCC 12 flags the _mm512_undefined_* pass-through operands inside its own intrinsic headers
// (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <array>
// at::vec's AVX2 code (the bf16/fp16 conversions of vec_io.h), under a namespace of its own.
#define CPU_CAPABILITY AVX2_AVX512_LOWBIT
#define CPU_CAPABILITY_AVX2
#define DLDNA_KERNELS_NAMESPACE avx512
#define DLDNA_LOWBIT_AVX512 1
#include "cpu/kernels_impl.h"
#else
#include "cpu/kernel_table.h"
#endif

namespace dldna_fused::cpu {

const KernelTable* kernels_avx512() {
#if defined(DLDNA_HAVE_AVX512_KERNELS)
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                                __builtin_cpu_supports("avx512vbmi") && kernels_avx2() != nullptr;
  if (!supported) {
    return nullptr;
  }
  static const KernelTable table = [] {
    KernelTable t = *kernels_avx2();
    t.name = "avx512";
    t.adam_lowbit = &avx512::adam_lowbit_chunks;
    t.lion_lowbit = &avx512::lion_lowbit_chunks;
    t.quantize = &avx512::quantize_chunks;
    t.dequantize = &avx512::dequantize_chunks;
    return t;
  }();
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace dldna_fused::cpu

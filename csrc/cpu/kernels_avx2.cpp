// The AVX2 + FMA build of the CPU kernels. See [Note: CPU capability builds] in cpu/kernel_table.h.
// The target pragma must precede every include so that the vector headers, and the inline
// functions they pull in, are compiled for AVX2 in this file only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define DLDNA_HAVE_AVX2_KERNELS 1
#pragma GCC target("avx2,fma,f16c")
#include "cpu/avx2_feature_macros.h"
#include <immintrin.h>
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define DLDNA_KERNELS_NAMESPACE avx2
#define DLDNA_LOWBIT_AVX2 1
#include "cpu/kernels_impl.h"
#else
#include "cpu/kernel_table.h"
#endif

namespace dldna_fused::cpu {

const KernelTable* kernels_avx2() {
#if defined(DLDNA_HAVE_AVX2_KERNELS)
  return &avx2::table("avx2");
#else
  return nullptr;
#endif
}

}  // namespace dldna_fused::cpu

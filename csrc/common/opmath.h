#pragma once
// Elementwise primitives the update rules are written in. Each rule is a template over the value
// type V: `float` for scalar CPU tails and CUDA threads, `at::vec::Vectorized<float>` for the CPU's
// vector body (its specialization lives in cpu/vec_io.h). [Note: one update rule, every device]
//
// [Note: one update rule, every device]
// An optimizer's arithmetic is written once, as a template function in common/<optimizer>_math.h,
// in fp32 ("opmath") whatever the storage dtype. The CPU kernel instantiates it with a SIMD vector
// for the body and with `float` for the tail; the CUDA functor instantiates it with `float` per
// element. The same operations in the same order run everywhere, so CPU and CUDA agree to
// rounding and a parity test of one device says something about the other.

#include <cmath>

// Always inlined on the host too: the rules are compiled into the portable and the AVX2 kernel files
// (cpu/kernel_table.h), and an out-of-line AVX2 copy picked by the linker for the portable caller
// would fault on a CPU without AVX2.
#if defined(__CUDACC__)
#define DLDNA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DLDNA_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace dldna_fused {

template <typename V>
struct OpMath;  // sqrt, max, min, abs, sign for value type V

template <>
struct OpMath<float> {
  static DLDNA_HOST_DEVICE float sqrt(float x) {
#if defined(__CUDA_ARCH__)
    return ::sqrtf(x);  // IEEE-rounded: the build never passes --use_fast_math
#else
    return std::sqrt(x);
#endif
  }
  // NaN in either input propagates, like at::vec::maximum/minimum, so CPU body and tail agree.
  static DLDNA_HOST_DEVICE float max(float a, float b) {
    return (a != a || a > b) ? a : b;
  }
  static DLDNA_HOST_DEVICE float min(float a, float b) {
    return (a != a || a < b) ? a : b;
  }
  static DLDNA_HOST_DEVICE float abs(float x) {
#if defined(__CUDA_ARCH__)
    return ::fabsf(x);
#else
    return std::fabs(x);
#endif
  }
  // torch.sign as it computes (torch 2.14, CPU): 1, -1, and 0 for ±0 and for NaN. So a NaN
  // gradient leaves a Lion step's param where weight decay puts it, as in the reference.
  static DLDNA_HOST_DEVICE float sign(float x) {
    return x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f);
  }
};

}  // namespace dldna_fused

// Included right after `#pragma GCC target("avx2,fma,f16c...")`, before any other include, by the
// kernel builds that compile at::vec's AVX2 code (cpu/kernels_avx2.cpp, cpu/kernels_avx512.cpp).
// The pragma enables the instructions but not the feature macros that headers such as Sleef's test,
// so set those too; everything that follows is compiled for AVX2 anyway.
// No include guard: each including file needs it once, at its top.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif

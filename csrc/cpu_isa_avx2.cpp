// CPU kernels compiled for AVX2 + FMA + F16C (8-wide float vectors, hardware half
// conversion), picked at run time when the CPU has them. Standard headers come first so
// that none of their inline functions is compiled for AVX2 (no illegal instruction can
// leak into the baseline code through the linker's choice of one inline copy); our own
// inline functions are `static` (la_types.h) or in namespace la::cpu::avx2.
#include <cstdint>
#include <cstring>
#include <math.h>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>  // its intrinsics carry their own target attributes
#endif

namespace la {
namespace cpu {
// defined before the target pragma: it runs on CPUs without AVX2. Our headers come after
// the pragma, so their static inline math is compiled (and inlined) as AVX2 code here.
bool avx2_supported();
bool avx2_supported() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
}  // namespace cpu
}  // namespace la

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LA_HAVE_AVX2_TU 1
#pragma GCC target("avx2,fma,f16c")
#define LA_ISA avx2
#define LA_NT_STORES 1  // _mm256_stream_si256 + _mm_sfence for write-only outputs
#include "cpu_kernels.h"
#endif

namespace la {
namespace cpu {
#ifdef LA_HAVE_AVX2_TU
const Kernels kernels_avx2 = {"avx2", &avx2::k_dot, &avx2::k_perturb, &avx2::k_combine, &avx2::k_sync,
                              &avx2::k_nonfinite};
#else
const Kernels kernels_avx2 = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
#endif
}  // namespace cpu
}  // namespace la

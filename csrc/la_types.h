// Storage types of the kernels and their float conversions, shared by CPU and GPU code.
//
// bf16 and f16 are plain 16-bit payloads, bit-compatible with c10::BFloat16 / c10::Half
// (and __nv_bfloat16 / __half), so kernels reinterpret a tensor's data_ptr. They are our
// own types (not c10's) so that the CPU kernels can be compiled once per instruction set
// (cpu_isa_*.cpp) without sharing any inline function between those translation units.
// Conversions round to nearest even, as torch's casts do. Host fp16 uses _Float16 where the
// compiler has it (F16C instructions in the AVX2 kernels), else portable bit arithmetic
// (forced with -DLA_PORTABLE_HALF; both are unit-tested in csrc/tests/test_math.cpp).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LA_HD __host__ __device__ __forceinline__
#else
// static: every CPU translation unit (one per ISA) gets its own copy, no COMDAT sharing
#define LA_HD static inline
#endif

namespace la {

struct bf16 {
  uint16_t x;
};
struct f16 {
  uint16_t x;
};

LA_HD uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
LA_HD float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

LA_HD float to_f(float v) { return v; }
LA_HD float to_f(bf16 v) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__ushort_as_bfloat16(v.x));
#else
  return float_of(static_cast<uint32_t>(v.x) << 16);
#endif
}
LA_HD float to_f(f16 v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.x));
#elif defined(__FLT16_MANT_DIG__) && !defined(__CUDACC__) && !defined(LA_PORTABLE_HALF)
  _Float16 h;
  std::memcpy(&h, &v.x, 2);
  return static_cast<float>(h);
#else
  // IEEE half -> float: rebias normal numbers; denormals via a float multiply
  const uint32_t w = static_cast<uint32_t>(v.x) << 16;
  const uint32_t sign = w & 0x80000000u, two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xe0u << 23)) * float_of(0x7800000u);  // 2^-112
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized);
  return float_of(sign | r);
#endif
}

// float -> storage type T: overloads on a tag argument (explicit specializations could
// not be `static`), wrapped by from_f<T>.
LA_HD float cvt(float f, float) { return f; }
LA_HD bf16 cvt(float f, bf16) {
#if defined(__CUDA_ARCH__)
  // a NaN becomes the host's 0x7fc0 (the intrinsic gives 0x7fff): both devices store the same bits
  return bf16{(bits_of(f) & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>(0x7fc0u)
                                                        : __bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  const uint32_t u = bits_of(f);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  // a select, not an early return: keeps CPU loops branch-free (vectorizable)
  return bf16{static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r)};  // NaN stays NaN
#endif
}
LA_HD f16 cvt(float f, f16) {
#if defined(__CUDA_ARCH__)
  return f16{__half_as_ushort(__float2half_rn(f))};
#elif defined(__FLT16_MANT_DIG__) && !defined(__CUDACC__) && !defined(LA_PORTABLE_HALF)
  const _Float16 h = static_cast<_Float16>(f);
  f16 r;
  std::memcpy(&r.x, &h, 2);
  return r;
#else
  // float -> IEEE half, round to nearest even (scale into the half range, then re-bias)
  const float scale_to_inf = float_of(0x77800000u), scale_to_zero = float_of(0x08800000u);
  const float af = f < 0 ? -f : f;
  float base = (af * scale_to_inf) * scale_to_zero;
  const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits_of(base);
  const uint32_t exp_bits = (b >> 13) & 0x00007c00u, mant_bits = b & 0x00000fffu;
  const uint32_t nonsign = exp_bits + mant_bits;
  return f16{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign))};
#endif
}

template <class T>
LA_HD T from_f(float f) {
  return cvt(f, T{});
}

template <class T>
struct dtype_code;
template <>
struct dtype_code<float> { static constexpr int value = 0; };
template <>
struct dtype_code<bf16> { static constexpr int value = 1; };
template <>
struct dtype_code<f16> { static constexpr int value = 2; };

}  // namespace la

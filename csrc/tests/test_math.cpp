// C++ unit tests of the shared element-wise math (la_math.h, la_types.h): the formulas the
// CPU and CUDA kernels both run. No libtorch needed; run with ctest (see CMakeLists.txt).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "la_math.h"

static int failures = 0;
#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);     \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

static bool close(float a, float b, float rel = 1e-6f) { return std::fabs(a - b) <= rel * (std::fabs(b) + 1e-30f); }

static void test_lerp_and_lookahead() {
  CHECK(la::lerp(1.0f, 3.0f, 0.25f) == 1.5f);
  CHECK(la::lerp(1.0f, 3.0f, 1.0f) == 3.0f);  // exact at the end (two-sided formula)
  CHECK(la::lookahead(2.0f, 4.0f, 0.5f) == 3.0f);
}

// The numeric policy (docs/tolerances.md): torch's fused multiply-adds, and no other contraction.
static void test_numeric_policy() {
  CHECK(la::perturb(3e38f, -3e38f, 1.5f) == -INFINITY);  // scale * dir rounds (overflows) first
  la::Sgd plain{2.0f, 0.0f, 0.0f, 1.0f, false, false, false};
  float buf = 0.0f;
  CHECK(la::sgd(plain, 3e38f, 3e38f, &buf) == -3e38f);  // w - lr d: one fused multiply-add, as torch's add(alpha=)
  // lerp: a + w (b - a) in one rounding, as torch's lerp kernel (unfused: 0x1.e3073p-1)
  CHECK(la::lerp(0x1.060d7cp-1f, 0x1.f35196p+0f, 0x1.333334p-2f) == 0x1.e30732p-1f);
}

static void test_finite() {
  CHECK(la::finite(1.0f) && la::finite(-0.0f) && la::finite(3.4e38f));
  CHECK(!la::finite(INFINITY) && !la::finite(-INFINITY) && !la::finite(NAN));
}

static void test_direction_and_v() {
  la::Combine k{0.0f, 1.5f, -0.5f, false, true, true, false, true, true};
  CHECK(la::direction(k, NAN, 2.0f, 4.0f) == 1.0f);  // g0 unused: its NaN never leaks
  CHECK(la::momentum_v(k, 2.0f, NAN, 2.0f, 4.0f, 0.5f, 9.0f, 0.25f, 0.125f) == 2.0f);
}

static void test_sgd() {
  la::Sgd h{0.1f, 0.1f, 0.9f, 1.0f, true, false, true};
  float buf = 0.5f;
  const float w = la::sgd(h, 1.0f, 1.0f, &buf);
  const float d = 1.0f + 0.1f * 1.0f, b = 0.9f * 0.5f + d;
  CHECK(close(buf, b));
  CHECK(close(w, 1.0f - 0.1f * (d + 0.9f * b)));
  la::Sgd first{0.1f, 0.0f, 0.9f, 0.7f, false, true, true};
  buf = 123.0f;
  CHECK(close(la::sgd(first, 1.0f, 2.0f, &buf), 0.8f) && buf == 2.0f);  // buffer starts at d
  la::Sgd plain{0.5f, 0.0f, 0.0f, 1.0f, false, false, false};
  buf = 7.0f;
  CHECK(la::sgd(plain, 1.0f, 2.0f, &buf) == 0.0f && buf == 7.0f);
}

static void test_adamw() {
  // step 1: m = 0.1 d, s = 0.001 d^2, bias-corrected update = lr * sign(d) (eps small)
  const double lr = 0.01, b1 = 0.9, b2 = 0.999, wd = 0.1;
  la::AdamW h{float(1 - lr * wd), float(1 - b1), float(b2), float(1 - b2), 1e-8f, float(lr / (1 - b1)),
              float(std::sqrt(1 - b2))};
  float m = 0.0f, s = 0.0f;
  const float w = la::adamw(h, 2.0f, 0.5f, &m, &s);
  CHECK(close(m, 0.05f) && close(s, 0.00025f));
  CHECK(close(w, float(2.0 * (1 - lr * wd) - lr), 1e-5f));
}

static void test_conversions() {
  // bf16: round to nearest even, NaN kept
  CHECK(la::from_f<la::bf16>(1.0f).x == 0x3f80);
  CHECK(la::from_f<la::bf16>(la::float_of(0x3f808000u)).x == 0x3f80);  // tie -> even
  CHECK(la::from_f<la::bf16>(la::float_of(0x3f818000u)).x == 0x3f82);  // tie -> even (up)
  CHECK(std::isnan(la::to_f(la::from_f<la::bf16>(NAN))));
  // f16: every half round-trips exactly (normals, denormals, inf); NaN stays NaN
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = la::to_f(la::f16{static_cast<uint16_t>(h)});
    const bool nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
    if (nan) {
      CHECK(std::isnan(f));
    } else if (la::from_f<la::f16>(f).x != h) {
      std::printf("f16 round trip failed for 0x%04x\n", h);
      ++failures;
      break;
    }
  }
  CHECK(la::from_f<la::f16>(65520.0f).x == 0x7c00);  // overflow rounds to inf
  CHECK(la::from_f<la::f16>(1.0f + 1.0f / 2048).x == 0x3c00);  // tie -> even
  CHECK(la::to_f(la::f16{0x0001}) == std::ldexp(1.0f, -24));  // smallest denormal
#if defined(LA_PORTABLE_HALF) && defined(__FLT16_MANT_DIG__)
  // the portable float -> half matches the compiler's on a sweep of float bit patterns
  for (uint64_t u = 0; u < (1ull << 32); u += 4099) {
    const float f = la::float_of(static_cast<uint32_t>(u));
    if (std::isnan(f)) continue;
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    if (la::from_f<la::f16>(f).x != want) {
      std::printf("f16 rounding differs for %a: 0x%04x vs 0x%04x\n", f, la::from_f<la::f16>(f).x, want);
      ++failures;
      break;
    }
  }
#endif
}

int main() {
  test_lerp_and_lookahead();
  test_numeric_policy();
  test_finite();
  test_direction_and_v();
  test_sgd();
  test_adamw();
  test_conversions();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all shared-math tests passed\n");
  return 0;
}

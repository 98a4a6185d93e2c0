// Element-wise math of every fused op, written once for the CPU (ops_cpu.cpp) and the
// GPU (ops_cuda.cu) kernels: each function is `__host__ __device__` under nvcc and plain
// inline under a C++ compiler, so the CPU tests exercise the very formulas the GPU runs.
//
// Precision rule (lookahead_ext/ops/reference.py): all arithmetic in float32; bf16/fp16
// inputs are upcast on load and results are cast once on store. Scalars arrive as floats
// (host hyper-parameters) or are read from device memory by the caller; nothing here is
// a template parameter, so a new lr / step / scale never recompiles a kernel.
#pragma once

#include <math.h>

#include "la_types.h"

namespace la {

// c ? a : b for a condition that is loop-invariant at run time (a hyper-parameter flag).
// On the CPU as bit operations on a broadcast mask: GCC does not vectorize a float select
// on an invariant scalar bool ("relevant stmt not supported"), and the loops must vectorize.
// Exactly one of a, b is returned bit for bit, so the dropped side's NaN never leaks.
LA_HD float sel(bool c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return float_of((bits_of(a) & m) | (bits_of(b) & ~m));
#endif
}

// torch.lerp's two-sided formula (aten/src/ATen/native/Lerp.h): exact at both ends.
LA_HD float lerp(float a, float b, float w) {
  return sel(w < 0.5f && w > -0.5f, a + w * (b - a), b - (b - a) * (1.0f - w));
}

LA_HD bool finite(float x) {
  // x - x is NaN for +-Inf and NaN; avoids std::isfinite, which -ffast-math may fold.
  return (x - x) == 0.0f;
}

// ---------------------------------------------------------------- perturb_ (Alg. 1, l. 9-10)
// out = base + scale * dir, scale = +-rho / ||v||.
LA_HD float perturb(float base, float dir, float scale) { return base + scale * dir; }

// ---------------------------------------------------------------- combine_step_
// Coefficients of the two linear combinations of the probe gradients:
//   d     = c0 g0 + cp g+ + cm g-                          (eq. 9; eq. 6, eq. 8)
//   v_new = bv v + a0 g0 + ap g+ + am g-                   (eq. 115; eq. 10 is gamma = 1/2)
// A term whose `use` flag is 0 is left out (the reference skips None lists and zero
// host coefficients, so a NaN in an unused gradient never leaks into d).
struct Combine {
  float c0, cp, cm;        // d coefficients
  bool u0, up, um;         // which terms enter d
  bool w0, wp, wm;         // which terms enter v_new (bv v always does when v is given)
};

// Selects (sel), not branches, here and below: the flags are loop-invariant at run time,
// and the CPU loops must vectorize (a dropped term's NaN still never reaches the result).
LA_HD float direction(const Combine& k, float g0, float gp, float gm) {
  float d = 0.0f;
  d = sel(k.u0, d + k.c0 * g0, d);
  d = sel(k.up, d + k.cp * gp, d);
  d = sel(k.um, d + k.cm * gm, d);
  return d;
}

// v_new from the old v: coefficients bv, a0, ap, am are read by the caller (device scalars).
LA_HD float momentum_v(const Combine& k, float v, float g0, float gp, float gm,
                       float bv, float a0, float ap, float am) {
  float r = bv * v;
  r = sel(k.w0, r + a0 * g0, r);
  r = sel(k.wp, r + ap * gp, r);
  r = sel(k.wm, r + am * gm, r);
  return r;
}

// torch.optim.SGD semantics (base_step.py): returns the new w, updates the momentum buffer.
struct Sgd {
  float lr, weight_decay, momentum, dampening;
  bool nesterov, first, use_momentum;
};

LA_HD float sgd(const Sgd& h, float w, float d, float* buf) {
  // selects, not branches: every path loads and stores *buf, so the CPU loop vectorizes
  // (a conditional store would block it); buf must point at writable memory even
  // without momentum (the kernels pass a register / a dummy then).
  d = sel(h.weight_decay != 0.0f, d + h.weight_decay * w, d);
  const float old = *buf;
  const float b = sel(h.first, d, h.momentum * old + (1.0f - h.dampening) * d);
  *buf = sel(h.use_momentum, b, old);
  d = sel(h.use_momentum, sel(h.nesterov, d + h.momentum * b, b), d);
  return w + (-h.lr) * d;
}

// torch.optim.AdamW semantics (decoupled weight decay). decay = 1 - lr*wd,
// step_size = lr / (1 - beta1^t), sqrt_bc2 = sqrt(1 - beta2^t): computed on the host in
// double, passed as floats, so the step count t is a runtime value.
struct AdamW {
  float decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, sqrt_bc2;
};

LA_HD float adamw(const AdamW& h, float w, float d, float* m, float* s) {
  w = w * h.decay;
  float mn = lerp(*m, d, h.one_minus_beta1);
  float sn = h.beta2 * (*s) + h.one_minus_beta2 * (d * d);
  *m = mn;
  *s = sn;
  float denom = sqrtf(sn) / h.sqrt_bc2 + h.eps;
  return w + (-h.step_size) * (mn / denom);
}

// ---------------------------------------------------------------- lookahead_sync_ (Alg. 1, l. 18)
// slow <- slow + alpha (fast - slow); the caller then writes fast <- slow (and params).
LA_HD float lookahead(float slow, float fast, float alpha) { return lerp(slow, fast, alpha); }

}  // namespace la

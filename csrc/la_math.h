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

// Numeric policy (docs/tolerances.md): torch's own optimizers' evaluation order, and a fused
// multiply-add exactly where torch's CPU kernels fuse one (add with alpha, lerp, addcmul),
// spelled out as fma_rn; nothing else is contracted (-ffp-contract=off, nvcc --fmad=false),
// so every instruction set and the GPU round alike. fmaf is exact everywhere (a libm call
// on CPUs without FMA, __fmaf_rn on the GPU).
LA_HD float fma_rn(float a, float b, float c) { return fmaf(a, b, c); }

// torch.lerp (aten/src/ATen/native/cpu/LerpKernel.cpp, lerp_vec): two-sided, exact at both
// ends, one fused multiply-add: a + w (b - a) for |w| < 0.5, else b + (w - 1)(b - a).
LA_HD float lerp(float a, float b, float w) {
  const bool small = w < 0.5f && w > -0.5f;
  return fma_rn(sel(small, w, w - 1.0f), b - a, sel(small, a, b));
}

LA_HD bool finite(float x) {
  // x - x is NaN for +-Inf and NaN; avoids std::isfinite, which -ffast-math may fold.
  return (x - x) == 0.0f;
}

// ---------------------------------------------------------------- perturb_ (Alg. 1, l. 9-10)
// out = base + scale * dir, scale = +-rho / ||v||: the product rounded, then the sum (the
// authors' SAM code, e_w = grad * scale; p.add_(e_w)), for a float and a tensor scale alike.
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
// Each product rounded, summed in term order (the reference's linear_combination). -0.0 is
// the exact additive identity (the first term keeps its sign of zero); no term: +0.
LA_HD float direction(const Combine& k, float g0, float gp, float gm) {
  float d = -0.0f;
  d = sel(k.u0, d + k.c0 * g0, d);
  d = sel(k.up, d + k.cp * gp, d);
  d = sel(k.um, d + k.cm * gm, d);
  return sel(k.u0 || k.up || k.um, d, 0.0f);
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

// torch.optim.SGD (sgd.py, both paths), op for op: grad.add(param, alpha=wd),
// buf.mul_(momentum).add_(grad, alpha=1-dampening), grad.add(buf, alpha=momentum),
// param.add_(grad, alpha=-lr); every add with alpha is one fused multiply-add (torch's CPU
// add kernel). Returns the new w, updates the momentum buffer.
struct Sgd {
  float lr, weight_decay, momentum, one_minus_dampening;  // 1 - dampening rounded once, from double
  bool nesterov, first, use_momentum;
};

LA_HD float sgd(const Sgd& h, float w, float d, float* buf) {
  // selects, not branches: every path loads and stores *buf, so the CPU loop vectorizes
  // (a conditional store would block it); buf must point at writable memory even
  // without momentum (the kernels pass a register / a dummy then).
  d = sel(h.weight_decay != 0.0f, fma_rn(h.weight_decay, w, d), d);
  const float old = *buf;
  const float b = sel(h.first, d, fma_rn(h.one_minus_dampening, d, h.momentum * old));
  *buf = sel(h.use_momentum, b, old);
  d = sel(h.use_momentum, sel(h.nesterov, fma_rn(h.momentum, b, d), b), d);
  return fma_rn(-h.lr, d, w);
}

// torch.optim.AdamW (adam.py, single-tensor and foreach paths), op for op:
// param.mul_(decay), exp_avg.lerp_(grad, 1-beta1), exp_avg_sq.mul_(beta2).addcmul_(grad, grad,
// 1-beta2) (torch's addcmul: self + ((1-beta2) grad) grad, fused), denom = sqrt(s) / sqrt_bc2
// + eps, param.addcdiv_(m, denom, -step_size) (torch's addcdiv: self + (-step_size m) / denom,
// the product first: at |m| ~ 1e38 it overflows as torch's does). decay = 1 - lr*wd,
// step_size = lr / (1 - beta1^t), sqrt_bc2 = sqrt(1 - beta2^t): computed on the host in
// double, passed as floats, so the step count t is a runtime value.
struct AdamW {
  float decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, sqrt_bc2;
};

// The base step's scalars from the doubles of KernelArgs.hyper (the host floats of
// BaseStep.kernel_args, or the float64 device tensor of BaseStep.device_args: layout in
// lookahead_ext/ops/base_step.py and op_args.h), each rounded once to float32; 1 - dampening
// in double first (as torch's alpha = 1 - dampening). One decoding for the host and the
// device path, so a device-scalar step equals the host-scalar step bit for bit.
LA_HD Sgd sgd_from(const double* h, bool nesterov, bool first, bool use_momentum) {
  Sgd s;
  s.lr = static_cast<float>(h[0]);
  s.weight_decay = static_cast<float>(h[1]);
  s.momentum = static_cast<float>(h[2]);
  s.one_minus_dampening = static_cast<float>(1.0 - h[3]);
  s.nesterov = nesterov;
  s.first = first;
  s.use_momentum = use_momentum;
  return s;
}

LA_HD AdamW adamw_from(const double* h) {
  AdamW a;
  a.decay = static_cast<float>(h[0]);
  a.one_minus_beta1 = static_cast<float>(h[1]);
  a.beta2 = static_cast<float>(h[2]);
  a.one_minus_beta2 = static_cast<float>(h[3]);
  a.eps = static_cast<float>(h[4]);
  a.step_size = static_cast<float>(h[5]);
  a.sqrt_bc2 = static_cast<float>(h[6]);
  return a;
}

LA_HD float adamw(const AdamW& h, float w, float d, float* m, float* s) {
  w = w * h.decay;
  float mn = lerp(*m, d, h.one_minus_beta1);
  float sn = fma_rn(h.one_minus_beta2 * d, d, h.beta2 * (*s));
  *m = mn;
  *s = sn;
  float denom = sqrtf(sn) / h.sqrt_bc2 + h.eps;
  return w + (-h.step_size * mn) / denom;
}

// ---------------------------------------------------------------- lookahead_sync_ (Alg. 1, l. 18)
// slow <- slow + alpha (fast - slow); the caller then writes fast <- slow (and params).
LA_HD float lookahead(float slow, float fast, float alpha) { return lerp(slow, fast, alpha); }

}  // namespace la

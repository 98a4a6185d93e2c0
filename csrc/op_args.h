// Host-side decoding of the op arguments shared by the CPU and CUDA implementations:
// the hyper-parameter vectors of combine_step_ become the POD structs of la_math.h.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "la_math.h"

namespace la {

// hyper (floats, from native.py):
//   SGD:   [lr, weight_decay, momentum, dampening]            flags: [nesterov, first, ...]
//   AdamW: [decay, 1-beta1, beta2, 1-beta2, eps, step_size, sqrt_bc2]
// flags: [nesterov, first, w0, wp, wm]: w* = the gradient term enters v_new.
inline Sgd make_sgd(at::ArrayRef<double> hyper, at::IntArrayRef flags, bool has_buf) {
  TORCH_CHECK(hyper.size() == 4 && flags.size() == 5, "combine_step_: bad SGD hyper/flags size");
  Sgd h;
  h.lr = static_cast<float>(hyper[0]);
  h.weight_decay = static_cast<float>(hyper[1]);
  h.momentum = static_cast<float>(hyper[2]);
  h.one_minus_dampening = static_cast<float>(1.0 - hyper[3]);  // as torch's alpha=1-dampening
  h.nesterov = flags[0] != 0;
  h.first = flags[1] != 0;
  h.use_momentum = hyper[2] != 0.0;
  TORCH_CHECK(!h.use_momentum || has_buf, "combine_step_: SGD momentum needs the momentum_buffer list");
  return h;
}

inline AdamW make_adamw(at::ArrayRef<double> hyper) {
  TORCH_CHECK(hyper.size() == 7, "combine_step_: bad AdamW hyper size");
  AdamW h;
  h.decay = static_cast<float>(hyper[0]);
  h.one_minus_beta1 = static_cast<float>(hyper[1]);
  h.beta2 = static_cast<float>(hyper[2]);
  h.one_minus_beta2 = static_cast<float>(hyper[3]);
  h.eps = static_cast<float>(hyper[4]);
  h.step_size = static_cast<float>(hyper[5]);
  h.sqrt_bc2 = static_cast<float>(hyper[6]);
  return h;
}

inline Combine make_combine(at::ArrayRef<double> coefs, at::IntArrayRef flags, bool h0, bool hp,
                            bool hm, bool has_v) {
  TORCH_CHECK(coefs.size() == 3, "combine_step_: coefs must have 3 entries (c0, c+, c-)");
  // flags[2..4] are read below for SGD and AdamW alike (make_sgd checks the size only for SGD)
  TORCH_CHECK(flags.size() == 5, "combine_step_: flags must have 5 entries (nesterov, first, w0, w+, w-)");
  Combine k;
  k.c0 = static_cast<float>(coefs[0]);
  k.cp = static_cast<float>(coefs[1]);
  k.cm = static_cast<float>(coefs[2]);
  k.u0 = h0 && coefs[0] != 0.0;
  k.up = hp && coefs[1] != 0.0;
  k.um = hm && coefs[2] != 0.0;
  k.w0 = has_v && h0 && flags[2] != 0;
  k.wp = has_v && hp && flags[3] != 0;
  k.wm = has_v && hm && flags[4] != 0;
  return k;
}

// The coefficients (bv, a0, ap, am) of the v update: entry i is the float32 one-element
// device tensor t[i] when given (read in-kernel on CUDA, no host sync), else the host float
// f[i]. t is empty (all host floats) or holds 4 optional tensors.
using OptTensors = c10::List<c10::optional<at::Tensor>>;

// host_ok: a CPU tensor is also accepted (the CUDA op reads it on the host once).
inline void check_vcoefs(const OptTensors& t, at::ArrayRef<double> f, const at::Device& dev, bool host_ok = false) {
  TORCH_CHECK(f.size() == 4, "combine_step_: v_coefs_f must have 4 entries (bv, a0, a+, a-)");
  TORCH_CHECK(t.size() == 0 || t.size() == 4, "combine_step_: v_coefs_t must be empty or hold 4 entries");
  for (size_t i = 0; i < t.size(); ++i) {
    const c10::optional<at::Tensor> x = t.get(i);
    if (!x) continue;
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->numel() == 1,
                "combine_step_: v_coefs tensors must be float32 with one element");
    TORCH_CHECK(x->device() == dev || (host_ok && x->is_cpu()), "combine_step_: v_coefs tensor is on ",
                x->device(), ", expected ", dev);
  }
}

// Pointer of v_coefs entry i (nullptr: use the host float).
inline const float* vcoef_ptr(const OptTensors& t, size_t i) {
  if (t.size() == 0) return nullptr;
  const c10::optional<at::Tensor> x = t.get(i);
  return x ? x->data_ptr<float>() : nullptr;
}

// combine_step_'s optional v_sq_out (a float32 [1] accumulator on the op's device, only
// with v) and write_masters=false (params get the new w, masters are only read: same dtype).
inline void check_combine_extras(const char* op, at::TensorList params, at::TensorList masters, at::TensorList v,
                                 const c10::optional<at::Tensor>& v_sq_out, bool write_masters,
                                 const at::Device& dev) {
  if (v_sq_out) {
    TORCH_CHECK(!v.empty() || params.empty(), op, ": v_sq_out needs v (it accumulates sum v_new^2)");
    TORCH_CHECK(v_sq_out->scalar_type() == at::kFloat && v_sq_out->numel() == 1, op,
                ": v_sq_out must be a float32 tensor with one element, got ", v_sq_out->scalar_type(), " ",
                v_sq_out->sizes());
    TORCH_CHECK(v_sq_out->device() == dev, op, ": v_sq_out is on ", v_sq_out->device(), ", expected ", dev);
  }
  if (!write_masters) {
    for (size_t i = 0; i < params.size() && i < masters.size(); ++i) {
      TORCH_CHECK(params[i].scalar_type() == masters[i].scalar_type(), op,
                  ": write_masters=False needs params of the masters' dtype (float32), got params[", i, "] ",
                  params[i].scalar_type());
    }
  }
}

// nonfinite_'s list_sizes (tensors per list; empty: one list) as offsets [0, ..., n].
inline std::vector<int64_t> list_bounds(at::IntArrayRef list_sizes, int64_t n) {
  std::vector<int64_t> b{0};
  if (list_sizes.empty()) {
    b.push_back(n);
    return b;
  }
  for (int64_t k : list_sizes) {
    TORCH_CHECK(k >= 0, "nonfinite_: list_sizes must be >= 0");
    b.push_back(b.back() + k);
  }
  TORCH_CHECK(b.back() == n, "nonfinite_: list_sizes sum to ", b.back(), " but there are ", n, " tensors");
  return b;
}

// host_ok: a CPU tensor is also accepted (the CUDA op reads it on the host once).
inline void check_scalar(const c10::optional<at::Tensor>& t, const char* op, const char* name,
                         const at::Device& dev, bool host_ok = false) {
  if (t) {
    TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, op, ": ", name,
                " must be a float32 tensor with one element, got ", t->scalar_type(), " ",
                t->sizes());
    TORCH_CHECK(t->device() == dev || (host_ok && t->is_cpu()), op, ": ", name, " is on ", t->device(),
                ", expected ", dev);
  }
}

}  // namespace la

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
//
// base_t (optional, BaseStep.device_args: the base step's scalars on the op's device, no
// host read): a float64 tensor of hyper's layout followed by [nesterov, first]:
//   SGD   (6): lr, weight_decay, momentum, dampening, nesterov, first
//   AdamW (9): decay, 1-beta1, beta2, 1-beta2, eps, step_size, sqrt_bc2, 0, 0
// Given, it replaces hyper and flags[0..1] (which then hold the host placeholders of
// BaseStep.kernel_args: momentum, nesterov and the kind stay host values). The CPU op reads
// it on the host (the CPU is its device), the CUDA kernels in-kernel; both decode it with
// la_math.h's sgd_from / adamw_from, as the host hyper.
constexpr int64_t kBaseLen[2] = {4 + 2, 7 + 2};  // base_t elements per kind

inline Sgd make_sgd(at::ArrayRef<double> hyper, at::IntArrayRef flags, bool has_buf) {
  TORCH_CHECK(hyper.size() == 4 && flags.size() == 5, "combine_step_: bad SGD hyper/flags size");
  Sgd h = sgd_from(hyper.data(), flags[0] != 0, flags[1] != 0, hyper[2] != 0.0);
  TORCH_CHECK(!h.use_momentum || has_buf, "combine_step_: SGD momentum needs the momentum_buffer list");
  return h;
}

inline AdamW make_adamw(at::ArrayRef<double> hyper) {
  TORCH_CHECK(hyper.size() == 7, "combine_step_: bad AdamW hyper size");
  return adamw_from(hyper.data());
}

// hyper and flags with base_t's values in place of the host ones (a CPU base_t, read here).
struct HostBase {
  std::vector<double> hyper;
  std::vector<int64_t> flags;
};

inline HostBase host_base(at::ArrayRef<double> hyper, at::IntArrayRef flags,
                          const c10::optional<at::Tensor>& base_t) {
  HostBase b{hyper.vec(), flags.vec()};
  if (base_t && b.flags.size() >= 2) {
    const double* h = base_t->data_ptr<double>();
    const int64_t n = base_t->numel();
    b.hyper.assign(h, h + n - 2);
    b.flags[0] = h[n - 2] != 0.0;
    b.flags[1] = h[n - 1] != 0.0;
  }
  return b;
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

// skip_if (combine_step_, lookahead_sync_): a float32 one-element tensor on the op's device
// (native.py converts any real dtype), read on the device only: nonzero skips the op.
inline void check_skip_if(const char* op, const c10::optional<at::Tensor>& skip_if, const at::Device& dev) {
  if (!skip_if) return;
  TORCH_CHECK(skip_if->scalar_type() == at::kFloat && skip_if->numel() == 1, op,
              ": skip_if must be a float32 tensor with one element, got ", skip_if->scalar_type(), " ",
              skip_if->sizes());
  TORCH_CHECK(skip_if->device() == dev, op, ": skip_if is on ", skip_if->device(), ", expected ", dev,
              " (it is read on the device)");
}

// The argument checks of combine_step_, shared by the CPU and CUDA ops (the same errors in
// the same order, every list validated even when params is empty). host_scalars_ok: the CUDA
// op also takes CPU v_coefs tensors (read once on the host). Returns the lists' numels and
// the gradients' dtype (the params' when no gradient list is given).
struct CombineLists {
  std::vector<int64_t> numels;
  at::ScalarType gdt = at::kFloat;
};

inline CombineLists check_combine_args(const char* op, at::TensorList params, at::TensorList masters,
                                       at::TensorList g0, at::TensorList gp, at::TensorList gm,
                                       at::TensorList state1, at::TensorList state2, at::TensorList v,
                                       const OptTensors& v_coefs_t, at::ArrayRef<double> v_coefs_f, int64_t kind,
                                       const c10::optional<at::Tensor>& v_sq_out, bool write_masters,
                                       const c10::optional<at::Tensor>& base_t,
                                       const c10::optional<at::Tensor>& skip_if, const at::Device& dev,
                                       bool host_scalars_ok) {
  check_combine_extras(op, params, masters, v, v_sq_out, write_masters, dev);
  CombineLists r;
  check_list(params, op, "params", dev, r.numels);
  check_list(masters, op, "masters", dev, r.numels, at::kFloat);
  bool gset = false;
  for (const at::TensorList* g : {&g0, &gp, &gm}) {
    if (g->empty()) continue;
    check_list(*g, op, "grads", dev, r.numels, gset ? c10::optional<at::ScalarType>(r.gdt) : c10::nullopt);
    r.gdt = (*g)[0].scalar_type();
    gset = true;
  }
  if (!gset && !params.empty()) r.gdt = params[0].scalar_type();
  TORCH_CHECK(kind == kSgd || kind == kAdamW, op, ": kind must be 0 (SGD) or 1 (AdamW)");
  if (!state1.empty()) check_list(state1, op, "state1", dev, r.numels, at::kFloat);
  if (!state2.empty()) check_list(state2, op, "state2", dev, r.numels, at::kFloat);
  if (!v.empty()) check_list(v, op, "v", dev, r.numels, at::kFloat);
  TORCH_CHECK(kind != kAdamW || params.empty() || (!state1.empty() && !state2.empty()), op,
              ": AdamW needs exp_avg and exp_avg_sq");
  if (!v.empty()) check_vcoefs(v_coefs_t, v_coefs_f, dev, host_scalars_ok);
  if (base_t) {
    TORCH_CHECK(base_t->scalar_type() == at::kDouble && base_t->numel() == kBaseLen[kind], op,
                ": base_t must be a float64 tensor with ", kBaseLen[kind], " elements (BaseStep.device_args), got ",
                base_t->scalar_type(), " ", base_t->sizes());
    TORCH_CHECK(base_t->device() == dev && base_t->is_contiguous(), op, ": base_t is on ", base_t->device(),
                ", expected ", dev, " (contiguous)");
  }
  check_skip_if(op, skip_if, dev);
  if (params.empty()) return r;
  // written lists must not share memory (params may be their own masters)
  check_distinct(op, 5, {{"params", params}, {"masters", masters}, {"state1", state1}, {"state2", state2}, {"v", v},
                      {"g0", g0}, {"gp", gp}, {"gm", gm}}, /*params_alias_masters=*/true);
  return r;
}

// multi_dot's arguments: `tensors` holds n_lists lists of equal length, each checked on
// `dev` (check_list: numels gets the row sizes), and `pairs` (flat (i, j)) indexes them.
inline std::vector<at::TensorList> dot_lists(at::TensorList tensors, int64_t n_lists, at::IntArrayRef pairs,
                                             const at::Device& dev, std::vector<int64_t>& numels) {
  TORCH_CHECK(n_lists >= 1 && static_cast<int64_t>(tensors.size()) % n_lists == 0,
              "multi_dot: tensors must hold n_lists lists of equal length");
  TORCH_CHECK(pairs.size() % 2 == 0, "multi_dot: pairs must be a flat list of (i, j)");
  const int64_t n = static_cast<int64_t>(tensors.size()) / n_lists;
  std::vector<at::TensorList> lists;
  for (int64_t l = 0; l < n_lists; ++l) {
    lists.push_back(tensors.slice(l * n, n));
    check_list(lists.back(), "multi_dot", "tensors", dev, numels);
  }
  for (int64_t p : pairs) {
    TORCH_CHECK(p >= 0 && p < n_lists, "multi_dot: pair index ", p, " out of range");
  }
  return lists;
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

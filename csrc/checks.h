// Argument checks shared by the CPU and CUDA op implementations: every tensor of an op
// must be contiguous, on the op's device, of a supported dtype, and the lists of one op
// must match element by element in numel. A violation raises a clear error (the Python
// wrapper lookahead_ext/ops/native.py makes non-contiguous tensors contiguous first).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace la {

inline bool low_or_f32(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kDouble: return "float64";
    default: return c10::toString(t);
  }
}

// Check one list: contiguity, device, dtype in {fp32, bf16, fp16} (or exactly `want` if
// given), numel equal to `numels` (filled from the first checked list when empty).
inline void check_list(at::TensorList ts, const char* op, const char* name, const at::Device& dev,
                       std::vector<int64_t>& numels, c10::optional<at::ScalarType> want = c10::nullopt) {
  if (numels.empty()) {
    for (const auto& t : ts) numels.push_back(t.numel());
  }
  TORCH_CHECK(ts.size() == numels.size(), op, ": list '", name, "' has ", ts.size(),
              " tensors, expected ", numels.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.device() == dev, op, ": ", name, "[", i, "] is on ", t.device(),
                " but the op runs on ", dev, " (all tensors must share one device)");
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] is not contiguous (strides ",
                t.strides(), "); call .contiguous() or use lookahead_ext.ops, which handles it");
    TORCH_CHECK(t.numel() == numels[i], op, ": ", name, "[", i, "] has ", t.numel(),
                " elements, expected ", numels[i]);
    if (want) {
      TORCH_CHECK(t.scalar_type() == *want, op, ": ", name, "[", i, "] must be ", dtype_name(*want),
                  ", got ", dtype_name(t.scalar_type()));
    } else {
      TORCH_CHECK(low_or_f32(t.scalar_type()), op, ": ", name, "[", i,
                  "] must be float32, bfloat16 or float16, got ", dtype_name(t.scalar_type()));
    }
    if (i > 0) {
      TORCH_CHECK(t.scalar_type() == ts[0].scalar_type(), op, ": all tensors of '", name,
                  "' must share one dtype (", dtype_name(ts[0].scalar_type()), " vs ",
                  dtype_name(t.scalar_type()), ")");
    }
  }
}

// The CPU kernels declare their streams __restrict__ (and a CUDA thread loads every stream
// of an element before it stores any, so an aliased pair would silently keep one of two
// results): lists that are written must not share memory with another list of the same
// call (perturb_'s out/base aliasing is the exception it handles, and it does not use
// __restrict__). Shared by the CPU and CUDA ops: the same error for the same input.
// The first `n_written` lists are written; the rest are read-only, and two read-only lists may share memory (e.g. g0 is gp).
// `params_alias_masters`: lists 0 and 1 (params, masters) may be the same tensors: every
// element then gets the same value stored twice (fp32 params used as their own masters).
inline void check_distinct(const char* op, size_t n_written,
                           std::initializer_list<std::pair<const char*, at::TensorList>> lists,
                           bool params_alias_masters = false) {
  std::vector<std::pair<const char*, at::TensorList>> ls(lists);
  for (size_t a = 0; a < ls.size() && a < n_written; ++a) {
    for (size_t b = a + 1; b < ls.size(); ++b) {
      if (ls[a].second.empty() || ls[b].second.empty()) continue;
      if (params_alias_masters && a == 0 && b == 1) continue;
      for (size_t i = 0; i < ls[a].second.size(); ++i) {
        const auto& x = ls[a].second[i];
        const auto& y = ls[b].second[i];
        TORCH_CHECK(x.numel() == 0 || x.data_ptr() != y.data_ptr(), op, ": ", ls[a].first, "[", i, "] and ",
                    ls[b].first, "[", i, "] share memory; they must be distinct tensors");
      }
    }
  }
}

// perturb_: out[i] may be base[i] itself (in place), but then of the same dtype.
inline void check_out_base(at::TensorList out, at::TensorList base) {
  for (size_t i = 0; i < out.size() && i < base.size(); ++i) {
    if (out[i].numel() == 0 || out[i].data_ptr() != base[i].data_ptr()) continue;
    TORCH_CHECK(out[i].scalar_type() == base[i].scalar_type(), "perturb_: out[", i,
                "] is base[", i, "] but with another dtype");
  }
}

inline at::ScalarType list_dtype(at::TensorList ts, at::ScalarType fallback) {
  return ts.empty() ? fallback : ts[0].scalar_type();
}

// Calls f(T{}) with T the C++ type of a fp32 / bf16 / fp16 dtype.
template <class F>
inline void dispatch_float(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

// The four hyper-parameter layouts of combine_step_ (see ops.cpp schemas).
constexpr int64_t kSgd = 0;
constexpr int64_t kAdamW = 1;

}  // namespace la

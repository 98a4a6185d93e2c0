// The torch op schemas of lookahead_ext, defined once: schemas.cpp registers them as
// torch.ops.lookahead_ext, the emulated CUDA build (csrc/emu/) under its own namespace.
#pragma once

#include <torch/library.h>

namespace la {

inline void define_schemas(torch::Library& m) {
  // sum_k <tensors[i*n+k], tensors[j*n+k]> for each pair (i, j); [P] or [P, n] float32.
  m.def("multi_dot(Tensor[] tensors, int n_lists, int[] pairs, bool per_tensor) -> Tensor");
  // out = base + scale * direction, scale = scale_t (device scalar) * scale_f; backup = base first.
  m.def("perturb_(Tensor(a!)[] out, Tensor[] base, Tensor[] direction, Tensor? scale_t, "
        "float scale_f, Tensor(b!)[] backup) -> ()");
  // d = c.g, base step (kind 0 SGD / 1 AdamW) on masters, params = cast(masters), v update.
  // v coefficient i: v_coefs_t[i] (one-element float32 device tensor) if given, else v_coefs_f[i].
  // v_sq_out (float32 [1], with v): += sum v_new^2 (multi_dot's lanes/partials, no atomics).
  // write_masters=false: the new w goes to params only (same dtype as masters), masters read.
  // base_t (float64, BaseStep.device_args; op_args.h): the base step's scalars on the device,
  // in place of hyper and flags[0..1]. skip_if (float32, one element, on the device): nonzero
  // writes params = cast(masters) and nothing else.
  m.def("combine_step_(Tensor(a!)[] params, Tensor(b!)[] masters, Tensor[] g0, Tensor[] gp, "
        "Tensor[] gm, float[] coefs, Tensor(c!)[] state1, Tensor(d!)[] state2, Tensor(e!)[] v, "
        "Tensor?[] v_coefs_t, float[] v_coefs_f, int kind, float[] hyper, int[] flags, "
        "Tensor(f!)? v_sq_out=None, bool write_masters=True, Tensor? base_t=None, "
        "Tensor? skip_if=None) -> ()");
  // slow += alpha (fast - slow); fast = slow; params = slow (when given); a nonzero skip_if
  // (float32, one element, on the device) writes nothing.
  m.def("lookahead_sync_(Tensor(a!)[] slow, Tensor(b!)[] fast, float alpha, "
        "Tensor(c!)[] params, Tensor? skip_if=None) -> ()");
  // 1.0 if any element is NaN/Inf (after the optional in-place unscale by inv_scale); 0-d.
  // sq_norms: a float32 [1 + L] tensor instead: the flag, then the squared L2 norm of each of
  // the L lists (list_sizes tensors each; empty: one list), multi_dot's lanes/partials.
  m.def("nonfinite_(Tensor(a!)[] tensors, Tensor? inv_scale, int[] list_sizes=[], "
        "bool sq_norms=False) -> Tensor");
}

}  // namespace la

"""backend="native": thin wrappers over the torch ops of the compiled extension (csrc/):
``lookahead_ext._C`` (schemas + CPU kernels) and ``lookahead_ext._C_cuda`` (CUDA kernels).

The functions have the signatures of reference.py (the oracle); the element-wise math is
csrc/la_math.h, shared by both devices. This module only adapts arguments:

- tensor lists are passed whole (one kernel launch / one OpenMP region per op call);
- 0-d tensor scalars (``scale``, ``v_coefs``) stay on the device and are read in-kernel;
- hyper-parameters are host floats from `BaseStep.kernel_args()` (no recompilation for a
  new lr or step); a BaseStep with device scalars adds `BaseStep.device_args()` (one float64
  device tensor the kernels read in place of the host values);
- `skip_if` goes to the kernels as a float32 device flag (`helpers.skip_f32`, a device op);
- non-contiguous tensors are handled: the kernel runs on a contiguous copy and results are
  copied back (the raw torch ops reject them with a clear error instead).

Fast path: every wrapper first calls the raw op on the caller's lists as they are (no
per-tensor Python work); the op checks contiguity before it writes anything, and only
when it rejects a non-contiguous tensor does the wrapper build contiguous stand-ins and
call it again. For 8 contiguous tensors a wrapper adds ~1-2 us to the raw op call.

`NativeBackend` is parameterised by the torch op namespace and the modules that register
it per device type, so another build of the same csrc/ ops (e.g. an emulated one under
its own namespace) is one more instance (docs/backends.md).
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from .base_step import BaseStep
from .helpers import (check_combine_aliasing, check_combine_extras, check_combine_scalars, check_nonfinite_aliasing,
                      check_perturb_aliasing, check_same_length, check_skip_if, check_sync_aliasing, skip_f32)

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_F32 = torch.float32
_NONCONTIG = "is not contiguous"
_BUILD_HINT = "build it with `python setup.py build_ext --inplace` or `pip install --no-build-isolation .`"


def _fast(fn, *args):
    """Call a raw op; return (True, result), or (False, None) when it rejected a
    non-contiguous tensor (checked before any write: nothing was modified)."""
    try:
        return True, fn(*args)
    except RuntimeError as exc:
        if _NONCONTIG not in str(exc):
            raise
        return False, None


# --------------------------------------------------------------------------- contiguity
class _Contig:
    """Contiguous stand-ins for a list; `flush()` copies results back into the originals."""

    def __init__(self, ts: Optional[Sequence[Tensor]], write: bool = False, share: "Optional[_Contig]" = None):
        self.orig = list(ts) if ts is not None else []
        # a tensor that is also in `share` (out is base, params are masters) reuses its stand-in
        ids = {} if share is None else {id(a): w for a, w in zip(share.orig, share.work)}
        self.work = [ids.get(id(t), t if t.is_contiguous() else t.contiguous()) for t in self.orig]
        self.write = write

    def flush(self) -> None:
        if self.write:
            for o, w in zip(self.orig, self.work):
                if o is not w:
                    o.copy_(w)


def _c(ts) -> list[Tensor]:
    return [] if ts is None else [t if t.is_contiguous() else t.contiguous() for t in ts]


_F32_SLOTS: dict = {}  # (device, stream, slot) -> float32 [1]: see _scalar_t


def _scalar_t(t: Tensor, slot: int = 0) -> Tensor:
    """A device scalar as the raw ops take it: float32, one element, no autograd. Another
    dtype is rounded into a persistent buffer per (device, stream, argument slot), which the
    op reads before the next call on that stream writes it: no allocation per call."""
    if t.dtype != torch.float32:
        if t.numel() != 1:  # (the op's own check words the error)
            return t.to(torch.float32)
        dev = t.device
        key = (dev, torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else None, slot)
        buf = _F32_SLOTS.get(key)
        if buf is None:
            buf = _F32_SLOTS[key] = torch.empty(1, dtype=torch.float32, device=dev)
        return buf.copy_(t.detach().reshape(1)).view(t.shape)
    return t.detach() if t.requires_grad else t


def _split_scalar(scale) -> tuple[Optional[Tensor], float]:
    if isinstance(scale, Tensor):
        return _scalar_t(scale), 1.0
    return None, float(scale)


def _v_coefs(v_coefs) -> tuple[list, list[float], list[int]]:
    """(device scalars or None per entry / [] when none, host floats, term flags [w0, wp, wm])
    of (bv, a0, ap, am): 0-d tensors are passed as they are, read in the kernel."""
    vt, vf, use = [], [], []
    any_t = False
    for c in v_coefs:
        if isinstance(c, Tensor):
            any_t = True
            vt.append(c if c.dtype is _F32 and not c.requires_grad else _scalar_t(c, 1 + len(vt)))
            vf.append(0.0)
            use.append(1)  # a tensor coefficient never drops its term
        else:
            vt.append(None)
            vf.append(float(c))
            use.append(int(vf[-1] != 0.0))  # a float zero drops it (as in the reference)
    return (vt if any_t else []), vf, use[1:]


def _reject_mixed_meta(args) -> None:
    """The dispatcher sends a call with any meta tensor to the fake kernel: refuse real tensors
    on another device there (they would get uninitialised results), as the reference does."""
    from torch._subclasses.fake_tensor import FakeTensor
    devices = set()
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, Tensor) and not isinstance(t, FakeTensor):
                devices.add(t.device.type)
    if len(devices) > 1:
        raise RuntimeError(f"lookahead_ext ops: tensors on different devices ({', '.join(sorted(devices))}) "
                           "in one call")


class NativeBackend:
    """The csrc/ ops registered under torch op namespace `namespace`; `modules[device_type]`
    are the extension modules to import before ops on that device type can run."""

    def __init__(self, name: str, namespace: str, modules: dict[str, tuple[str, ...]]):
        self.name = name
        self.namespace = namespace
        self.modules = dict(modules)
        self.devices = tuple(modules)
        self._status: dict[str, tuple[bool, str]] = {}
        self._fakes = False

    def __repr__(self) -> str:
        return f"NativeBackend({self.name!r}, namespace={self.namespace!r})"

    # ------------------------------------------------------------------ availability
    def available(self, device_type: str) -> tuple[bool, str]:
        """(True, "ok") if the ops can run on `device_type` tensors here, else (False, why)."""
        if device_type not in self.modules:
            return False, f"{self.name} has no {device_type} kernels"
        if device_type not in self._status:
            try:
                for m in self.modules[device_type]:
                    importlib.import_module(m)
                if device_type == "cuda" and not torch.cuda.is_available():
                    raise RuntimeError("torch.cuda.is_available() is False")
                self._status[device_type] = (True, "ok")
                self.register_fakes()
            except Exception as exc:  # ImportError or a broken build
                self._status[device_type] = (
                    False, f"{self.modules[device_type][-1]} is not usable ({type(exc).__name__}: {exc}); "
                           + _BUILD_HINT)
        return self._status[device_type]

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """The kernels take fp32/bf16/fp16 tensors on their device types (float64 -> reference)."""
        dt = torch.device(device).type
        return dtype in _SUPPORTED and dt in self.modules and self.available(dt)[0]

    def _lib(self):
        return getattr(torch.ops, self.namespace)

    # ------------------------------------------------------------------ ops
    def multi_dot(self, lists: Sequence[Sequence[Tensor]], pairs: Sequence[tuple[int, int]],
                  per_tensor: bool = False) -> Tensor:
        """Deterministic global dot products per pair (see reference.multi_dot); float32."""
        n = check_same_length("multi_dot", lists)
        if n == 0:
            out = torch.zeros(len(pairs), 0, dtype=torch.float32)
            return out if per_tensor else out.sum(dim=1)
        flat_pairs = [int(x) for p in pairs for x in p]
        flat = [t for lst in lists for t in lst]
        ok, out = _fast(self._lib().multi_dot, flat, len(lists), flat_pairs, bool(per_tensor))
        if ok:
            return out
        return self._lib().multi_dot(_c(flat), len(lists), flat_pairs, bool(per_tensor))

    def perturb_(self, out, base, direction, scale, backup=None) -> None:
        """out = cast(base + scale*direction), backup = base first (Algorithm 1, lines 9-10)."""
        if not out:
            return
        check_perturb_aliasing(out, base, direction, scale, backup)
        st, sf = _split_scalar(scale)
        ok, _ = _fast(self._lib().perturb_, out, base, direction, st, sf, [] if backup is None else backup)
        if ok:
            return
        o = _Contig(out, write=True)
        k = _Contig(backup, write=True)
        b = _Contig(base, share=o)  # out may alias base: the pair shares one stand-in
        self._lib().perturb_(o.work, b.work, _c(direction), st, sf, k.work)
        k.flush()
        o.flush()

    def combine_step_(self, params, masters, grads, coefs, base: BaseStep, base_state: dict,
                      v=None, v_coefs=None, v_sq_out: Optional[Tensor] = None,
                      write_masters: bool = True, skip_if: Optional[Tensor] = None) -> None:
        """One pass: d = sum c_i g_i, SGD/AdamW step on masters, params = cast(masters) and
        v = bv v + a0 g0 + a+ g+ + a- g- (Algorithm 1, lines 12-16; eqs. 9, 115).
        v_sq_out (float32 [1], with v): += sum v_new^2, fused (multi_dot's summation).
        write_masters=False: the new w goes to params only (same dtype), masters are read."""
        check_combine_extras(params, masters, v, v_sq_out, write_masters)
        check_combine_scalars(params, base, skip_if)
        if not params:
            return
        check_combine_aliasing(params, masters, grads, base, base_state, v, v_coefs, v_sq_out, write_masters, skip_if)
        kind, hyper, flags = base.kernel_args()  # placeholders where base holds device scalars:
        base_t = base.device_args(params[0].device) if base.on_device else None  # ... these replace them
        skip = skip_f32(skip_if)
        names = base.state_names()
        s1 = base_state[names[0]] if names else None
        s2 = base_state[names[1]] if len(names) > 1 else None
        vt, vf, wflags = ([], [0.0] * 4, [0, 0, 0]) if v is None else _v_coefs(v_coefs)
        g0, gp, gm = ([] if g is None else g for g in grads)
        cf = [float(c) for c in coefs]
        fl = [*flags, *wflags]
        hyper = list(hyper)
        lib = self._lib()
        ok, _ = _fast(lib.combine_step_, params, masters, g0, gp, gm, cf, [] if s1 is None else s1,
                      [] if s2 is None else s2, [] if v is None else v, vt, vf, kind, hyper, fl, v_sq_out,
                      bool(write_masters), base_t, skip)
        if ok:
            return
        c1, c2, vv = _Contig(s1, write=True), _Contig(s2, write=True), _Contig(v, write=True)
        p = _Contig(params, write=True)
        m = _Contig(masters, write=write_masters, share=p)  # params may be their masters
        lib.combine_step_(p.work, m.work, _c(g0), _c(gp), _c(gm), cf, c1.work, c2.work, vv.work, vt, vf, kind,
                          hyper, fl, v_sq_out, bool(write_masters), base_t, skip)
        for x in (p, m, c1, c2, vv):
            x.flush()

    def lookahead_sync_(self, slow, fast, alpha: float, params=None, skip_if: Optional[Tensor] = None) -> None:
        """slow += alpha (fast - slow); fast = slow; params = slow (Algorithm 1, line 18)."""
        check_skip_if("lookahead_sync_", skip_if, slow[0].device if slow else None)
        if not slow:
            return
        check_sync_aliasing(slow, fast, params, skip_if)
        skip = skip_f32(skip_if)
        ok, _ = _fast(self._lib().lookahead_sync_, slow, fast, float(alpha), [] if params is None else params, skip)
        if ok:
            return
        s, f, q = _Contig(slow, True), _Contig(fast, True), _Contig(params, True)
        self._lib().lookahead_sync_(s.work, f.work, float(alpha), q.work, skip)
        for x in (s, f, q):
            x.flush()

    def nonfinite_(self, lists, inv_scale: Optional[Tensor] = None, sq_norms: bool = False) -> Tensor:
        """0-d float32: 1.0 if any NaN/Inf (after the optional in-place unscale). sq_norms=True:
        float32 [1 + len(lists)]: the flag, then each list's squared L2 norm, one read of the data."""
        flat = [t for lst in lists for t in lst]
        if not flat:
            if sq_norms:
                return torch.zeros(1 + len(lists), dtype=torch.float32)
            return torch.zeros((), dtype=torch.float32)
        check_nonfinite_aliasing(lists, inv_scale)
        inv = None if inv_scale is None else _scalar_t(inv_scale, 5)
        sizes = [len(lst) for lst in lists] if sq_norms else []
        ok, out = _fast(self._lib().nonfinite_, flat, inv, sizes, bool(sq_norms))
        if ok:
            return out
        w = _Contig(flat, write=inv_scale is not None)
        out = self._lib().nonfinite_(w.work, inv, sizes, bool(sq_norms))
        w.flush()
        return out

    # ------------------------------------------------------------------ fake kernels
    def register_fakes(self) -> None:
        """Fake (meta) kernels so that torch.compile / opcheck can trace the ops; they also
        refuse real tensors mixed with meta tensors (the dispatcher routes those here)."""
        if self._fakes:
            return
        self._fakes = True
        lib = self.namespace + "::"
        try:
            @torch.library.register_fake(lib + "multi_dot")
            def _(tensors, n_lists, pairs, per_tensor):
                _reject_mixed_meta((tensors,))
                n = len(tensors) // n_lists
                shape = (len(pairs) // 2, n) if per_tensor else (len(pairs) // 2,)
                dev = tensors[0].device if tensors else torch.device("cpu")
                return torch.empty(shape, dtype=torch.float32, device=dev)

            @torch.library.register_fake(lib + "nonfinite_")
            def _(tensors, inv_scale, list_sizes=(), sq_norms=False):
                _reject_mixed_meta((tensors, inv_scale))
                dev = tensors[0].device if tensors else torch.device("cpu")
                shape = (1 + (len(list_sizes) if list_sizes else 1),) if sq_norms else ()
                return torch.empty(shape, dtype=torch.float32, device=dev)

            def _inplace(*args, **kwargs):
                _reject_mixed_meta(list(args) + list(kwargs.values()))

            for name in ("perturb_", "combine_step_", "lookahead_sync_"):
                torch.library.register_fake(lib + name)(_inplace)
        except RuntimeError:  # already registered (module reloaded)
            pass


NATIVE = NativeBackend("native", "lookahead_ext", {"cpu": ("lookahead_ext._C",),
                                                   "cuda": ("lookahead_ext._C", "lookahead_ext._C_cuda")})
NATIVE.available("cpu")  # registers the fake kernels when the extension is built

# the module-level op functions are the default backend's (tests and benchmarks call them)
multi_dot = NATIVE.multi_dot
perturb_ = NATIVE.perturb_
combine_step_ = NATIVE.combine_step_
lookahead_sync_ = NATIVE.lookahead_sync_
nonfinite_ = NATIVE.nonfinite_

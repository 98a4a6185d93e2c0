"""Fused C++ (CPU) and CUDA backends: thin wrappers over the torch ops registered by
``lookahead_ext._C`` (schemas + CPU kernels) and ``lookahead_ext._C_cuda`` (CUDA kernels).

The functions have the signatures of reference.py (the oracle); the element-wise math is
csrc/la_math.h, shared by both devices. This module only adapts arguments:

- tensor lists are passed whole (one kernel launch / one OpenMP region per op call);
- 0-d tensor scalars (``scale``, ``v_coefs``) stay on the device and are read in-kernel;
- hyper-parameters are host floats derived here in double precision (no recompilation
  for a new lr or step);
- non-contiguous tensors are handled: the kernel runs on a contiguous copy and results are
  copied back (the raw torch ops reject them with a clear error instead).

Fast path: every wrapper first calls the raw op on the caller's lists as they are (no
per-tensor Python work); the op checks contiguity before it writes anything, and only
when it rejects a non-contiguous tensor does the wrapper build contiguous stand-ins and
call it again. For 8 contiguous tensors a wrapper adds ~1-2 us to the raw op call.
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .base_step import ADAMW, BaseStep

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_F32 = torch.float32
_DEVICE = {"cpp": "cpu", "cuda": "cuda"}
_MODULE = {"cpp": "lookahead_ext._C", "cuda": "lookahead_ext._C_cuda"}
_loaded: dict[str, tuple[bool, str]] = {}


def _load(name: str) -> tuple[bool, str]:
    if name not in _loaded:
        try:
            importlib.import_module("lookahead_ext._C")  # schemas live here
            if name == "cuda":
                importlib.import_module(_MODULE[name])
                if not torch.cuda.is_available():
                    raise RuntimeError("torch.cuda.is_available() is False")
            _loaded[name] = (True, "ok")
        except Exception as exc:  # ImportError or a broken build
            _loaded[name] = (False, f"{_MODULE[name]} is not usable ({type(exc).__name__}: {exc}); "
                                    "build it with `python setup.py build_ext --inplace` or "
                                    "`pip install --no-build-isolation .`")
    return _loaded[name]


def available(name: str) -> tuple[bool, str]:
    """(True, "ok") if backend `name` ("cpp" or "cuda") can run here, else (False, why)."""
    if name not in _MODULE:
        return False, f"unknown native backend {name!r}"
    return _load(name)


def supports(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """The kernels take fp32/bf16/fp16 tensors on their device (float64 -> reference)."""
    return available(name)[0] and torch.device(device).type == _DEVICE[name] and dtype in _SUPPORTED


def _ops():
    return torch.ops.lookahead_ext


_NONCONTIG = "is not contiguous"


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


# --------------------------------------------------------------------------- ops
def multi_dot(lists: Sequence[Sequence[Tensor]], pairs: Sequence[tuple[int, int]],
              per_tensor: bool = False) -> Tensor:
    """Deterministic global dot products per pair (see reference.multi_dot); float32."""
    n = len(lists[0]) if lists else 0
    for lst in lists:
        if len(lst) != n:
            raise ValueError("multi_dot: all tensor lists must have the same length")
    if n == 0:
        out = torch.zeros(len(pairs), 0, dtype=torch.float32)
        return out if per_tensor else out.sum(dim=1)
    flat_pairs = [int(x) for p in pairs for x in p]
    flat = [t for lst in lists for t in lst]
    ok, out = _fast(_ops().multi_dot, flat, len(lists), flat_pairs, bool(per_tensor))
    if ok:
        return out
    return _ops().multi_dot(_c(flat), len(lists), flat_pairs, bool(per_tensor))


def _scalar_t(t: Tensor) -> Tensor:
    """A device scalar as the raw ops take it: float32, one element, no autograd."""
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t.detach() if t.requires_grad else t


def _split_scalar(scale) -> tuple[Optional[Tensor], float]:
    if isinstance(scale, Tensor):
        return _scalar_t(scale), 1.0
    return None, float(scale)


def perturb_(out, base, direction, scale, backup=None) -> None:
    """out = cast(base + scale*direction), backup = base first (Algorithm 1, lines 9-10)."""
    if not out:
        return
    st, sf = _split_scalar(scale)
    ok, _ = _fast(_ops().perturb_, out, base, direction, st, sf, [] if backup is None else backup)
    if ok:
        return
    o = _Contig(out, write=True)
    k = _Contig(backup, write=True)
    b = _Contig(base, share=o)  # out may alias base: the pair shares one stand-in
    _ops().perturb_(o.work, b.work, _c(direction), st, sf, k.work)
    k.flush()
    o.flush()


def _hyper(base: BaseStep) -> tuple[int, list[float], list[int]]:
    if base.kind == ADAMW:
        return 1, [1.0 - base.lr * base.weight_decay, 1.0 - base.beta1, base.beta2, 1.0 - base.beta2,
                   base.eps, base.lr / base.bias_correction1, base.bias_correction2 ** 0.5], [0, 0]
    return 0, [base.lr, base.weight_decay, base.momentum, base.dampening], \
        [int(base.nesterov), int(base.first)]


def _v_coefs(v_coefs) -> tuple[list, list[float], list[int]]:
    """(device scalars or None per entry / [] when none, host floats, term flags [w0, wp, wm])
    of (bv, a0, ap, am): 0-d tensors are passed as they are, read in the kernel."""
    vt, vf, use = [], [], []
    any_t = False
    for c in v_coefs:
        if isinstance(c, Tensor):
            any_t = True
            vt.append(c if c.dtype is _F32 and not c.requires_grad else _scalar_t(c))
            vf.append(0.0)
            use.append(1)  # a tensor coefficient never drops its term
        else:
            vt.append(None)
            vf.append(float(c))
            use.append(int(vf[-1] != 0.0))  # a float zero drops it (as in the reference)
    return (vt if any_t else []), vf, use[1:]


def combine_step_(params, masters, grads, coefs, base: BaseStep, base_state: dict,
                  v=None, v_coefs=None, v_sq_out: Optional[Tensor] = None,
                  write_masters: bool = True) -> None:
    """One pass: d = sum c_i g_i, SGD/AdamW step on masters, params = cast(masters) and
    v = bv v + a0 g0 + a+ g+ + a- g- (Algorithm 1, lines 12-16; eqs. 9, 115).
    v_sq_out (float32 [1], with v): += sum v_new^2, fused (multi_dot's summation).
    write_masters=False: the new w goes to params only (same dtype), masters are read."""
    reference.check_combine_extras(params, masters, v, v_sq_out, write_masters)
    if not params:
        return
    kind, hyper, flags = _hyper(base)
    names = base.state_names()
    s1 = base_state[names[0]] if names else None
    s2 = base_state[names[1]] if len(names) > 1 else None
    vt, vf, wflags = ([], [0.0] * 4, [0, 0, 0]) if v is None else _v_coefs(v_coefs)
    g0, gp, gm = ([] if g is None else g for g in grads)
    cf = [float(c) for c in coefs]
    fl = flags + wflags
    ok, _ = _fast(_ops().combine_step_, params, masters, g0, gp, gm, cf, [] if s1 is None else s1,
                  [] if s2 is None else s2, [] if v is None else v, vt, vf, kind, hyper, fl, v_sq_out,
                  bool(write_masters))
    if ok:
        return
    c1, c2, vv = _Contig(s1, write=True), _Contig(s2, write=True), _Contig(v, write=True)
    p = _Contig(params, write=True)
    m = _Contig(masters, write=write_masters, share=p)  # params may be their masters
    _ops().combine_step_(p.work, m.work, _c(g0), _c(gp), _c(gm), cf, c1.work, c2.work, vv.work, vt, vf, kind,
                         hyper, fl, v_sq_out, bool(write_masters))
    for x in (p, m, c1, c2, vv):
        x.flush()


def lookahead_sync_(slow, fast, alpha: float, params=None) -> None:
    """slow += alpha (fast - slow); fast = slow; params = slow (Algorithm 1, line 18)."""
    if not slow:
        return
    ok, _ = _fast(_ops().lookahead_sync_, slow, fast, float(alpha), [] if params is None else params)
    if ok:
        return
    s, f, q = _Contig(slow, True), _Contig(fast, True), _Contig(params, True)
    _ops().lookahead_sync_(s.work, f.work, float(alpha), q.work)
    for x in (s, f, q):
        x.flush()


def nonfinite_(lists, inv_scale: Optional[Tensor] = None, sq_norms: bool = False) -> Tensor:
    """0-d float32: 1.0 if any NaN/Inf (after the optional in-place unscale). sq_norms=True:
    float32 [1 + len(lists)]: the flag, then each list's squared L2 norm, one read of the data."""
    flat = [t for lst in lists for t in lst]
    if not flat:
        if sq_norms:
            return torch.zeros(1 + len(lists), dtype=torch.float32)
        return torch.zeros((), dtype=torch.float32)
    inv = None if inv_scale is None else _scalar_t(inv_scale)
    sizes = [len(lst) for lst in lists] if sq_norms else []
    ok, out = _fast(_ops().nonfinite_, flat, inv, sizes, bool(sq_norms))
    if ok:
        return out
    w = _Contig(flat, write=inv_scale is not None)
    out = _ops().nonfinite_(w.work, inv, sizes, bool(sq_norms))
    w.flush()
    return out


def _register_fakes() -> None:
    """Fake (meta) kernels so that torch.compile / opcheck can trace the ops."""
    lib = "lookahead_ext::"
    try:
        @torch.library.register_fake(lib + "multi_dot")
        def _(tensors, n_lists, pairs, per_tensor):
            n = len(tensors) // n_lists
            shape = (len(pairs) // 2, n) if per_tensor else (len(pairs) // 2,)
            dev = tensors[0].device if tensors else torch.device("cpu")
            return torch.empty(shape, dtype=torch.float32, device=dev)

        @torch.library.register_fake(lib + "nonfinite_")
        def _(tensors, inv_scale, list_sizes=(), sq_norms=False):
            dev = tensors[0].device if tensors else torch.device("cpu")
            shape = (1 + (len(list_sizes) if list_sizes else 1),) if sq_norms else ()
            return torch.empty(shape, dtype=torch.float32, device=dev)

        for name in ("perturb_", "combine_step_", "lookahead_sync_"):
            torch.library.register_fake(lib + name)(lambda *a, **k: None)
    except RuntimeError:  # already registered (module reloaded)
        pass


if available("cpp")[0]:
    _register_fakes()

"""The fused-op contract of lookahead_ext: every optimizer calls only these functions.

Ops (each defined once, see reference.py for the exact math; every backend implements
the same signatures and is tested against the reference):

- ``multi_dot(lists, pairs, per_tensor=False)``: global dot products / squared norms over
  tensor lists (deterministic).
- ``perturb_(out, base, direction, scale, backup=None)``: the probe write w + scale*v.
- ``combine_step_(params, masters, grads, coefs, base, base_state, v=None, v_coefs=None,
  v_sq_out=None, write_masters=True, skip_if=None)``: d = sum c_i g_i, the base optimizer step
  (SGD/AdamW) and the momentum-v update, one pass. ``skip_if`` (a one-element device tensor,
  read on the device): nonzero leaves masters, v, the base state and v_sq_out bit-identical
  and writes params <- cast(masters). ``base``'s lr / step / first may be 0-d device tensors. ``v_sq_out`` (float32 [1], with v): += sum v_new^2
  (multi_dot's deterministic summation; the next step's ||v|| without a pass over v).
  ``write_masters=False``: the new w goes to params only, masters are read (params must
  have the masters' dtype: float32 params whose masters are scratch backups).
- ``lookahead_sync_(slow, fast, alpha, params=None, skip_if=None)``: slow += alpha(fast - slow),
  fast = slow; a nonzero ``skip_if`` writes nothing.
- ``nonfinite_(lists, inv_scale=None, sq_norms=False, out=None)``: fused NaN/Inf check with
  optional AMP unscale; ``sq_norms=True`` returns [flag, ||lists[0]||^2, ...] (float32 [1 + len])
  from the same read of the data. ``out``: a tensor of the result's dtype and shape, on the
  lists' device, that the result is written into and returned (the Triton kernels write it
  directly: no allocation per call).

Backends (docs/backends.md): "reference" (pure PyTorch, the oracle), "native" (the compiled
csrc/ extension: CPU kernels, CUDA kernels when built; "cpp" and "cuda" are accepted aliases
restricted to CPU / CUDA tensors), "triton" (kernels/). "auto" picks, per call, by device and
dtype: the first available backend of AUTO_CPU_ORDER / AUTO_CUDA_ORDER that supports the
tensors, else "reference" (float64 always goes to the reference under "auto"). An explicitly
requested backend that cannot take the tensors raises BackendUnavailable naming why.
`register_backend` adds a backend (a `Backend`, see backend.py). The (backend, device type,
dtype) -> implementation decision is cached; the cache key includes the AUTO_* orders and
the registry version; `clear_dispatch_cache()` forgets it (e.g. after building the extension).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import backend as _registry
from . import reference
from .backend import Backend, BackendUnavailable
from .base_step import ADAMW, BASES, SGD, BaseStep
from .helpers import check_nonfinite_out

__all__ = [
    "BACKENDS", "AUTO_CPU_ORDER", "AUTO_CUDA_ORDER", "Backend", "BackendUnavailable", "BaseStep", "SGD",
    "ADAMW", "BASES", "register_backend", "unregister_backend", "resolve", "clear_dispatch_cache",
    "available_backends", "backend_rows", "multi_dot", "perturb_", "combine_step_", "lookahead_sync_",
    "nonfinite_", "sq_norm",
]



def register_backend(name: str, target: str, *, alias_of: Optional[str] = None,
                     devices: Optional[Sequence[str]] = None) -> None:
    """Add a backend row: `target` is "module.path:attribute" of a `Backend` (imported on first
    use); an alias row stands for `alias_of`, optionally restricted to some device types."""
    global BACKENDS
    _registry.register_backend(name, target, alias_of=alias_of, devices=devices)
    BACKENDS = _registry.backend_names()


def unregister_backend(name: str) -> None:
    global BACKENDS
    _registry.unregister_backend(name)
    BACKENDS = _registry.backend_names()


register_backend("native", "lookahead_ext.ops.native:NATIVE")
register_backend("cpp", "lookahead_ext.ops.native:NATIVE", alias_of="native", devices=("cpu",))
register_backend("cuda", "lookahead_ext.ops.native:NATIVE", alias_of="native", devices=("cuda",))
register_backend("triton", "lookahead_ext.ops.triton_backend")
AUTO_CPU_ORDER = ("native",)
# Which fused backend "auto" prefers on CUDA tensors. Meant to be set from bench/bench_triton.py
# and bench/bench_native.py on a GPU (the winner on 64M params in 200 tensors goes first). No GPU
# has been lent to this project yet, so this is a provisional order: the CUDA extension first
# (no JIT compile on first use, no per-call pointer-table build), Triton when it is not built.
AUTO_CUDA_ORDER = ("native", "triton")


def available_backends() -> dict[str, str]:
    """Map each backend name (aliases included) to 'ok' or the reason it is unavailable."""
    out = {"reference": "ok"}
    for name in _registry.REGISTRY:
        out[name] = _registry.status(name)[1]
    return out


def backend_rows() -> list[tuple[str, str]]:
    """(backend, device type) pairs that can run on this machine: the rows of the test matrix
    (aliases left out: they are the same implementation)."""
    return [(name, dt) for name, e in _registry.REGISTRY.items() if e.alias_of is None
            for dt in _registry.present(name)]


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_fallback_warned = False


def _warn_reference_fallback(device: torch.device, reasons: list) -> None:
    """Say once per process that "auto" runs the slow reference because no fused backend is built."""
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"lookahead_ext: backend='auto' falls back to the pure-PyTorch reference ops "
                      f"on {device.type} (3-13x slower per op) because the compiled extension is "
                      f"missing: {'; '.join(reasons)}. Pass backend='reference' to choose the "
                      f"reference on purpose.",
                      RuntimeWarning, stacklevel=3)


def resolve(backend: str, device: torch.device, dtype: torch.dtype):
    """Return the implementation of the ops for tensors on `device` of `dtype`."""
    _registry.check_backend_name(backend)
    if backend == "reference":
        return reference
    dt = device.type
    if backend == "auto":
        order = AUTO_CPU_ORDER if dt == "cpu" else AUTO_CUDA_ORDER if dt == "cuda" else ()
        missing = []
        for name in order:
            impl, reason = _registry.status(name, dt)
            if impl is None:
                missing.append(reason)
            elif impl.supports(device, dtype):
                return impl
        if missing and dtype in _FUSED_DTYPES:
            _warn_reference_fallback(device, missing)
        return reference
    impl, reason = _registry.status(backend, dt)
    if impl is None:
        raise BackendUnavailable(f"backend={backend!r} is unavailable: {reason}. "
                                 "Use backend='reference' or 'auto'.")
    if not impl.supports(device, dtype):
        raise BackendUnavailable(f"backend={backend!r} does not support {dtype} tensors on "
                                 f"{device}; use backend='auto' to fall back to the reference path.")
    return impl


_DISPATCH: dict = {}


def clear_dispatch_cache() -> None:
    """Forget the cached backend decisions of the op functions."""
    _DISPATCH.clear()


def _impl(backend: str, first: Optional[Tensor]):
    if first is None:
        _registry.check_backend_name(backend)
        return reference
    key = (backend, first.device.type, first.dtype, AUTO_CPU_ORDER, AUTO_CUDA_ORDER, _registry.VERSION[0])
    impl = _DISPATCH.get(key)
    if impl is None:
        impl = resolve(backend, first.device, first.dtype)  # raises: nothing cached
        _DISPATCH[key] = impl
    return impl


def _first(*lists) -> Optional[Tensor]:
    for lst in lists:
        if lst:
            return lst[0]
    return None


def multi_dot(lists: Sequence[Sequence[Tensor]], pairs: Sequence[tuple[int, int]],
              per_tensor: bool = False, backend: str = "auto") -> Tensor:
    return _impl(backend, _first(*lists)).multi_dot(lists, pairs, per_tensor)


def sq_norm(tensors: Sequence[Tensor], backend: str = "auto") -> Tensor:
    """Global squared L2 norm of a tensor list (0-d tensor)."""
    return multi_dot([tensors], [(0, 0)], backend=backend)[0]


def perturb_(out, base, direction, scale, backup=None, backend: str = "auto") -> None:
    _impl(backend, _first(out)).perturb_(out, base, direction, scale, backup)


def combine_step_(params, masters, grads, coefs, base: BaseStep, base_state: dict,
                  v=None, v_coefs=None, v_sq_out: Optional[Tensor] = None,
                  write_masters: bool = True, skip_if: Optional[Tensor] = None, backend: str = "auto") -> None:
    _impl(backend, _first(params)).combine_step_(params, masters, grads, coefs, base,
                                                  base_state, v, v_coefs, v_sq_out, write_masters, skip_if)


def lookahead_sync_(slow, fast, alpha: float, params=None, skip_if: Optional[Tensor] = None,
                    backend: str = "auto") -> None:
    _impl(backend, _first(fast)).lookahead_sync_(slow, fast, alpha, params, skip_if)


def nonfinite_(lists, inv_scale: Optional[Tensor] = None, sq_norms: bool = False,
               backend: str = "auto", out: Optional[Tensor] = None) -> Tensor:
    impl = _impl(backend, _first(*lists))
    if out is None:
        return impl.nonfinite_(lists, inv_scale, sq_norms)
    check_nonfinite_out(lists, sq_norms, out)
    into = getattr(impl, "nonfinite_into", None)  # a backend that writes out itself
    if into is not None:
        return into(lists, inv_scale, sq_norms, out)
    return out.copy_(impl.nonfinite_(lists, inv_scale, sq_norms))

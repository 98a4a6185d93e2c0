"""The fused-op contract of lookahead_ext: every optimizer calls only these functions.

Ops (each defined once, see reference.py for the exact math; every backend implements
the same signatures and is tested against the reference):

- ``multi_dot(lists, pairs, per_tensor=False)``: global dot products / squared norms over
  tensor lists (deterministic).
- ``perturb_(out, base, direction, scale, backup=None)``: the probe write w + scale*v.
- ``combine_step_(params, masters, grads, coefs, base, base_state, v=None, v_coefs=None,
  v_sq_out=None, write_masters=True)``: d = sum c_i g_i, the base optimizer step (SGD/AdamW)
  and the momentum-v update, one pass. ``v_sq_out`` (float32 [1], with v): += sum v_new^2
  (multi_dot's deterministic summation; the next step's ||v|| without a pass over v).
  ``write_masters=False``: the new w goes to params only, masters are read (params must
  have the masters' dtype: float32 params whose masters are scratch backups).
- ``lookahead_sync_(slow, fast, alpha, params=None)``: slow += alpha(fast - slow), fast = slow.
- ``nonfinite_(lists, inv_scale=None, sq_norms=False)``: fused NaN/Inf check with optional
  AMP unscale; ``sq_norms=True`` returns [flag, ||lists[0]||^2, ...] (float32 [1 + len]) from
  the same read of the data.

Backends: "reference" (pure PyTorch), "cpp" (fused C++ CPU kernels, csrc/), "cuda"
(CUDA kernels, csrc/), "triton" (kernels/). "auto" picks, per call, by device and dtype:
CPU -> "cpp" when the extension is built, else "reference"; CUDA -> the order in
AUTO_CUDA_ORDER (set from the benchmark, see README), else "reference"; float64 and
other dtypes a backend does not support fall back to "reference" under "auto" only.
An explicitly requested backend that is unavailable raises BackendUnavailable naming
what is missing. The (backend, device type, dtype) -> module decision is cached; the cache
key includes AUTO_CUDA_ORDER and the backend module table, so changing either takes effect
on the next call; `clear_dispatch_cache()` forgets it (e.g. after building the extension).
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .base_step import ADAMW, BASES, SGD, BaseStep

__all__ = [
    "BACKENDS", "AUTO_CUDA_ORDER", "BackendUnavailable", "BaseStep", "SGD", "ADAMW", "BASES",
    "resolve", "clear_dispatch_cache", "available_backends", "multi_dot", "perturb_", "combine_step_",
    "lookahead_sync_", "nonfinite_", "sq_norm",
]

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
# Which fused backend "auto" prefers on CUDA tensors. Meant to be set from bench/bench_triton.py
# and bench/bench_native.py on a GPU (the winner on 64M params in 200 tensors goes first). No GPU
# has been lent to this project yet, so this is a provisional order: the CUDA extension first
# (no JIT compile on first use, no per-call pointer-table build), Triton when it is not built.
AUTO_CUDA_ORDER = ("cuda", "triton")

# backend name -> module path implementing the op functions plus
# `available() -> (bool, reason)` and `supports(device, dtype) -> bool`.
_MODULES = {
    "cpp": "lookahead_ext.ops.native",
    "cuda": "lookahead_ext.ops.native",
    "triton": "lookahead_ext.ops.triton_backend",
}


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot run here."""


def _load(name: str):
    """Import a fast backend module; return (module or None, reason)."""
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as exc:  # ImportError, or a broken build raising anything on import
        return None, f"{_MODULES[name]} could not be imported ({type(exc).__name__}: {exc})"
    ok, reason = mod.available(name)
    return (mod if ok else None), reason


def available_backends() -> dict[str, str]:
    """Map each backend name to 'ok' or the reason it is unavailable."""
    out = {"reference": "ok"}
    for name in ("cpp", "cuda", "triton"):
        mod, reason = _load(name)
        out[name] = "ok" if mod is not None else reason
    return out


def _check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


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
    """Return the module implementing the ops for tensors on `device` of `dtype`."""
    _check_backend_name(backend)
    if backend == "reference":
        return reference
    if backend == "auto":
        order = ("cpp",) if device.type == "cpu" else AUTO_CUDA_ORDER if device.type == "cuda" else ()
        missing = []
        for name in order:
            mod, reason = _load(name)
            if mod is None:
                missing.append(reason)
            elif mod.supports(name, device, dtype):
                return mod
        if missing and dtype in _FUSED_DTYPES:
            _warn_reference_fallback(device, missing)
        return reference
    mod, reason = _load(backend)
    if mod is None:
        raise BackendUnavailable(f"backend={backend!r} is unavailable: {reason}. "
                                 "Use backend='reference' or 'auto'.")
    if not mod.supports(backend, device, dtype):
        raise BackendUnavailable(f"backend={backend!r} does not support {dtype} tensors on "
                                 f"{device}; use backend='auto' to fall back to the reference path.")
    return mod


_DISPATCH: dict = {}


def clear_dispatch_cache() -> None:
    """Forget the cached backend decisions of the op functions."""
    _DISPATCH.clear()


def _impl(backend: str, first: Optional[Tensor]):
    if first is None:
        _check_backend_name(backend)
        return reference
    key = (backend, first.device.type, first.dtype, AUTO_CUDA_ORDER,
           _MODULES["cpp"], _MODULES["cuda"], _MODULES["triton"])
    mod = _DISPATCH.get(key)
    if mod is None:
        mod = resolve(backend, first.device, first.dtype)  # raises: nothing cached
        _DISPATCH[key] = mod
    return mod


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
                  write_masters: bool = True, backend: str = "auto") -> None:
    _impl(backend, _first(params)).combine_step_(params, masters, grads, coefs, base,
                                                  base_state, v, v_coefs, v_sq_out, write_masters)


def lookahead_sync_(slow, fast, alpha: float, params=None, backend: str = "auto") -> None:
    _impl(backend, _first(fast)).lookahead_sync_(slow, fast, alpha, params)


def nonfinite_(lists, inv_scale: Optional[Tensor] = None, sq_norms: bool = False,
               backend: str = "auto") -> Tensor:
    return _impl(backend, _first(*lists)).nonfinite_(lists, inv_scale, sq_norms)

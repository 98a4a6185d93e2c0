"""backend="triton": the fused ops as Triton kernels (kernels/, installed as
lookahead_ext.kernels); this module is the `Backend` (backend.py) itself. Triton is imported lazily, on the first use of this backend: a
machine without a working Triton still imports lookahead_ext, and asking for
backend="triton" there raises BackendUnavailable with the reason from `available`.

Tensors: CUDA tensors with compiled kernels; CPU tensors only under the Triton
interpreter (TRITON_INTERPRET=1 set before the kernels are first imported, as
tests/conftest.py does). Parameters float32/bfloat16/float16; optimizer state float32.
float64 is not supported (`supports` says False, so backend="auto" uses the reference);
a call that still receives float64 tensors (e.g. mixed lists) is delegated to the
reference implementation, which is exact for it.

nonfinite_'s sq_norms (one list) is computed by the check kernel itself; combine_step_'s
v_sq_out (and sq_norms over several lists) by the multi_dot kernel, one extra read pass
(deterministic); write_masters=False is in the combine kernel.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Optional

import torch

from . import reference
from .helpers import (check_combine_aliasing, check_combine_scalars, check_nonfinite_aliasing, check_perturb_aliasing,
                      check_scale, check_skip_if, check_sync_aliasing)

name = "triton"
devices = ("cpu", "cuda")
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_state: dict = {}


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _kernels():
    """Import lookahead_ext.kernels (and triton) once; return the package or raise."""
    mod = _state.get("kernels")
    if mod is None:
        mod = importlib.import_module("lookahead_ext.kernels")
        for sub in ("_mta", "multi_dot", "perturb", "combine_step", "lookahead_sync", "nonfinite"):
            importlib.import_module(f"lookahead_ext.kernels.{sub}")
        _state["kernels"] = mod
    return mod


def _interpret() -> bool:
    """The mode the kernels were defined in (the interpreter reads TRITON_INTERPRET then)."""
    if "kernels" in _state:
        return _state["kernels"]._mta.INTERPRET
    return _interpret_env()


def _import_status() -> tuple[bool, str]:
    """Whether triton and the kernels import (cached once known; not while nothing could run)."""
    if "available" in _state:
        return _state["available"]
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        res = (False, f"triton is not importable ({type(exc).__name__}: {exc}); "
                      "`pip install triton` (Linux + CUDA GPU)")
        _state["available"] = res
        return res
    if not _interpret_env() and not torch.cuda.is_available():
        # no GPU and no interpreter: nothing could run; do not cache (env may change)
        return (False, "Triton needs a CUDA GPU, or TRITON_INTERPRET=1 (set before "
                       "lookahead_ext.kernels is imported) to run on CPU tensors")
    try:
        _kernels()
    except Exception as exc:
        res = (False, f"lookahead_ext.kernels failed to import ({type(exc).__name__}: {exc})")
        _state["available"] = res
        return res
    _state["available"] = (True, "ok")
    return _state["available"]


def available(device_type: str = "cuda") -> tuple[bool, str]:
    """CUDA tensors with compiled kernels; CPU tensors only under the interpreter."""
    if device_type not in devices:
        return False, f"triton has no {device_type} kernels"
    ok, why = _import_status()
    if not ok:
        return ok, why
    if device_type == "cpu" and not _interpret():
        return False, ("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before "
                       "lookahead_ext.kernels is imported)")
    if device_type == "cuda" and (_interpret() or not torch.cuda.is_available()):
        return False, "compiled Triton kernels need a CUDA GPU and TRITON_INTERPRET unset"
    return True, "ok"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in _SUPPORTED and available(torch.device(device).type)[0]


def _guard(*lists):
    """Compiled Triton launches on the *current* CUDA device (triton/runtime/jit.py:
    driver.active.get_current_device()), not the tensors' one: make the tensors' device
    current (tensors on cuda:1 while cuda:0 is current would otherwise get kernels on
    cuda:0 with cuda:1 pointers). A no-op on CPU (interpreter)."""
    for lst in lists:
        for t in lst or ():
            if t is not None and t.device.type == "cuda":
                return torch.cuda.device(t.device)
            return contextlib.nullcontext()
    return contextlib.nullcontext()


def _run(name: str, guard_lists, args: tuple, out=None):
    """Call the kernels' `name` (``out``: the result into it); a call that holds float64
    tensors (found when its lists are read, before anything is written) is delegated to
    the reference."""
    k = _kernels()
    try:
        with _guard(*guard_lists):
            fn = getattr(getattr(k, _MODULE[name]), name)
            return fn(*args) if out is None else fn(*args, out=out)
    except k._mta.Float64:
        res = getattr(reference, name)(*args)
        return res if out is None else out.copy_(res)


_MODULE = {"multi_dot": "multi_dot", "perturb_": "perturb", "combine_step_": "combine_step",
           "lookahead_sync_": "lookahead_sync", "nonfinite_": "nonfinite"}


def multi_dot(lists, pairs, per_tensor: bool = False):
    return _run("multi_dot", lists, (lists, pairs, per_tensor))


def perturb_(out, base, direction, scale, backup=None) -> None:
    check_scale(scale)  # before the backup is written
    check_perturb_aliasing(out, base, direction, scale, backup)
    return _run("perturb_", (out,), (out, base, direction, scale, backup))


def combine_step_(params, masters, grads, coefs, base, base_state, v=None, v_coefs=None,
                  v_sq_out=None, write_masters=True, skip_if=None) -> None:
    check_combine_scalars(params, base, skip_if)
    check_combine_aliasing(params, masters, grads, base, base_state, v, v_coefs, v_sq_out, write_masters, skip_if)
    return _run("combine_step_", (params,), (params, masters, grads, coefs, base, base_state, v,
                                             v_coefs, v_sq_out, write_masters, skip_if))


def lookahead_sync_(slow, fast, alpha: float, params=None, skip_if=None) -> None:
    check_skip_if("lookahead_sync_", skip_if, slow[0].device if slow else None)
    check_sync_aliasing(slow, fast, params, skip_if)
    return _run("lookahead_sync_", (slow,), (slow, fast, alpha, params, skip_if))


def nonfinite_(lists, inv_scale: Optional[torch.Tensor] = None, sq_norms: bool = False):
    check_nonfinite_aliasing(lists, inv_scale)
    return _run("nonfinite_", lists, (lists, inv_scale, sq_norms))


def nonfinite_into(lists, inv_scale, sq_norms: bool, out: torch.Tensor) -> torch.Tensor:
    """nonfinite_ with its result written into ``out`` by the kernels (checked by ops.nonfinite_)."""
    check_nonfinite_aliasing(lists, inv_scale)
    return _run("nonfinite_", lists, (lists, inv_scale, sq_norms), out=out)

"""The Backend protocol of the fused ops and the registry that maps backend names to implementations."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

OP_NAMES = ("multi_dot", "perturb_", "combine_step_", "lookahead_sync_", "nonfinite_")


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot run here."""


@runtime_checkable
class Backend(Protocol):
    """What a backend provides: the five ops with reference.py's signatures, plus

    - ``devices``: the device types it targets (``("cpu",)``, ``("cpu", "cuda")``);
    - ``available(device_type)``: ``(True, "ok")`` or ``(False, why)`` for one of them;
    - ``supports(device, dtype)``: whether it takes tensors of `dtype` on `device`
      (False sends ``backend="auto"`` to the reference; an explicit request raises).
    """

    name: str
    devices: tuple[str, ...]

    def available(self, device_type: str) -> tuple[bool, str]: ...

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool: ...

    def multi_dot(self, lists: Sequence[Sequence[Tensor]], pairs, per_tensor: bool = False) -> Tensor: ...

    def perturb_(self, out, base, direction, scale, backup=None) -> None: ...

    def combine_step_(self, params, masters, grads, coefs, base, base_state, v=None, v_coefs=None,
                      v_sq_out: Optional[Tensor] = None, write_masters: bool = True,
                      skip_if: Optional[Tensor] = None) -> None: ...

    def lookahead_sync_(self, slow, fast, alpha: float, params=None, skip_if: Optional[Tensor] = None) -> None: ...

    def nonfinite_(self, lists, inv_scale: Optional[Tensor] = None, sq_norms: bool = False) -> Tensor: ...


@dataclass(frozen=True)
class Entry:
    """One registry row: `target` ("module:attribute") is imported on first use; an alias row
    names the backend it stands for and may restrict it to some device types."""
    name: str
    target: str
    devices: Optional[tuple[str, ...]] = None
    alias_of: Optional[str] = None


REGISTRY: dict[str, Entry] = {}
VERSION = [0]  # bumped on every registry change: part of the dispatch cache key


def register_backend(name: str, target: str, *, alias_of: Optional[str] = None,
                     devices: Optional[Sequence[str]] = None) -> None:
    """Add (or replace) a backend row: `target` is "module.path:attribute" of a `Backend`.
    Nothing is imported until the backend is first used."""
    if name in ("auto", "reference"):
        raise ValueError(f"backend name {name!r} is reserved")
    REGISTRY[name] = Entry(name, target, None if devices is None else tuple(devices), alias_of)
    VERSION[0] += 1


def unregister_backend(name: str) -> None:
    REGISTRY.pop(name, None)
    VERSION[0] += 1


def backend_names() -> tuple[str, ...]:
    """Every accepted value of `backend=`: "auto", "reference", then the registry (aliases too)."""
    return ("auto", "reference", *REGISTRY)


def check_backend_name(backend: str) -> None:
    if backend not in ("auto", "reference") and backend not in REGISTRY:
        raise ValueError(f"backend must be one of {backend_names()}, got {backend!r}")


def load(name: str):
    """(Backend or None, reason): import the backend of registry row `name`."""
    entry = REGISTRY[name]
    mod_name, _, attr = entry.target.partition(":")
    try:
        obj = importlib.import_module(mod_name)
        return (getattr(obj, attr) if attr else obj), "ok"
    except Exception as exc:  # ImportError, or a broken build raising anything on import
        return None, f"{entry.target} could not be imported ({type(exc).__name__}: {exc})"


def device_types(name: str) -> tuple[str, ...]:
    """The device types registry row `name` runs on (an alias's restriction, else the backend's)."""
    entry = REGISTRY[name]
    if entry.devices is not None:
        return entry.devices
    impl, _ = load(name)
    return tuple(getattr(impl, "devices", ())) if impl is not None else ()


def status(name: str, device_type: Optional[str] = None):
    """(Backend or None, reason) of row `name` on `device_type` (None: on any of its device types)."""
    impl, reason = load(name)
    if impl is None:
        return None, reason
    types = device_types(name)
    if device_type is not None and device_type not in types:
        return None, f"backend {name!r} does not run on {device_type} tensors (it targets {', '.join(types)})"
    reasons = []
    for dt in (types if device_type is None else (device_type,)):
        ok, why = impl.available(dt)
        if ok:
            return impl, "ok"
        reasons.append(why)
    return None, "; ".join(dict.fromkeys(reasons)) or f"backend {name!r} targets no device"


def present(name: str) -> list[str]:
    """Device types on which registry row `name` can run on this machine."""
    impl, _ = load(name)
    if impl is None:
        return []
    return [dt for dt in device_types(name) if impl.available(dt)[0]]

"""Tensor-group building blocks shared by every optimizer: (device, dtype) grouping, the fused base step, slow-weight sync, global norms.

A fused op takes lists of one device and one dtype. Every optimizer of the package (the
probe runtime and the CMLR family, the baselines, :class:`~lookahead_ext.Lookahead`,
:class:`~lookahead_ext.LookaheadBio`) goes through these functions instead of its own
loops, so a model with float32 and bfloat16 parameters works the same everywhere:

``KindGroups(tensors)``
    Positions of a tensor list grouped by (device, dtype); ``split(lst)`` cuts any
    parallel list (grads, masters, state) the same way.
``global_sq(lists_per_group, pairs, backend)``
    Dot products over all groups (one ``ops.multi_dot`` per group, summed by
    ``sum_parts``): the only correct way to take a norm over tensors of several dtypes.
``inv_norm(sq, eps)``
    1 / (sqrt(sq) + eps): a host float on the CPU, a 0-d device tensor elsewhere.
``zero_filled(grads, params)``
    A gradient list with None replaced by zeros of the parameter's dtype.
``base_step_(params, masters, grads, coefs, base, state, ...)``
    ``ops.combine_step_`` over tensors of any mix of devices/dtypes (one call per group).
``per_parameter_steps(states, base)``
    torch.optim's per-parameter state semantics: the parameters split by the age of their
    base state (SGD momentum buffer created or not, AdamW step count), each subset with
    its :class:`~lookahead_ext.ops.base_step.BaseStep`.
``state_buffer(p, st, name)`` / ``state_buffers(params, states, names)``
    Per-parameter state tensors (what a base step needs), created as zeros on first use.
``sync_slow_(slow, fast, alpha, params=None, ...)``
    The Lookahead outer step ``ops.lookahead_sync_`` per group: slow += alpha (fast - slow),
    fast = slow (and params = cast(fast) when ``fast`` are fp32 masters of ``params``).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..ops.base_step import ADAMW, SGD, BaseStep
from ..ops.plan_lists import PlanList, twin
from ._buckets import state_dtype


class KindGroups:
    """Positions of ``tensors`` grouped by (device, dtype), in order of first appearance.

    ``index``: one list of positions per group; ``kinds``: the (device, dtype) of each;
    ``single``: True when there is (at most) one group, so lists need no splitting.

    Args:
        tensors: the tensors to group (parameters, or any list parallel to them).
    """

    __slots__ = ("index", "kinds", "single")

    def __init__(self, tensors: Sequence[Tensor]):
        groups: dict = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)
        self.kinds = list(groups)
        self.index = list(groups.values())
        self.single = len(self.index) <= 1

    def __len__(self) -> int:
        return len(self.index)

    def split(self, lst: Optional[Sequence]) -> list:
        """``lst`` (parallel to the tensors) cut per group; None gives None per group."""
        if lst is None:
            return [None] * len(self.index)
        if self.single:
            return [lst] if self.index else []
        return [[lst[i] for i in idx] for idx in self.index]


def zero_filled(grads: Sequence[Optional[Tensor]], params: Sequence[Tensor]) -> list[Tensor]:
    """``grads`` with None replaced by zeros like the parameter (its dtype, so that every
    list handed to an op is of one dtype)."""
    if type(grads) is PlanList and all(g is not None for g in grads):  # the usual case: its column goes along
        return twin(grads)
    return PlanList([g if g is not None else torch.zeros_like(p, memory_format=torch.contiguous_format)
                     for g, p in zip(grads, params)])


def sum_parts(parts: list, n: int) -> Tensor:
    """Sum per-group results (1-D, n entries) in a fixed order, in float64 if any part is
    float64, on the first part's device; zeros when there is none."""
    if not parts:
        return torch.zeros(n)
    if len(parts) == 1:
        return parts[0]
    dt = torch.float64 if any(x.dtype == torch.float64 for x in parts) else torch.float32
    dev = parts[0].device
    out = parts[0].to(dt)
    for x in parts[1:]:
        out = out + x.to(device=dev, dtype=dt)
    return out


def global_sq(lists_per_group, pairs, backend: str = "auto") -> Tensor:
    """Global dot products: ``lists_per_group[i]`` is the list of tensor lists of group i
    (as for ``ops.multi_dot``, one device and dtype each); one multi_dot per group, summed
    with :func:`sum_parts`. E.g. ||g||^2 over groups: ``global_sq([[g] for g in gs], [(0, 0)])[0]``."""
    parts = [ops.multi_dot(lists, pairs, backend=backend)
             for lists in lists_per_group if lists and lists[0]]
    return sum_parts(parts, len(pairs))


def sqrt64(x: Tensor, scratch=None, key=None) -> Tensor:
    """sqrt in float64, correctly rounded as Python's math.sqrt on every device: ATen's
    vectorised CPU sqrt is not (SLEEF; about 1% of float32 inputs differ in the last bit),
    the complex one of a non-negative real is (std::sqrt); CUDA's sqrt is IEEE.
    ``scratch`` (device_flags.Scratch) and ``key``: computed into its buffers of that key
    (0-d ``x``; no allocation)."""
    if scratch is None:
        x = x.to(torch.float64)
        if x.device.type == "cpu":
            return x.to(torch.complex128).sqrt().real
        return x.sqrt()
    out = scratch((key, "sqrt"), torch.float64, x.device).copy_(x.reshape(()))
    if x.device.type == "cpu":
        c = scratch((key, "complex"), torch.complex128, x.device).copy_(out)
        return out.copy_(c.sqrt_().real)
    return out.sqrt_()


def inv_norm(sq, eps: float, on_device: bool = False, scratch=None, key=None):
    """1 / (||x|| + eps) from a squared norm (a 0-d tensor, or a float).

    CPU: a Python float computed in double precision: there is no device to wait for, and
    each 0-d tensor op costs microseconds, more than the fused passes of a small model.
    Elsewhere: a 0-d device tensor (no host sync). ``on_device`` (the device-flag mode, any
    device): a 0-d float64 tensor computed as the CPU's double-precision float, bit for bit
    (IEEE sqrt, add and divide); with ``scratch`` and ``key`` (see sqrt64) into its buffers."""
    if on_device:
        if scratch is not None:
            return sqrt64(sq, scratch, key).add_(eps).reciprocal_()
        return 1.0 / (sqrt64(sq) + eps)
    if isinstance(sq, float) or sq.device.type == "cpu":
        return 1.0 / (math.sqrt(float(sq)) + eps)
    return 1.0 / (sq.sqrt() + eps)


def state_buffer(p: Tensor, st: dict, name: str) -> Tensor:
    """``st[name]``, a persistent per-parameter tensor, created on first use as contiguous
    zeros in the state dtype (fp32 for bf16/fp16 parameters, else the parameter's)."""
    if name in st:
        return st[name]
    buf = st[name] = torch.zeros_like(p, dtype=state_dtype(p.dtype),
                                      memory_format=torch.contiguous_format)
    return buf


def state_buffers(params, states: Sequence[dict], names) -> dict:
    """{name: [per-parameter tensor]} from the per-parameter state dicts ``states``
    (see :func:`state_buffer`)."""
    return {name: PlanList([state_buffer(p, st, name) for p, st in zip(params, states)])
            for name in names}


def per_parameter_steps(states: Sequence[dict], base: BaseStep) -> list:
    """[(BaseStep, positions or None)]: the parameters split by the age of their base state,
    as torch.optim's per-parameter semantics require (AdamW: the step count after this
    update; SGD with momentum: whether the buffer is created now). None = all of them
    (the usual case: one age). AdamW's ``states[i]["step"]`` is advanced by the caller
    via :func:`advance_steps` after the update."""
    if base.kind == ADAMW:
        keys = [st.get("step", 0) + 1 for st in states]
    else:
        mom = base.momentum != 0.0
        keys = [mom and "momentum_buffer" not in st for st in states]

    def at(key):
        first, step = (bool(key), 1) if base.kind == SGD else (False, key)
        return base if (base.first, base.step) == (first, step) else \
            replace(base, first=first, step=step)
    if keys.count(keys[0]) == len(keys):
        return [(at(keys[0]), None)]
    sub: dict = {}
    for i, key in enumerate(keys):
        sub.setdefault(key, []).append(i)
    return [(at(key), idx) for key, idx in sub.items()]


def advance_steps(states: Sequence[dict], base: BaseStep) -> None:
    """Record AdamW's step count of an applied ``base`` in the per-parameter states."""
    if base.kind == ADAMW:
        for st in states:
            st["step"] = base.step


def base_step_(params, masters, grads, coefs, base: BaseStep, state: dict, v=None, v_coefs=None,
               v_sq_out: Optional[Tensor] = None, write_masters: bool = True,
               backend: str = "auto", groups: Optional[KindGroups] = None,
               skip_if: Optional[Tensor] = None) -> None:
    """``ops.combine_step_`` (d = sum c_i g_i, then the SGD/AdamW step with d, optional v
    update) over tensors of several devices/dtypes: one call per group of ``groups``
    (default: all tensors are of one device and dtype). Arguments as ops.combine_step_;
    ``state``: {name: per-parameter list}; ``skip_if``: a device flag (only with one
    group), passed only when given."""
    if groups is None or groups.single:
        extra = {} if skip_if is None else dict(skip_if=skip_if)
        ops.combine_step_(params, masters, grads, coefs, base, state, v, v_coefs,
                          v_sq_out=v_sq_out, write_masters=write_masters, backend=backend, **extra)
        return
    if skip_if is not None:
        raise ValueError("base_step_: skip_if needs tensors of one device and dtype")
    cut = groups.split
    gl = [cut(g) for g in grads]
    sl = {k: cut(x) for k, x in state.items()}
    for i, (ps, ms, vs) in enumerate(zip(cut(params), cut(masters), cut(v))):
        ops.combine_step_(ps, ms, tuple(g[i] for g in gl), coefs, base,
                          {k: x[i] for k, x in sl.items()}, vs, v_coefs, v_sq_out=v_sq_out,
                          write_masters=write_masters, backend=backend)


def sync_slow_(slow, fast, alpha: float, params=None, backend: str = "auto",
               groups: Optional[KindGroups] = None, skip_if: Optional[Tensor] = None) -> None:
    """Lookahead outer step per group: slow += alpha (fast - slow); fast = slow; and, when
    ``params`` are distinct from ``fast`` (fp32 masters of bf16/fp16 params),
    params = cast(fast). alpha = 1 is an exact copy on every backend. ``skip_if``: a device
    flag, nonzero = write nothing (passed to the op only when given)."""
    pieces = zip(groups.split(slow), groups.split(fast), groups.split(params)) \
        if groups is not None and not groups.single else [(slow, fast, params)]
    for s, f, p in pieces:
        if not s:
            continue
        aliased = p is None or all(a is b for a, b in zip(f, p))
        extra = {}
        if skip_if is not None:
            extra["skip_if"] = skip_if if skip_if.device == f[0].device else skip_if.to(f[0].device)
        ops.lookahead_sync_(s, f, alpha, params=None if aliased else p, backend=backend, **extra)

"""Helpers shared by every backend of the fused ops: precision rule, argument checks (the aliasing rules among them), linear combinations."""
from __future__ import annotations

import threading
from operator import add, attrgetter, is_, le
from typing import Optional, Sequence

import torch
from torch import Tensor

TensorList = Sequence[Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic happens in: float64 for float64 tensors, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(ts: TensorList, dtype: torch.dtype) -> list[Tensor]:
    """The tensors of `ts` in `dtype` (the same objects where they already have it)."""
    return [t if t.dtype == dtype else t.to(dtype) for t in ts]


def check_same_length(op: str, lists) -> int:
    """Length shared by the tensor lists of one op call (raises ValueError otherwise)."""
    n = len(lists[0]) if lists else 0
    for lst in lists:
        if len(lst) != n:
            raise ValueError(f"{op}: all tensor lists must have the same length")
    return n


def check_scale(scale) -> None:
    """perturb_'s `scale`: a float or a one-element tensor read as a scalar (0-d or [1])."""
    if isinstance(scale, Tensor) and scale.numel() != 1:
        raise ValueError(f"perturb_: scale must be a float or a tensor with one element, "
                         f"got shape {tuple(scale.shape)}")


def check_skip_if(op: str, skip_if, device) -> None:
    """The `skip_if` of combine_step_ / lookahead_sync_: None, or a real tensor with one element
    (0-d or [1]; any real dtype, bool included) on the op's device (`device`: a torch.device,
    or None when the op has no tensors). Checked before anything is written; host-only
    (dtype, shape, device: the value is never read)."""
    if skip_if is None:
        return
    if not isinstance(skip_if, Tensor):
        raise ValueError(f"{op}: skip_if must be None or a tensor with one element on the params' device, "
                         f"got {type(skip_if).__name__}")
    if skip_if.is_complex():
        raise ValueError(f"{op}: skip_if must be a real tensor (a float, integer or bool flag), got {skip_if.dtype}")
    if skip_if.numel() != 1:
        raise ValueError(f"{op}: skip_if must have one element (a 0-d flag), got shape {tuple(skip_if.shape)}")
    if device is not None and skip_if.device != torch.device(device):
        raise ValueError(f"{op}: skip_if is on {skip_if.device}, the tensors on {device}: it is read on the "
                         "device, never on the host")


def check_combine_scalars(params, base, skip_if) -> None:
    """combine_step_'s device scalars: skip_if (check_skip_if) and the base step's tensor
    fields (lr, step, first) on the params' device."""
    device = params[0].device if params else None
    check_skip_if("combine_step_", skip_if, device)
    if device is not None and base.on_device:
        for name in ("lr", "step", "first"):
            x = getattr(base, name)
            if isinstance(x, Tensor) and x.device != device:
                raise ValueError(f"combine_step_: base.{name} is on {x.device}, the params on {device}: "
                                 "it is read on the device, never on the host")


def skip_flag(skip_if: Tensor) -> Tensor:
    """0-d bool tensor on skip_if's device: skip_if != 0 (NaN counts as set). No host read."""
    return skip_if.detach().reshape(()) != 0


def skip_f32(skip_if: Optional[Tensor]) -> Optional[Tensor]:
    """skip_if as the kernels take it: a float32 one-element tensor on its device, 1.0 where
    it is set (any nonzero value, NaN included), else 0.0 (a device op, no host read)."""
    if skip_if is None:
        return None
    if skip_if.dtype == torch.float32 and not skip_if.requires_grad:
        return skip_if
    return skip_flag(skip_if).to(torch.float32)


def linear_combination(terms: Sequence[tuple[object, Optional[TensorList]]], like: TensorList, cdt) -> list[Tensor]:
    """sum_k coef_k * lists_k (elementwise over the list) in dtype `cdt`, skipping None lists
    and float zero coefficients; zeros shaped like `like` when no term remains."""
    acc = None
    for coef, lst in terms:
        if lst is None or (not isinstance(coef, Tensor) and coef == 0.0):
            continue
        x = upcast(lst, cdt)
        c = coef.to(cdt) if isinstance(coef, Tensor) else float(coef)
        term = torch._foreach_mul(x, c)
        acc = term if acc is None else torch._foreach_add(acc, term)
    if acc is None:
        acc = [torch.zeros_like(t, dtype=cdt) for t in like]
    return acc


def check_combine_extras(params, masters, v, v_sq_out, write_masters: bool) -> None:
    """Validate combine_step_'s v_sq_out / write_masters (shared by every backend)."""
    if v_sq_out is not None:
        if v is None:
            raise ValueError("combine_step_: v_sq_out needs v (it accumulates sum v_new^2)")
        if not isinstance(v_sq_out, Tensor) or v_sq_out.dtype != torch.float32 or v_sq_out.numel() != 1:
            raise ValueError("combine_step_: v_sq_out must be a float32 tensor with one element, got "
                             f"{getattr(v_sq_out, 'dtype', type(v_sq_out))} {tuple(getattr(v_sq_out, 'shape', ()))}")
        if params and v_sq_out.device != params[0].device:
            raise ValueError(f"combine_step_: v_sq_out is on {v_sq_out.device}, params on {params[0].device}")
    if not write_masters:
        for i, (p, m) in enumerate(zip(params, masters)):
            if p.dtype != m.dtype:
                raise ValueError(f"combine_step_: write_masters=False needs params of the masters' dtype "
                                 f"({m.dtype}); params[{i}] is {p.dtype}")


# ----------------------------------------------------------------------------- aliasing
# The rules (docs/backends.md, "Aliasing"): a tensor an op writes may share no byte of memory
# with any other tensor of the call, except the declared in-place pairs (perturb_'s out[i]
# and base[i], combine_step_'s params[i] and masters[i]), which may be the same view element
# for element (same start, dtype, shape and strides: every kernel reads an element of the
# pair before it writes it). Read-only tensors may overlap each other freely. A tensor's
# memory is its byte range from its first to one past its last element; two interleaved
# strided views of one buffer (x[::2], x[1::2]) count as overlapping. Empty tensors own no
# memory. Host-only: addresses, sizes and strides, no tensor is read.

_data_ptr = Tensor.data_ptr
_nbytes = attrgetter("nbytes")
_contiguous = Tensor.is_contiguous
IN_PLACE = {"perturb_": ("out", "base"), "combine_step_": ("params", "masters")}


def _extent(t: Tensor) -> int:
    """Bytes from t's first element to one past its last (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0
    return t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))


def _self_overlapping(t: Tensor) -> bool:
    """Two elements at one address (a stride-0 dimension of size > 1, e.g. an expand)."""
    return any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride()))


_ENGINE = threading.local()


def trust_engine_calls(on: bool) -> bool:
    """Skip the aliasing check of this thread's op calls while ``on`` (returns the previous
    setting). The probe runtime sets it around its own calls, never around user code: every
    tensor those calls write is a parameter (checked once when its bucket plan is built) or
    a buffer the optimizer allocated, so the per-call check would only cost host time
    (several hundred us for 600 tiny tensors, more than the Triton launch-plan path)."""
    prev = getattr(_ENGINE, "trusted", False)
    _ENGINE.trusted = on
    return prev


def check_aliasing(op: str, written, read=()) -> None:
    """ValueError when the op's written tensors overlap each other or a read tensor, beyond
    the op's in-place pair (IN_PLACE). ``written`` / ``read``: (name, tensor list or None)
    pairs; a single tensor (a scalar argument) may stand for a list. Sorts all tensors by
    start address once: O(n log n) in their number, host-only."""
    if getattr(_ENGINE, "trusted", False):
        return  # the runtime's own calls (trust_engine_calls)
    aliasing_errors(op, written, read)


def aliasing_errors(op: str, written, read=()) -> None:
    """check_aliasing, also for the runtime's own calls (e.g. its parameters, once per plan)."""
    if torch.compiler.is_compiling():  # traced: no addresses (the fake kernels check devices)
        return
    pair = IN_PLACE.get(op)
    given = {name: ts for name, ts in written}
    roles = []  # (name, tensors, written, single, first byte per tensor, end byte per tensor)
    for is_written, pairs in ((True, written), (False, read)):
        for name, ts in pairs:
            if ts is None:
                continue
            single = isinstance(ts, Tensor)
            ts = [ts] if single else ts
            if not ts:
                continue
            if pair is not None and name == pair[1] and _same_objects(given.get(pair[0]), ts):
                continue  # the in-place partner is the written list itself: nothing to add
            if not is_written and any(_same_objects(r[1], ts) for r in roles if not r[2]):
                continue  # a read list given twice (g0 is g+)
            first = list(map(_data_ptr, ts))
            if 0 in first:  # meta tensors (and some empty ones): no memory
                first = [x or -1 for x in first]
                last = [x if x < 0 else x + _extent(t) for x, t in zip(first, ts)]
            elif all(map(_contiguous, ts)):
                last = list(map(add, first, map(_nbytes, ts)))
            else:
                last = [x + _extent(t) for x, t in zip(first, ts)]
                if is_written:
                    for i, t in enumerate(ts):
                        if t.numel() and _self_overlapping(t):
                            raise ValueError(f"{op}: {name if single else f'{name}[{i}]'} (shape "
                                             f"{tuple(t.shape)}) has elements that share memory (a "
                                             "stride-0 dimension) and is written")
            roles.append((name, ts, is_written, single, first, last))
    if not any(r[2] for r in roles):
        return
    starts = [x for r in roles for x in r[4]]
    ends = [x for r in roles for x in r[5]]
    if len(starts) < 2:
        return
    # fast test, C-level loops: the k-th smallest end <= the (k+1)-th smallest start for every
    # k means no byte is covered twice (coverage at a start = starts so far - ends so far <= 1).
    # Failing it (an overlap, allowed or not) takes the exact sweep.
    first = sorted(starts)
    if all(map(le, sorted(ends), first[1:])):
        return
    _sweep(op, roles, starts, ends, pair)


def _same_objects(a, b) -> bool:
    return a is b or (a is not None and len(a) == len(b) and all(map(is_, a, b)))


def _sweep(op, roles, starts, ends, pair) -> None:
    """The exact check: runs of entries whose byte ranges chain together; every overlapping
    pair of a run with a written member must be the op's in-place pair."""
    owner = [(r, i) for r, role in enumerate(roles) for i in range(len(role[1]))]
    order = sorted(range(len(starts)), key=starts.__getitem__)
    end_max, lo = -1, 0
    for pos, j in enumerate(order + [None]):
        if j is None or starts[j] >= end_max:
            if pos - lo > 1:
                _check_run(op, order[lo:pos], starts, ends, owner, roles, pair)
            if j is not None:
                lo, end_max = pos, ends[j]
        elif ends[j] > end_max:
            end_max = ends[j]


def _name(role, i) -> str:
    return role[0] if role[3] else f"{role[0]}[{i}]"


def _check_run(op, run, starts, ends, owner, roles, pair) -> None:
    if not any(roles[owner[j][0]][2] for j in run):
        return
    for x, a in enumerate(run):
        for b in run[x + 1:]:
            if starts[b] >= ends[a] or starts[a] >= ends[b] or starts[a] == ends[a] or starts[b] == ends[b]:
                continue  # no common byte (an empty tensor, or chained by a third one)
            (ra, i), (rb, j) = owner[a], owner[b]
            role_a, role_b = roles[ra], roles[rb]
            if not role_a[2]:  # name the written one first
                (role_a, i), (role_b, j) = (role_b, j), (role_a, i)
            if not role_a[2]:
                continue  # two read-only tensors
            ta, tb = role_a[1][i], role_b[1][j]
            if (pair is not None and {role_a[0], role_b[0]} == set(pair) and i == j and starts[a] == starts[b]
                    and ta.dtype == tb.dtype and ta.shape == tb.shape and ta.stride() == tb.stride()):
                continue  # the in-place pair, element for element
            hint = (f"; only {pair[0]}[i] may be {pair[1]}[i] itself (the same view)" if pair else "")
            raise ValueError(f"{op}: {_name(role_a, i)} (shape {tuple(ta.shape)}) and {_name(role_b, j)} "
                             f"(shape {tuple(tb.shape)}) share memory, and {op} writes {_name(role_a, i)}: "
                             f"a written tensor must not overlap another tensor of the call{hint}")


def check_perturb_aliasing(out, base, direction, scale, backup) -> None:
    """perturb_: out and backup are written; out[i] may be base[i] itself."""
    check_aliasing("perturb_", (("out", out), ("backup", backup)),
                   (("base", base), ("direction", direction), ("scale", scale if isinstance(scale, Tensor) else None)))


def check_combine_aliasing(params, masters, grads, base, base_state: dict, v, v_coefs, v_sq_out,
                           write_masters: bool, skip_if=None) -> None:
    """combine_step_: params, masters (with write_masters), the base state buffers, v and
    v_sq_out are written; params[i] may be masters[i] itself; the gradient lists may alias
    each other; skip_if and the base step's device scalars are read."""
    if getattr(_ENGINE, "trusted", False):
        return  # before building the role lists: the runtime's own calls (trust_engine_calls)
    written = [("params", params), ("masters", masters if write_masters else None), ("v", v),
               ("v_sq_out", v_sq_out)] + [(name, base_state.get(name)) for name in base.state_names()]
    read = [("masters", None if write_masters else masters)]
    read += [(name, g) for name, g in zip(("g0", "gp", "gm"), grads)]
    read += [(f"v_coefs[{k}]", c) for k, c in enumerate(v_coefs or ()) if isinstance(c, Tensor)]
    read += [("skip_if", skip_if)]
    read += [(f"base.{n}", getattr(base, n)) for n in ("lr", "step", "first") if isinstance(getattr(base, n), Tensor)]
    check_aliasing("combine_step_", written, read)


def check_sync_aliasing(slow, fast, params, skip_if=None) -> None:
    """lookahead_sync_: slow, fast and params are all written; skip_if is read."""
    check_aliasing("lookahead_sync_", (("slow", slow), ("fast", fast), ("params", params)), (("skip_if", skip_if),))


def check_nonfinite_aliasing(lists, inv_scale) -> None:
    """nonfinite_ writes its tensors only when it unscales them (inv_scale given)."""
    if inv_scale is not None:
        check_aliasing("nonfinite_", [(f"lists[{k}]", lst) for k, lst in enumerate(lists)],
                       (("inv_scale", inv_scale),))


def check_nonfinite_out(lists, sq_norms: bool, out) -> None:
    """nonfinite_'s ``out``: the result's dtype (float32; float64 if any input is) and shape
    (() or [1 + len(lists)] with sq_norms) on the inputs' device, sharing no memory with them.
    The runtime's own calls (trust_engine_calls) are not checked: O(tensors) on the host."""
    if getattr(_ENGINE, "trusted", False):
        return
    flat = [t for lst in lists for t in lst]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in flat) else torch.float32
    shape = (1 + len(lists),) if sq_norms else ()
    device = flat[0].device if flat else out.device
    if not isinstance(out, torch.Tensor) or out.dtype != dtype or tuple(out.shape) != shape or out.device != device:
        got = (f"{out.dtype} of shape {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"nonfinite_: out must be a {dtype} tensor of shape {shape} on {device}, got {got}")
    check_aliasing("nonfinite_", (("out", out),), [(f"lists[{k}]", lst) for k, lst in enumerate(lists)])

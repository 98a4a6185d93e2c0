"""Pure-PyTorch reference implementations of the fused ops: the oracle.

Every fast backend (C++/CUDA in csrc/, Triton in kernels/) is tested against these
functions. They favour clarity and exactness over speed, but use torch._foreach_*
so that the reference path is a fair, reasonably fast baseline.

Precision rule shared by every backend: arithmetic happens in the dtype of the
optimizer state ("compute dtype"): float32 for float32/bfloat16/float16 parameters,
float64 for float64 parameters. Low-precision inputs are upcast on load and results
are cast once on store.

Numeric policy (docs/tolerances.md): each formula is evaluated in the order of torch's own
optimizers, with torch's ops, so a fused multiply-add happens exactly where torch's CPU
kernels have one (add with alpha, lerp, addcmul); the fused backends spell those out.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .base_step import ADAMW, BaseStep
from .helpers import (TensorList, check_combine_aliasing, check_combine_extras, check_combine_scalars,
                      check_nonfinite_aliasing, check_perturb_aliasing, check_same_length, check_scale, check_skip_if,
                      check_sync_aliasing, compute_dtype, linear_combination, skip_flag)
from .helpers import upcast as _up

Scalar = "float | Tensor"

__all__ = ["multi_dot", "perturb_", "combine_step_", "lookahead_sync_", "nonfinite_", "base_step_",
           # helpers re-exported under their old names (they live in helpers.py)
           "compute_dtype", "linear_combination", "check_combine_extras"]


def multi_dot(lists: Sequence[TensorList], pairs: Sequence[tuple[int, int]],
              per_tensor: bool = False) -> Tensor:
    """Dot products <lists[i], lists[j]> summed over all tensors, for each (i, j) in pairs.

    Returns a float32 tensor of shape [len(pairs)] (float64 if any input is float64),
    or [len(pairs), n_tensors] with per_tensor=True. <a, a> is the squared norm.
    Deterministic: each tensor's partial is summed in a fixed order.
    """
    n = check_same_length("multi_dot", lists)
    dt = torch.float64 if any(t.dtype == torch.float64 for lst in lists for t in lst) else torch.float32
    device = lists[0][0].device if n else torch.device("cpu")
    if n == 0:
        out = torch.zeros(len(pairs), 0, dtype=dt, device=device)
    else:
        up = [_up(lst, dt) for lst in lists]
        rows = []
        for i, j in pairs:
            prods = torch._foreach_mul(up[i], up[j])
            rows.append(torch.stack([p.sum() for p in prods]))
        out = torch.stack(rows) if rows else torch.zeros(0, n, dtype=dt, device=device)
    return out if per_tensor else out.sum(dim=1)


def perturb_(out: TensorList, base: TensorList, direction: TensorList, scale,
             backup: Optional[TensorList] = None) -> None:
    """out[i] <- cast(base[i] + scale * direction[i]); first backup[i] <- base[i] if given.

    Used for the probe points w +- rho * v / ||v|| (Algorithm 1, lines 9-10): `scale` is
    +-rho/||v|| as a 0-d tensor (no host sync) or a float. `out` may alias `base`
    (in-place perturbation of float32 parameters whose backup is written first).
    """
    check_scale(scale)  # before anything is written
    if not out:
        return
    check_perturb_aliasing(out, base, direction, scale, backup)
    cdt = compute_dtype((out if backup is None else backup)[0].dtype)
    if backup is not None:
        torch._foreach_copy_(list(backup), list(base))
        base = backup
    b = _up(base, cdt)
    d = _up(direction, cdt)
    # scale * direction rounded, then added (numeric policy, docs/tolerances.md): one formula
    # for a float and a tensor scale (add with alpha= would be a fused multiply-add)
    s = scale.reshape(()).to(cdt) if isinstance(scale, Tensor) else float(scale)
    res = torch._foreach_add(b, torch._foreach_mul(d, s))
    torch._foreach_copy_(list(out), res)


def base_step_(masters: TensorList, d: list[Tensor], base: BaseStep, state: dict) -> None:
    """Apply the torch.optim.SGD / AdamW update to masters with direction d (see base_step.py).

    `state` maps buffer names (base.state_names()) to tensor lists updated in place.
    `d` is consumed (may be modified in place). With device scalars (base.on_device) the
    scalars are base.device_entries(): the same doubles, used by ops that round them to the
    compute dtype as the Python-scalar ops do (add with alpha -> addcmul by a 0-d tensor:
    the same fused multiply-add; addcdiv -> its multiply, divide, add), no host read.
    """
    masters = list(masters)
    dev = base.on_device
    h = base.device_entries(masters[0].device) if dev and masters else None
    if base.kind == ADAMW:
        if base.weight_decay != 0.0:
            torch._foreach_mul_(masters, h[0] if dev else 1.0 - base.lr * base.weight_decay)
        m, s = list(state["exp_avg"]), list(state["exp_avg_sq"])
        torch._foreach_lerp_(m, d, 1.0 - base.beta1)
        torch._foreach_mul_(s, base.beta2)
        torch._foreach_addcmul_(s, d, d, 1.0 - base.beta2)
        denom = torch._foreach_sqrt(s)
        if not dev:
            step_size = base.lr / base.bias_correction1
            torch._foreach_div_(denom, base.bias_correction2**0.5)
            torch._foreach_add_(denom, base.eps)
            torch._foreach_addcdiv_(masters, m, denom, -step_size)
            return
        torch._foreach_div_(denom, _scalar(h[6]))
        torch._foreach_add_(denom, base.eps)
        upd = torch._foreach_mul(m, _scalar(-h[5]))  # addcdiv: s + (v*x)/y, each op rounded
        torch._foreach_div_(upd, denom)
        torch._foreach_add_(masters, upd)
        return
    if base.weight_decay != 0.0:
        torch._foreach_add_(d, masters, alpha=base.weight_decay)
    if base.momentum != 0.0:
        bufs = list(state["momentum_buffer"])
        if isinstance(base.first, Tensor):  # both updates, then a select: no host read
            first = h[5] != 0
            new = torch._foreach_mul(bufs, base.momentum)
            torch._foreach_add_(new, d, alpha=1.0 - base.dampening)
            torch._foreach_copy_(bufs, [torch.where(first, x, y) for x, y in zip(d, new)])
        elif base.first:
            torch._foreach_copy_(bufs, d)
        else:
            torch._foreach_mul_(bufs, base.momentum)
            torch._foreach_add_(bufs, d, alpha=1.0 - base.dampening)
        if base.nesterov:
            torch._foreach_add_(d, bufs, alpha=base.momentum)
        else:
            d = bufs
    if isinstance(base.lr, Tensor):  # w + (-lr) d as one fused multiply-add, as add(alpha=-lr)
        torch._foreach_addcmul_(masters, d, [_scalar(-h[0])] * len(masters))
    else:
        torch._foreach_add_(masters, d, alpha=-base.lr)


def _scalar(x):
    """A device_entries value for a foreach op: a 0-d tensor as it is, a host float as a float."""
    return x if isinstance(x, Tensor) else float(x)


def combine_step_(params: TensorList, masters: TensorList,
                  grads: Sequence[Optional[TensorList]], coefs: Sequence,
                  base: BaseStep, base_state: dict,
                  v: Optional[TensorList] = None, v_coefs: Optional[Sequence] = None,
                  v_sq_out: Optional[Tensor] = None, write_masters: bool = True,
                  skip_if: Optional[Tensor] = None) -> None:
    """The fused inner step (Algorithm 1, lines 12-16; eq. 9 and eq. 115), elementwise:

        d      = c0*g0 + cp*gp + cm*gm                      (eq. 9 for CMLR: c0 = 0)
        v_new  = bv*v + a0*g0 + ap*gp + am*gm               (eq. 115 with bv = beta/||v||,
                                                             ap = (1-beta)*gamma/||gp||, ...)
        w      <- base step of w with direction d           (torch SGD / AdamW)
        param  <- cast(w)

    grads = (g0, gp, gm), each a tensor list or None; coefs = (c0, cp, cm) floats.
    v_coefs = (bv, a0, ap, am), floats or 0-d tensors (kept on device: no host sync).
    v is updated in place and read before the update (v_new uses the old v).
    `params` may be the `masters` tensors themselves (float32 parameters updated in place
    without a separate master copy, as LookaheadBio does); read-only grad lists may alias
    each other (g0 is gp).

    v_sq_out: a float32 tensor of one element on the params' device (only with v):
        v_sq_out += sum_i <v_new_i, v_new_i>  (the values as stored into v; deterministic,
        multi_dot's summation: with v_sq_out zeroed, the CPU backend equals
        multi_dot([v], [(0, 0)]) on the updated v bitwise). The next step's ||v|| without
        another read pass of v.
    write_masters=False: the new w is written to `params` only; `masters` are only read
        (float32 parameters whose masters are scratch backups of w, rewritten by the next
        perturb_ with backup=masters). params must have the masters' dtype. Saves the
        4 B/elem masters write.
    skip_if: None, or a one-element real tensor on the params' device, read on the device
        (torch.where here, never a host read). Nonzero (NaN included): masters, v, every
        base-state buffer and v_sq_out keep their bits, and params <- cast(masters) (the
        restore of w after a probe; nothing else). Zero: the results of skip_if=None, bit
        for bit.
    base: its lr / step / first may be 0-d tensors on the params' device (BaseStep).
    """
    check_combine_extras(params, masters, v, v_sq_out, write_masters)
    check_combine_scalars(params, base, skip_if)
    if not params:
        return
    check_combine_aliasing(params, masters, grads, base, base_state, v, v_coefs, v_sq_out, write_masters, skip_if)
    if skip_if is None:
        _combine(params, masters, grads, coefs, base, base_state, v, v_coefs, v_sq_out, write_masters)
        return
    # every written tensor is computed as today, then its old bits are selected back where
    # skip_if is set (a select: no arithmetic on the old values, the new ones' NaNs never leak)
    skip = skip_flag(skip_if)
    kept = [list(masters) if write_masters else []] + [list(base_state[n]) for n in base.state_names()]
    kept += [list(v)] if v is not None else []
    kept += [[v_sq_out]] if v_sq_out is not None else []
    old = [[t.clone() for t in lst] for lst in kept]
    _combine(params, masters, grads, coefs, base, base_state, v, v_coefs, v_sq_out, write_masters)
    _select_old(skip, kept, old)
    torch._foreach_copy_(list(params), [torch.where(skip, m.to(p.dtype), p) for p, m in zip(params, masters)])


def _select_old(skip: Tensor, kept: list, old: list) -> None:
    """kept[k][i] <- old[k][i] where the 0-d bool `skip` is set (a select: bit for bit)."""
    for lst, olds in zip(kept, old):
        if lst:
            torch._foreach_copy_(lst, [torch.where(skip, o, t) for o, t in zip(olds, lst)])


def _combine(params, masters, grads, coefs, base, base_state, v, v_coefs, v_sq_out, write_masters) -> None:
    """combine_step_ without skip_if (arguments checked)."""
    cdt = masters[0].dtype
    if v is not None:
        bv, a0, ap, am = v_coefs
        newv = linear_combination([(bv, v), (a0, grads[0]), (ap, grads[1]), (am, grads[2])], v, cdt)
    d = linear_combination(list(zip(coefs, grads)), masters, cdt)
    aliased = all(p is m for p, m in zip(params, masters))
    w = list(masters) if write_masters or aliased else [m.clone() for m in masters]
    base_step_(w, d, base, base_state)
    if v is not None:
        torch._foreach_copy_(list(v), newv)
        if v_sq_out is not None:
            v_sq_out.add_(multi_dot([v], [(0, 0)])[0].reshape(v_sq_out.shape).to(v_sq_out.dtype))
    torch._foreach_copy_(list(params), w)


def lookahead_sync_(slow: TensorList, fast: TensorList, alpha: float,
                    params: Optional[TensorList] = None, skip_if: Optional[Tensor] = None) -> None:
    """Lookahead outer step (Algorithm 1, line 18): slow <- slow + alpha*(fast - slow), fast <- slow.

    `fast` is written with the new slow weights (cast to its dtype); when `params` is
    given (model parameters kept apart from fp32 fast masters) it is written too.
    skip_if: None, or a one-element real tensor on the tensors' device, read on the device:
    nonzero (NaN included) writes nothing (every tensor keeps its bits); zero is skip_if=None.
    """
    check_skip_if("lookahead_sync_", skip_if, slow[0].device if slow else None)
    if not slow:
        return
    check_sync_aliasing(slow, fast, params, skip_if)
    if skip_if is not None:
        skip = skip_flag(skip_if)
        kept = [list(slow), list(fast)] + ([list(params)] if params is not None else [])
        old = [[t.clone() for t in lst] for lst in kept]
        lookahead_sync_(slow, fast, alpha, params)
        _select_old(skip, kept, old)
        return
    cdt = slow[0].dtype
    torch._foreach_lerp_(list(slow), _up(fast, cdt), float(alpha))
    torch._foreach_copy_(list(fast), list(slow))
    if params is not None:
        torch._foreach_copy_(list(params), list(slow))


def nonfinite_(lists: Sequence[TensorList], inv_scale: Optional[Tensor] = None,
               sq_norms: bool = False) -> Tensor:
    """Return a 0-d float32 tensor: 1.0 if any element of any tensor is NaN/Inf, else 0.0.

    With inv_scale (a 0-d tensor, e.g. 1/GradScaler scale) every tensor is first multiplied
    in place by it (AMP unscale), as torch._amp_foreach_non_finite_check_and_unscale_ does.
    The check is on the unscaled values.

    sq_norms=True: return a 1-D tensor of length 1 + len(lists) instead: element 0 is the
    flag, element 1 + i the squared L2 norm of lists[i] over all its tensors (of the stored,
    unscaled values), summed as multi_dot([lists[i]], [(0, 0)]) does (float32; float64 if
    any input is float64). The fused backends read the data once for both.
    """
    check_nonfinite_aliasing(lists, inv_scale)
    flat = [t for lst in lists for t in lst]
    device = flat[0].device if flat else torch.device("cpu")
    flags = []
    for t in flat:
        if inv_scale is not None:
            cdt = compute_dtype(t.dtype)
            t.copy_(t.to(cdt) * inv_scale.to(cdt))
        if t.numel():
            flags.append(torch.logical_not(torch.isfinite(t).all()))
    if not flags:
        flag = torch.zeros((), dtype=torch.float32, device=device)
    else:
        flag = torch.stack(flags).any().to(torch.float32)
    if not sq_norms:
        return flag
    dt = torch.float64 if any(t.dtype == torch.float64 for t in flat) else torch.float32
    norms = [multi_dot([lst], [(0, 0)]).to(device=device, dtype=dt) if len(lst) else
             torch.zeros(1, dtype=dt, device=device) for lst in lists]
    return torch.cat([flag.to(dt).reshape(1)] + norms)

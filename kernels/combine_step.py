"""combine_step_: d = sum c_i g_i, the base step (torch SGD / AdamW) on the fp32 masters,
the momentum-v update and the parameter write, in one pass over memory.

    d      = c0*g0 + cp*gp + cm*gm                (terms with a None list or a 0.0 float dropped)
    v_new  = bv*v + a0*g0 + ap*gp + am*gm         (v_coefs: floats or 0-d device tensors)
    w      <- SGD / AdamW step of w with direction d
    param  <- cast(w)

All hyperparameters are runtime arguments (a new lr never recompiles); only the
structure (which lists are present, SGD/AdamW, momentum/nesterov/first step, dtypes) is
constexpr. The order of the floating-point operations mirrors reference.py.

write_masters=False (constexpr WRITE_W): the new w is stored to params only, the masters
are only read. v_sq_out (+= sum v_new^2) is fused (constexpr VSQ): each program stores
the sum of its new v's squares as multi_dot's <v, v> partials would (the same order, so the
same bits as a separate pass), and a fixed-order second pass adds them in place.
"""
from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from lookahead_ext.ops.base_step import ADAMW
from lookahead_ext.ops.helpers import check_combine_extras, skip_f32

from . import _mta

# table slots
_P, _W, _G0, _GP, _GM, _V, _S1, _S2 = range(8)
_NS = 8


@_mta.helper
def _term(acc, x, c, ADD: tl.constexpr):
    """acc + x * c when ADD (a term after the first), else x * c: one rounding per product
    and per sum, in the reference's order."""
    if ADD:
        return acc + x * c
    return x * c


@_mta.helper
def _scalar(ptr, val, IS_PTR: tl.constexpr):
    """A v coefficient: read on the device (a 0-d tensor) or the host float."""
    if IS_PTR:
        return tl.load(ptr).to(tl.float32)
    return val


@triton.jit
def _combine_kernel(
        table, work,
        c0, cp, cm,
        bv_ptr, a0_ptr, ap_ptr, am_ptr, bv_val, a0_val, ap_val, am_val,
        lr, weight_decay, momentum, one_minus_dampening,
        decay_factor, lerp_w, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
        skip_ptr, base_ptr, vsq_parts,
        P_DT: tl.constexpr, G0_DT: tl.constexpr, GP_DT: tl.constexpr, GM_DT: tl.constexpr,
        D0: tl.constexpr, DP: tl.constexpr, DM: tl.constexpr,
        HAS_V: tl.constexpr, V0: tl.constexpr, VP: tl.constexpr, VM: tl.constexpr,
        BV_PTR: tl.constexpr, A0_PTR: tl.constexpr, AP_PTR: tl.constexpr, AM_PTR: tl.constexpr,
        VB: tl.constexpr,
        ADAM: tl.constexpr, HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr,
        NESTEROV: tl.constexpr, FIRST: tl.constexpr, WRITE_W: tl.constexpr,
        HAS_SKIP: tl.constexpr, DEV_BASE: tl.constexpr, VSQ: tl.constexpr,
        FULL: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # HAS_SKIP: skip_ptr is skip_if (float32, one element): nonzero stores params <- cast(masters)
    # and nothing else. DEV_BASE: base_ptr is BaseStep.device_args (float64, layout in
    # ops/base_step.py): the scalars that derive from lr / step / first are read from it,
    # rounded once to float32 as the host floats are. VSQ: the program's sum of the new v's
    # squares goes to vsq_parts[col] (the v_sq_out pass fused: multi_dot's <v, v> partials,
    # same order of operations, so the same bits).
    row, c, col = _mta.work_item(table, work, 9)
    p_ptr = _mta.slot(row, 0, P_DT, ALIGNED)
    w_ptr = _mta.slot(row, 1, tl.float32, ALIGNED)
    g0_ptr = _mta.slot(row, 2, G0_DT, ALIGNED)
    gp_ptr = _mta.slot(row, 3, GP_DT, ALIGNED)
    gm_ptr = _mta.slot(row, 4, GM_DT, ALIGNED)
    v_ptr = _mta.slot(row, 5, tl.float32, ALIGNED)
    s1_ptr = _mta.slot(row, 6, tl.float32, ALIGNED)
    s2_ptr = _mta.slot(row, 7, tl.float32, ALIGNED)
    start, lim = _mta.chunk(c, tl.load(row + 8), FULL, BLOCK, ITERS)
    if HAS_SKIP:  # (integer arithmetic on the flag: the interpreter cannot AND a scalar into a mask)
        skip_i = (tl.load(skip_ptr) != 0.0).to(tl.int64)  # NaN: skipped too
        keep = skip_i == 0
    first_t = False
    if DEV_BASE:
        if ADAM:
            decay_factor = tl.load(base_ptr + 0).to(tl.float32)
            step_size = tl.load(base_ptr + 5).to(tl.float32)
            bc2_sqrt = tl.load(base_ptr + 6).to(tl.float32)
        else:
            lr = tl.load(base_ptr + 0).to(tl.float32)
            first_t = tl.load(base_ptr + 5) != 0.0
    if HAS_V:
        bv = _scalar(bv_ptr, bv_val, BV_PTR)
        a0 = _scalar(a0_ptr, a0_val, A0_PTR)
        ap = _scalar(ap_ptr, ap_val, AP_PTR)
        am = _scalar(am_ptr, am_val, AM_PTR)
    vsq = tl.full([BLOCK], 0.0, tl.float32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < lim
        mu = m  # the state and master stores (none when skipped)
        if HAS_SKIP:
            mu = offs < lim * (1 - skip_i)
        if D0 or V0:
            g0 = tl.load(g0_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if DP or VP:
            gp = tl.load(gp_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if DM or VM:
            gm = tl.load(gm_ptr + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0)
        w_old = w
        # d = sum of the present terms, accumulated in the reference's order
        d = tl.full([BLOCK], 0.0, tl.float32)
        if D0:
            d = _term(d, g0, c0, False)
        if DP:
            d = _term(d, gp, cp, D0)
        if DM:
            d = _term(d, gm, cm, D0 or DP)
        # momentum v (reads the old v)
        if HAS_V:
            nv = tl.full([BLOCK], 0.0, tl.float32)
            if VB:
                nv = _term(nv, tl.load(v_ptr + offs, mask=m, other=0.0), bv, False)
            if V0:
                nv = _term(nv, g0, a0, VB)
            if VP:
                nv = _term(nv, gp, ap, VB or V0)
            if VM:
                nv = _term(nv, gm, am, VB or V0 or VP)
            tl.store(v_ptr + offs, nv, mask=mu)
            if VSQ:  # masked lanes hold 0 (every load above has other=0)
                vsq += nv * nv
        # the base step
        if ADAM:
            if HAS_WD:
                w = w * decay_factor
            ea = tl.load(s1_ptr + offs, mask=m, other=0.0)
            sq = tl.load(s2_ptr + offs, mask=m, other=0.0)
            diff = d - ea
            ea = tl.where(lerp_w < 0.5, ea + lerp_w * diff, d - diff * (1.0 - lerp_w))
            sq = sq * beta2
            sq = sq + one_minus_beta2 * d * d
            denom = tl.div_rn(tl.sqrt_rn(sq), bc2_sqrt) + eps
            w = w + (-step_size) * tl.div_rn(ea, denom)
            tl.store(s1_ptr + offs, ea, mask=mu)
            tl.store(s2_ptr + offs, sq, mask=mu)
        else:
            if HAS_WD:
                d = d + weight_decay * w
            if MOMENTUM:
                if FIRST:
                    buf = d
                else:
                    buf = tl.load(s1_ptr + offs, mask=m, other=0.0)
                    buf = buf * momentum
                    buf = buf + one_minus_dampening * d
                    if DEV_BASE:
                        buf = tl.where(first_t, d, buf)
                tl.store(s1_ptr + offs, buf, mask=mu)
                if NESTEROV:
                    d = d + momentum * buf
                else:
                    d = buf
            w = w + (-lr) * d
        if WRITE_W:
            tl.store(w_ptr + offs, w, mask=mu)
        if HAS_SKIP:
            w = tl.where(keep, w, w_old)
        tl.store(p_ptr + offs, w.to(P_DT), mask=m)
    if VSQ:
        tl.store(vsq_parts + col, _mta.block_sum(vsq, axis=0))


def _present(coef, lst) -> bool:
    return lst is not None and (isinstance(coef, torch.Tensor) or float(coef) != 0.0)


def combine_step_(params, masters, grads, coefs, base, base_state, v=None, v_coefs=None,
                  v_sq_out=None, write_masters=True, skip_if=None) -> None:
    # write_masters=False's per-tensor dtype rule is checked on the columns below
    check_combine_extras(params, masters, v, v_sq_out, True)
    if not params:
        return
    g0, gp, gm = (g if g is None or isinstance(g, list) else list(g) for g in grads)
    c0, cp, cm = (float(c) for c in coefs)
    adam = base.kind == ADAMW
    if adam:
        s1, s2 = base_state["exp_avg"], base_state["exp_avg_sq"]
    elif base.uses_momentum:
        s1, s2 = base_state["momentum_buffer"], None
    else:
        s1 = s2 = None
    has_v = v is not None
    if has_v:
        bv, a0, ap, am = v_coefs
    else:
        bv = a0 = ap = am = 0.0
    flags = dict(D0=_present(c0, g0), DP=_present(cp, gp), DM=_present(cm, gm),
                 HAS_V=has_v, VB=has_v and _present(bv, v), V0=has_v and _present(a0, g0),
                 VP=has_v and _present(ap, gp), VM=has_v and _present(am, gm))
    # params that are their own masters: storing params is storing the masters
    write_w = bool(write_masters) or all(map(operator.is_, params, masters))
    prep = _mta.Prepared([params, masters, g0, gp, gm, v if has_v else None, s1, s2],
                         writes=(_P, _W, _V, _S1, _S2) if write_w else (_P, _V, _S1, _S2))
    if not write_masters and prep.cols[_P].dtypes != prep.cols[_W].dtypes:
        check_combine_extras(params, masters, v, v_sq_out, write_masters)  # raises, naming the tensor
    p = prep.plan()
    dev = prep.device
    sargs = [_mta.scalar_arg(x, dev, p.seg) for x in (bv, a0, ap, am)]
    cfg = _mta.CONFIG
    # the one host-side packing of the base step (BaseStep.kernel_args), unpacked per kind;
    # with device scalars, the kernel reads those from BaseStep.device_args (base_t)
    _, hyper, kflags = base.kernel_args()
    base_t = base.device_args(dev) if base.on_device else None
    skip = skip_f32(skip_if)
    vsq = has_v and v_sq_out is not None and p.n_cols > 0
    vsq_parts = p.scratch(1) if vsq else p.seg  # (p.seg: a placeholder pointer, never read)
    has_wd = float(base.weight_decay) != 0.0
    if adam:
        lr = wd = momentum = one_minus_damp = 0.0
        decay, lerp_w, beta2, one_minus_beta2, eps, step_size, bc2_sqrt = hyper
    else:
        lr, wd, momentum, dampening = hyper
        one_minus_damp = 1.0 - dampening
        decay = lerp_w = beta2 = one_minus_beta2 = eps = step_size = bc2_sqrt = 0.0
    for g in p.groups:
        for s in (_W, _V, _S1, _S2):
            if g.dtypes[s] not in (None, torch.float32):
                raise TypeError(f"triton combine_step_: optimizer state must be float32, got {g.dtypes[s]}")
        for work, nw, full in g.launches():
            _combine_kernel[(nw,)](
                g.table, work, c0, cp, cm,
                sargs[0][0], sargs[1][0], sargs[2][0], sargs[3][0],
                sargs[0][1], sargs[1][1], sargs[2][1], sargs[3][1],
                lr, wd, momentum, one_minus_damp,
                decay, lerp_w, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                work if skip is None else skip, work if base_t is None else base_t, vsq_parts,
                P_DT=_mta.tl_dtype(g.dtypes[_P]), G0_DT=_mta.tl_dtype(g.dtypes[_G0]),
                GP_DT=_mta.tl_dtype(g.dtypes[_GP]), GM_DT=_mta.tl_dtype(g.dtypes[_GM]),
                BV_PTR=sargs[0][2], A0_PTR=sargs[1][2], AP_PTR=sargs[2][2], AM_PTR=sargs[3][2],
                ADAM=adam, HAS_WD=has_wd, MOMENTUM=base.uses_momentum,
                NESTEROV=bool(base.nesterov), FIRST=bool(kflags[1]), WRITE_W=write_w,
                HAS_SKIP=skip is not None, DEV_BASE=base_t is not None, VSQ=vsq,
                FULL=full, ALIGNED=g.aligned, BLOCK=cfg.block, ITERS=cfg.iters, num_warps=cfg.num_warps, enable_fp_fusion=cfg.fp_fusion, **flags)
    prep.finish()
    if vsq:  # v_sq_out += ||v||^2 in place (unchanged bits when skipped: a select on the device)
        _mta.segsum_kernel[(1, 1)](vsq_parts, v_sq_out, p.total, vsq_parts.shape[1], 1,
                                   p.total if skip is None else skip, ACC=True, HAS_SKIP=skip is not None,
                                   BLOCK=cfg.seg_block, num_warps=cfg.num_warps, enable_fp_fusion=cfg.fp_fusion)

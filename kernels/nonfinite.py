"""nonfinite_: fused NaN/Inf check over many tensors, with optional in-place AMP unscale
(t <- cast(t * inv_scale), the check on the stored, unscaled values), like
torch._amp_foreach_non_finite_check_and_unscale_. Returns a 0-d float32 flag (1.0 if any
element is not finite). Per-program flags + a second pass: no atomics, no host sync.

sq_norms=True returns [flag, norm_0, ...] (float32): for one list the check kernel also
writes per-program partial sums of squares of the stored values (no second read pass);
for several lists, one multi_dot pass per list after the check.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _mta


@triton.jit
def _nonfinite_kernel(table, work, flags, sq_parts, inv_ptr, X_DT: tl.constexpr, UNSCALE: tl.constexpr,
                      SQ: tl.constexpr, FULL: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr, ITERS: tl.constexpr):
    row, c, col = _mta.work_item(table, work, 2)
    x_ptr = _mta.slot(row, 0, X_DT, ALIGNED)
    start, lim = _mta.chunk(c, tl.load(row + 1), FULL, BLOCK, ITERS)
    if UNSCALE:
        inv = tl.load(inv_ptr).to(tl.float32)
    bad = tl.full([BLOCK], 0.0, tl.float32)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < lim
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        if UNSCALE:
            x = (x.to(tl.float32) * inv).to(X_DT)
            tl.store(x_ptr + offs, x, mask=m)
        xf = x.to(tl.float32)
        # |x| <= FLT_MAX is false exactly for NaN and +-Inf. Masked lanes hold 0.
        ok = tl.abs(xf) <= 3.4028234663852886e38
        bad = tl.maximum(bad, tl.where(ok, 0.0, 1.0))
        if SQ:  # as multi_dot's <x, x> partials (same order of operations)
            acc += xf * xf
    tl.store(flags + col, _mta.block_max(bad, axis=0))
    if SQ:
        tl.store(sq_parts + col, _mta.block_sum(acc, axis=0))


def nonfinite_(lists, inv_scale=None, sq_norms=False, out=None) -> torch.Tensor:
    """``out``: a tensor of the result's dtype and shape to write it into."""
    if sq_norms and len(lists) == 1:
        return _nonfinite(lists[0], inv_scale, True, out)
    flag = _nonfinite(lists[0] if len(lists) == 1 else [t for lst in lists for t in lst], inv_scale, False,
                      None if sq_norms else out)
    if not sq_norms:
        return flag
    from .multi_dot import multi_dot
    parts = [flag.reshape(1)]
    for lst in lists:
        parts.append(multi_dot([lst], [(0, 0)]) if len(lst) else
                     torch.zeros(1, dtype=torch.float32, device=flag.device))
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


def _nonfinite(flat, inv_scale, sq: bool, out=None) -> torch.Tensor:
    """The check of one list (a PlanList keeps its checked column): a 0-d flag, or with
    `sq` [flag, sum of squares] (float32 [2]) from the same pass."""
    shape = 2 if sq else ()
    if not flat:
        return torch.zeros(shape, dtype=torch.float32) if out is None else out.zero_()
    device = flat[0].device
    prep = _mta.Prepared([flat], writes=(0,) if inv_scale is not None else ())
    p = prep.plan()
    if p.n_cols == 0:
        return torch.zeros(shape, dtype=torch.float32, device=device) if out is None else out.zero_()
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)  # both entries written below
    unscale = inv_scale is not None
    if unscale:
        if inv_scale.device != device:
            inv_scale = inv_scale.to(device)
        inv_ptr = inv_scale.reshape(-1)
    else:
        inv_ptr = p.seg
    flags, sq_parts = p.scratch_rows(2)  # per-program flags and partial sums of squares, owned by the plan
    cfg = _mta.CONFIG
    for g in p.groups:
        for work, nw, full in g.launches():
            _nonfinite_kernel[(nw,)](
                g.table, work, flags, sq_parts, inv_ptr,
                X_DT=_mta.tl_dtype(g.dtypes[0]), UNSCALE=unscale, SQ=sq,
                FULL=full, ALIGNED=g.aligned, BLOCK=cfg.block, ITERS=cfg.iters, num_warps=cfg.num_warps, enable_fp_fusion=cfg.fp_fusion)
    prep.finish()
    _mta.segmax_kernel[(1,)](flags, out, p.n_cols, BLOCK=cfg.seg_block, num_warps=cfg.num_warps, enable_fp_fusion=cfg.fp_fusion)
    if sq:
        _mta.segsum_kernel[(1, 1)](sq_parts, out[1:], p.total, p.n_cols, 1, p.total, ACC=False, HAS_SKIP=False,
                                   BLOCK=cfg.seg_block,
                                   num_warps=cfg.num_warps, enable_fp_fusion=cfg.fp_fusion)
    return out

"""lookahead_sync_: the Lookahead outer step over many tensors in one launch:

    slow  <- slow + alpha * (fast - slow)      (torch.lerp's formula, fp32)
    fast  <- cast(slow)
    param <- cast(slow)                        (when params are given)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lookahead_ext.ops.helpers import skip_f32

from . import _mta


@triton.jit
def _sync_kernel(table, work, alpha, skip_ptr,
                 SLOW_DT: tl.constexpr, FAST_DT: tl.constexpr, P_DT: tl.constexpr,
                 HAS_P: tl.constexpr, HAS_SKIP: tl.constexpr, FULL: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # HAS_SKIP: skip_ptr is skip_if (float32, one element): nonzero stores nothing
    row, c, _ = _mta.work_item(table, work, 4)
    slow_ptr = _mta.slot(row, 0, SLOW_DT, ALIGNED)
    fast_ptr = _mta.slot(row, 1, FAST_DT, ALIGNED)
    start, lim = _mta.chunk(c, tl.load(row + 3), FULL, BLOCK, ITERS)
    if HAS_SKIP:  # nothing in range when set (NaN too): integer arithmetic, as in combine_step
        lim = lim * (1 - (tl.load(skip_ptr) != 0.0).to(tl.int64))
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < lim
        s = tl.load(slow_ptr + offs, mask=m, other=0.0).to(tl.float32)
        f = tl.load(fast_ptr + offs, mask=m, other=0.0).to(tl.float32)
        diff = f - s
        s = tl.where(alpha < 0.5, s + alpha * diff, f - diff * (1.0 - alpha))
        tl.store(slow_ptr + offs, s.to(SLOW_DT), mask=m)
        tl.store(fast_ptr + offs, s.to(FAST_DT), mask=m)
        if HAS_P:
            p_ptr = _mta.slot(row, 2, P_DT, ALIGNED)
            tl.store(p_ptr + offs, s.to(P_DT), mask=m)


def lookahead_sync_(slow, fast, alpha: float, params=None, skip_if=None) -> None:
    if not slow:
        return
    skip = skip_f32(skip_if)
    prep = _mta.Prepared([slow, fast, params], writes=(0, 1, 2))
    p = prep.plan()
    cfg = _mta.CONFIG
    for g in p.groups:
        if g.dtypes[0] != torch.float32:
            raise TypeError(f"triton lookahead_sync_: slow weights must be float32, got {g.dtypes[0]}")
        for work, nw, full in g.launches():
            _sync_kernel[(nw,)](
                g.table, work, float(alpha), work if skip is None else skip,
                SLOW_DT=_mta.tl_dtype(g.dtypes[0]), FAST_DT=_mta.tl_dtype(g.dtypes[1]),
                P_DT=_mta.tl_dtype(g.dtypes[2]), HAS_P=params is not None, HAS_SKIP=skip is not None,
                FULL=full, ALIGNED=g.aligned, BLOCK=cfg.block, ITERS=cfg.iters, num_warps=cfg.num_warps, enable_fp_fusion=cfg.fp_fusion)
    prep.finish()

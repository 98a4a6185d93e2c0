"""perturb_: the probe write out <- cast(base + scale * direction), backup <- base first.

`scale` is a 0-d device tensor (read in-kernel through its pointer: no host sync) or a
float. `out` may alias `base` (each element is read before it is written by the same
program).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _mta


@triton.jit
def _perturb_kernel(table, work, scale_ptr, scale_val,
                    OUT_DT: tl.constexpr, BASE_DT: tl.constexpr, DIR_DT: tl.constexpr,
                    BACKUP_DT: tl.constexpr, HAS_BACKUP: tl.constexpr, SCALE_PTR: tl.constexpr,
                    FULL: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr, ITERS: tl.constexpr):
    row, c, _ = _mta.work_item(table, work, 5)
    out_ptr = _mta.slot(row, 0, OUT_DT, ALIGNED)
    base_ptr = _mta.slot(row, 1, BASE_DT, ALIGNED)
    dir_ptr = _mta.slot(row, 2, DIR_DT, ALIGNED)
    start, lim = _mta.chunk(c, tl.load(row + 4), FULL, BLOCK, ITERS)
    if SCALE_PTR:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = scale_val
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < lim
        b = tl.load(base_ptr + offs, mask=m, other=0.0)
        if HAS_BACKUP:
            bk_ptr = _mta.slot(row, 3, BACKUP_DT, ALIGNED)
            b = b.to(BACKUP_DT)
            tl.store(bk_ptr + offs, b, mask=m)
        d = tl.load(dir_ptr + offs, mask=m, other=0.0).to(tl.float32)
        res = b.to(tl.float32) + scale * d
        tl.store(out_ptr + offs, res.to(OUT_DT), mask=m)


def perturb_(out, base, direction, scale, backup=None) -> None:
    if not out:
        return
    prep = _mta.Prepared([out, base, direction, backup], writes=(0, 3))
    p = prep.plan()
    cfg = _mta.CONFIG
    sp, sv, is_ptr = _mta.scalar_arg(scale, prep.device, p.seg)
    for g in p.groups:
        for work, nw, full in g.launches():
            _perturb_kernel[(nw,)](
                g.table, work, sp, sv,
                OUT_DT=_mta.tl_dtype(g.dtypes[0]), BASE_DT=_mta.tl_dtype(g.dtypes[1]),
                DIR_DT=_mta.tl_dtype(g.dtypes[2]), BACKUP_DT=_mta.tl_dtype(g.dtypes[3]),
                HAS_BACKUP=backup is not None, SCALE_PTR=is_ptr,
                FULL=full, ALIGNED=g.aligned, BLOCK=cfg.block, ITERS=cfg.iters, num_warps=cfg.num_warps, enable_fp_fusion=cfg.fp_fusion)
    prep.finish()

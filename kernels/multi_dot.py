"""multi_dot: global dot products / squared norms over tensor lists (deterministic).

One launch reads two lists X, Y and produces up to three products <X,X>, <Y,Y>, <X,Y>
(each a row of per-program partials); a fixed-order second pass (segsum) sums the
partials per tensor (per_tensor=True) or over everything. No atomics.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _mta


@triton.jit
def _dot_kernel(table, work, partials, n_cols, row_xx, row_yy, row_xy,
                X_DT: tl.constexpr, Y_DT: tl.constexpr, HAS_Y: tl.constexpr,
                DO_XX: tl.constexpr, DO_YY: tl.constexpr, DO_XY: tl.constexpr,
                FULL: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr, ITERS: tl.constexpr):
    row, c, col = _mta.work_item(table, work, 3)
    x_ptr = _mta.slot(row, 0, X_DT, ALIGNED)
    if HAS_Y:
        y_ptr = _mta.slot(row, 1, Y_DT, ALIGNED)
    start, lim = _mta.chunk(c, tl.load(row + 2), FULL, BLOCK, ITERS)
    acc_xx = tl.full([BLOCK], 0.0, tl.float32)
    acc_yy = tl.full([BLOCK], 0.0, tl.float32)
    acc_xy = tl.full([BLOCK], 0.0, tl.float32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < lim
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if DO_XX:
            acc_xx += x * x
        if HAS_Y:
            y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if DO_YY:
                acc_yy += y * y
            if DO_XY:
                acc_xy += x * y
    if DO_XX:
        tl.store(partials + row_xx * n_cols + col, _mta.block_sum(acc_xx, axis=0))
    if DO_YY:
        tl.store(partials + row_yy * n_cols + col, _mta.block_sum(acc_yy, axis=0))
    if DO_XY:
        tl.store(partials + row_xy * n_cols + col, _mta.block_sum(acc_xy, axis=0))


_SCHEDULES: dict = {}


def _launches(pairs: tuple):
    """Unique products (unordered list pairs) and a schedule of launches, each reading at
    most two lists: cross products first (with the matching squares), then the remaining
    squares two at a time. Cached per `pairs`; also returns the output row of each pair
    (None when the rows are the products in order)."""
    hit = _SCHEDULES.get(pairs)
    if hit is not None:
        return hit
    keys = []
    for i, j in pairs:
        k = (min(i, j), max(i, j))
        if k not in keys:
            keys.append(k)
    todo = list(keys)
    sched = []  # (x, y or None, HAS_Y, DO_XX, DO_YY, DO_XY, row_xx, row_yy, row_xy)
    for k in [k for k in keys if k[0] != k[1]]:
        i, j = k
        job = {"xy": k}
        for name, d in (("xx", (i, i)), ("yy", (j, j))):
            if d in todo:
                job[name] = d
                todo.remove(d)
        todo.remove(k)
        sched.append((i, j, job))
    diag = [k for k in todo if k[0] == k[1]]
    for a in range(0, len(diag), 2):
        i = diag[a][0]
        if a + 1 < len(diag):
            j = diag[a + 1][0]
            sched.append((i, j, {"xx": diag[a], "yy": diag[a + 1]}))
        else:
            sched.append((i, None, {"xx": diag[a]}))
    jobs = []
    for x, y, job in sched:
        rows = {name: keys.index(k) for name, k in job.items()}
        jobs.append((x, y, y is not None, "xx" in rows, "yy" in rows, "xy" in rows,
                     rows.get("xx", 0), rows.get("yy", 0), rows.get("xy", 0)))
    idx = [keys.index((min(i, j), max(i, j))) for i, j in pairs]
    res = _SCHEDULES[pairs] = (len(keys), jobs, None if idx == list(range(len(keys))) else idx)
    return res


def _partials(lists, jobs, n_keys):
    """Launch the schedule; returns (partials [n_keys, n_cols] owned by the first plan, that
    plan). Each launch's plan has the same rows, hence the same chunk columns."""
    cfg = _mta.CONFIG
    partials = first = None
    for x, y, has_y, do_xx, do_yy, do_xy, row_xx, row_yy, row_xy in jobs:
        prep = _mta.Prepared([lists[x], lists[y] if has_y else None])
        p = prep.plan()
        if partials is None:
            partials, first = p.scratch(n_keys), p
        for g in p.groups:
            for work, nw, full in g.launches():
                _dot_kernel[(nw,)](
                    g.table, work, partials, partials.shape[1], row_xx, row_yy, row_xy,
                    X_DT=_mta.tl_dtype(g.dtypes[0]), Y_DT=_mta.tl_dtype(g.dtypes[1]),
                    HAS_Y=has_y, DO_XX=do_xx, DO_YY=do_yy, DO_XY=do_xy, FULL=full, ALIGNED=g.aligned,
                    BLOCK=cfg.block, ITERS=cfg.iters, num_warps=cfg.num_warps, enable_fp_fusion=cfg.fp_fusion)
    return partials, first


def multi_dot(lists: Sequence[Sequence[torch.Tensor]], pairs, per_tensor: bool = False) -> torch.Tensor:
    n = len(lists[0]) if lists else 0
    for lst in lists:
        if len(lst) != n:
            raise ValueError("multi_dot: all tensor lists must have the same length")
    pairs = tuple([tuple(p) for p in pairs])
    device = lists[0][0].device if n else torch.device("cpu")
    if n == 0 or not pairs:
        out = torch.zeros(len(pairs), n, dtype=torch.float32, device=device)
        return out if per_tensor else out.sum(dim=1)
    n_keys, jobs, idx = _launches(pairs)
    partials, p = _partials(lists, jobs, n_keys)
    if p.n_cols == 0:
        res = torch.zeros(n_keys, n if per_tensor else 1, dtype=torch.float32, device=device)
    elif per_tensor:
        res = _mta.segsum(partials, p.seg, n)
    else:
        res = _mta.segsum(partials, p.total, 1)
    out = res if idx is None else res[torch.tensor(idx, device=device)]
    return out if per_tensor else out.reshape(len(pairs))

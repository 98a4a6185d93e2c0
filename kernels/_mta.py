"""Multi-tensor apply for the Triton kernels: pointer tables, work lists, their cache.

Design (works compiled on CUDA and under TRITON_INTERPRET=1 on CPU; checked in both):

- A launch covers many tensors. Row r of the *table* holds the int64 data pointers of
  the r-th tensor of every "slot" (params, masters, grads, state...) plus its numel:
  ``table[r * (S + 1) + s]`` is slot s, ``table[r * (S + 1) + S]`` the numel. A kernel
  loads a pointer and casts it back with ``.to(tl.pointer_type(DT))``; DT is a
  constexpr per slot, so there is one compiled kernel per dtype combination.
  (The interpreter dereferences raw host addresses, so the same int64 -> pointer cast
  works there on CPU tensors.)
- The *work list* has one entry per program: (row, chunk index in that row, global
  chunk column). A program handles CHUNK = BLOCK * ITERS consecutive elements of one
  tensor; reductions write one partial per program at its global column and a
  fixed-order second pass sums them (deterministic, no atomics).
- Rows are grouped by their dtype tuple and by whether all their pointers are 16-byte
  aligned (one launch per group and FULL/tail kind): a list may mix dtypes; aligned groups
  get `tl.multiple_of(ptr, 16)` hints. Whole chunks (FULL) use the chunk end as the mask
  bound, which the compiler can prove divisible: with aligned pointers that gives 128-bit
  vector accesses (checked in tests/triton_compile_check.py); tail chunks use numel.
- Tables are cached in two levels, both keyed by content, so a cached table can never
  disagree with the tensors it is used for. A *column* is one validated tensor list: its
  tensors' (pointer, dtype, numel), all contiguous; equal contents share one interned
  column with a serial uid. A *plan* (tables + work lists) is cached per (device, chunk,
  column uids). An address reused by the caching allocator for another tensor of the same
  size and dtype yields the same, still correct, column. Cached plans are never mutated.
  A plain list is read in full on every call (4 reads per tensor, C-level maps); a
  PlanList (lookahead_ext.ops.plan_lists) keeps its column: O(1) per list within a step,
  two maps (addresses, version counters) at a new step, a full read at a new epoch: the
  persistent launch plans of the engine.
- Non-contiguous tensors are handled by a contiguous copy (written back for outputs).
"""
from __future__ import annotations

import itertools
import operator
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from lookahead_ext.ops.plan_lists import ADDRESS, FULL, OWNER, PlanList, epoch, step

# TRITON_INTERPRET is read by @triton.jit when a kernel is *defined*: record the mode the
# kernels of this package were defined in.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16, torch.float64: tl.float64}
SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
# tl.multiple_of(ptr, 16) on pointers loaded from the table when all of a launch's pointers
# are 16-byte aligned (LOOKAHEAD_EXT_TRITON_ALIGN=0 disables it, for the benchmark).
ALIGN_HINTS = os.environ.get("LOOKAHEAD_EXT_TRITON_ALIGN", "1") != "0"


class _InterpretedHelper:
    """A jit device function under the interpreter, called without re-patching the language
    module: the calling kernel's launch has patched it already, and the interpreter's own
    per-call patch costs ~1.4 ms (most of a small launch's time in CI)."""

    def __init__(self, jitted):
        self.jitted = jitted

    def __call__(self, *args, **kwargs):
        return self.jitted.rewrite()(*args, **kwargs)


def device_fn(jitted):
    """A jit device function as kernels should call it: itself when compiled, without the
    interpreter's per-call language patch when interpreted."""
    return _InterpretedHelper(jitted) if hasattr(jitted, "rewrite") else jitted


def helper(fn):
    """@triton.jit for a device function that kernels call (see device_fn)."""
    return device_fn(triton.jit(fn))


# tl.sum / tl.max are jit functions of triton.language.standard (tl.zeros too: kernels call
# tl.full instead): these are the same functions, called cheaply under the interpreter
block_sum = device_fn(tl.sum)
block_max = device_fn(tl.max)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class Config:
    """Launch configuration. BLOCK elements per vector op, ITERS vector ops per program
    (CHUNK = BLOCK * ITERS elements per program), num_warps on GPU. The interpreter wants
    few, large programs; the GPU wants enough programs to fill the machine."""
    block: int
    iters: int
    num_warps: int
    seg_block: int = 1024  # second-pass reduction block
    # FMA contraction off: the ops are memory-bound, and separate roundings mirror the
    # reference's op-by-op arithmetic (and silence Triton 3.9's default-change warning).
    fp_fusion: bool = os.environ.get("LOOKAHEAD_EXT_TRITON_FP_FUSION", "0") == "1"

    @property
    def chunk(self) -> int:
        return self.block * self.iters


if INTERPRET:
    CONFIG = Config(block=_env_int("LOOKAHEAD_EXT_TRITON_BLOCK", 1024),
                    iters=_env_int("LOOKAHEAD_EXT_TRITON_ITERS", 1), num_warps=1, seg_block=256)
else:
    CONFIG = Config(block=_env_int("LOOKAHEAD_EXT_TRITON_BLOCK", 1024),
                    iters=_env_int("LOOKAHEAD_EXT_TRITON_ITERS", 8),
                    num_warps=_env_int("LOOKAHEAD_EXT_TRITON_WARPS", 4))


def set_config(block: Optional[int] = None, iters: Optional[int] = None,
               num_warps: Optional[int] = None) -> Config:
    """Change the launch configuration (benchmark sweeps); clears the table cache."""
    if block is not None:
        if block & (block - 1) or block < 16:
            raise ValueError("block must be a power of two >= 16")
        CONFIG.block = block
    if iters is not None:
        CONFIG.iters = max(1, int(iters))
    if num_warps is not None:
        CONFIG.num_warps = int(num_warps)
    cache_clear()
    return CONFIG


# ----------------------------------------------------------------------------- plans
@dataclass
class Group:
    dtypes: tuple            # torch dtype (or None for an absent slot) per slot
    table: torch.Tensor      # int64 [rows * (S + 1)]
    work: torch.Tensor       # int64 [n_work * 3]: full chunks first, then tail chunks
    n_work: int
    rows: list               # original row indices
    n_full: int = 0          # leading work entries whose chunk lies wholly inside its tensor
    aligned: bool = False    # every pointer of the group is 16-byte aligned

    def __post_init__(self):
        # (work list, programs, FULL) per launch: whole chunks run unmasked-in-effect (mask
        # bound = chunk end, known to the compiler: vectorized accesses), partial last
        # chunks with the tensor's numel as bound. Sliced once: plans are reused.
        self._launches = []
        if self.n_full:
            self._launches.append((self.work, self.n_full, True))
        if self.n_work > self.n_full:
            self._launches.append((self.work[3 * self.n_full:], self.n_work - self.n_full, False))

    def launches(self):
        return self._launches


@dataclass
class Plan:
    groups: list
    seg: torch.Tensor        # int64 [n + 1]: global chunk column range of each row
    n_cols: int              # total chunks (= partials per reduced quantity)
    total: torch.Tensor      # int64 [2] = (0, n_cols): one segment over every chunk
    _scratch: dict = field(default_factory=dict)

    def scratch(self, rows: int) -> torch.Tensor:
        """float32 [rows, n_cols]: per-program partials that a call reduces before it
        returns, a view of one buffer per (device, stream) that every plan shares (calls on
        one stream run in order; calls on two streams get their own): a new plan (e.g. for
        gradients at new addresses) allocates none."""
        dev = self.seg.device
        key = (rows, torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else None)
        buf = self._scratch.get(key)
        if buf is None:
            n = rows * max(self.n_cols, 1)
            buf = self._scratch[key] = _shared_scratch(dev, key[1], n)[:n].view(rows, max(self.n_cols, 1))
        return buf

    def scratch_rows(self, rows: int) -> tuple:
        """The rows of `scratch(rows)` as views, made once (indexing a tensor costs ~2 us)."""
        dev = self.seg.device
        key = ("rows", rows, torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else None)
        views = self._scratch.get(key)
        if views is None:
            views = self._scratch[key] = tuple(self.scratch(rows).unbind(0))
        return views


@dataclass(frozen=True, eq=False)
class Column:
    """One validated, contiguous tensor list, interned by content (equal contents: the same
    object, hence the same uid)."""
    uid: int
    ptrs: tuple
    dtypes: tuple
    numels: tuple
    fp64: bool               # some tensor is float64: the op goes to the reference


class Float64(Exception):
    """Raised before any launch when a list holds float64 tensors (the backend then
    delegates the call to the reference implementation)."""


_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_contiguous = torch.Tensor.is_contiguous
_dtype = operator.attrgetter("dtype")
_UIDS = itertools.count()
_COLUMNS: "OrderedDict[tuple, Column]" = OrderedDict()
COLUMNS_SIZE = 256


def column(tensors: list) -> Column:
    """The interned column of a list of contiguous tensors: every tensor read (C-level maps)."""
    return intern((tuple(map(_data_ptr, tensors)), tuple(map(_dtype, tensors)), tuple(map(_numel, tensors))))


def intern(key: tuple, fields: Optional[tuple] = None) -> Column:
    """The one Column of (addresses, dtypes, sizes) = ``fields``, stored under ``key``
    (default: the fields themselves; column_like keys by a shorter equivalent)."""
    col = _COLUMNS.get(key)
    if col is None:
        fields = key if fields is None else fields
        col = Column(next(_UIDS), *fields, torch.float64 in fields[1])
        _COLUMNS[key] = col
        if len(_COLUMNS) > COLUMNS_SIZE:
            _COLUMNS.popitem(last=False)
    else:
        _COLUMNS.move_to_end(key)
    return col


_CACHE: "OrderedDict[tuple, Plan]" = OrderedDict()
CACHE_SIZE = 64


_SCRATCH: dict = {}  # (device, stream) -> the float32 buffer of Plan.scratch (grown as needed)


def _shared_scratch(device: torch.device, stream, n: int) -> torch.Tensor:
    buf = _SCRATCH.get((device, stream))
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[(device, stream)] = torch.empty(max(n, 2 * (0 if buf is None else buf.numel())),
                                                       dtype=torch.float32, device=device)
    return buf


def cache_clear() -> None:
    """Forget every cached plan and column (PlanLists re-check on their next use)."""
    _CACHE.clear()
    _COLUMNS.clear()
    _SCRATCH.clear()


def plan(slots: Sequence[Optional[Sequence[torch.Tensor]]], device: torch.device,
         cols: Optional[Sequence[Optional[Column]]] = None) -> Plan:
    """Build (or fetch from cache) the tables for `slots`: S lists (None = absent slot) of
    n contiguous tensors each; row r is (slots[0][r], ..., slots[S-1][r]). `cols`: the
    slots' columns when the caller has them (Prepared), else they are read here.

    Hot path (cache hit): a dict lookup on the columns' uids. Row sizes and devices are
    validated when a plan is built; a hit has the same pointers, dtypes and sizes as a
    validated plan (with UVA a pointer also names its device)."""
    if cols is None:
        cols = [None if s is None else column(list(s)) for s in slots]
    chunk = CONFIG.chunk
    key = (device, chunk, tuple([None if c is None else c.uid for c in cols]))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    p = _build(slots, cols, device, chunk)
    _CACHE[key] = p
    if len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return p


def _build(slots, cols, device, chunk) -> Plan:
    present = [i for i, c in enumerate(cols) if c is not None]
    n = len(cols[present[0]].ptrs)
    numels = cols[present[0]].numels
    for i in present:
        for r, t in enumerate(slots[i]):
            if t.device != device:
                raise ValueError(f"triton backend: tensors on different devices ({device}, {t.device})")
            if cols[i].numels[r] != numels[r]:
                raise ValueError(f"triton backend: size mismatch in row {r}: "
                                 f"{tuple(slots[present[0]][r].shape)} vs {tuple(t.shape)}")
    key_rows = []
    for r in range(n):
        row = [numels[r]]
        for c in cols:
            row.append(None if c is None else (c.ptrs[r], c.dtypes[r]))
        key_rows.append(tuple(row))

    # global chunk columns, row-major
    seg = [0]
    for r in range(n):
        seg.append(seg[-1] + (key_rows[r][0] + chunk - 1) // chunk)
    # one launch group per (dtype tuple, alignment): a few misaligned views (e.g. slices of
    # a flat buffer) do not take the vector path away from the aligned tensors
    by_dtypes: "OrderedDict[tuple, list]" = OrderedDict()
    for r in range(n):
        dts = tuple(None if e is None else e[1] for e in key_rows[r][1:])
        row_aligned = ALIGN_HINTS and (key_rows[r][0] == 0 or all(
            e is None or e[0] % 16 == 0 for e in key_rows[r][1:]))
        by_dtypes.setdefault((dts, row_aligned), []).append(r)
    flat: list[int] = list(seg) + [0, seg[-1]]
    layout = []
    for (dts, aligned), rows in by_dtypes.items():
        t_off = len(flat)
        for r in rows:
            flat.extend(0 if e is None else e[0] for e in key_rows[r][1:])
            flat.append(key_rows[r][0])
        w_off = len(flat)
        full, tail = [], []
        for gr, r in enumerate(rows):
            numel = key_rows[r][0]
            for c in range(seg[r + 1] - seg[r]):
                (full if (c + 1) * chunk <= numel else tail).extend((gr, c, seg[r] + c))
        flat.extend(full)
        flat.extend(tail)
        n_work = (len(full) + len(tail)) // 3
        layout.append((dts, rows, t_off, w_off, n_work, len(full) // 3, aligned))
    meta = torch.tensor(flat, dtype=torch.int64).to(device, non_blocking=True)
    groups = [Group(dts, meta[t_off:w_off], meta[w_off:w_off + 3 * n_work], n_work, rows,
                    n_full, aligned)
              for dts, rows, t_off, w_off, n_work, n_full, aligned in layout]
    return Plan(groups, meta[:n + 1], seg[-1], meta[n + 1:n + 3])


# ----------------------------------------------------------------------------- inputs
_version = operator.attrgetter("_version")


def checked(lst: PlanList) -> Optional[Column]:
    """The column a PlanList keeps, if still valid: as it is within the step it was checked
    in; in a later step of the same epoch, after the re-check its ``check`` asks for (see
    ops/plan_lists.py: addresses and version counters, addresses only, or none); else None
    (read it in full)."""
    col = lst._col
    if col is None or lst._epoch != epoch():
        return None
    st = step()
    if lst._step == st:
        return col
    mode = lst.check
    if mode == ADDRESS:
        if tuple(map(_data_ptr, lst)) != col.ptrs:
            return None
    elif mode != OWNER and (lst._seen is None or lst._seen != (tuple(map(_data_ptr, lst)), tuple(map(_version, lst)))):
        return None
    lst._step = st
    return col


def keep(lst: PlanList, col: Column) -> None:
    """Record `col`, just read from `lst`'s tensors, as its column for this step. The version
    counters that a later step re-checks (check "full") are read from a list's second full
    read on: a list used in one step only (a probe's gradients) is read once, without them."""
    seen = lst._epoch != -1 and lst.check == FULL
    lst._col, lst._epoch, lst._step = col, epoch(), step()
    lst._seen = (col.ptrs, tuple(map(_version, lst))) if seen else None


def column_like(lst: PlanList) -> Optional[Column]:
    """The column of a list made with ``like=`` (a gradient list): its addresses and
    contiguity read (two maps), dtypes and sizes those of ``like``'s column when that one is
    valid (``checked``); None when it is not (or ``lst`` is not contiguous, or the lengths
    differ): read in full."""
    like = lst.like
    if len(like) != len(lst):
        return None
    lc = checked(like)  # O(1) for the engine's parameter lists (check "owner")
    if lc is None:
        return None
    if not all(map(_contiguous, lst)):
        return None
    ptrs = tuple(map(_data_ptr, lst))
    # `lc` is interned: its uid stands for its dtypes and sizes (no hashing of them)
    return intern((ptrs, lc.uid), (ptrs, lc.dtypes, lc.numels))


class Prepared:
    """Contiguous views/copies of the slot lists and their columns; `plan()` gives their
    tables, `finish()` writes back the copies made for non-contiguous outputs. Raises
    Float64 (before anything is written) when a list holds float64 tensors.

    A PlanList checked in this epoch is taken as it is (O(1)); any other list is read in
    full (contiguity, pointers, dtypes, sizes) and a PlanList keeps what was read."""

    def __init__(self, slots, writes=()):
        self.slots = []
        self.cols = []
        self._back = []
        n = None
        for si, lst in enumerate(slots):
            if lst is None:
                self.slots.append(None)
                self.cols.append(None)
                continue
            col = None
            if type(lst) is PlanList:
                col = checked(lst)
                if col is None and lst.like is not None:
                    col = column_like(lst)
                    if col is not None:
                        keep(lst, col)
            if col is None:
                if not isinstance(lst, list):
                    lst = list(lst)
                if all(map(_contiguous, lst)):
                    col = column(lst)
                    if type(lst) is PlanList:
                        keep(lst, col)
                else:
                    out = []
                    for t in lst:
                        if not t.is_contiguous():
                            c = t.contiguous()
                            if si in writes:
                                self._back.append((t, c))
                            t = c
                        out.append(t)
                    lst = out
                    col = column(lst)
            if n is None:
                n = len(lst)
            elif len(lst) != n:
                raise ValueError("triton backend: all tensor lists of an op must have the same length")
            if col.fp64:
                raise Float64()
            self.slots.append(lst)
            self.cols.append(col)
        self.n = n or 0
        first = next((s for s in self.slots if s), None)
        self.device = first[0].device if first else None

    def plan(self) -> Plan:
        return plan(self.slots, self.device, self.cols)

    def finish(self):
        for t, c in self._back:
            t.copy_(c)


def tl_dtype(dt):
    return tl.float32 if dt is None else TL_DTYPE[dt]


def scalar_arg(x, device, dummy):
    """(pointer, value, is_pointer) for a scalar given as a float or a 0-d tensor."""
    if isinstance(x, torch.Tensor):
        if x.device != device:
            if x.device.type == "cpu":
                return dummy, float(x), False
            x = x.to(device)
        return x.reshape(-1), 0.0, True
    return dummy, float(x), False


# ----------------------------------------------------------------------------- kernel preamble
@helper
def work_item(table, work, ROW: tl.constexpr):
    """This program's work item: its tensor's table row (ROW int64 slots), the chunk index
    within the tensor and the partial-sum column."""
    pid = tl.program_id(0).to(tl.int64)
    return table + tl.load(work + 3 * pid) * ROW, tl.load(work + 3 * pid + 1), tl.load(work + 3 * pid + 2)


@helper
def slot(row, i, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Slot i of a table row as a pointer to DT; ALIGNED: every pointer of the launch is
    16-byte aligned (the hint that gives whole chunks 128-bit loads)."""
    ptr = tl.load(row + i).to(tl.pointer_type(DT))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@helper
def chunk(c, n, FULL: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """(first element, mask limit) of chunk c of a tensor of n elements. FULL: the whole
    chunk is in range, and its end as the limit is a mask the compiler can vectorize."""
    start = c * (BLOCK * ITERS)
    if FULL:
        return start, start + BLOCK * ITERS
    return start, n


# ----------------------------------------------------------------------------- second pass
@triton.jit
def segsum_kernel(src, dst, seg, n_src_cols, n_segs, skip_ptr, ACC: tl.constexpr, HAS_SKIP: tl.constexpr,
                  BLOCK: tl.constexpr):
    """dst[row, s] (+)= sum(src[row, seg[s]:seg[s+1]]) in a fixed order (row = axis 1);
    ACC: add to dst (float32) instead of overwriting it; HAS_SKIP: dst keeps its value when
    the float32 flag at skip_ptr is nonzero (NaN too)."""
    s = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = tl.load(seg + s)
    end = tl.load(seg + s + 1)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(src + row * n_src_cols + idx, mask=idx < end, other=0.0)
    total = block_sum(acc, axis=0)
    if ACC:
        old = tl.load(dst + row * n_segs + s)
        total = old + total
        if HAS_SKIP:
            total = tl.where(tl.load(skip_ptr) != 0.0, old, total)
    tl.store(dst + row * n_segs + s, total)


@triton.jit
def segmax_kernel(src, dst, n, BLOCK: tl.constexpr):
    """dst[0] = max(src[0:n]) (single program; order-independent)."""
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for off in range(0, n, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc = tl.maximum(acc, tl.load(src + idx, mask=idx < n, other=0.0))
    tl.store(dst, block_max(acc, axis=0))


def segsum(src: torch.Tensor, seg: torch.Tensor, n_segs: int) -> torch.Tensor:
    """src [R, C] float32 -> [R, n_segs] with segment boundaries seg (int64 [n_segs + 1])."""
    R, C = src.shape
    dst = torch.empty(R, n_segs, dtype=torch.float32, device=src.device)
    if R == 0 or n_segs == 0:
        return dst
    segsum_kernel[(n_segs, R)](src, dst, seg, C, n_segs, seg, ACC=False, HAS_SKIP=False, BLOCK=CONFIG.seg_block,
                               num_warps=CONFIG.num_warps,
                               enable_fp_fusion=CONFIG.fp_fusion)
    return dst

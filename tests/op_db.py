"""op_db: sample inputs of every fused op (torch OpInfo style), the backend rows and their tolerances.

A *row* is a backend on one device type present on this machine (ops.backend_rows()); ROWS
gives each its sizes (the Triton interpreter is slow: small sizes), its tolerance table and
whether its own reductions are bitwise reproducible (v_sq_out == its multi_dot of v).
An OpInfo yields SampleInputs for (row, dtype, size): arguments, which arguments the op
writes (compared with the reference under a tolerance *kind*), the expected return kind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from lookahead_ext import ops
from lookahead_ext.ops import BaseStep

from _compare import EXACT, Tol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Sizes (numel per tensor of one list). The native CPU kernels work in 16K-element chunks, the
# Triton interpreter in 1024-element programs: each set crosses its backend's chunk edges.
SIZES = {
    # Triton interpreter: chunk 1024 elements
    "empty": [0],
    "one": [1],
    "odd": [7, 33],
    "prime": [5003],
    "many": [1 + (i * 7) % 13 for i in range(40)],
    "mixed": [0, 1, 4097, 3, 1024, 1025, 257],
    # native: 16K chunks; a prime above 64K, a prime above 1M, 300 small tensors, mixed
    "edge_mixed": [0, 1, 7, 3, 4099, 0, 70001, 1, 257, 16, 65537],
    "large": [1_000_003],
    "many_small": [((i * 37) % 61) + 1 for i in range(300)],
    # compiled Triton / CUDA: realistic sizes
    "gpu_large": [3_000_017, 1 << 20, 12345, 0, 65537],
    "gpu_many": [1 + (i * 7919) % 200_000 for i in range(200)],
    # offset (misaligned) and non-contiguous views: see _views
    "views": None,
    # hand-made inputs independent of size (overflow, mixed dtypes, aliasing)
    "special": None,
}
# (view kind, shape): a view at element offset 1, a transposed matrix, channels-last, a stride-3 slice
VIEW_SPECS = [("offset", (4099,)), ("t", (7, 5)), ("channels_last", (3, 4, 5, 6)), ("step", (34,))]


# Tolerance per (table, kind, dtype). Kinds: "state" fp32 optimizer state and masters; "param"
# a tensor written in its own dtype; "reduce" a float32 reduction (dot products, norms);
# "unscaled" values unscaled in place by nonfinite_; "exact" copies and flags.
TOLS = {
    # native: the kernels do the reference's fp32 operations in its order and with its fused
    # multiply-adds (docs/tolerances.md, "Numeric policy"; bitwise on CPU, test_numeric_policy.py,
    # but for AdamW's sqrt: torch's is not correctly rounded); the CUDA reference orders a few ops
    # differently;
    # a value cast to bf16/fp16 may land one unit away at a rounding boundary; reductions sum
    # in double per chunk (the reference uses torch's fp32 cascade); one multiply is exact.
    "native": {
        "state": {torch.float32: Tol(2e-6, 2e-6)},
        "param": {torch.float32: Tol(2e-6, 2e-6), torch.bfloat16: Tol(8e-3, 1e-5), torch.float16: Tol(1e-3, 1e-6)},
        "reduce": {torch.float32: Tol(2e-5, 1e-4)},
        "unscaled": {d: EXACT for d in DTYPES},
    },
    # triton: the interpreter rounds toward zero on the final cast (the GPU to nearest): one
    # ulp of the dtype plus fp32 slack for bf16/fp16.
    "triton": {
        "state": {torch.float32: Tol(1e-5, 1e-6)},
        "param": {torch.float32: Tol(1e-5, 1e-6), torch.bfloat16: Tol(1e-5, 1e-6, 1.001),
                  torch.float16: Tol(1e-5, 1e-6, 1.001)},
        "reduce": {torch.float32: Tol(2e-5, 1e-5)},
        "unscaled": {torch.float32: Tol(1e-5, 1e-6), torch.bfloat16: Tol(1e-5, 1e-6, 1.001),
                     torch.float16: Tol(1e-5, 1e-6, 1.001)},
    },
}


def tol(table: str, kind: str, dtype: torch.dtype) -> Tol:
    if kind == "exact":
        return EXACT
    return TOLS[table][kind][dtype]


@dataclass(frozen=True)
class Row:
    """One backend on one device type, with what the matrix runs on it."""
    backend: str
    device: str
    sizes: tuple[str, ...]
    tol: str
    bitwise_self: bool  # v_sq_out / sq_norms equal the row's own multi_dot bitwise
    optim_steps: int = 20
    fp32_backup: bool = False  # perturb_ of bf16/fp16 params in place with a float32 backup
    mixed_dot: bool = False    # multi_dot over a list that mixes dtypes

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.device}"

    @property
    def full_size(self) -> str:
        """The size at which every variant (all schemes x bases, ...) runs."""
        return self.sizes[0]


_SMALL = ("mixed", "empty", "one", "odd", "prime", "many", "views", "special")
ROWS = {
    ("native", "cpu"): Row("native", "cpu", ("edge_mixed", "large", "many_small", "views", "special"), "native", True),
    ("native", "cuda"): Row("native", "cuda", ("edge_mixed", "large", "many_small", "views", "special"), "native",
                            False),
    ("triton", "cpu"): Row("triton", "cpu", _SMALL, "triton", True, optim_steps=7,
                           fp32_backup=True, mixed_dot=True),
    ("triton", "cuda"): Row("triton", "cuda", _SMALL + ("gpu_large", "gpu_many"), "triton", True, optim_steps=7,
                            fp32_backup=True, mixed_dot=True),
    # the CUDA kernels on the CPU through HIP-CPU (tests/_cuda_emu.py), the native tolerances (the
    # same la_math.h): every variant at small sizes (fibers are slow), edge_mixed crosses its 64K
    # chunks; fewer optimizer steps
    ("cuda_emu", "cpu"): Row("cuda_emu", "cpu", ("mixed", "edge_mixed", "one", "views", "special"), "native", False,
                             optim_steps=10),
}
# a backend without an entry (e.g. one registered by another module) gets the small sizes
DEFAULT_ROW = dict(sizes=_SMALL, tol="native", bitwise_self=False)


def present_rows() -> list[Row]:
    """The rows of the backends present on this machine (no rows for absent ones)."""
    out = []
    for name, dev in ops.backend_rows():
        out.append(ROWS.get((name, dev)) or Row(name, dev, **DEFAULT_ROW))
    return out


# ----------------------------------------------------------------------------- tensors
def _gen(seed: int, kind: str, scale: float):
    g = torch.Generator().manual_seed(seed)

    def values(n):
        if kind == "nan":
            return torch.full((n,), float("nan"))
        x = torch.rand(n, generator=g) if kind == "rand" else torch.randn(n, generator=g)
        return x * scale
    return values


def _views(dtype, values) -> list[torch.Tensor]:
    out = []
    for kind, shape in VIEW_SPECS:
        n = math.prod(shape)
        if kind == "offset":
            out.append(values(n + 1).to(dtype)[1:])
        elif kind == "t":
            out.append(values(n).reshape(shape[::-1]).to(dtype).t())
        elif kind == "channels_last":
            out.append(values(n).reshape(shape).to(dtype).to(memory_format=torch.channels_last))
        else:
            out.append(values(3 * n).to(dtype)[::3])
    return out


def make(size, dtype, device, seed: int = 0, kind: str = "randn", scale: float = 1.0) -> list[torch.Tensor]:
    """One tensor list of size set `size` (a name of SIZES, "views": non-contiguous and offset
    views; or a list of sizes)."""
    values = _gen(seed, kind, scale)
    if size == "views":
        ts = _views(dtype, values)
    else:
        ts = [values(n).to(dtype) for n in (SIZES[size] if isinstance(size, str) else size)]
    return [t.to(device) for t in ts]


# ----------------------------------------------------------------------------- samples
@dataclass
class SampleInput:
    """Arguments of one op call. `writes`: (argument path, tolerance kind) of what the op writes,
    a path is an argument index or (index, key) into a dict argument; `ret`: the kind of the
    return value (None: returns None). `changes`: paths that must change (a no-op kernel fails).
    `expect`: the exact return value where it is known by construction."""
    name: str
    args: tuple
    writes: list = field(default_factory=list)
    ret: Optional[str] = None
    changes: tuple = ()
    expect: object = None
    check: Optional[Callable] = None       # (impl, args after the call, result): hand-checked values
    self_check: Optional[Callable] = None  # the same, for rows whose reductions are bitwise their own


@dataclass
class OpInfo:
    name: str
    sample_inputs: Callable  # (row, dtype, size) -> iterable of SampleInput


def _poison(like):
    return [torch.full_like(t, float("nan")) for t in like]


# -- multi_dot
PAIR_SETS = {
    "sq": (1, [(0, 0)]),
    "two_sq": (2, [(0, 0), (1, 1)]),
    "cross": (2, [(0, 1), (1, 0), (0, 0), (1, 1)]),
    "three": (3, [(2, 2), (0, 0), (1, 2), (1, 1)]),
}


def multi_dot_samples(row, dtype, size):
    dev = row.device
    if size == "special":
        a = [torch.randn(5), torch.randn(2000).bfloat16(), torch.randn(3).half()]
        for per_tensor in ((False, True) if row.mixed_dot else ()):
            yield SampleInput(f"mixed_dtypes_per_tensor={per_tensor}", ([[t.to(dev) for t in a]], [(0, 0)], per_tensor),
                              ret="reduce")
        hand = [[torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-4.0])], [torch.tensor([0.5, 0.5, 2.0]), torch.tensor([3.0])]]
        hand = [[t.to(dev) for t in lst] for lst in hand]
        yield SampleInput("hand_checked", (hand, [(0, 0), (0, 1)], True), ret="reduce", expect=[[14.0, 16.0], [7.5, -12.0]])
        yield SampleInput("empty_lists", ([[]], [(0, 0)], False), ret="reduce", expect=[0.0])
        return
    for pname, (k, pairs) in PAIR_SETS.items():
        if size != row.full_size and pname not in ("cross",):
            continue
        lists = [make(size, torch.float32 if i == 1 else dtype, dev, seed=i) for i in range(k)]
        for per_tensor in (False, True):
            yield SampleInput(f"{pname}_per_tensor={per_tensor}", (lists, pairs, per_tensor), ret="reduce")


# -- perturb_
def perturb_samples(row, dtype, size):
    dev = row.device
    if size == "special":
        x = torch.zeros(64, device=dev)
        one = torch.ones(64, device=dev)
        yield SampleInput("hand_checked", ([x], [one], [one], 1.0), writes=[(0, "param")], check=_all_two)
        bk = torch.zeros(3, device=dev)
        yield SampleInput("one_element_scale", ([torch.zeros(3, device=dev)], [torch.ones(3, device=dev)],
                                                [torch.ones(3, device=dev)], torch.tensor([0.5], device=dev), [bk]),
                          writes=[(0, "param"), (4, "exact")])
        return
    base = make(size, torch.float32, dev, seed=1)       # fp32 masters
    for mode in ("tensor_scale", "float_scale", "backup", "inplace_backup_fp32", "inplace_backup_same_dtype",
                 "fp32_direction"):
        direction = make(size, torch.float32 if mode == "fp32_direction" else dtype, dev, seed=2)
        scale = 0.61 if mode == "float_scale" else torch.tensor(-0.37, device=dev)
        if mode == "inplace_backup_fp32" and dtype != torch.float32 and not row.fp32_backup:
            continue  # the native kernels take a backup of the params' dtype
        if mode.startswith("inplace_backup"):  # params perturbed in place, backup written first
            w = make(size, dtype, dev, seed=4)
            bk = _poison(w) if mode.endswith("same_dtype") else _poison([t.float() for t in w])
            # bf16/fp16: |scale d| below half an ulp of w leaves an element as it was (~2%)
            yield SampleInput(mode, (w, w, direction, scale, bk), writes=[(0, "param"), (4, "exact")],
                              changes=(0,) if dtype == torch.float32 else ())
        elif mode == "backup":
            out = _poison(make(size, dtype, dev))
            yield SampleInput(mode, (out, base, direction, scale, _poison(base)),
                              writes=[(0, "param"), (4, "exact")])
        else:
            yield SampleInput(mode, (_poison(make(size, dtype, dev)), base, direction, scale), writes=[(0, "param")])


def _all_two(impl, args, _):
    assert torch.all(args[0][0] == 2.0)


# -- combine_step_
# (which grads are given, d coefficients, v coefficients: "t" a 0-d tensor, "zero" a 0-d zero tensor,
# a float as it is, None: no v) as the optimizers call them
SCHEMES = {
    "central": ((False, True, True), (0.0, 1.5, -0.5), ("t", "zero", "t", "t")),   # CMLR, eq. 9/115
    "forward": ((True, True, False), (-1.0, 2.0, 0.0), ("t", "t", "t", "zero")),   # FMLR, eq. 6
    "forward_floats": ((True, True, False), (0.8, 0.2, 0.0), (0.5, 0.2, 0.3, 0.0)),  # float v coefs, a zero
    "central_base": ((True, True, True), (1.0, 1.0, -1.0), None),                 # CLR, eq. 8
    "sam": ((True, True, False), (0.0, 1.0, 0.0), None),                          # SAM: c0 = 0
    "float_vcoefs": ((False, True, True), (0.0, 0.75, 0.25), (0.8, 0.0, 0.1, 0.1)),
    "g0_only": ((True, False, False), (1.0, 0.0, 0.0), None),
}
BASES = {
    "sgd_plain": BaseStep("sgd", lr=0.1),
    "sgd_mom_first": BaseStep("sgd", lr=0.05, momentum=0.9, weight_decay=1e-2, first=True),
    "sgd_mom": BaseStep("sgd", lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "sgd_nesterov": BaseStep("sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adamw": BaseStep("adamw", lr=1e-2, weight_decay=0.1, step=1),
    "adamw_t7": BaseStep("adamw", lr=3e-3, weight_decay=0.0, beta1=0.8, beta2=0.99, eps=1e-6, step=7),
    "adamw_t5": BaseStep("adamw", lr=3e-3, weight_decay=0.0, beta1=0.6, beta2=0.99, step=5),
}
# at the row's other sizes: one case per code path (momentum SGD, AdamW, Nesterov, v_sq_out, ...)
REDUCED = [("central", "sgd_mom", "plain"), ("central", "adamw", "plain"), ("forward_floats", "sgd_nesterov", "plain"),
           ("central", "sgd_mom", "v_sq_out"), ("forward", "adamw", "v_sq_out"),
           ("float_vcoefs", "sgd_nesterov", "v_sq_out"), ("central", "sgd_mom", "no_write_masters"),
           ("central", "adamw", "no_write_masters_v_sq_out")]


def combine_inputs(size, dtype, dev, scheme, base: BaseStep, seed=0):
    use, coefs, vpat = SCHEMES[scheme]
    masters = make(size, torch.float32, dev, seed=seed + 10)
    grads = tuple(make(size, dtype, dev, seed=seed + 20 + i) if u else None for i, u in enumerate(use))
    state = {name: make(size, torch.float32, dev, seed=seed + 30 + j, kind="rand" if "sq" in name else "randn",
                        scale=0.1) for j, name in enumerate(base.state_names())}
    v = vc = None
    if vpat is not None:
        v = make(size, torch.float32, dev, seed=seed + 40)
        vals = (0.9 * 0.37, 0.05 * 0.21, 0.05 * 0.19, 0.05 * 0.33)
        vc = tuple(torch.tensor(x, device=dev) if p == "t" else torch.zeros((), device=dev) if p == "zero" else p
                   for x, p in zip(vals, vpat))
    return masters, grads, coefs, state, v, vc


def _combine_sample(name, size, dtype, dev, scheme, bname, variant="plain"):
    base = BASES[bname]
    masters, grads, coefs, state, v, vc = combine_inputs(size, dtype, dev, scheme, base)
    wm = "no_write_masters" not in variant
    pdt = dtype if wm else torch.float32  # write_masters=False takes params of the masters' dtype
    params = _poison(make(size, pdt, dev))  # every element must be written
    acc = torch.zeros(1, device=dev) if variant.endswith("v_sq_out") and v is not None else None
    writes = [(0, "param"), (1, "state" if wm else "exact")] + [((5, k), "state") for k in state]
    if v is not None:
        writes.append((6, "state"))
    if acc is not None:
        writes.append((8, "reduce"))
    return SampleInput(name, (params, masters, grads, coefs, base, state, v, vc, acc, wm), writes=writes,
                       changes=(1,) if wm else (0,), self_check=_vsq_self if acc is not None else None)


def _vsq_self(impl, args, _):
    """v_sq_out is the backend's own multi_dot of the stored v, bitwise."""
    assert torch.equal(args[8], impl.multi_dot([args[6]], [(0, 0)]).reshape(1)), "v_sq_out != multi_dot(v)"


def combine_samples(row, dtype, size):
    dev = row.device
    if size == "special":
        yield from _combine_aliases(dev, dtype)
        return
    if size == row.full_size:
        for scheme in SCHEMES:
            for bname in BASES:
                # bf16/fp16 change the loads and the store, not the fp32 step: 5 schemes x 6 bases
                if dtype != torch.float32 and (scheme in ("forward_floats", "g0_only") or bname == "adamw_t5"):
                    continue
                yield _combine_sample(f"{scheme}-{bname}", size, dtype, dev, scheme, bname)
    for scheme, bname, variant in REDUCED:
        if "no_write_masters" in variant and dtype != torch.float32:
            continue
        if size == row.full_size and variant == "plain":
            continue
        yield _combine_sample(f"{scheme}-{bname}-{variant}", size, dtype, dev, scheme, bname, variant)


def _combine_aliases(dev, dtype):
    """Read-only grads aliasing each other (g0 is g+); fp32 params that are their own masters."""
    g = torch.Generator().manual_seed(0)

    def r(*n):
        return [torch.randn(k, generator=g).to(dev) for k in n]
    p = r(1001, 37)
    gg = [t.to(dtype) for t in r(1001, 37)]
    yield SampleInput("aliased_grads", ([t.to(dtype) for t in p], [t.clone() for t in p], (gg, gg, None),
                                        (0.5, 0.25, 0.0), BaseStep(lr=0.1), {}, None, None, None, True),
                      writes=[(0, "param"), (1, "state")], changes=(1,))
    if dtype != torch.float32:
        return
    for kind in ("sgd", "adamw"):
        for wm in (True, False):
            p = r(4099, 5)
            bs = BaseStep(kind=kind, lr=0.05, momentum=0.9 if kind == "sgd" else 0.0, first=True)
            st = {n: [torch.zeros_like(t) for t in p] for n in bs.state_names()}
            v = r(4099, 5)
            acc = torch.zeros(1, device=dev)
            yield SampleInput(f"params_are_masters_{kind}_write_masters={wm}",
                              (p, p, (None, r(4099, 5), None), (0.0, 1.0, 0.0), bs, st, v, (0.5, 0.0, 0.1, 0.0),
                               acc, wm),
                              writes=[(0, "state"), (6, "state"), (8, "reduce")] + [((5, k), "state") for k in st],
                              changes=(0,))


# -- lookahead_sync_
def sync_samples(row, dtype, size):
    dev = row.device
    if size == "special":  # by hand: slow = 1 + 0.25 (3 - 1) = 1.5 everywhere
        slow, fast = [torch.ones(5, device=dev), torch.ones(0, device=dev)], [torch.full((5,), 3.0, device=dev).to(dtype),
                                                                                torch.ones(0, device=dev).to(dtype)]
        yield SampleInput("hand_checked", (slow, fast, 0.25, None), writes=[(0, "state"), (1, "param")],
                          check=_all_one_and_half)
        yield SampleInput("empty_slow", ([], [], 0.5, None))
        return
    alphas = (0.9, 0.2, 0.5, 0.3, 0.8) if size == row.full_size else (0.5,)
    for alpha in alphas:
        for with_params in (False, True):
            slow = make(size, torch.float32, dev, seed=1)
            # engine: fast = fp32 masters + params; Lookahead wrapper: fast = the params themselves
            fast = make(size, torch.float32 if with_params else dtype, dev, seed=2)
            params = _poison(make(size, dtype, dev)) if with_params else None
            writes = [(0, "state"), (1, "param")] + ([(3, "param")] if with_params else [])
            yield SampleInput(f"alpha={alpha}_params={with_params}", (slow, fast, alpha, params), writes=writes,
                              changes=(0,))


def _all_one_and_half(impl, args, _):
    assert torch.all(args[0][0] == 1.5) and torch.all(args[1][0] == 1.5)


# -- nonfinite_
def _spoil(xs, where, bad):
    """Write `bad` into one element: the very last of the last non-empty tensor (the last
    program), or the middle of the largest (a later chunk). False when all are empty."""
    idx = [i for i, t in enumerate(xs) if t.numel()]
    if not idx:
        return False
    i = idx[-1] if where == "last" else max(idx, key=lambda j: xs[j].numel())
    n = xs[i].numel()
    k = n - 1 if where == "last" else (n // 2 + 1 if n > 1 else 0)
    xs[i][tuple(int(j) for j in torch.unravel_index(torch.tensor(k), xs[i].shape))] = float(bad)
    return True


def nonfinite_samples(row, dtype, size):
    dev = row.device
    if size == "special":
        # finite fp16 values that overflow once unscaled (the check is on the stored value)
        yield SampleInput("unscale_overflow_fp16", ([[torch.tensor([1.0, 30000.0, 2.0], dtype=torch.float16,
                                                                    device=dev)]], torch.tensor(4.0, device=dev)),
                          writes=[(0, "unscaled")], ret="exact", expect=1.0)
        big = torch.full((5,), 60000.0, dtype=dtype, device=dev)
        yield SampleInput("unscale_overflow", ([[big]], torch.tensor(1e35, device=dev)),
                          writes=[(0, "unscaled")], ret="exact", expect=1.0)
        a = [torch.tensor([1.0, 2.0], device=dev), torch.tensor([], dtype=torch.float32, device=dev)]
        b = [torch.tensor([3.0], dtype=torch.bfloat16, device=dev)]
        yield SampleInput("sq_norms_hand_checked", ([a, b, []], None, True), ret="reduce", expect=[0.0, 5.0, 9.0, 0.0])
        yield SampleInput("sq_norms_hand_checked_unscale", ([a, b], torch.tensor(2.0, device=dev), True),
                          writes=[(0, "unscaled")], ret="reduce", expect=[0.0, 20.0, 36.0])
        yield SampleInput("sq_norms_empty", ([[], []], None, True), ret="reduce", expect=[0.0, 0.0, 0.0])
        yield SampleInput("empty", ([[]],), ret="exact", expect=0.0)
        return
    full = size == row.full_size
    for bad in (None, "nan", "inf", "-inf") if full else (None, "nan"):
        for where in (("mid", "last") if bad else ("none",)):
            a = make(size, dtype, dev, seed=1)
            b = make(size, torch.float32, dev, seed=2)
            spoiled = bad is not None and _spoil(a, where, bad)
            if bad is not None and not spoiled:
                continue
            yield SampleInput(f"bad={bad}_{where}", ([a, b],), ret="exact", expect=float(spoiled))
            yield SampleInput(f"bad={bad}_{where}_split", ([a[:3], a[3:]],), ret="exact", expect=float(spoiled))
    for unscale in (False, True):
        inv = torch.tensor(1.0 / 1024.0, device=dev) if unscale else None
        a = make(size, dtype, dev, seed=6, scale=1024.0)
        if unscale:
            yield SampleInput("unscale", ([a], inv), writes=[(0, "unscaled")], ret="exact", expect=0.0)
        # sq_norms: one list in the param dtype, one mixing it with float32 (per-tensor dtypes)
        xs, ys = make(size, dtype, dev, seed=7), make(size, torch.float32, dev, seed=8)
        mixed = [y if i % 2 else x.clone() for i, (x, y) in enumerate(zip(xs, ys))]
        inv = torch.tensor(0.5, device=dev) if unscale else None
        yield SampleInput(f"sq_norms_unscale={unscale}", ([xs, mixed], inv, True), writes=[(0, "unscaled")],
                          ret="reduce", self_check=_norms_self)
    xs = make(size, torch.float32, dev, seed=9)
    for bad in ("nan", "inf"):
        ys = [t.clone() for t in xs]
        if _spoil(ys, "mid", bad):
            yield SampleInput(f"sq_norms_bad={bad}", ([ys[:1], ys[1:]], None, True), ret="reduce")


def _norms_self(impl, args, got):
    """The fused norms are the backend's own multi_dot of each single-dtype list, bitwise."""
    for i, lst in enumerate(args[0]):
        if lst and len({t.dtype for t in lst}) == 1:
            assert torch.equal(got[1 + i], impl.multi_dot([lst], [(0, 0)])[0]), f"norm {i} != multi_dot"


op_db = [
    OpInfo("multi_dot", multi_dot_samples),
    OpInfo("perturb_", perturb_samples),
    OpInfo("combine_step_", combine_samples),
    OpInfo("lookahead_sync_", sync_samples),
    OpInfo("nonfinite_", nonfinite_samples),
]
OP_IDS = [op.name for op in op_db]


# ----------------------------------------------------------------------------- device-side skip
# (issue 18 parts 1 and 3) combine_step_ / lookahead_sync_ with skip_if, and BaseStep with 0-d
# device tensors for lr / step / first: test_op_conformance.py's test_skip_* and
# test_device_base_step_*. Cases at the row's small sizes, float64 where the row takes it.
SKIP_SIZES = ("empty", "one", "odd", "prime", "many", "mixed", "views", "edge_mixed")
SKIP_DTYPES = DTYPES + [torch.float64]
SKIP_BASES = {
    "sgd_plain": BaseStep("sgd", lr=0.1),
    "sgd_wd_no_momentum": BaseStep("sgd", lr=0.05, weight_decay=1e-2),
    "sgd_mom_first": BASES["sgd_mom_first"],
    "sgd_mom": BASES["sgd_mom"],
    "sgd_nesterov": BASES["sgd_nesterov"],
    "adamw_t1": BaseStep("adamw", lr=1e-2, weight_decay=0.1, step=1),
    "adamw_t2": BaseStep("adamw", lr=3e-3, weight_decay=0.05, beta1=0.8, beta2=0.99, eps=1e-6, step=2),
    "adamw_t1000": BaseStep("adamw", lr=3e-3, weight_decay=0.0, step=1000),
}
# (scheme of SCHEMES, v_sq_out, write_masters)
SKIP_VARIANTS = [("central", True, True), ("sam", False, True), ("forward_floats", True, False)]
SKIP_SET = {"one_f32": lambda d: torch.tensor(1.0, device=d), "nan": lambda d: torch.tensor(float("nan"), device=d),
            "true": lambda d: torch.tensor(True, device=d), "int_2": lambda d: torch.tensor(2, device=d),
            "shape_1_f64": lambda d: torch.tensor([-3.5], dtype=torch.float64, device=d)}
SKIP_ZERO = {"zero_f32": lambda d: torch.zeros((), device=d), "neg_zero": lambda d: torch.tensor(-0.0, device=d),
             "false": lambda d: torch.tensor(False, device=d), "int_0": lambda d: torch.tensor(0, device=d)}


def skip_combine_cases(row, dtype, size):
    """(name, args of combine_step_ without skip_if) over bases x variants: the tuple of
    _combine_sample (params poisoned, so a param the op does not write is caught)."""
    dev = row.device
    for bname, base in SKIP_BASES.items():
        for scheme, vsq, wm in SKIP_VARIANTS:
            if not wm and dtype not in (torch.float32, torch.float64):
                continue  # write_masters=False takes params of the masters' dtype
            mdt = torch.float64 if dtype == torch.float64 else torch.float32
            masters, grads, coefs, state, v, vc = combine_inputs(size, dtype, dev, scheme, base)
            masters = [m.to(mdt) for m in masters]
            state = {k: [t.to(mdt) for t in x] for k, x in state.items()}
            v = None if v is None else [t.to(mdt) for t in v]
            params = _poison(make(size, dtype if wm else mdt, dev))
            acc = torch.zeros(1, device=dev) if vsq and v is not None and mdt == torch.float32 else None
            yield f"{bname}-{scheme}-vsq={acc is not None}-wm={wm}", (params, masters, grads, coefs, base, state, v,
                                                                       vc, acc, wm)
    if dtype == torch.float32:  # fp32 params that are their own masters (LookaheadBio)
        p = make(size, dtype, dev, seed=3)
        for bname in ("sgd_mom_first", "adamw_t2"):
            base = SKIP_BASES[bname]
            st = {n: make(size, dtype, dev, seed=30 + j, kind="rand", scale=0.1)
                  for j, n in enumerate(base.state_names())}
            yield f"params_are_masters-{bname}", (p, p, (None, make(size, dtype, dev, seed=21), None),
                                                  (0.0, 1.0, 0.0), base, st, None, None, None, True)


def skip_sync_cases(row, dtype, size):
    """(name, args of lookahead_sync_ without skip_if)."""
    dev = row.device
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    for with_params in (False, True):
        slow = make(size, sdt, dev, seed=1)
        fast = make(size, sdt if with_params else dtype, dev, seed=2)
        params = _poison(make(size, dtype, dev)) if with_params else None
        yield f"params={with_params}", (slow, fast, 0.3, params)


def device_base_steps(base: BaseStep, dev) -> dict:
    """Variants of `base` with 0-d device tensors for lr / step / first, each with the host
    BaseStep it must equal bit for bit (the host lr is the tensor's value as a double)."""
    import dataclasses
    import numpy as np
    lr32 = torch.tensor(base.lr, dtype=torch.float32, device=dev)
    host32 = dataclasses.replace(base, lr=float(np.float32(base.lr)))  # the float32 lr's double
    out = {"lr_f64": (dataclasses.replace(base, lr=torch.tensor(base.lr, dtype=torch.float64, device=dev)), base),
           "lr_f32": (dataclasses.replace(host32, lr=lr32), host32)}
    if base.kind == "adamw":
        out["step_f32"] = (dataclasses.replace(base, step=torch.tensor(float(base.step), device=dev)), base)
        out["all_i64"] = (dataclasses.replace(host32, lr=lr32, step=torch.tensor(base.step, device=dev)), host32)
    else:
        out["first_bool"] = (dataclasses.replace(base, first=torch.tensor(bool(base.first), device=dev)), base)
        out["all_f32"] = (dataclasses.replace(host32, lr=lr32, first=torch.tensor(float(base.first), device=dev)),
                          host32)
    return out

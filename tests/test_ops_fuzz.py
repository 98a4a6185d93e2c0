"""Property-based fuzzing of every op on every backend row present here against the reference:
random list lengths, sizes (0, 1, primes, chunk edges), dtypes (mixed lists too), layouts
(offset views, transposes, strided slices) and values. Bounded by default; run long with
``pytest tests/test_ops_fuzz.py --hypothesis-profile=deep``."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lookahead_ext import ops

from op_db import BASES, DTYPES, SCHEMES, SampleInput
from test_op_conformance import run_sample

pytestmark = pytest.mark.slow  # minutes on the Triton interpreter; the full run includes it

# sizes around both chunk widths (Triton interpreter 1024, native CPU 16384) and primes
SIZES = [0, 1, 2, 7, 31, 1023, 1024, 1025, 4099, 16383, 16384, 16385]
LAYOUTS = ["contiguous", "offset", "transposed", "strided"]


@st.composite
def shapes(draw):
    """A list of (numel, layout)."""
    n = draw(st.integers(0, 6))
    return [(draw(st.sampled_from(SIZES)), draw(st.sampled_from(LAYOUTS))) for _ in range(n)]


def _tensor(n, layout, dtype, dev, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(n, 1) * 3 + 1, generator=g)[: 3 * n + 1] * scale
    if layout == "offset":
        t = x[1:n + 1]
    elif layout == "strided":
        t = x[: 3 * n: 3] if n else x[:0]
    elif layout == "transposed" and n > 1 and n % 2 == 0:
        t = x[:n].reshape(2, n // 2).t()
    else:
        t = x[:n].clone()
    return t.to(dtype).to(dev)


def _lists(shape, dtypes, dev, seed, scale=1.0):
    return [_tensor(n, lay, dt, dev, seed * 101 + i, scale) for i, ((n, lay), dt) in enumerate(zip(shape, dtypes))]


def _row_dtype_list(draw, row, shape, allow_mixed):
    if allow_mixed:
        return [draw(st.sampled_from(DTYPES)) for _ in shape]
    return [draw(st.sampled_from(DTYPES))] * len(shape)


def _impl(row):
    return ops.resolve(row.backend, torch.device(row.device), torch.float32)


@given(data=st.data())
def test_fuzz_multi_dot(backend, data):
    shape = data.draw(shapes())
    dts = _row_dtype_list(data.draw, backend, shape, backend.mixed_dot)
    scale = data.draw(st.sampled_from([1.0, 1e-3, 1e3]))
    lists = [_lists(shape, dts, backend.device, s, scale) for s in range(2)]
    pairs = data.draw(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=3))
    run_sample(_impl(backend), "multi_dot", SampleInput("fuzz", (lists, pairs, data.draw(st.booleans())),
                                                         ret="reduce"), backend)


@given(data=st.data())
def test_fuzz_perturb(backend, data):
    shape = data.draw(shapes())
    dt = data.draw(st.sampled_from(DTYPES))
    dev = backend.device
    out = _lists(shape, [dt] * len(shape), dev, 1)
    base = _lists(shape, [torch.float32] * len(shape), dev, 2)
    direction = _lists(shape, [data.draw(st.sampled_from(DTYPES))] * len(shape), dev, 3)
    scale = data.draw(st.sampled_from([0.37, -1.5, "tensor"]))
    scale = torch.tensor(-0.21, device=dev) if scale == "tensor" else scale
    if data.draw(st.booleans()):  # in place with a backup of the params' dtype
        bk = [torch.full_like(t, float("nan")) for t in out]
        sample = SampleInput("fuzz_inplace", (out, out, direction, scale, bk), writes=[(0, "param"), (4, "exact")])
    else:
        sample = SampleInput("fuzz", (out, base, direction, scale), writes=[(0, "param")])
    run_sample(_impl(backend), "perturb_", sample, backend)


@given(data=st.data())
def test_fuzz_lookahead_sync(backend, data):
    shape = data.draw(shapes())
    dt = data.draw(st.sampled_from(DTYPES))
    dev = backend.device
    with_params = data.draw(st.booleans())
    slow = _lists(shape, [torch.float32] * len(shape), dev, 1)
    fast = _lists(shape, [torch.float32 if with_params else dt] * len(shape), dev, 2)
    params = _lists(shape, [dt] * len(shape), dev, 3) if with_params else None
    alpha = data.draw(st.floats(0.0, 1.0))
    writes = [(0, "state"), (1, "param")] + ([(3, "param")] if with_params else [])
    run_sample(_impl(backend), "lookahead_sync_", SampleInput("fuzz", (slow, fast, alpha, params), writes=writes),
               backend)


@given(data=st.data())
def test_fuzz_nonfinite(backend, data):
    shapes_ = [data.draw(shapes()) for _ in range(data.draw(st.integers(1, 3)))]
    dev = backend.device
    lists = [_lists(s, [data.draw(st.sampled_from(DTYPES)) for _ in s], dev, i) for i, s in enumerate(shapes_)]
    bad = data.draw(st.sampled_from([None, "nan", "inf"]))
    flat = [t for lst in lists for t in lst if t.numel()]
    if bad and flat:
        t = data.draw(st.sampled_from(flat))
        t[tuple(int(j) for j in torch.unravel_index(torch.tensor(t.numel() - 1), t.shape))] = float(bad)
    inv = data.draw(st.sampled_from([None, 0.5, 1.0 / 1024]))
    inv = None if inv is None else torch.tensor(inv, device=dev)
    sq = data.draw(st.booleans())
    run_sample(_impl(backend), "nonfinite_", SampleInput("fuzz", (lists, inv, sq), writes=[(0, "unscaled")],
                                                          ret="reduce" if sq else "exact"), backend)


@given(data=st.data())
def test_fuzz_combine_step(backend, data):
    shape = data.draw(shapes())
    dt = data.draw(st.sampled_from(DTYPES))
    dev = backend.device
    scheme = data.draw(st.sampled_from(sorted(SCHEMES)))
    base = BASES[data.draw(st.sampled_from(sorted(BASES)))]
    use, coefs, vpat = SCHEMES[scheme]
    masters = _lists(shape, [torch.float32] * len(shape), dev, 1)
    params = [torch.full_like(m, float("nan")).to(dt) for m in masters]
    grads = tuple(_lists(shape, [dt] * len(shape), dev, 10 + i) if u else None for i, u in enumerate(use))
    state = {k: [t.abs() for t in _lists(shape, [torch.float32] * len(shape), dev, 20 + j, 0.1)]
             for j, k in enumerate(base.state_names())}
    v = vc = acc = None
    writes = [(0, "param"), (1, "state")] + [((5, k), "state") for k in state]
    if vpat is not None:
        v = _lists(shape, [torch.float32] * len(shape), dev, 30)
        vc = tuple(torch.tensor(0.3, device=dev) if p in ("t", "zero") else p for p in vpat)
        writes.append((6, "state"))
        if data.draw(st.booleans()):
            acc = torch.zeros(1, device=dev)
            writes.append((8, "reduce"))
    run_sample(_impl(backend), "combine_step_",
               SampleInput("fuzz", (params, masters, grads, coefs, base, state, v, vc, acc, True), writes=writes),
               backend)


# aliasing patterns (docs/backends.md, "Aliasing"): slices of one flat buffer drawn at random for every
# argument; an independent oracle on element indices decides whether the call must be refused
def _slices(draw, flat, n):
    out = []
    for _ in range(n):
        a = draw(st.integers(0, flat.numel() - 1))
        out.append((a, draw(st.integers(0, 6))))
    return out


def _must_refuse(written, read, pair=None):
    """Element-level rule: a written slice shares an element with any other slice, unless it is
    its in-place partner (same list pair, same index, same slice)."""
    everything = [(name, i, s, True) for name, lst in written for i, s in enumerate(lst)]
    everything += [(name, i, s, False) for name, lst in read for i, s in enumerate(lst)]
    for x, (na, ia, (a0, la), wa) in enumerate(everything):
        for nb, ib, (b0, lb), wb in everything[x + 1:]:
            if not (wa or wb) or not set(range(a0, a0 + la)) & set(range(b0, b0 + lb)):
                continue
            if pair and {na, nb} == set(pair) and ia == ib and (a0, la) == (b0, lb):
                continue
            return True
    return False


@given(data=st.data())
def test_fuzz_aliasing(backend, data):
    dev = backend.device
    n = data.draw(st.integers(1, 3))
    flat = torch.randn(24, device=dev)
    op = data.draw(st.sampled_from(["perturb_", "lookahead_sync_"]))
    names = ("out", "base", "direction") if op == "perturb_" else ("slow", "fast", "params")
    lens = [data.draw(st.integers(0, 6)) for _ in range(n)]
    lists = {}
    for name in names:
        if data.draw(st.booleans()):  # a slice of the shared buffer, else a tensor of its own
            lists[name] = [(data.draw(st.integers(0, 24 - k)), k) for k in lens]
        else:
            lists[name] = None
    if op == "perturb_" and data.draw(st.booleans()):
        lists["base"] = lists["out"]  # the in-place pair
    args = [[flat[a:a + k] for a, k in lists[nm]] if lists[nm] is not None else
            [torch.randn(k, device=dev) for k in lens] for nm in names]
    shared = {nm: lst for nm, lst in lists.items() if lst is not None}
    written = [(nm, shared[nm]) for nm in (("out",) if op == "perturb_" else names) if nm in shared]
    read = [(nm, shared[nm]) for nm in (("base", "direction") if op == "perturb_" else ()) if nm in shared]
    refuse = _must_refuse(written, read, ("out", "base") if op == "perturb_" else None)
    if op == "perturb_":
        call, sample = (args[0], args[1], args[2], 0.37), SampleInput("fuzz_alias", (args[0], args[1], args[2], 0.37),
                                                                      writes=[(0, "state")])
    else:
        call = (args[0], args[1], 0.5, args[2])
        sample = SampleInput("fuzz_alias", call, writes=[(0, "state"), (1, "state"), (3, "state")])
    if refuse:
        for impl in (_impl(backend), ops.reference):
            with pytest.raises(ValueError, match="share memory"):
                getattr(impl, op)(*call)
    else:
        run_sample(_impl(backend), op, sample, backend)

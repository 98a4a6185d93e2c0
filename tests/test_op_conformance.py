"""Conformance: every op of op_db x every backend row present here x dtype x size against the reference."""
import os

import pytest
import torch

from lookahead_ext import ops
from lookahead_ext.ops import reference

from _compare import EXACT, assert_close, assert_lists_close
from op_db import BASES, DT_IDS, DTYPES, OP_IDS, combine_inputs, op_db, tol


def _get(args, path):
    if isinstance(path, tuple):
        return args[path[0]][path[1]]
    return args[path]


def _flat(x):
    return [t for y in x for t in _flat(y)] if isinstance(x, (list, tuple)) else [x]


def _check_ret(got, want, kind, table, what):
    if kind is None:
        assert got is None and want is None, what
        return
    assert got.dtype == want.dtype == torch.float32, (what, got.dtype)
    assert got.device.type == want.device.type, (what, got.device)
    assert_close(got, want, EXACT if kind == "exact" else tol(table, kind, torch.float32), f"{what} result")


def _unchanged_fraction_ok(after, before, what):
    """The call changed (almost) every element: an unwritten output cannot pass. An exact zero
    update of an element (e.g. 0.75 g+ + 0.25 g- == 0 in bf16) can happen by chance: < 1%."""
    sizes = [a.numel() for a in after]
    same = torch.cat([(a == b).reshape(-1) for a, b in zip(after, before)] or [torch.zeros(0, dtype=torch.bool)])
    for i, s in enumerate(same.split(sizes)):
        if s.numel():
            frac = float(s.float().mean())
            assert frac < 0.01, f"{what}[{i}]: {frac:.0%} of the elements are unchanged"


def clone_args(x, memo=None):
    """A copy of nested lists/tuples/dicts of tensors; a tensor keeps its strides and storage
    offset (views stay views) and a tensor passed twice stays one tensor (aliasing is kept)."""
    memo = {} if memo is None else memo
    if isinstance(x, torch.Tensor):
        if id(x) not in memo:
            flat = torch.empty(0, dtype=x.dtype, device=x.device).set_(x.untyped_storage()).clone()
            memo[id(x)] = flat.as_strided(x.size(), x.stride(), x.storage_offset())
        return memo[id(x)]
    if isinstance(x, (list, tuple)):
        return type(x)(clone_args(y, memo) for y in x)
    if isinstance(x, dict):
        return {k: clone_args(v, memo) for k, v in x.items()}
    return x


def run_sample(impl, opname, sample, row):
    """Run one sample on the backend and on the reference (each on its own deep copy: aliasing
    within the arguments is kept) and compare everything the op returns or writes."""
    args_b, args_r, before = (clone_args(sample.args) for _ in range(3))
    what = f"{row.id} {opname}[{sample.name}]"
    got = getattr(impl, opname)(*args_b)
    want = getattr(reference, opname)(*args_r)
    _check_ret(got, want, sample.ret, row.tol, what)
    if sample.expect is not None:
        assert got.tolist() == sample.expect, (what, got.tolist(), sample.expect)
    for path, kind in sample.writes:
        got_l, want_l = _get(args_b, path), _get(args_r, path)
        for dt in {t.dtype for t in _flat(got_l)}:
            pick = [(a, e) for a, e in zip(_flat(got_l), _flat(want_l)) if a.dtype == dt]
            assert_lists_close([a for a, _ in pick], [e for _, e in pick], tol(row.tol, kind, dt),
                               f"{what} arg {path}")
    for path in sample.changes:
        _unchanged_fraction_ok(_get(args_b, path), _get(before, path), f"{what} arg {path}")
    if sample.check is not None:
        sample.check(impl, args_b, got)
        sample.check(reference, args_r, want)
    if sample.self_check is not None and row.bitwise_self:
        sample.self_check(impl, args_b, got)
    if opname == "multi_dot":  # deterministic: the same call gives the same bits
        assert torch.equal(getattr(impl, opname)(*clone_args(sample.args)), got), f"{what}: not deterministic"


@pytest.mark.parametrize("dtype", DTYPES, ids=[DT_IDS[d] for d in DTYPES])
@pytest.mark.parametrize("op", op_db, ids=OP_IDS)
def test_conformance(backend, size, op, dtype):
    impl = ops.resolve(backend.backend, torch.device(backend.device), torch.float32)
    samples = list(op.sample_inputs(backend, dtype, size))
    assert samples, "every (op, size) has samples"
    for sample in samples:
        run_sample(impl, op.name, sample, backend)


# ----------------------------------------------------------------------------- nonfinite_(out=)
@pytest.mark.parametrize("sq_norms", [False, True], ids=["flag", "sq_norms"])
def test_nonfinite_out_is_the_result(backend, sq_norms):
    """nonfinite_(..., out=) writes the result into ``out`` and returns it, with the bits of
    the call without ``out`` (and the same unscaled tensors); a wrong ``out`` is refused
    before anything is written."""
    from op_db import make
    dev = backend.device
    for bad in (False, True):
        for inv in (None, 0.5):
            lists = [make([7, 1030, 0, 33], torch.bfloat16, dev, seed=1), make([5, 2], torch.float32, dev, seed=2)]
            if bad:
                lists[0][1][1029] = float("inf")
            twin = [[t.clone() for t in lst] for lst in lists]
            scale = None if inv is None else torch.tensor(inv, device=dev)
            want = ops.nonfinite_(twin, scale, sq_norms, backend=backend.backend)
            out = torch.full(want.shape, float("nan"), device=dev)
            got = ops.nonfinite_(lists, scale, sq_norms, backend=backend.backend, out=out)
            assert got is out and torch.equal(out, want), (bad, inv, out, want)
            assert all(torch.equal(a, b) for la_, lb in zip(lists, twin) for a, b in zip(la_, lb))
    lists = [make([7, 33], torch.float32, dev, seed=3)]
    before = [t.clone() for t in lists[0]]
    shape = (2,) if sq_norms else ()
    wrong = {"dtype": torch.zeros(shape, dtype=torch.float64, device=dev),
             "shape": torch.zeros((3,), device=dev),
             "device": torch.zeros(shape, device="meta"),
             "aliasing": lists[0][1].view(-1)[:2] if sq_norms else lists[0][1].view(-1)[0]}
    for what, out in wrong.items():
        with pytest.raises(ValueError, match="nonfinite_"):
            ops.nonfinite_(lists, torch.tensor(2.0, device=dev), sq_norms, backend=backend.backend, out=out)
        assert all(torch.equal(a, b) for a, b in zip(lists[0], before)), what


# ----------------------------------------------------------------------------- argument errors
def test_argument_errors_alike(backend):
    """The row's backend and the reference reject the same bad arguments, with the same message,
    before anything is written."""
    dev = backend.device
    impl = ops.resolve(backend.backend, torch.device(dev), torch.float32)
    base = BASES["sgd_mom"]
    masters, grads, coefs, state, v, vc = combine_inputs([5, 3], torch.float32, dev, "central", base)
    for mod in (impl, reference):
        def call(p=None, vv=v, **kw):
            p = [m.clone() for m in masters] if p is None else p
            mod.combine_step_(p, [m.clone() for m in masters], grads, coefs, base,
                              {k: [t.clone() for t in x] for k, x in state.items()}, vv, vc if vv is not None else None,
                              **kw)
        with pytest.raises(ValueError, match="needs v"):
            call(vv=None, v_sq_out=torch.zeros(1, device=dev))
        with pytest.raises(ValueError, match="float32 tensor with one element"):
            call(v_sq_out=torch.zeros(1, dtype=torch.float64, device=dev))
        with pytest.raises(ValueError, match="float32 tensor with one element"):
            call(v_sq_out=torch.zeros(2, device=dev))
        with pytest.raises(ValueError, match="is on meta"):
            call(v_sq_out=torch.zeros(1, device="meta"))
        with pytest.raises(ValueError, match="write_masters=False"):
            call(p=[m.bfloat16() for m in masters], write_masters=False)
        with pytest.raises(ValueError, match="same length"):
            mod.multi_dot([[torch.ones(3, device=dev)], []], [(0, 1)])
        # a scale of two elements: rejected before the backup is written
        bk = [torch.zeros(3, device=dev)]
        with pytest.raises((ValueError, RuntimeError), match="one element"):
            mod.perturb_([torch.zeros(3, device=dev)], [torch.ones(3, device=dev)], [torch.ones(3, device=dev)],
                         torch.ones(2, device=dev), bk)
        assert torch.equal(bk[0], torch.zeros(3, device=dev)), f"{mod}: backup written before the error"


# ----------------------------------------------------------------------------- device-side skip
# skip_if and device-scalar BaseSteps (issue 18 parts 1 and 3) on every row and on the reference
# itself: every comparison here is bitwise (the same backend with and without the new arguments).
import contextlib  # noqa: E402
import dataclasses  # noqa: E402

import _cuda_emu  # noqa: E402
from lookahead_ext.ops import BaseStep  # noqa: E402
from op_db import (ROWS, SKIP_DTYPES, SKIP_SET, SKIP_SIZES, SKIP_ZERO, Row, device_base_steps,  # noqa: E402
                   present_rows, skip_combine_cases, skip_sync_cases)

REFERENCE_ROW = Row("reference", "cpu", SKIP_SIZES, "native", True)


def _skip_rows(light: bool = False):
    rows = [REFERENCE_ROW] + present_rows()
    if _cuda_emu.WHY is not None and not any(r.backend == _cuda_emu.NAME for r in rows):
        rows.append(ROWS[(_cuda_emu.NAME, "cpu")])
    out = []
    for r in rows:
        marks = []
        if r.backend == _cuda_emu.NAME:
            marks.append(pytest.mark.cuda_emu)
            if _cuda_emu.WHY is not None:
                marks.append(pytest.mark.skip(reason=_cuda_emu.SKIP_REASON))
        sizes = [s for s in SKIP_SIZES if s in r.sizes or s in ("odd", "empty", "many")]
        if light and r.backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            # the heaviest bit test (base steps x device variants, 300 op calls a case) leaves
            # the 40-tensor "many" geometry to the others on the interpreted Triton row (160 s)
            sizes = [s for s in sizes if s != "many"]
        out += [pytest.param(r, s, marks=marks, id=f"{r.id}-{s}") for s in sizes]
    return out


SKIP_ROWS = _skip_rows()
DEVICE_BASE_ROWS = _skip_rows(light=True)  # the heaviest of them (base steps x device variants)


def _impl_for(row, dtype):
    """The row's implementation for `dtype` (None: the row does not take it, e.g. native fp64)."""
    dev = torch.device(row.device)
    if row.backend == "reference":
        return reference
    impl = ops.resolve(row.backend, dev, torch.float32)
    return impl if impl.supports(dev, dtype) else None


def _bits(t):
    """The tensor's bits (NaN payloads and signed zeros included) as an integer tensor."""
    t = t.detach()
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def assert_bits_equal(got, want, what):
    got = [t for t in _flat(got) if not isinstance(t, (float, int, bool))]
    want = [t for t in _flat(want) if not isinstance(t, (float, int, bool))]
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            assert a is None and b is None, what
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i, a.dtype, b.dtype)
        assert torch.equal(_bits(a), _bits(b)), f"{what}[{i}] (shape {tuple(a.shape)}): bits differ"


def _cycle(flags: dict, k: int):
    """The flag values for the k-th case: all of them for the first case, then one per case in
    turn (every value still meets every base and variant across the sizes and dtypes)."""
    items = list(flags.items())
    return items if k == 0 else [items[k % len(items)]]


_COMBINE_WRITTEN = (0, 1, 5, 6, 8)  # params, masters, base state, v, v_sq_out


def _written(args):
    return [args[i] if i != 5 else [args[5][k] for k in sorted(args[5])] for i in _COMBINE_WRITTEN]


def _assert_restored(row, params, masters, what):
    """params == cast(masters) bit for bit; the Triton interpreter's cast rounds toward zero
    (docs/tolerances.md), so its bf16/fp16 params are within its one-ulp "param" tolerance."""
    want = [m.to(p.dtype) for p, m in zip(params, masters)]
    if row.tol == "triton" and row.device == "cpu" and params and params[0].element_size() == 2:
        assert_lists_close(params, want, tol("triton", "param", params[0].dtype), what)
    else:
        assert_bits_equal(params, want, what)


@pytest.mark.parametrize("dtype", SKIP_DTYPES, ids=[DT_IDS.get(d, "fp64") for d in SKIP_DTYPES])
@pytest.mark.parametrize("backend,size", SKIP_ROWS)
def test_skip_if_set_writes_only_params_from_masters(backend, size, dtype):
    """skip_if nonzero (1.0, NaN, True, 2, a [1] float64): masters, state, v and v_sq_out keep
    their bits, params == cast(masters) bit for bit (the probe point is restored)."""
    impl = _impl_for(backend, dtype)
    if impl is None:
        pytest.skip(f"{backend.id} does not take {dtype}")
    for k, (name, args) in enumerate(skip_combine_cases(backend, dtype, size)):
        for sname, flag in _cycle(SKIP_SET, k):
            a, before = clone_args(args), clone_args(args)
            impl.combine_step_(*a, skip_if=flag(backend.device))
            what = f"{backend.id} combine_step_[{name}] skip_if={sname}"
            assert_bits_equal(_written(a)[1:], _written(before)[1:], what)
            _assert_restored(backend, a[0], before[1], what + " params")
    for name, args in skip_sync_cases(backend, dtype, size):
        for sname, flag in SKIP_SET.items():
            a, before = clone_args(args), clone_args(args)
            impl.lookahead_sync_(*a, skip_if=flag(backend.device))
            assert_bits_equal(a, before, f"{backend.id} lookahead_sync_[{name}] skip_if={sname}")


@pytest.mark.parametrize("dtype", SKIP_DTYPES, ids=[DT_IDS.get(d, "fp64") for d in SKIP_DTYPES])
@pytest.mark.parametrize("backend,size", SKIP_ROWS)
def test_skip_if_zero_is_skip_if_none(backend, size, dtype):
    """skip_if zero (0.0, -0.0, False, 0): every output bit-identical to skip_if=None."""
    impl = _impl_for(backend, dtype)
    if impl is None:
        pytest.skip(f"{backend.id} does not take {dtype}")
    for k, (name, args) in enumerate(skip_combine_cases(backend, dtype, size)):
        want = clone_args(args)
        impl.combine_step_(*want)
        for sname, flag in _cycle(SKIP_ZERO, k):
            a = clone_args(args)
            impl.combine_step_(*a, skip_if=flag(backend.device))
            assert_bits_equal(_written(a), _written(want), f"{backend.id} combine_step_[{name}] skip_if={sname}")
    for name, args in skip_sync_cases(backend, dtype, size):
        want = clone_args(args)
        impl.lookahead_sync_(*want)
        for sname, flag in SKIP_ZERO.items():
            a = clone_args(args)
            impl.lookahead_sync_(*a, skip_if=flag(backend.device))
            assert_bits_equal(a, want, f"{backend.id} lookahead_sync_[{name}] skip_if={sname}")


@pytest.mark.parametrize("dtype", SKIP_DTYPES, ids=[DT_IDS.get(d, "fp64") for d in SKIP_DTYPES])
@pytest.mark.parametrize("backend,size", DEVICE_BASE_ROWS)
def test_device_base_step_is_host_base_step(backend, size, dtype):
    """A BaseStep whose lr / step / first are 0-d device tensors gives the bits of the host
    BaseStep (SGD first / not first, Nesterov, no momentum, AdamW at steps 1, 2, 1000, weight
    decay), with and without a zero skip_if; a set skip_if still writes only the params."""
    impl = _impl_for(backend, dtype)
    if impl is None:
        pytest.skip(f"{backend.id} does not take {dtype}")
    for name, args in skip_combine_cases(backend, dtype, size):
        for vname, (dev_base, host_base) in device_base_steps(args[4], backend.device).items():
            want = clone_args(args[:4] + (host_base,) + args[5:])
            impl.combine_step_(*want)
            for skip in (None, torch.zeros((), device=backend.device)):
                a = clone_args(args[:4] + (dev_base,) + args[5:])
                impl.combine_step_(*a, skip_if=skip)
                assert_bits_equal(_written(a), _written(want),
                                  f"{backend.id} combine_step_[{name}] {vname} skip_if={skip is not None}")
        a, before = clone_args(args[:4] + (dev_base,) + args[5:]), clone_args(args)
        impl.combine_step_(*a, skip_if=torch.ones((), device=backend.device))
        assert_bits_equal(_written(a)[1:], _written(before)[1:], f"{backend.id} combine_step_[{name}] skipped")


def test_device_args_layout_is_kernel_args():
    """BaseStep.device_args: KernelArgs' hyper then flags, the host doubles bit for bit (float64)."""
    for base in (BASES["sgd_mom_first"], BASES["sgd_nesterov"], BASES["adamw"], BASES["adamw_t7"]):
        for vname, (dev_base, host_base) in device_base_steps(base, "cpu").items():
            k = host_base.kernel_args()
            got = dev_base.device_args()
            assert got.dtype == torch.float64 and got.shape == (len(k.hyper) + 2,)
            assert got.tolist() == [*k.hyper, *k.flags], (vname, got.tolist(), k)
    for step in (1, 2, 3, 10, 999, 1000, 12345):  # beta**step: torch.pow is Python's pow bit for bit
        b = BaseStep("adamw", lr=1e-3, step=step)
        assert dataclasses.replace(b, step=torch.tensor(step)).device_args().tolist()[:7] == list(b.kernel_args().hyper)
    buf = torch.empty(6, dtype=torch.float64)
    assert BaseStep(lr=torch.tensor(0.5, dtype=torch.float64)).device_args(out=buf) is buf and buf[0] == 0.5
    with pytest.raises(ValueError, match="float64 tensor of 9 elements"):
        BaseStep("adamw", step=torch.tensor(2)).device_args(out=buf)
    with pytest.raises(ValueError, match="real tensor with one element"):
        BaseStep(lr=torch.ones(2))


_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    """Every Python-level read of a tensor's value raises (Tensor.item, tolist, bool(), float(),
    int(), index): what a device-resident op on CUDA must never do."""
    def boom(self, *a, **k):
        raise AssertionError("host read of a tensor")
    with pytest.MonkeyPatch.context() as mp:
        for name in _READS:
            mp.setattr(torch.Tensor, name, boom)
        yield


@pytest.mark.parametrize("backend", [pytest.param(r, marks=m, id=r.id) for r, _, m in
                                     {(p.values[0].id): (p.values[0], None, p.marks) for p in SKIP_ROWS}.values()])
def test_no_host_read_with_device_scalars(backend):
    """combine_step_ with skip_if and a device BaseStep, lookahead_sync_ with skip_if: no host
    read of any tensor (Tensor.item / tolist / bool / float / int / index raise), set and not set."""
    impl = reference if backend.backend == "reference" else ops.resolve(backend.backend, torch.device(backend.device),
                                                                        torch.float32)
    calls = []
    for name, args in skip_combine_cases(backend, torch.float32, "odd"):
        dev_base = next(iter(device_base_steps(args[4], backend.device).values()))[0]
        dev_base = dataclasses.replace(dev_base, **({"step": torch.tensor(3.0)} if dev_base.kind == "adamw" else
                                                    {"first": torch.tensor(False)}))
        for flag in (0.0, 1.0):
            calls.append((impl.combine_step_, clone_args(args[:4] + (dev_base,) + args[5:]), torch.tensor(flag)))
    for name, args in skip_sync_cases(backend, torch.float32, "odd"):
        for flag in (0.0, 1.0, True):
            calls.append((impl.lookahead_sync_, clone_args(args), torch.tensor(flag)))
    with no_host_reads():
        with pytest.raises(AssertionError, match="host read"):
            bool(torch.ones(()))  # armed
        for fn, args, flag in calls:
            fn(*args, skip_if=flag)


@pytest.mark.parametrize("backend", [pytest.param(r, marks=m, id=r.id) for r, _, m in
                                     {(p.values[0].id): (p.values[0], None, p.marks) for p in SKIP_ROWS}.values()])
def test_skip_if_argument_errors(backend):
    """skip_if on another device, with more than one element, complex, not a tensor; a BaseStep
    tensor on another device: a ValueError naming the problem (no tensor printed), nothing written."""
    impl = reference if backend.backend == "reference" else ops.resolve(backend.backend, torch.device(backend.device),
                                                                        torch.float32)
    dev = backend.device
    args = next(skip_combine_cases(backend, torch.float32, "odd"))[1]
    sync = next(skip_sync_cases(backend, torch.float32, "odd"))[1]
    bad = [(torch.ones((), device="meta"), "skip_if is on meta"), (torch.ones(2, device=dev), r"one element.*\(2,\)"),
           (torch.ones((1, 1, 2), device=dev), "one element"),
           (torch.ones((), dtype=torch.complex64, device=dev), "real tensor.*complex64"), (1.0, "got float")]
    for flag, msg in bad:
        a, before = clone_args(args), clone_args(args)
        with pytest.raises(ValueError, match=msg) as e:
            impl.combine_step_(*a, skip_if=flag)
        assert "tensor(" not in str(e.value)
        assert_bits_equal(_written(a), _written(before), f"{backend.id} combine_step_ after error {msg}")
        s, before = clone_args(sync), clone_args(sync)
        with pytest.raises(ValueError, match=msg):
            impl.lookahead_sync_(*s, skip_if=flag)
        assert_bits_equal(s, before, f"{backend.id} lookahead_sync_ after error {msg}")
    a, before = clone_args(args), clone_args(args)
    with pytest.raises(ValueError, match="base.lr is on meta"):
        impl.combine_step_(*a[:4], dataclasses.replace(a[4], lr=torch.tensor(0.1, device="meta")), *a[5:])
    assert_bits_equal(_written(a), _written(before), f"{backend.id} combine_step_ after a base error")

"""Conformance: every op of op_db x every backend row present here x dtype x size against the reference."""
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

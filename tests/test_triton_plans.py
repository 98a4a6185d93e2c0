"""Persistent launch plans of the Triton backend (kernels/_mta.py, lookahead_ext/ops/plan_lists.py):
a cached table is never used for tensors it does not describe.

Every case changes what a list holds (a tensor re-pointed, resized, re-typed, made
non-contiguous, replaced; a PlanList mutated, copied, or re-pointed across an epoch) after
a plan was cached for it, and checks the next call against the reference on copies: a
stale table would write the old storage or the old extent and leave the new one as it was.
Sizes are tiny (the interpreter is slow); they span several chunks of the interpreter's
1024-element programs where the extent matters.
"""
from __future__ import annotations

import copy

import pytest
import torch

from test_triton_ops import _AVAIL, DEVICE, T

requires_triton = pytest.mark.skipif(_AVAIL != "ok", reason=f"triton backend unavailable: {_AVAIL}")


def randn(sizes, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * scale).to(dtype).to(DEVICE) for n in sizes]
from lookahead_ext.ops import reference as R
from lookahead_ext.ops.plan_lists import PlanList, new_epoch, new_step, reuse

pytestmark = requires_triton

SIZES = [7, 1030, 33]


def _mta():
    from lookahead_ext.kernels import _mta
    return _mta


def perturb_both(out, base, d, scale=0.5):
    """perturb_ on the Triton backend and on the reference (on clones of `out`); returns
    (triton result, reference result)."""
    want = [t.clone() for t in out]
    R.perturb_(want, list(base), list(d), scale)
    T().perturb_(out, base, d, scale)
    return list(out), want


def assert_same(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}[{i}]"
        # torch's per-dtype tolerances (bf16/fp16 outputs round the fp32 result once; a
        # stale table leaves the row as it was, far outside them)
        torch.testing.assert_close(a, b, msg=lambda m: f"{what}[{i}]: {m}")


class ColumnReads:
    """Counts _mta.column calls (each reads every tensor of a list)."""

    def __init__(self, monkeypatch):
        self.n = 0
        mta = _mta()
        orig = mta.column

        def counted(lst):
            self.n += 1
            return orig(lst)
        monkeypatch.setattr(mta, "column", counted)


# ----------------------------------------------------------------------------- plain lists
def test_same_tensors_reuse_the_plan():
    out, base, d = randn(SIZES, torch.float32, 0), randn(SIZES, torch.float32, 1), randn(SIZES, torch.float32, 2)
    mta = _mta()
    prep = mta.Prepared([out, base, d, None])
    assert prep.plan() is mta.Prepared([list(out), list(base), list(d), None]).plan()
    assert_same(*perturb_both(out, base, d), "out")


def test_data_reassigned_is_seen():
    """p.data = other: the same tensor object, new storage."""
    out, base, d = randn(SIZES, torch.float32, 0), randn(SIZES, torch.float32, 1), randn(SIZES, torch.float32, 2)
    T().perturb_(out, base, d, 0.5)
    old = out[1].data
    snapshot = old.clone()
    out[1].data = torch.zeros_like(old)
    got, want = perturb_both(out, base, d)
    assert_same(got, want, "out")
    assert torch.equal(old, snapshot), "the old storage was written: stale table"


def test_same_address_smaller_size_is_seen():
    """A tensor re-pointed to a prefix of its storage keeps its address: the size is in the key."""
    out, base, d = randn(SIZES, torch.float32, 0), randn(SIZES, torch.float32, 1), randn(SIZES, torch.float32, 2)
    T().perturb_(out, base, d, 0.5)
    full = out[1].data
    tail = full[5:].clone()
    out[1].data = full[:5]
    base[1], d[1] = base[1][:5].clone(), d[1][:5].clone()
    assert out[1].data_ptr() == full.data_ptr()
    got, want = perturb_both(out, base, d)
    assert_same(got, want, "out")
    assert torch.equal(full[5:], tail), "elements past the new size were written: stale table"


def test_resize_in_place_is_seen():
    out, base, d = randn(SIZES, torch.float32, 0), randn(SIZES, torch.float32, 1), randn(SIZES, torch.float32, 2)
    T().perturb_(out, base, d, 0.5)
    with torch.no_grad():
        out[1].resize_(4)
    base[1], d[1] = base[1][:4].clone(), d[1][:4].clone()
    assert_same(*perturb_both(out, base, d), "out")


def test_same_address_other_dtype_is_seen():
    """bf16 storage re-viewed as fp16 (same address, same size): the dtype is in the key."""
    out = randn(SIZES, torch.bfloat16, 0)
    base, d = randn(SIZES, torch.float32, 1), randn(SIZES, torch.float32, 2)
    T().perturb_(out, base, d, 0.5)
    out[0].data = out[0].data.view(torch.float16)
    assert_same(*perturb_both(out, base, d), "out")


def test_transposed_in_place_is_seen():
    """t_() keeps address, dtype and size; the tensor is no longer contiguous (copy path)."""
    out = [torch.randn(6, 5, device=DEVICE), torch.randn(3, device=DEVICE)]
    base = [torch.randn(5, 6, device=DEVICE), torch.randn(3, device=DEVICE)]
    d = [torch.randn(5, 6, device=DEVICE), torch.randn(3, device=DEVICE)]
    T().perturb_(out, base, d, 0.5)
    with torch.no_grad():
        out[0].t_()
    assert not out[0].is_contiguous()
    assert_same(*perturb_both(out, base, d), "out")


def test_views_sharing_an_address_get_their_own_plans():
    """Two tensor objects at one address with different sizes (what a caching allocator
    gives a new tensor in a freed block): different columns, different tables."""
    buf = torch.zeros(1100, device=DEVICE)
    base, d = randn([1100], torch.float32, 1), randn([1100], torch.float32, 2)
    T().perturb_([buf[:1100]], base, d, 1.0)
    buf.zero_()
    short = [buf[:10]]
    T().perturb_(short, [base[0][:10].clone()], [d[0][:10].clone()], 1.0)
    assert torch.equal(buf[:10], base[0][:10] + d[0][:10])
    assert torch.count_nonzero(buf[10:]) == 0, "the longer view's table was used"


def test_replaced_tensor_is_seen():
    out, base, d = randn(SIZES, torch.float32, 0), randn(SIZES, torch.float32, 1), randn(SIZES, torch.float32, 2)
    T().perturb_(out, base, d, 0.5)
    old = out[2]
    snapshot = old.clone()
    out[2] = torch.zeros_like(old)
    assert_same(*perturb_both(out, base, d), "out")
    assert torch.equal(old, snapshot)


def test_plain_lists_are_read_every_call(monkeypatch):
    out, base, d = randn(SIZES, torch.float32, 0), randn(SIZES, torch.float32, 1), randn(SIZES, torch.float32, 2)
    T().perturb_(out, base, d, 0.5)
    reads = ColumnReads(monkeypatch)
    T().perturb_(out, base, d, 0.5)
    assert reads.n == 3


def test_float64_lists_go_to_the_reference():
    out = randn(SIZES, torch.float32, 0)
    out[1] = out[1].double()
    base, d = randn(SIZES, torch.float32, 1), randn(SIZES, torch.float32, 2)
    base[1], d[1] = base[1].double(), d[1].double()
    out = PlanList(out)
    assert_same(*perturb_both(out, base, d), "out")


def test_write_masters_false_still_names_the_tensor():
    from lookahead_ext.ops import BaseStep
    p, w, g = randn([3, 4], torch.bfloat16, 0), randn([3, 4], torch.float32, 1), randn([3, 4], torch.float32, 2)
    with pytest.raises(ValueError, match=r"params\[0\] is torch.bfloat16"):
        T().combine_step_(p, w, (g, None, None), (1.0, 0.0, 0.0), BaseStep(), {}, write_masters=False)


# ----------------------------------------------------------------------------- PlanLists
def _planned():
    return (PlanList(randn(SIZES, torch.float32, 0)), PlanList(randn(SIZES, torch.float32, 1)),
            PlanList(randn(SIZES, torch.float32, 2)))


def test_planlists_are_read_once_per_epoch(monkeypatch):
    out, base, d = _planned()
    new_epoch()
    T().perturb_(out, base, d, 0.5)
    reads = ColumnReads(monkeypatch)
    for _ in range(3):
        T().perturb_(out, base, d, 0.5)
    assert reads.n == 0
    new_epoch()
    T().perturb_(out, base, d, 0.5)
    assert reads.n == 3


def test_planlist_repointed_then_new_epoch_is_seen():
    """What the engine does between steps: anything may be re-pointed, then a new epoch."""
    out, base, d = _planned()
    T().perturb_(out, base, d, 0.5)
    old = out[0].data
    snapshot = old.clone()
    out[0].data = torch.zeros_like(old)
    new_epoch()
    assert_same(*perturb_both(out, base, d), "out")
    assert torch.equal(old, snapshot), "the old storage was written: stale table"


def test_planlist_resized_then_new_epoch_is_seen():
    out, base, d = _planned()
    T().perturb_(out, base, d, 0.5)
    full = out[1].data
    tail = full[5:].clone()
    out[1].data = full[:5]
    base[1], d[1] = base[1][:5].clone(), d[1][:5].clone()  # item assignment: forgets by itself
    new_epoch()
    got, want = perturb_both(out, base, d)
    assert_same(got, want, "out")
    assert torch.equal(full[5:], tail), "elements past the new size were written: stale table"


def test_planlists_are_rechecked_not_read_at_a_new_step(monkeypatch):
    """A new step (the engine's, every step) re-checks addresses and versions only: an
    unchanged list keeps its column."""
    out, base, d = _planned()
    new_epoch()
    T().perturb_(out, base, d, 0.5)
    reads = ColumnReads(monkeypatch)
    new_step()  # a list's first use reads no versions (a gradient list is used once) ...
    T().perturb_(out, base, d, 0.5)
    assert reads.n == 3  # ... its second full read records them
    reads.n = 0
    for _ in range(3):
        new_step()
        T().perturb_(out, base, d, 0.5)
    assert reads.n == 0
    out[0].data = out[0].data.clone()
    new_step()
    T().perturb_(out, base, d, 0.5)
    assert reads.n == 1  # only the changed list is read again


def _repoint(t):  # new storage with other values (perturb_ does not read out: a stale
    t.data = torch.zeros_like(t.data)  # table leaves the new storage as it was)


def _resize(t):
    with torch.no_grad():
        t.resize_(4)


def _transpose(t):  # in place: same address, dtype and size, no longer contiguous
    with torch.no_grad():
        t.t_()


def _set(t):
    with torch.no_grad():
        t.set_(torch.zeros_like(t))


def _swap(t):
    torch.utils.swap_tensors(t, torch.zeros_like(t))


@pytest.mark.parametrize("change", [_repoint, _resize, _transpose, _set, _swap], ids=lambda f: f.__name__[1:])
def test_planlist_changed_then_new_step_is_seen(change):
    """Between steps (new_step, no new epoch) a tensor of a kept PlanList re-pointed, resized,
    transposed, set_ or swapped: its address or its version counter moves, and the next
    call reads the list again (a stale table would write the old storage or extent)."""
    sizes = [7, (40, 30), 33]
    mk = lambda seed: PlanList([torch.randn(n if isinstance(n, int) else n, generator=torch.Generator().manual_seed(seed + i)).to(DEVICE)  # noqa: E731
                                for i, n in enumerate(sizes)])
    out, base, d = mk(0), mk(10), mk(20)
    for _ in range(2):  # read in full twice: the versions are recorded
        new_step()
        T().perturb_(out, base, d, 0.5)
    old = out[1].data
    snapshot = old.clone()
    change(out[1])
    if out[1].shape != base[1].shape:  # the inputs follow the new shape
        base[1] = torch.randn(out[1].shape, device=DEVICE)
        d[1] = torch.randn(out[1].shape, device=DEVICE)
    new_step()
    got, want = perturb_both(out, base, d)
    assert_same(got, want, "out")
    if old.data_ptr() != out[1].data_ptr():
        assert torch.equal(old, snapshot), "the old storage was written: stale table"
    else:  # same storage: nothing past the new extent is written
        tail = old.reshape(-1)[out[1].numel():]
        assert torch.equal(tail, snapshot.reshape(-1)[out[1].numel():]), "stale extent"


def _kept_three_steps(check):
    out, base, d = (PlanList(randn(SIZES, torch.float32, k), check=check) for k in range(3))
    for _ in range(3):
        new_step()
        T().perturb_(out, base, d, 0.5)
    return out, base, d


def test_owner_lists_are_not_rechecked_at_a_new_step(monkeypatch):
    """check="owner": the owner validates its tensors itself (the engine's parameters, by its
    bucket signature), so a new step reads nothing; a new epoch reads them in full."""
    from lookahead_ext.kernels import _mta as mta
    out, base, d = _kept_three_steps("owner")
    reads = ColumnReads(monkeypatch)
    maps = []
    monkeypatch.setattr(mta, "_data_ptr", lambda t: maps.append(t) or torch.Tensor.data_ptr(t))
    for _ in range(3):
        new_step()
        T().perturb_(out, base, d, 0.5)
    assert reads.n == 0 and maps == []
    new_epoch()
    T().perturb_(out, base, d, 0.5)
    assert reads.n == 3


def test_address_lists_see_a_repointed_tensor_at_a_new_step(monkeypatch):
    """check="address": one map over the addresses per step; a tensor re-pointed to other
    memory (.data =, set_) is read again, and the old storage is never written."""
    out, base, d = _kept_three_steps("address")
    reads = ColumnReads(monkeypatch)
    new_step()
    T().perturb_(out, base, d, 0.5)
    assert reads.n == 0
    for change in (_repoint, _set):
        old = out[1].data
        snapshot = old.clone()
        change(out[1])
        new_step()
        assert_same(*perturb_both(out, base, d), "out")
        assert torch.equal(old, snapshot), f"{change.__name__}: the old storage was written"
    assert reads.n == 2


def test_planlist_check_is_validated():
    with pytest.raises(ValueError, match="check must be one of"):
        PlanList([], check="never")


def test_like_list_takes_dtypes_and_sizes_from_its_like(monkeypatch):
    """A gradient list made with like=params reads addresses and contiguity only, and gives
    the column a full read gives; without a current column of `like` (or of another length,
    or non-contiguous) it is read in full."""
    mta = _mta()
    params = PlanList(randn(SIZES, torch.float32, 0), check="owner")
    base = PlanList(randn(SIZES, torch.float32, 1), check="owner")
    new_epoch()
    T().perturb_(params, base, base, 0.5)  # params' column: read in this step
    grads = PlanList(randn(SIZES, torch.float32, 2), like=params)
    reads = ColumnReads(monkeypatch)
    got, want = perturb_both(params, base, grads)
    assert_same(got, want, "params")
    assert reads.n == 0
    full = mta.column(list(grads))
    assert (grads._col.ptrs, grads._col.dtypes, grads._col.numels) == (full.ptrs, full.dtypes, full.numels)
    reads.n = 0
    new_epoch()  # like's column is stale: the gradient list is read in full
    grads2 = PlanList(randn(SIZES, torch.float32, 3), like=params)
    T().perturb_(base, base, grads2, 0.5)
    assert reads.n >= 1 and grads2._col.dtypes == (torch.float32,) * 3
    short = PlanList(randn(SIZES[:2], torch.float32, 4), like=params)  # another length
    T().perturb_(params, base, base, 0.5)
    assert mta.column_like(short) is None
    strided = PlanList([torch.randn(14, device=DEVICE)[::2], torch.randn(1030, device=DEVICE),
                        torch.randn(33, device=DEVICE)], like=params)
    assert mta.column_like(strided) is None  # not contiguous: the copy path


def test_engine_reads_each_gradient_list_once_per_probe(monkeypatch):
    """In the engine's steady state (one bucket), a step reads no list in full: the
    parameters and state are kept, each probe's gradient list is read once (two maps, by
    column_like) and the same list object goes to the check and the base step."""
    from lookahead_ext.optim import CMLR
    mta = _mta()
    model = _model()
    opt = CMLR(model.parameters(), lr=0.1, momentum=0.9, k=2, backend="triton")
    _run(opt, model, 3)
    reads = ColumnReads(monkeypatch)
    likes = []
    orig = mta.column_like
    monkeypatch.setattr(mta, "column_like", lambda lst: likes.append(lst) or orig(lst))  # kept alive: ids stay unique
    _run(opt, model, 2)
    assert reads.n == 0
    assert likes and len(likes) == len({id(lst) for lst in likes}), "a gradient list was read twice"


def test_same_address_view_needs_a_new_epoch():
    """`.data =` a view that starts at the same element keeps the address and the version:
    a new step does not see it (documented); a new epoch does."""
    out, base, d = _planned()
    T().perturb_(out, base, d, 0.5)
    full = out[1].data
    out[1].data = full[:5]
    base[1], d[1] = base[1][:5].clone(), d[1][:5].clone()
    new_epoch()
    got, want = perturb_both(out, base, d)
    assert_same(got, want, "out")


def test_reuse_keeps_the_list_only_for_the_same_tensors():
    a, b = randn([3, 4], torch.float32, 0), randn([3, 4], torch.float32, 1)
    kept = PlanList(a)
    assert reuse(kept, list(a)) is kept
    assert reuse(kept, [a[0], b[1]]) is not kept  # a state tensor replaced
    assert reuse(kept, a[:1]) is not kept
    assert reuse(list(a), a) is not a and type(reuse(None, a)) is PlanList


@pytest.mark.parametrize("mutate", ["setitem", "append", "extend", "iadd", "insert", "pop", "delitem",
                                    "reverse", "slice"])
def test_planlist_mutation_forgets_the_column(mutate):
    out, base, d = _planned()
    T().perturb_(out, base, d, 0.5)  # cached for this epoch
    lists = (out, base, d)
    for i, lst in enumerate(lists):
        x = randn([SIZES[0]], torch.float32, 10 + i)[0]  # a row shaped like row 0
        if mutate == "setitem":
            lst[0] = x
        elif mutate == "append":
            lst.append(x)
        elif mutate == "extend":
            lst.extend([x])
        elif mutate == "iadd":
            lst += [x]
        elif mutate == "insert":
            lst.insert(1, x)
        elif mutate == "pop":
            lst.pop(0)
        elif mutate == "delitem":
            del lst[0]
        elif mutate == "reverse":
            lst.reverse()
        elif mutate == "slice":
            lst[0:1] = [x]
    forgot = all(type(lst) is PlanList and lst._col is None for lst in lists)
    assert_same(*perturb_both(out, base, d), "out")  # a kept column would give stale tables
    assert forgot


def test_planlist_copies_do_not_inherit_the_column():
    out, base, d = _planned()
    T().perturb_(out, base, d, 0.5)
    for cp in (copy.deepcopy(out), copy.copy(out)):
        assert type(cp) is PlanList and cp._col is None
    out2 = copy.deepcopy(out)
    snapshot = [t.clone() for t in out]
    got, want = perturb_both(out2, base, d)
    assert_same(got, want, "deep copy")
    assert_same(list(out), snapshot, "the original (the copy's call must not write it)")


def test_planlist_non_contiguous_is_copied_every_call(monkeypatch):
    out = PlanList([torch.randn(6, 5, device=DEVICE).t(), torch.randn(3, device=DEVICE)])
    base = PlanList([torch.randn(5, 6, device=DEVICE), torch.randn(3, device=DEVICE)])
    d = PlanList([torch.randn(5, 6, device=DEVICE), torch.randn(3, device=DEVICE)])
    assert_same(*perturb_both(out, base, d), "out")
    assert out._col is None  # a column of temporary copies is never kept
    assert_same(*perturb_both(out, base, d), "out again")


def test_planlist_other_backends_take_it_as_a_list():
    from lookahead_ext import ops
    x = PlanList(randn(SIZES, torch.float32, 0))
    want = ops.multi_dot([list(x)], [(0, 0)], backend="reference")
    for backend in [b for b, why in ops.available_backends().items() if why == "ok" and b != "cuda"]:
        torch.testing.assert_close(ops.multi_dot([x], [(0, 0)], backend=backend), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- engine
def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(DEVICE)


def _run(opt, model, steps, between=None):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE, next(model.parameters()).dtype)

    def closure():
        loss = model(x).square().mean()
        loss.backward()
        return loss
    for s in range(steps):
        opt.step(closure)
        if between is not None:
            between(s, opt, model)


@pytest.mark.parametrize("change", ["data", "repoint_state", "replace_state", "requires_grad",
                                    "add_group", "load_state_dict", "repoint_master"])
def test_engine_changes_between_steps_match_the_reference(change):
    """CMLR (SGD momentum, K=2) on the Triton backend vs the reference backend while the
    parameters / state change between steps the way users change them. "repoint_master":
    the fp32 master of a bf16 parameter re-pointed in place; the bucket (and its masters
    PlanList) persists, so only the engine's new epoch per step makes the next launch see it."""
    from lookahead_ext.optim import CMLR
    dtype = torch.bfloat16 if change == "repoint_master" else torch.float32

    def between(s, opt, model):
        p = model[0].weight
        if change == "repoint_master" and s == 0:
            m = opt.state[p]["master"]
            m.data = m.data.clone()
        elif change == "data" and s == 0:
            p.data = p.data.clone() * 0.5
        elif change == "repoint_state" and s == 0:  # v re-pointed in place, same object
            st = opt.state[p]["v"]
            st.data = st.data.clone()
        elif change == "replace_state" and s == 0:
            new = opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone() * 0.5
            placed.append((new, new.clone()))
        elif change == "requires_grad":
            model[2].bias.requires_grad_(s % 2 == 1)
        elif change == "add_group" and s == 0:
            extra = torch.nn.Parameter(torch.randn(3, device=DEVICE))
            model.register_parameter("extra", extra)
            opt.add_param_group({"params": [extra]})
        elif change == "load_state_dict" and s == 1:
            opt.load_state_dict(opt.state_dict())

    results = []
    for backend in ("triton", "reference"):
        model = _model().to(dtype)
        opt = CMLR(model.parameters(), lr=0.1, momentum=0.9, k=2, backend=backend)
        placed = []
        _run(opt, model, 4, between)
        results.append([p.detach().clone() for p in model.parameters()])
        for new, at_placing in placed:  # the replacing tensor is the one the steps update
            assert opt.state[model[0].weight]["momentum_buffer"] is new
            assert not torch.equal(new, at_placing), "the replaced state tensor is still updated"
    for a, b in zip(*results):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:  # bf16 params = cast(fp32 masters): at most one bf16 rounding step apart
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_engine_deepcopy_mid_training_matches_the_reference():
    """A deep copy of (model, optimizer) taken between steps holds new tensors at new
    addresses: its kept lists must not use the original's tables. The copy continues, the
    original is stepped too, and both must follow the reference."""
    from lookahead_ext.optim import CMLR

    def run(backend, steps_before, steps_after, use_copy):
        model = _model()
        opt = CMLR(model.parameters(), lr=0.1, momentum=0.9, k=2, backend=backend)
        _run(opt, model, steps_before)
        if use_copy:
            model2, opt2 = copy.deepcopy((model, opt))
            _run(opt, model, 1)  # the original moves on: a stale table would write it
            model = model2
            opt = opt2
        _run(opt, model, steps_after)
        return [p.detach().clone() for p in model.parameters()]
    got = run("triton", 2, 3, True)
    want = run("reference", 2, 3, False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_host_overhead_bench_runs():
    """bench/host_overhead.py end to end on a few tensors (numbers not checked)."""
    import importlib.util
    import os
    import time
    path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "host_overhead.py")
    spec = importlib.util.spec_from_file_location("host_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.measure(DEVICE, 4, 2, 1, ["perturb", "combine"], time.thread_time)
    assert set(res["ops"]) == {"perturb", "combine"}
    assert res["ops"]["combine"]["triton_planlist"] > 0 and res["triton_step_per_call"] > 0
    assert "| perturb |" in bench.to_md(res, {"device": "cpu"})

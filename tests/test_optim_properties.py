"""Optimizer-level invariants as properties (hypothesis): a skipped step changes nothing, a
resume at any cut point goes on bit for bit, a low-precision parameter is cast(master).

Drawn per example: the optimizer (every probe optimizer of the package), parameter dtype,
base step, backend, how many steps, where the NaN lands. ``--hypothesis-profile=deep`` runs
2000 examples per property; the README's test command runs the default profile's few."""
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import lookahead_ext as la
from _prod_util import FAMILY, assert_same_state, data, flat_state, mlp

MEMBERS = FAMILY + [(la.LookbehindSAM, dict(k=2)), (la.GSAM, {}), (la.CRSAM, {})]
BACKENDS = ["reference"] + (["cpp"] if la.ops.available_backends()["cpp"] == "ok" else [])


@st.composite
def setups(draw):
    cls, kw = draw(st.sampled_from(MEMBERS))
    kw = dict(kw, lr=0.05, backend=draw(st.sampled_from(BACKENDS)))
    if cls in FAMILY_CLASSES and draw(st.booleans()):
        kw.update(base="adamw", lr=1e-2)
    elif cls in FAMILY_CLASSES:
        kw.update(momentum=draw(st.sampled_from([0.0, 0.9])))
    return cls, kw, draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))


FAMILY_CLASSES = {cls for cls, _ in FAMILY}


def _closure(model, x, y, poison=None):
    """A closure; ``poison = (call index, kind)`` makes that call's gradient NaN or its loss inf."""
    calls = [0]

    def closure():
        loss = F.mse_loss(model(x.to(model[0].weight.dtype)).float(), y)
        loss.backward()
        i, calls[0] = calls[0], calls[0] + 1
        if poison is not None and i == poison[0]:
            if poison[1] == "nan_grad":
                model[0].weight.grad.view(-1)[0] = float("nan")
            else:
                loss = loss * float("inf")
        return loss
    return closure


def _low_precision_is_cast_master(model, opt):
    for p in model.parameters():
        master = opt.state.get(p, {}).get("master")
        if p.dtype in (torch.bfloat16, torch.float16) and master is not None:
            assert torch.equal(p, master.to(p.dtype)), tuple(p.shape)


@given(setup=setups(), before=st.integers(0, 4), call=st.integers(0, 3),
       kind=st.sampled_from(["nan_grad", "inf_loss"]))
def test_skipped_step_changes_nothing(setup, before, call, kind):
    cls, kw, dtype = setup
    model = mlp(dtype=dtype)
    x, y = data()
    opt = cls(model.parameters(), **kw)
    for _ in range(before):
        opt.step(_closure(model, x, y))
    weights = [p.detach().clone() for p in model.parameters()]
    state, steps, skipped = flat_state(opt), opt.num_steps, opt.num_skipped
    evals = opt.evals_per_update() if hasattr(opt, "evals_per_update") else 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(_closure(model, x, y, poison=(call % max(1, int(evals)), kind)))
    if opt.num_skipped == skipped:  # the poisoned call was past this step's last probe
        return
    assert opt.num_steps == steps
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert_same_state(state, flat_state(opt))
    _low_precision_is_cast_master(model, opt)


@given(setup=setups(), total=st.integers(1, 6), data_=st.data())
def test_resume_at_any_cut_point_is_bit_identical(setup, total, data_):
    cls, kw, dtype = setup
    cut = data_.draw(st.integers(0, total), label="cut")
    x, y = data()
    model = mlp(dtype=dtype)
    opt = cls(model.parameters(), **kw)
    for _ in range(total):
        opt.step(_closure(model, x, y))
    _low_precision_is_cast_master(model, opt)

    first = mlp(dtype=dtype)
    opt1 = cls(first.parameters(), **kw)
    for _ in range(cut):
        opt1.step(_closure(first, x, y))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = mlp(seed=1, dtype=dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = cls(resumed.parameters(), **kw)
    opt2.load_state_dict(ckpt["opt"])
    for _ in range(total - cut):
        opt2.step(_closure(resumed, x, y))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b), (cls.__name__, tuple(a.shape), cut)
    assert_same_state(flat_state(opt), flat_state(opt2))
    _low_precision_is_cast_master(resumed, opt2)


def test_the_properties_can_fail(monkeypatch):
    """A restore that misses by one on the first weight is caught by the skip property."""
    from lookahead_ext.optim import runtime
    real = runtime.ProbeRuntime._restore

    def off_by_one(self, buckets):
        real(self, buckets)
        with torch.no_grad():
            buckets[0].params[0].view(-1)[0] += 1.0
    monkeypatch.setattr(runtime.ProbeRuntime, "_restore", off_by_one)
    with pytest.raises(AssertionError):
        test_skipped_step_changes_nothing.hypothesis.inner_test(
            setup=(la.SAM, dict(lr=0.05, backend="reference"), torch.float32), before=1, call=1,
            kind="nan_grad")

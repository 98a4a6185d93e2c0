"""Issue 14, training side: unfreezing, skipped inner steps under Lookahead, edits of bf16/fp16
params between steps, step() re-entry, a closure without backward(), a skipped first step."""
import copy
import warnings

import pytest
import torch

import lookahead_ext as la
from lookahead_ext.optim import baselines
from _prod_util import FAMILY, FAMILY_IDS, assert_same_state, data, flat_state, mlp, params_of
from conftest import mse_closure

LOW = [torch.bfloat16, torch.float16]


def _data(dtype):
    return tuple(t.to(dtype) for t in data())


def _nan_closure(model, x, y):
    """A closure whose gradients are NaN (a probe optimizer skips the update)."""
    inner = mse_closure(model, x, y)

    def closure():
        loss = inner()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
        return loss
    return closure


def _stepper(opt, model, x, y):
    """One training step for any optimizer of the tests: step(closure), or backward then
    step() for Lookahead around a torch optimizer."""
    closure = mse_closure(model, x, y)
    if isinstance(opt, la.Lookahead) and not hasattr(opt.optimizer, "num_steps"):
        def step():
            opt.zero_grad()
            closure()
            opt.step()
    else:
        def step():
            opt.step(closure)
    return step


# ----------------------------------------------------------------------------- 1. unfreezing
LOOKAHEAD_MEMBERS = [(la.CMLR, {}), (la.FMLR, {}), (la.MLSAM, {}), (la.CLR, {}), (la.LR, {}),
                     (la.Lookahead, None)]
LOOKAHEAD_IDS = [c.__name__ if kw is not None else "Lookahead_SGD" for c, kw in LOOKAHEAD_MEMBERS]


def _lookahead_opt(cls, kw, params, k=3, alpha=0.5):
    if kw is None:
        return la.Lookahead(torch.optim.SGD(params, lr=0.05, momentum=0.9), k=k, alpha=alpha)
    return cls(params, lr=0.05, k=k, alpha=alpha, **kw)


def _frozen_run(cls, kw, pick):
    """(model, the parameter ``pick(model)`` frozen before the optimizer is built, optimizer,
    one training step)."""
    model = mlp()
    x, y = data()
    p = pick(model)
    p.requires_grad_(False)
    opt = _lookahead_opt(cls, kw, model.parameters())
    return model, p, opt, _stepper(opt, model, x, y)


@pytest.mark.parametrize("cls,kw", LOOKAHEAD_MEMBERS, ids=LOOKAHEAD_IDS)
def test_unfrozen_param_joins_cycle_with_its_weights_then(cls, kw):
    """Frozen at construction, edited while frozen (e.g. pretrained weights loaded), unfrozen
    at a cycle start: its slow weights are its weights when it joins (not those at
    construction), and the sync moves it by alpha (fast - slow) like every other parameter."""
    model, w, opt, step = _frozen_run(cls, kw, lambda m: m[0].weight)
    for _ in range(3):  # one whole cycle (k=3) while frozen
        step()
    assert opt.cycle_position == 0
    with torch.no_grad():
        w.add_(0.25)  # an edit while frozen: construction-time slow weights would undo it
    w.requires_grad_(True)
    joined = w.detach().clone()
    step()  # the first step it trains in (inside the cycle, no sync)
    assert not torch.equal(w, joined)
    with opt.slow_weights():
        assert torch.equal(w, joined)
    fast = w.detach().clone()
    opt.sync()  # the outer step: slow + alpha (fast - slow)
    torch.testing.assert_close(w.detach(), joined + 0.5 * (fast - joined), rtol=0, atol=1e-6)
    for _ in range(7):  # through more syncs: no error, and it keeps training
        step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls,kw", LOOKAHEAD_MEMBERS, ids=LOOKAHEAD_IDS)
def test_unfreeze_mid_cycle_and_freeze_again(cls, kw):
    """Unfrozen mid-cycle it joins that cycle (slow = its weights at its first step); frozen
    mid-cycle it is left exactly as it is (no sync touches it) and drops its slow weights;
    unfrozen again it rejoins with its weights then."""
    _, b, opt, step = _frozen_run(cls, kw, lambda m: m[2].bias)
    step()
    b.requires_grad_(True)  # cycle position 1 of 3
    joined = b.detach().clone()
    step()
    with opt.slow_weights():
        assert torch.equal(b, joined)
    step()  # the sync step of that cycle
    assert opt.cycle_position == 0
    step()
    b.requires_grad_(False)  # mid-cycle
    frozen = b.detach().clone()
    for _ in range(5):  # across syncs
        step()
    assert torch.equal(b, frozen)
    with torch.no_grad():
        b.mul_(2.0)
    b.requires_grad_(True)
    if opt.cycle_position == 2:
        step()  # the next step is not a sync step
    rejoined = b.detach().clone()
    step()
    with opt.slow_weights():
        assert torch.equal(b, rejoined)


def test_errors_name_parameters_by_shape_not_values():
    """The error of a bad gradient names the parameter by its shape, never prints a tensor."""
    model = mlp()
    x, y = data()
    opt = la.CMLR(model.parameters(), lr=0.1, k=2)

    def closure():
        loss = mse_closure(model, x, y)()
        model[0].weight.grad = model[0].weight.grad.to_sparse()
        return loss
    with pytest.raises(RuntimeError, match=r"shape \(8, 4\)") as e:
        opt.step(closure)
    assert "tensor(" not in str(e.value)


# ----------------------------------------------------------------------------- 2. Lookahead skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("applied_before", [1, 2], ids=["mid_cycle", "on_sync_step"])
def test_lookahead_wrapper_ignores_skipped_inner_step(applied_before, dtype):
    """k=3: a skip after 1 applied step (mid-cycle) or after 2 (the step that would sync)
    leaves weights, slow weights, counter and every state entry bit-identical."""
    model = mlp(dtype=dtype)
    x, y = _data(dtype)
    opt = la.Lookahead(la.SAM(model.parameters(), lr=0.1, momentum=0.9), k=3, alpha=0.5)
    for _ in range(applied_before):
        opt.step(mse_closure(model, x, y))
    before_w, before_state = params_of(model), flat_state(opt)
    position = opt.cycle_position
    with opt.slow_weights():
        before_slow = params_of(model)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(_nan_closure(model, x, y))
    assert opt.cycle_position == position
    assert all(torch.equal(a, b) for a, b in zip(before_w, model.parameters()))
    assert_same_state(before_state, flat_state(opt))
    with opt.slow_weights():
        assert all(torch.equal(a, b) for a, b in zip(before_slow, model.parameters()))
    opt.step(mse_closure(model, x, y))  # the cycle goes on: the next applied step counts
    assert opt.cycle_position == (position + 1) % 3


# ----------------------------------------------------------------------------- 4. low-precision edits
def _edit(kind, model, saved):
    with torch.no_grad():
        if kind == "load_state_dict":
            model.load_state_dict(saved)  # roll back to an earlier checkpoint
        elif kind == "reinit":
            torch.manual_seed(5)
            model[0].reset_parameters()
        else:  # clamp
            for p in model.parameters():
                p.clamp_(-0.1, 0.1)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["load_state_dict", "reinit", "clamp"])
@pytest.mark.parametrize("cls,kw", [(la.SAM, {}), (la.CMLR, dict(k=10)), (la.FMLR, dict(k=10))],
                         ids=["SAM", "CMLR", "FMLR"])
def test_low_precision_edit_between_steps_is_kept(cls, kw, kind, dtype):
    """The next step starts from the edited parameter: with lr=0 it leaves the edit exactly
    in place; the masters follow the edit element by element (unchanged elements keep
    their fp32 bits)."""
    model = mlp(dtype=dtype)
    x, y = _data(dtype)
    opt = cls(model.parameters(), lr=0.1, **kw)
    saved = copy.deepcopy(model.state_dict())
    for _ in range(3):
        opt.step(mse_closure(model, x, y))
    masters = [opt.state[p]["master"].clone() for p in model.parameters()]
    old = params_of(model)
    _edit(kind, model, saved)
    edited = params_of(model)
    assert any(not torch.equal(a, b) for a, b in zip(old, edited))
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step(mse_closure(model, x, y))
    for p, e, o, m in zip(model.parameters(), edited, old, masters):
        assert torch.equal(p, e)
        kept = e == o
        assert torch.equal(opt.state[p]["master"][kept], m[kept])
        assert torch.equal(opt.state[p]["master"][~kept], e[~kept].float())


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_low_precision_without_edit_keeps_masters(dtype):
    """Without an edit the masters carry their fp32 bits across steps (the check reads
    version counters only; the optimizer's own writes do not count as edits), also after
    slow_weights() and sync()."""
    model = mlp(dtype=dtype)
    x, y = _data(dtype)
    opt = la.CMLR(model.parameters(), lr=0.1, k=10)
    opt.step(mse_closure(model, x, y))
    with opt.slow_weights():
        pass
    opt.sync()
    masters = [opt.state[p]["master"].clone() for p in model.parameters()]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step(mse_closure(model, x, y))
    assert any(not torch.equal(m, m.to(dtype).float()) for m in masters)  # finer than the param
    for p, m in zip(model.parameters(), masters):
        assert torch.equal(opt.state[p]["master"], m)


# ----------------------------------------------------------------------------- 11. re-entry
REENTRY = FAMILY + [(baselines.LookbehindSAM, dict(k=2)), (baselines.GSAM, {}), (baselines.CRSAM, {})]
REENTRY_IDS = FAMILY_IDS + ["LookbehindSAM", "GSAM", "CRSAM"]


@pytest.mark.parametrize("api", ["step", "probes"])
@pytest.mark.parametrize("cls,kw", REENTRY, ids=REENTRY_IDS)
def test_step_inside_closure_is_refused(cls, kw, api):
    model = mlp()
    x, y = data()
    opt = cls(model.parameters(), lr=0.0, **kw)
    closure = mse_closure(model, x, y)
    opt.step(closure)
    before_w, before_state = params_of(model), flat_state(opt)

    def reentrant():
        loss = closure()
        opt.step(closure)
        return loss
    with pytest.raises(RuntimeError, match="while a step is in progress"):
        if api == "step":
            opt.step(reentrant)
        else:
            for _ in opt.probes():
                reentrant()
    assert all(torch.equal(a, b) for a, b in zip(before_w, model.parameters()))
    assert_same_state(before_state, flat_state(opt))
    opt.step(closure)  # the optimizer still works
    assert opt.num_steps == 2


def test_lookahead_wrapper_step_inside_closure_is_refused():
    model = mlp()
    x, y = data()
    opt = la.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    closure = mse_closure(model, x, y)
    before_w, before_state = params_of(model), flat_state(opt)

    def reentrant():
        loss = closure()
        opt.step()
        return loss
    with pytest.raises(RuntimeError, match="while a step is in progress"):
        opt.step(reentrant)
    assert all(torch.equal(a, b) for a, b in zip(before_w, model.parameters()))
    assert_same_state(before_state, flat_state(opt))
    opt.step(closure)
    assert opt.cycle_position == 1


# ----------------------------------------------------------------------------- closure without backward
@pytest.mark.parametrize("cls,kw", FAMILY, ids=FAMILY_IDS)
def test_closure_without_backward_warns_once(cls, kw):
    model = mlp()
    x, y = data()
    opt = cls(model.parameters(), lr=0.1, **kw)

    def forward_only():
        return torch.nn.functional.mse_loss(model(x), y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(forward_only)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "backward()" in msgs[0], msgs
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a normal step does not warn
        opt.step(mse_closure(model, x, y))


# ----------------------------------------------------------------------------- skipped first step
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "Lookahead"])
@pytest.mark.parametrize("cls,kw", FAMILY, ids=FAMILY_IDS)
def test_skipped_first_step_leaves_state_empty(cls, kw, wrap, dtype):
    model = mlp(dtype=dtype)
    x, y = _data(dtype)
    opt = cls(model.parameters(), lr=0.1, **kw)
    if wrap:
        opt = la.Lookahead(opt, k=2)
    before_w, before_state = params_of(model), flat_state(opt)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(_nan_closure(model, x, y))
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    assert_same_state(before_state, flat_state(opt))
    assert all(torch.equal(a, b) for a, b in zip(before_w, model.parameters()))
    opt.step(mse_closure(model, x, y))  # the first applied step creates the masters
    assert all(torch.equal(p, opt.state[p]["master"].to(dtype)) for p in model.parameters())

"""Parity: every optimizer of optim_db x every backend row present here against backend="reference"
(parameters, losses, optimizer state, slow weights); a skipped step leaves the state bit-identical;
the fused backend is really used."""
import copy
import warnings

import pytest
import torch

from lookahead_ext import ops
from lookahead_ext.ops.backend import OP_NAMES

from conftest import mse_closure, small_batch, small_model
from op_db import DT_IDS, DTYPES
from optim_db import OPTIM_TOLS, optim_db


def train(info, dtype, device, backend, steps):
    model = small_model(dtype, device)
    x, y = small_batch(dtype, device)
    opt = info.make(model.parameters(), backend)
    closure = mse_closure(model, x, y)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        if info.closure:
            losses.append(float(opt.step(closure).detach()))
        else:
            losses.append(float(closure().detach()))
            opt.step()
    return model, opt, losses


def _cases():
    return [(o, d) for o in optim_db for d in DTYPES if d in o.dtypes]


@pytest.mark.parametrize("info,dtype", _cases(), ids=[f"{o.name}-{DT_IDS[d]}" for o, d in _cases()])
def test_parity(backend, info, dtype):
    tol = OPTIM_TOLS.get(backend.tol, OPTIM_TOLS["native"])[dtype]
    steps = backend.optim_steps
    m_f, o_f, l_f = train(info, dtype, backend.device, backend.backend, steps)
    m_r, o_r, l_r = train(info, dtype, backend.device, "reference", steps)
    assert l_r[-1] < l_r[0], "the problem trains at all"
    for (name, a), b in zip(m_f.named_parameters(), m_r.parameters()):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), msg=lambda s: f"{name}: {s}", **tol)
    torch.testing.assert_close(torch.tensor(l_f), torch.tensor(l_r), **tol)
    if hasattr(o_r, "num_steps"):
        assert o_f.num_steps == o_r.num_steps == steps
    # optimizer state (v, masters, moments) matches too
    inner_f, inner_r = getattr(o_f, "optimizer", o_f), getattr(o_r, "optimizer", o_r)
    for p_f, p_r in zip(m_f.parameters(), m_r.parameters()):
        st_f, st_r = inner_f.state[p_f], inner_r.state[p_r]
        assert set(st_f) == set(st_r)
        for k in st_f:
            if isinstance(st_f[k], torch.Tensor) and st_f[k].is_floating_point():
                torch.testing.assert_close(st_f[k].float(), st_r[k].float(), msg=lambda s: f"{k}: {s}", **tol)
    if hasattr(o_r, "_slow"):  # slow weights agree too
        for s_r, s_f in zip(o_r._slow.values(), o_f._slow.values()):
            torch.testing.assert_close(s_f.float(), s_r.float(), **tol)


# ----------------------------------------------------------------------------- skipped steps
def _snapshot(model, opt):
    sd = copy.deepcopy(opt.state_dict())
    for key in ("evals", "skipped"):  # counters of work done, not optimizer state
        sd.get("lookahead_ext", {}).get("engine", {}).pop(key, None)
    return [p.detach().clone() for p in model.parameters()], sd


def _assert_bit_identical(a, b):
    pa, sa = a
    pb, sb = b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)

    def walk(u, v):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v)
        elif isinstance(u, dict):
            assert u.keys() == v.keys()
            for k in u:
                walk(u[k], v[k])
        elif isinstance(u, (list, tuple)):
            assert len(u) == len(v)
            for s, t in zip(u, v):
                walk(s, t)
        else:
            assert u == v
    walk(sa, sb)


SKIP_CASES = [("CMLR", "first"), ("CMLR", "last"), ("FMLR", "first"), ("FMLR", "last")]


@pytest.mark.parametrize("name,where", SKIP_CASES, ids=[f"{n}-{w}" for n, w in SKIP_CASES])
def test_skipped_step_leaves_state_bit_identical(backend, name, where):
    """A NaN gradient at one probe: the fused nonfinite_ check skips the update and no
    parameter, momentum, v, base state or slow weight changes by a single bit."""
    info = next(o for o in optim_db if o.name == name)
    model = small_model(torch.float32, backend.device)
    closure = mse_closure(model, *small_batch(torch.float32, backend.device))
    opt = info.make(model.parameters(), backend.backend)
    for _ in range(3):
        opt.step(closure)
    before = _snapshot(model, opt)
    calls = {"n": 0}
    evals = 1 if where == "first" else 2  # k = 3 of the cycle: probes g+ then g- (or g0, g+)

    def bad_closure():
        calls["n"] += 1
        loss = closure()
        if calls["n"] == evals:
            next(model.parameters()).grad[0, 0] = float("nan")
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(bad_closure)
    assert opt.num_skipped == 1
    _assert_bit_identical(before, _snapshot(model, opt))


def test_skip_on_infinite_gradient_with_finite_loss(backend):
    model = small_model(torch.float32, backend.device)
    x, y = small_batch(torch.float32, backend.device)
    opt = next(o for o in optim_db if o.name == "SAM").make(model.parameters(), backend.backend)
    opt.device_skip = False  # the host path warns at once (on CUDA, SAM's default is the lazy device flag)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y) * float("inf")
        loss.backward()
        return torch.tensor(1.0)  # finite loss: the gradient check must catch it

    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step(closure)
    assert opt.num_skipped == 1
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_backend_is_really_used(backend, monkeypatch):
    """Guard against a silent fallback: every op of a CMLR step goes through the row's backend."""
    impl = ops.resolve(backend.backend, torch.device(backend.device), torch.float32)
    calls = []
    for name in OP_NAMES:
        fn = getattr(impl, name)
        monkeypatch.setattr(impl, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    ops.clear_dispatch_cache()
    info = next(o for o in optim_db if o.name == "CMLR")
    train(info, torch.float32, backend.device, backend.backend, 3)
    # no multi_dot: the norms come from the fused nonfinite_ check and combine_step_'s v_sq_out
    assert set(calls) == {"perturb_", "combine_step_", "lookahead_sync_", "nonfinite_"}

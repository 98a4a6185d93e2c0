"""Equivalences, state_dict resume, schedulers, the probes() API, slow weights, bad inputs,
low precision, diagnostics and the subclass extension points of the optimizer engine."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import lookahead_ext as la
from lookahead_ext.optim.engine import ProbeOptimizer

LOOK = ("LR", "CLR", "FMLR", "MLSAM", "CMLR")
ALL = ("SAM", "FR", "CR") + LOOK


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).to(dtype)


def data(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def closure_for(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)
        loss.backward()
        return loss
    return closure


def build(name, params, **kw):
    cls = getattr(la, name)
    if name in LOOK:
        kw.setdefault("k", 3)
    kw.setdefault("backend", "reference")
    return cls(params, **kw)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(a, b, msg=""):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y), msg


def state_tensors(opt):
    sd = opt.state_dict()
    out = []
    for i in sorted(sd["state"]):
        for key in sorted(sd["state"][i]):
            out.append((i, key, sd["state"][i][key]))
    extra = sd.get("lookahead_ext")
    slow = [] if extra is None else [extra["slow"][i] for i in sorted(extra["slow"])]
    return out, slow


def assert_same_state(s1, s2):
    (a, sa), (b, sb) = s1, s2
    assert [(i, k) for i, k, _ in a] == [(i, k) for i, k, _ in b]
    for (_, key, x), (_, _, y) in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        else:
            assert x == y, key
    assert_bitwise(sa, sb)


# ------------------------------------------------------------------ equivalences
def test_fr_with_lam_rho_is_sam():
    x, y = data()
    m1, m2 = mlp(), mlp()
    o1 = la.SAM(m1.parameters(), lr=0.1, rho=0.07, momentum=0.9, backend="reference")
    o2 = la.FR(m2.parameters(), lr=0.1, rho=0.07, lam=0.07, momentum=0.9, backend="reference")
    for _ in range(4):
        o1.step(closure_for(m1, x, y))
        o2.step(closure_for(m2, x, y))
    assert_bitwise(params_of(m1), params_of(m2))


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_lookahead_alpha_one_is_base(base):
    x, y = data()
    m1, m2 = mlp(), mlp()
    mk = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if base == "sgd" else \
        (lambda p: torch.optim.Adam(p, lr=0.01))
    o1 = mk(m1.parameters())
    o2 = la.Lookahead(mk(m2.parameters()), k=2, alpha=1.0)
    for _ in range(5):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            closure_for(m, x, y)()
            o.step()
    assert_bitwise(params_of(m1), params_of(m2))


def test_lookahead_wrapper_math_and_state():
    x, y = data()
    m = mlp()
    w0 = params_of(m)
    opt = la.Lookahead(torch.optim.SGD(m.parameters(), lr=0.1), k=2, alpha=0.5)
    ref = mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        for mm, o in ((m, opt), (ref, ref_opt)):
            o.zero_grad()
            closure_for(mm, x, y)()
            o.step()
    expected = [a + 0.5 * (b - a) for a, b in zip(w0, params_of(ref))]
    for p, e in zip(m.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
    assert opt.cycle_position == 0
    opt.zero_grad()
    closure_for(m, x, y)()
    opt.step()
    with opt.slow_weights():
        for p, e in zip(m.parameters(), expected):
            torch.testing.assert_close(p.detach(), e)
    # state_dict round trip mid-cycle, then continue bit-identically
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": m.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    m2 = mlp(seed=5)
    m2.load_state_dict(ck["model"])
    opt2 = la.Lookahead(torch.optim.SGD(m2.parameters(), lr=0.1), k=2, alpha=0.5)
    opt2.load_state_dict(ck["opt"])
    for mm, o in ((m, opt), (m2, opt2)):
        o.zero_grad()
        closure_for(mm, x, y)()
        o.step()
    assert_bitwise(params_of(m), params_of(m2))


SGD_OPTS = [dict(), dict(momentum=0.9), dict(momentum=0.9, dampening=0.3),
            dict(momentum=0.9, nesterov=True), dict(momentum=0.8, weight_decay=0.01),
            dict(weight_decay=0.05), dict(momentum=0.9, nesterov=True, weight_decay=0.01)]
ADAMW_OPTS = [dict(), dict(betas=(0.8, 0.95)), dict(eps=1e-4), dict(weight_decay=0.1),
              dict(betas=(0.5, 0.9), eps=1e-6, weight_decay=0.02)]


@pytest.mark.parametrize("base,opts", [("sgd", o) for o in SGD_OPTS] + [("adamw", o) for o in ADAMW_OPTS])
def test_cmlr_base_step_equals_torch(base, opts):
    """Drive CMLR call by call, rebuild d = (rho+lam)/2rho g+ + (rho-lam)/2rho g- from the
    captured probe gradients and feed it to torch.optim.SGD / AdamW on a copy."""
    x, y = data()
    m, ref = mlp(), mlp()
    lr = 0.05 if base == "sgd" else 0.01
    opt = la.CMLR(m.parameters(), lr=lr, base=base, k=100, backend="reference", **opts)
    tcls = torch.optim.SGD if base == "sgd" else torch.optim.AdamW
    topt = tcls(ref.parameters(), lr=lr, **opts)
    rho, lam = 0.05, 0.1
    for _ in range(4):
        grads = {}
        for probe in opt.probes():
            closure_for(m, x, y)()
            grads[probe.name] = [p.grad.clone() for p in m.parameters()]
        for p, gp, gm in zip(ref.parameters(), grads["g+"], grads["g-"]):
            p.grad = gp * ((rho + lam) / (2 * rho)) + gm * ((rho - lam) / (2 * rho))
        topt.step()
        for a, b in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ state dict resume
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", ALL)
def test_state_dict_resume_bit_identical(name, base):
    x, y = data()
    kw = dict(lr=0.05, base=base, weight_decay=0.01, track_cosine=True)
    kw.update(momentum=0.9) if base == "sgd" else kw.update(betas=(0.9, 0.99))
    m = mlp()
    opt = build(name, m.parameters(), **kw)
    for _ in range(4):  # mid-cycle for K = 3
        opt.step(closure_for(m, x, y))
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": m.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    m2 = mlp(seed=3)
    m2.load_state_dict(ck["model"])
    opt2 = build(name, m2.parameters(), lr=0.5, base=base, track_cosine=True)  # hyperparams come from the state
    opt2.load_state_dict(ck["opt"])
    assert opt2.cycle_position == opt.cycle_position and opt2.num_evals == opt.num_evals
    for _ in range(4):
        l1 = opt.step(closure_for(m, x, y))
        l2 = opt2.step(closure_for(m2, x, y))
        assert torch.equal(l1, l2)
    assert_bitwise(params_of(m), params_of(m2), name)
    assert_same_state(state_tensors(opt), state_tensors(opt2))
    assert opt.cosine_history == opt2.cosine_history
    assert len(opt.cosine_history) == 7


# ------------------------------------------------------------------ schedulers, groups
def test_lr_scheduler_drives_per_group_lr():
    x, y = data()
    m = mlp()
    opt = la.CMLR([dict(params=m[0].parameters()), dict(params=m[2].parameters(), lr=0.02)],
                  lr=0.1, k=2, backend="reference")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 if e == 0 else 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        opt.step(closure_for(m, x, y))
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    before = params_of(m)
    opt.step(closure_for(m, x, y))  # lr 0 and the sync: slow + alpha (fast - slow)
    with opt.slow_weights():
        after_slow = params_of(m)
    assert_bitwise(after_slow, params_of(m))
    assert not all(torch.equal(a, b) for a, b in zip(before, params_of(m)))  # synced toward w0


def test_lr_scheduler_with_probes_api():
    x, y = data()
    m = mlp()
    opt = la.SAM(m.parameters(), lr=0.1, backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for probe in opt.probes():
            probe.loss = closure_for(m, x, y)()
        sched.step()
    before = params_of(m)
    opt.step(closure_for(m, x, y))
    assert_bitwise(before, params_of(m))


def test_sam_lam_follows_per_group_rho():
    """SAM/ML-SAM tie lam to each group's rho: the update is exactly d = g+."""
    x, y = data()
    m1, m2 = mlp(), mlp()
    o1 = la.SAM([dict(params=m1[0].parameters(), rho=0.2), dict(params=m1[2].parameters())],
                lr=0.1, backend="reference")
    o2 = la.FR([dict(params=m2[0].parameters(), rho=0.2, lam=0.2), dict(params=m2[2].parameters())],
               lr=0.1, rho=0.05, lam=0.05, backend="reference")
    o1.step(closure_for(m1, x, y))
    o2.step(closure_for(m2, x, y))
    assert_bitwise(params_of(m1), params_of(m2))


# ------------------------------------------------------------------ probes() API
def test_probes_gradient_accumulation_matches_closure():
    x, y = data(n=32)
    m1, m2 = mlp(), mlp()
    o1 = la.CMLR(m1.parameters(), lr=0.1, k=3, backend="reference")
    o2 = la.CMLR(m2.parameters(), lr=0.1, k=3, backend="reference")
    for _ in range(4):
        o1.step(closure_for(m1, x, y))
        names = []
        for probe in o2.probes():
            names.append(probe.name)
            total = 0.0
            for xs, ys in ((x[:16], y[:16]), (x[16:], y[16:])):
                loss = F.cross_entropy(m2(xs), ys) / 2
                loss.backward()
                total += loss.detach()
            probe.loss = total
        assert names[-2:] == ["g+", "g-"]
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert o1.num_evals == o2.num_evals


@pytest.mark.parametrize("at", [0, 1, 2])
def test_probes_early_break_restores_exactly(at):
    x, y = data()
    m = mlp()
    opt = la.CMLR(m.parameters(), lr=0.1, k=2, momentum=0.9, backend="reference")
    for _ in range(2):
        opt.step(closure_for(m, x, y))
    assert opt.cycle_position == 0  # three probes: g0, g+, g-
    w, st = params_of(m), state_tensors(opt)
    pos, evals = opt.cycle_position, opt.num_evals
    for i, probe in enumerate(opt.probes()):
        closure_for(m, x, y)()
        if i == at:
            break
    assert_bitwise(w, params_of(m))
    assert_same_state(st, state_tensors(opt))
    assert opt.cycle_position == pos and opt.num_evals == evals + at
    # an exception inside step's closure restores too
    calls = []

    def bad():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        return closure_for(m, x, y)()
    with pytest.raises(KeyError):
        opt.step(bad)
    assert_bitwise(w, params_of(m))


def test_step_without_closure_names_probes():
    m = mlp()
    for name in ALL:
        with pytest.raises(RuntimeError, match="probes"):
            build(name, m.parameters()).step()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_step_zeroes_grads_and_returns_first_loss(backend):
    x, y = data()
    m = mlp()
    opt = la.CMLR(m.parameters(), lr=0.1, k=2, backend=backend)
    seen, losses = [], []

    def closure():
        seen.append(all(p.grad is None for p in m.parameters()))
        loss = closure_for(m, x, y)()
        losses.append(loss.detach())
        return loss
    for evals in (3, 2):  # g0 (v's init), g+, g-; then g+, g- (inner step 2 of K=2)
        for p in m.parameters():  # stale grads: dropped before the first probe of each step
            p.grad = torch.ones_like(p)
        seen.clear()
        losses.clear()
        out = opt.step(closure)
        assert all(seen) and len(seen) == evals
        assert torch.equal(out.detach(), losses[0])


def test_user_edits_between_steps_are_respected():
    """fp32 masters are refreshed every step: editing p.data between steps is honoured."""
    x, y = data()
    m1, m2 = mlp(), mlp()
    o1 = la.SAM(m1.parameters(), lr=0.1, backend="reference")
    o2 = la.SAM(m2.parameters(), lr=0.1, backend="reference")
    o1.step(closure_for(m1, x, y))
    with torch.no_grad():
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            p1.mul_(0.5)
            p2.copy_(p1)
    o1.step(closure_for(m1, x, y))
    o2.step(closure_for(m2, x, y))
    assert_bitwise(params_of(m1), params_of(m2))



@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_parameter_changes_between_steps_rebuild_the_plan(backend):
    """The engine and Lookahead cache their bucket plans; a parameter frozen, replaced
    (p.data = ..., here with another dtype) or added between steps must be honoured exactly
    as by an optimizer built fresh for the new parameter set."""
    x, y = data()
    m1, m2 = mlp(), mlp()
    o1 = la.CMLR(m1.parameters(), lr=0.1, momentum=0.9, k=2, backend=backend)
    o1.step(closure_for(m1, x, y))
    w0 = m1[0].weight.detach().clone()
    m1[0].weight.requires_grad_(False)           # frozen: left untouched
    o1.step(closure_for(m1, x, y))
    assert torch.equal(m1[0].weight, w0)
    m1[0].weight.requires_grad_(True)
    with torch.no_grad():                         # replaced storage of another dtype
        m1[2].bias.data = m1[2].bias.data.double()
    m1[2].bias.register_hook(lambda g: g.double())
    extra = torch.nn.Parameter(torch.ones(3))     # a group added mid-run
    o1.add_param_group({"params": [extra]})

    def closure():
        h = F.linear(torch.tanh(m1[0](x)), m1[2].weight, m1[2].bias.float())
        loss = F.cross_entropy(h + extra, y)
        loss.backward()
        return loss
    o1.step(closure)
    assert m1[2].bias.dtype == torch.float64 and not torch.equal(extra, torch.ones(3))
    assert all(torch.isfinite(p).all() for p in m1.parameters())

    # Lookahead around torch SGD: freezing / unfreezing between syncs
    la_opt = la.Lookahead(torch.optim.SGD(m2.parameters(), lr=0.1), k=1, alpha=0.5,
                          backend=backend)
    closure_for(m2, x, y)()
    la_opt.step()
    w0 = m2[0].weight.detach().clone()
    m2[0].weight.requires_grad_(False)
    m2.zero_grad()
    closure_for(m2, x, y)()
    la_opt.step()
    assert torch.equal(m2[0].weight, w0)
    with torch.no_grad():  # another dtype: its own fused-sync group (cpp takes one dtype per call)
        m2[2].bias.data = m2[2].bias.data.double()
    la_opt._slow[m2[2].bias] = la_opt._slow[m2[2].bias].double()
    m2.zero_grad()
    F.cross_entropy(F.linear(torch.tanh(m2[0](x)), m2[2].weight, m2[2].bias.float()), y).backward()
    la_opt.step()
    assert m2[2].bias.dtype == torch.float64 and torch.equal(m2[2].bias, la_opt._slow[m2[2].bias])



@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_v_norm_from_combine_is_used_only_for_the_v_it_wrote(backend, monkeypatch):
    """CMLR takes ||v|| for the next step from combine_step_'s v_sq_out (no pass over v)
    and the probe-gradient norms from the fused nonfinite_ check (no multi_dot at all);
    an in-place edit of v (version counter) or a replaced v forces a fresh multi_dot.
    Either way the trajectory is bit-identical to always recomputing ||v||."""
    from lookahead_ext import ops as la_ops
    x, y = data()
    m1, m2 = mlp(), mlp()
    o1 = la.CMLR(m1.parameters(), lr=0.1, momentum=0.9, k=3, init_v="carry", backend=backend)
    o2 = la.CMLR(m2.parameters(), lr=0.1, momentum=0.9, k=3, init_v="carry", backend=backend)
    o2._v_norm_sq = lambda vdir: o2._global_sq([[vl] for vl in vdir], [(0, 0)])[0]
    calls = []
    real = la_ops.multi_dot
    monkeypatch.setattr(la_ops, "multi_dot", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for _ in range(4):
        o1.step(closure_for(m1, x, y))
    n_cached = len(calls)
    for _ in range(4):
        o2.step(closure_for(m2, x, y))
    assert n_cached == 0 and len(calls) == 3  # o2: every step after the first (v = g0 there)
    assert_bitwise(params_of(m1), params_of(m2))
    calls.clear()
    for o in (o1, o2):                       # the same in-place edit of v in both
        with torch.no_grad():
            for p in o.param_groups[0]["params"]:
                o.state[p]["v"].mul_(3.0)
    o1.step(closure_for(m1, x, y))
    assert len(calls) == 1                   # the edit invalidated the carried norm
    o2.step(closure_for(m2, x, y))
    assert_bitwise(params_of(m1), params_of(m2))
    p0 = o1.param_groups[0]["params"][0]      # a replaced v tensor (same values) too
    o1.state[p0]["v"] = o1.state[p0]["v"].clone()
    calls.clear()
    o1.step(closure_for(m1, x, y))
    assert len(calls) == 1


# ------------------------------------------------------------------ slow weights
@pytest.mark.parametrize("name", LOOK)
def test_slow_weights_and_sync(name):
    x, y = data()
    m = mlp()
    w0 = params_of(m)
    opt = build(name, m.parameters(), lr=0.1, alpha=0.6, k=5)
    for _ in range(2):
        opt.step(closure_for(m, x, y))
    fast = params_of(m)
    with opt.slow_weights():
        assert_bitwise(w0, params_of(m))
    assert_bitwise(fast, params_of(m))
    with pytest.raises(ZeroDivisionError):
        with opt.slow_weights():
            1 / 0
    assert_bitwise(fast, params_of(m))
    opt.sync()
    assert opt.cycle_position == 0
    expected = [a + 0.6 * (b - a) for a, b in zip(w0, fast)]
    for p, e in zip(m.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-7)
    with opt.slow_weights():
        now = params_of(m)
    assert_bitwise(now, params_of(m))
    opt.step(closure_for(m, x, y))  # goes on from the synced point


def test_non_lookahead_members_have_no_slow_weights():
    m = mlp()
    for name in ("SAM", "FR", "CR"):
        opt = build(name, m.parameters())
        with pytest.raises(RuntimeError, match="slow weights"):
            opt.sync()


# ------------------------------------------------------------------ bad inputs
def test_sparse_gradients_raise():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    w = params_of(emb)
    opt = la.CMLR(emb.parameters(), lr=0.1, backend="reference")

    def closure():
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(closure)
    assert_bitwise(w, params_of(emb))


def test_complex_parameters_raise():
    with pytest.raises(TypeError, match="real floating-point"):
        la.CMLR([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("what,at", [("nan_loss", 0), ("inf_loss", 1), ("nan_grad", 1),
                                     ("inf_grad", 2), ("nan_grad", 0)])
def test_nonfinite_skips_bit_identically(name, what, at):
    x, y = data()
    m = mlp()
    opt = build(name, m.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.step(closure_for(m, x, y))
    w, st = params_of(m), state_tensors(opt)
    pos, steps = opt.cycle_position, opt.num_steps
    calls = []

    def closure():
        i = len(calls)
        calls.append(1)
        loss = closure_for(m, x, y)()
        if i == at:
            if what.endswith("loss"):
                return loss * (float("nan") if what == "nan_loss" else float("inf"))
            with torch.no_grad():
                m[0].weight.grad[0, 0] = float("nan") if what == "nan_grad" else float("inf")
        return loss
    at = min(at, (3 if name == "CLR" else 2) - 1)  # probes in this (mid-cycle) step
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(closure)
    assert len(calls) == at + 1  # the remaining probes are not requested
    assert_bitwise(w, params_of(m))
    assert_same_state(st, state_tensors(opt))
    assert opt.num_skipped == 1 and opt.state_dict()["lookahead_ext"]["engine"]["skipped"] == 1
    assert opt.cycle_position == pos and opt.num_steps == steps
    assert all(p.grad is None for p in m.parameters())
    opt.step(closure_for(m, x, y))  # and training goes on
    assert opt.num_steps == steps + 1


BAD = [dict(lr=-1.0), dict(rho=0.0), dict(rho=-0.1), dict(lam=-0.1), dict(k=0), dict(k=2.5),
       dict(alpha=0.0), dict(alpha=1.5), dict(beta_start=1.2), dict(beta_end=-0.1),
       dict(gamma=2.0), dict(momentum=1.0), dict(momentum=-0.1), dict(dampening=2.0),
       dict(weight_decay=-1.0), dict(eps=0.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9,)),
       dict(norm_eps=0.0), dict(base="lion"), dict(init_v="zero"), dict(backend="gpu"),
       dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.1),
       dict(rho=float("nan"))]


@pytest.mark.parametrize("kw", BAD, ids=[str(b) for b in BAD])
def test_bad_hyperparameters(kw):
    with pytest.raises(ValueError):
        la.CMLR(mlp().parameters(), **kw)


def test_bad_hyperparameters_in_a_group_and_lookahead():
    with pytest.raises(ValueError, match="rho"):
        la.CMLR([dict(params=mlp().parameters(), rho=-1.0)])
    with pytest.raises(ValueError):
        la.Lookahead(torch.optim.SGD(mlp().parameters(), lr=0.1), k=0)
    with pytest.raises(ValueError):
        la.Lookahead(torch.optim.SGD(mlp().parameters(), lr=0.1), alpha=0.0)
    with pytest.raises(TypeError):
        la.SAM(mlp().parameters(), lam=0.1)


def test_param_without_grad_is_untouched():
    x, y = data()
    m = mlp()
    extra = torch.nn.Parameter(torch.ones(3))
    opt = la.CMLR([dict(params=list(m.parameters()) + [extra])], lr=0.1, k=2,
                  weight_decay=0.1, backend="reference")
    for _ in range(3):
        opt.step(closure_for(m, x, y))
    assert torch.equal(extra.detach(), torch.ones(3))
    assert "momentum_buffer" not in opt.state[extra]


def test_param_with_grad_in_some_probes_uses_zero():
    """A parameter without .grad in some probes counts as a zero gradient there."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    u = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    opt = la.CMLR([w, u], lr=0.1, k=5, backend="reference")
    for i, probe in enumerate(opt.probes()):
        loss = (w ** 2).sum() + (u ** 2).sum() * (i == 1)  # u only in g+ (index 1)
        loss.backward()
    for t in (w, u):
        assert torch.isfinite(t).all()
    # u: d = (rho+lam)/2rho * 2u + (rho-lam)/2rho * 0 -- perturbed at g+ by rho*v_hat_u = 0
    assert float(u.detach()) == pytest.approx(3.0 - 0.1 * 1.5 * 6.0)


# ------------------------------------------------------------------ low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_low_precision_params_fp32_state(dtype, base):
    x, y = data()
    m, ref = mlp(dtype), mlp(torch.float32)
    with torch.no_grad():
        for p, r in zip(m.parameters(), ref.parameters()):
            r.copy_(p.float())
    opt = la.CMLR(m.parameters(), lr=0.05, base=base, k=3, momentum=0.9 if base == "sgd" else 0.0,
                  backend="reference")
    ropt = la.CMLR(ref.parameters(), lr=0.05, base=base, k=3, momentum=0.9 if base == "sgd" else 0.0,
                   backend="reference")
    first = float(closure_for(m, x, y)().detach())
    m.zero_grad()
    for _ in range(7):
        opt.step(closure_for(m, x, y))
        ropt.step(closure_for(ref, x, y))
    for p in m.parameters():
        st = opt.state[p]
        assert p.dtype == dtype
        assert st["master"].dtype == torch.float32 and st["v"].dtype == torch.float32
        assert torch.equal(p.detach(), st["master"].to(dtype))
        assert opt._slow[p].dtype == torch.float32
    for p, r in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().float(), r.detach(), rtol=0.05, atol=0.02)
    assert float(closure_for(m, x, y)().detach()) < first
    # resume bit-identically, fp32 state stays fp32
    m2 = mlp(dtype, seed=9)
    m2.load_state_dict(m.state_dict())
    opt2 = la.CMLR(m2.parameters(), lr=0.05, base=base, k=3, backend="reference")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in m2.parameters():
        assert opt2.state[p]["master"].dtype == torch.float32
    for _ in range(2):
        opt.step(closure_for(m, x, y))
        opt2.step(closure_for(m2, x, y))
    assert_bitwise(params_of(m), params_of(m2))


# ------------------------------------------------------------------ diagnostics
def test_track_cosine_matches_definition():
    x, y = data()
    m = mlp()
    opt = la.SAM(m.parameters(), lr=0.1, backend="reference", track_cosine=True)
    plain = la.SAM(mlp().parameters(), lr=0.1, backend="reference")
    assert plain.track_cosine is False and plain.cosine_history == []
    ds = []
    for _ in range(3):
        for probe in opt.probes():
            closure_for(m, x, y)()
            if probe.name == "g+":
                ds.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert len(opt.cosine_history) == 2
    for i in (0, 1):
        c = F.cosine_similarity(ds[i + 1], ds[i], dim=0)
        assert opt.cosine_history[i] == pytest.approx(float(c), abs=1e-5)
    assert "prev_d" in opt.state[next(m.parameters())]


# ------------------------------------------------------------------ extension points
class OneProbeSGD(ProbeOptimizer):
    """Plain SGD through the engine's building blocks (one probe at w, d = g0)."""
    lookahead = False

    def _probe_and_commit(self, buckets):
        g0 = yield from self._probe(buckets, 0, "g0")
        with torch.no_grad():
            kept, filled = self._gather(buckets, {"g0": g0})
            for b, g in zip(kept, filled["g0"]):
                self._base_step(b, (g, None, None), (1.0, 0.0, 0.0), None, None, self._backend())
            self._finish(buckets)


class TwoAscentSAM(ProbeOptimizer):
    """SAM by hand from the building blocks, with a custom persistent buffer."""
    lookahead = False

    def _probe_and_commit(self, buckets):
        g0 = yield from self._probe(buckets, 0, "g0")
        with torch.no_grad():
            dense = self._dense(buckets, g0)
            inv = self._norm_inv(self._global_sq([[d] for d in dense], [(0, 0)])[0])
        gp = yield from self._probe(buckets, 1, "g+", dense, +1.0, inv)
        with torch.no_grad():
            kept, filled = self._gather(buckets, {"g0": g0, "g+": gp})
            for b, g in zip(kept, filled["g+"]):
                self._base_step(b, (None, g, None), (0.0, 1.0, 0.0), None, None, self._backend())
                for p in b.params:
                    self._state_buffer(p, "visits").add_(1)
            self._finish(buckets)


def test_subclass_extension_points():
    x, y = data()
    m1, m2, m3, m4 = mlp(), mlp(), mlp(), mlp()
    o1 = OneProbeSGD(m1.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, backend="reference")
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    o3 = TwoAscentSAM(m3.parameters(), lr=0.1, rho=0.1, backend="reference", track_cosine=True)
    o4 = la.SAM(m4.parameters(), lr=0.1, rho=0.1, backend="reference", track_cosine=True)
    for _ in range(3):
        o1.step(closure_for(m1, x, y))
        o2.zero_grad()
        closure_for(m2, x, y)()
        o2.step()
        o3.step(closure_for(m3, x, y))
        o4.step(closure_for(m4, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert_bitwise(params_of(m3), params_of(m4))
    assert o3.cosine_history == o4.cosine_history
    assert o1.num_evals == 3 and o3.num_evals == 6
    assert float(o3.state[next(m3.parameters())]["visits"].flatten()[0]) == 3.0


# ------------------------------------------------------------------ more Lookahead / engine
def test_lookahead_step_with_closure_and_around_sam():
    x, y = data()
    m = mlp()
    opt = la.Lookahead(torch.optim.SGD(m.parameters(), lr=0.1), k=2)
    loss = opt.step(closure_for(m, x, y))
    assert loss is not None and opt.cycle_position == 1
    m2 = mlp()
    opt2 = la.Lookahead(la.SAM(m2.parameters(), lr=0.1, backend="reference"), k=2, alpha=0.5)
    w0 = params_of(m2)
    for _ in range(2):
        opt2.step(closure_for(m2, x, y))
    assert opt2.optimizer.num_evals == 4 and opt2.cycle_position == 0
    with pytest.raises(RuntimeError, match="probes"):
        opt2.step()
    with opt2.slow_weights():
        slow = params_of(m2)
    assert_bitwise(slow, params_of(m2))  # just synced: fast == slow
    assert not all(torch.equal(a, b) for a, b in zip(w0, slow))


def test_reset_base_state_at_sync():
    x, y = data()
    m = mlp()
    opt = la.CMLR(m.parameters(), lr=0.1, k=2, momentum=0.9, reset_base_state=True,
                  backend="reference")
    opt.step(closure_for(m, x, y))
    assert "momentum_buffer" in opt.state[m[0].weight]
    opt.step(closure_for(m, x, y))
    assert "momentum_buffer" not in opt.state[m[0].weight] and "v" in opt.state[m[0].weight]


def test_backup_is_fused_into_first_perturbation(monkeypatch):
    from lookahead_ext import ops
    calls = []
    real = ops.perturb_

    def spy(out, base, direction, scale, backup=None, backend="auto"):
        calls.append((backup is not None,))
        return real(out, base, direction, scale, backup=backup, backend=backend)
    monkeypatch.setattr(ops, "perturb_", spy)
    x, y = data()
    m = mlp()
    opt = la.CMLR(m.parameters(), lr=0.1, k=2, backend="reference")
    opt.step(closure_for(m, x, y))   # g0 (no write), g+ (fused backup), g- (from masters)
    assert [c[0] for c in calls] == [True, False]
    calls.clear()
    mb = mlp(torch.bfloat16)
    optb = la.CMLR(mb.parameters(), lr=0.1, k=2, backend="reference")
    optb.step(closure_for(mb, x, y))  # persistent fp32 masters: no backup needed
    assert [c[0] for c in calls] == [False, False]


def test_backend_auto_matches_reference():
    x, y = data()
    m1, m2 = mlp(), mlp()
    o1 = la.CMLR(m1.parameters(), lr=0.1, k=2, backend="reference")
    o2 = la.CMLR(m2.parameters(), lr=0.1, k=2, backend="auto")
    for _ in range(3):
        o1.step(closure_for(m1, x, y))
        o2.step(closure_for(m2, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lookahead_around_sam_on_bf16_syncs_masters():
    x, y = data()
    m = mlp(torch.bfloat16)
    opt = la.Lookahead(la.SAM(m.parameters(), lr=0.1, backend="reference"), k=2, alpha=0.5)
    for _ in range(2):
        opt.step(closure_for(m, x, y))
    for p in m.parameters():
        assert torch.equal(opt.state[p]["master"], opt._slow[p])
        assert torch.equal(p.detach(), opt._slow[p].to(torch.bfloat16))
    sd = opt.state_dict()
    assert "state" in sd and "param_groups" in sd and "lookahead" in sd


def test_lookahead_with_lr_scheduler():
    x, y = data()
    m = mlp()
    opt = la.Lookahead(torch.optim.SGD(m.parameters(), lr=0.1), k=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.zero_grad()
            closure_for(m, x, y)()
            opt.step()
            sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)

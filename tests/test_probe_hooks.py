"""The probe runtime's registered hooks (probe pre/post hooks, norm reducers, grad unscalers),
torch's step hooks on the probes() path, and the tensor-group building blocks."""
import pytest
import torch
import torch.nn.functional as F

import lookahead_ext as la
from torch.optim.optimizer import register_optimizer_step_pre_hook
from lookahead_ext.optim import groups
from test_optim_api import data, mlp, params_of


def closure_for(model, x, y, scale=1.0):
    def closure():
        loss = F.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)
        (loss * scale).backward()
        return loss
    return closure


# ------------------------------------------------------------------ torch's step hooks
@pytest.mark.parametrize("path", ["step", "probes"])
def test_torch_step_hooks_fire_once_per_step_on_both_paths(path):
    x, y = data()
    m = mlp()
    opt = la.CMLR(m.parameters(), lr=0.1, k=2, backend="reference")
    calls = []
    opt.register_step_pre_hook(lambda o, args, kw: calls.append(("pre", o.num_steps)))
    post = opt.register_step_post_hook(lambda o, args, kw: calls.append(("post", o.num_steps)))
    g_pre = register_optimizer_step_pre_hook(
        lambda o, args, kw: calls.append(("global_pre", o.num_steps)))
    try:
        for _ in range(2):
            if path == "step":
                opt.step(closure_for(m, x, y))
            else:
                for probe in opt.probes():
                    probe.loss = closure_for(m, x, y)()
    finally:
        g_pre.remove()
    assert calls == [("global_pre", 0), ("pre", 0), ("post", 1),
                     ("global_pre", 1), ("pre", 1), ("post", 2)]
    post.remove()
    calls.clear()
    for probe in opt.probes():   # abandoned step: pre hook only, as a step() that raises
        closure_for(m, x, y)()
        break
    assert calls == [("pre", 2)]


# ------------------------------------------------------------------ probe hooks
def test_probe_hooks_see_every_probe_and_can_be_removed():
    x, y = data()
    m = mlp()
    opt = la.CMLR(m.parameters(), lr=0.1, k=2, backend="reference")
    seen = []

    def pre(o, probe):
        assert o is opt and all(p.grad is None for p in m.parameters())
        seen.append(("pre", probe.name))

    def post(o, probe, params):
        assert len(params) == 4 and all(p.grad is not None for p in params)
        seen.append(("post", probe.name, float(probe.loss.detach())))
    h1, h2 = opt.register_probe_pre_hook(pre), opt.register_probe_hook(post)
    loss = opt.step(closure_for(m, x, y))
    assert [s[:2] for s in seen] == [("pre", "g0"), ("post", "g0"), ("pre", "g+"), ("post", "g+"),
                                     ("pre", "g-"), ("post", "g-")]
    assert seen[1][2] == float(loss.detach())
    h1.remove()
    h2.remove()
    seen.clear()
    opt.step(closure_for(m, x, y))
    assert seen == []


def test_probe_hook_may_replace_grads_and_loss():
    """What lookahead_ext.distributed does: a hook that halves every gradient equals a
    closure whose loss is halved; a hook that sets a NaN loss skips the step."""
    x, y = data()
    m1, m2 = mlp(), mlp()
    o1 = la.SAM(m1.parameters(), lr=0.1, backend="reference")
    o2 = la.SAM(m2.parameters(), lr=0.1, backend="reference")

    def halve(o, probe, params):
        for p in params:
            p.grad.mul_(0.5)
    o1.register_probe_hook(halve)
    for _ in range(2):
        o1.step(closure_for(m1, x, y))
        o2.step(closure_for(m2, x, y, scale=0.5))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    w = params_of(m1)
    h = o1.register_probe_hook(lambda o, probe, params: setattr(probe, "loss", torch.tensor(float("nan"))))
    with pytest.warns(RuntimeWarning, match="skipped"):
        o1.step(closure_for(m1, x, y))
    h.remove()
    assert all(torch.equal(a, b) for a, b in zip(w, m1.parameters())) and o1.num_skipped == 1


def test_always_call_probe_hook_runs_on_abandon_only_if_asked():
    x, y = data()
    m = mlp()
    opt = la.SAM(m.parameters(), lr=0.1, backend="reference")
    plain, always = [], []
    opt.register_probe_hook(lambda o, probe, params: plain.append(probe.name))
    opt.register_probe_hook(lambda o, probe, params: always.append(probe.name), always_call=True)
    w = params_of(m)
    with pytest.raises(ZeroDivisionError):
        for probe in opt.probes():
            closure_for(m, x, y)()
            if probe.name == "g+":
                1 / 0
    assert plain == ["g0"] and always == ["g0", "g+"]
    assert all(torch.equal(a, b) for a, b in zip(w, m.parameters()))


# ------------------------------------------------------------------ norm reducers, unscalers
def test_norm_reducer_scales_every_global_norm():
    """A reducer multiplying ||x||^2 by 4 doubles every norm: SAM then perturbs by rho/2."""
    x, y = data()
    m1, m2 = mlp(), mlp()
    o1 = la.SAM(m1.parameters(), lr=0.1, rho=0.1, backend="reference")
    o2 = la.SAM(m2.parameters(), lr=0.1, rho=0.05, backend="reference")
    sqs = []

    def reducer(o, sq):
        assert isinstance(sq, torch.Tensor) and sq.dim() == 0
        sqs.append(float(sq))
        return sq * 4
    h = o1.register_norm_reducer(reducer)
    for _ in range(2):
        o1.step(closure_for(m1, x, y))
        o2.step(closure_for(m2, x, y))
    # one reduction per global norm (one collective under FSDP2): each probe's gradient
    # norm (g0, g+) in runtime._clip_probe, g0's reused for the direction
    assert len(sqs) == 4
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    h.remove()
    assert not o1._norm_reducers


@pytest.mark.parametrize("cls,kw,extra", [(la.CMLR, dict(k=2), 2), (la.FMLR, dict(k=2), 2), (la.LookbehindSAM, {}, 0),
                                          (la.CRSAM, {}, 0)], ids=["CMLR", "FMLR", "LookbehindSAM", "CRSAM"])
def test_norm_reducer_runs_once_per_global_norm(cls, kw, extra):
    """Once per probe, plus once per norm that no probe's check gives (CMLR, FMLR: the
    carried v at steps 2 and 4 of a K=2 cycle)."""
    x, y = data()
    m = mlp()
    opt = cls(m.parameters(), lr=0.1, **kw)
    calls = []
    opt.register_norm_reducer(lambda o, sq: calls.append(1) or sq)
    for _ in range(4):
        opt.step(closure_for(m, x, y))
    assert len(calls) == opt.num_evals + extra


def test_grad_unscaler_unscales_in_the_fused_check_one_at_a_time():
    x, y = data()
    m1, m2 = mlp(), mlp()
    o1 = la.CMLR(m1.parameters(), lr=0.1, k=2, backend="reference")
    o2 = la.CMLR(m2.parameters(), lr=0.1, k=2, backend="reference")
    h = o1.register_grad_unscaler(lambda o: torch.tensor(0.25))
    with pytest.raises(RuntimeError, match="already has a grad unscaler"):
        o1.register_grad_unscaler(lambda o: None)
    for _ in range(3):
        o1.step(closure_for(m1, x, y, scale=4.0))
        o2.step(closure_for(m2, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    h.remove()
    o1.register_grad_unscaler(lambda o: None).remove()


# ------------------------------------------------------------------ building blocks
def test_kind_groups_and_global_sq_over_mixed_dtypes():
    ts = [torch.randn(3), torch.randn(4, dtype=torch.bfloat16), torch.randn(2),
          torch.randn(5, dtype=torch.float64)]
    kg = groups.KindGroups(ts)
    assert kg.index == [[0, 2], [1], [3]] and not kg.single
    assert kg.split(list("abcd")) == [["a", "c"], ["b"], ["d"]] and kg.split(None) == [None] * 3
    sq = groups.global_sq([[g] for g in kg.split(ts)], [(0, 0)], "reference")[0]
    assert sq.dtype == torch.float64
    torch.testing.assert_close(sq, sum((t.double() ** 2).sum() for t in ts))
    assert groups.inv_norm(4.0, 1e-12) == pytest.approx(0.5)
    z = groups.zero_filled([None, ts[1]], ts[:2])
    assert torch.equal(z[0], torch.zeros(3)) and z[1] is ts[1]


def test_base_step_and_sync_over_mixed_groups_match_one_call_per_dtype():
    from lookahead_ext import ops
    from lookahead_ext.ops.base_step import BaseStep
    torch.manual_seed(0)
    ts = [torch.randn(3), torch.randn(4, dtype=torch.bfloat16), torch.randn(2)]
    gs = [torch.randn_like(t) for t in ts]
    base = BaseStep("sgd", lr=0.1, momentum=0.9, first=True)
    mk = lambda: ([t.clone() for t in ts], [t.float().clone() for t in ts],  # noqa: E731
                  {"momentum_buffer": [torch.zeros(t.shape) for t in ts]})
    (p1, m1, s1), (p2, m2, s2) = mk(), mk()
    groups.base_step_(p1, m1, (gs, None, None), (1.0, 0.0, 0.0), base, s1, backend="reference",
                      groups=groups.KindGroups(p1))
    for idx in ([0, 2], [1]):
        sel = lambda lst: [lst[i] for i in idx]  # noqa: E731
        ops.combine_step_(sel(p2), sel(m2), (sel(gs), None, None), (1.0, 0.0, 0.0), base,
                          {"momentum_buffer": sel(s2["momentum_buffer"])}, backend="reference")
    for a, b in zip(p1 + m1 + s1["momentum_buffer"], p2 + m2 + s2["momentum_buffer"]):
        assert torch.equal(a, b)
    slow = [t.float() * 0 for t in ts]
    groups.sync_slow_(slow, m1, 0.5, params=p1, backend="reference", groups=groups.KindGroups(p1))
    for s, m, p in zip(slow, m1, p1):
        assert torch.equal(s, m) and torch.equal(p, m.to(p.dtype))


def test_per_parameter_steps_split_by_state_age():
    from lookahead_ext.ops.base_step import BaseStep
    adam = BaseStep("adamw", lr=0.1)
    subsets = groups.per_parameter_steps([{"step": 3}, {}, {"step": 3}], adam)
    assert [(b.step, idx) for b, idx in subsets] == [(4, [0, 2]), (1, [1])]
    sgd = BaseStep("sgd", lr=0.1, momentum=0.9)
    (b, idx), = groups.per_parameter_steps([{}, {}], sgd)
    assert b.first and idx is None


def test_deepcopy_goes_on_exactly_and_drops_hooks():
    import copy
    x, y = data()
    m = mlp()
    opt = la.CMLR(m.parameters(), lr=0.1, k=3, momentum=0.9, backend="reference")
    opt.register_probe_hook(lambda o, probe, params: None)
    opt.step(closure_for(m, x, y))
    m2, opt2 = copy.deepcopy((m, opt))         # the copy steps the copied parameters
    assert not opt2._probe_post_hooks and opt._probe_post_hooks
    opt.load_state_dict(opt.state_dict())     # torch's load_state_dict keeps the hooks
    assert opt._probe_post_hooks
    for _ in range(3):
        opt.step(closure_for(m, x, y))
        opt2.step(closure_for(m2, x, y))
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert opt2.num_evals == opt.num_evals and opt2.cycle_position == opt.cycle_position

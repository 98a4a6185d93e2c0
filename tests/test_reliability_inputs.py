"""Issue 14, items 8 and 10: hyperparameters are finite and in range at construction and at every
step (optim/validation.py), and the fused ops refuse memory overlaps beyond the declared in-place
pairs on every backend (ops/helpers.check_aliasing; docs/backends.md, "Aliasing")."""
import math

import pytest
import torch

import lookahead_ext as la
from lookahead_ext import ops
from lookahead_ext.ops import BaseStep, reference
from lookahead_ext.optim import validation

from _prod_util import FAMILY, assert_same_state, data, flat_state, mlp, params_of
from test_op_conformance import run_sample
from op_db import SampleInput

INF, NAN = float("inf"), float("nan")


def _closure(model):
    x, y = data()

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return closure


# ----------------------------------------------------------------------------- item 8: construction
# every float keyword of the family, with a value that was accepted before (inf) and NaN
FAMILY_KEYS = ["lr", "weight_decay", "rho", "lam", "norm_eps", "eps", "momentum", "dampening", "alpha",
               "beta_start", "beta_end", "gamma", "max_grad_norm"]


# SAM and MLSAM fix lam = rho; the members without a Lookahead cycle take no alpha
FAMILY_CASES = [(cls, kw, key) for cls, kw in FAMILY for key in FAMILY_KEYS
                if not (key == "lam" and cls in (la.SAM, la.MLSAM)) and not (key == "alpha" and not cls.lookahead)]


@pytest.mark.parametrize("value", [INF, NAN, -INF], ids=["inf", "nan", "-inf"])
@pytest.mark.parametrize("cls,kw,key", FAMILY_CASES, ids=[f"{c.__name__}-{k}" for c, _, k in FAMILY_CASES])
def test_family_refuses_non_finite(cls, kw, key, value):
    with pytest.raises(ValueError, match=rf"^{key} must be a finite number in .*, got {value!r}$"):
        cls(mlp().parameters(), **kw, **{key: value})


@pytest.mark.parametrize("value", [INF, NAN])
def test_family_refuses_non_finite_betas_and_group_values(value):
    with pytest.raises(ValueError, match=r"betas\[1\] must be a finite number"):
        la.CMLR(mlp().parameters(), base="adamw", betas=(0.9, value))
    with pytest.raises(ValueError, match=r"betas\[0\] must be a finite number"):
        la.CMLR(mlp().parameters(), betas=(value, 0.9))  # base="sgd" drops betas but checks them
    with pytest.raises(ValueError, match="^lam must be"):
        la.CMLR([dict(params=mlp().parameters(), lam=value)])


BASELINES = [
    (la.LookbehindSAM, dict(rho=INF)), (la.LookbehindSAM, dict(lr=INF)), (la.LookbehindSAM, dict(alpha=NAN)),
    (la.GSAM, dict(beta=NAN)), (la.GSAM, dict(beta=INF)), (la.GSAM, dict(rho=INF)), (la.GSAM, dict(weight_decay=INF)),
    (la.CRSAM, dict(beta=INF)), (la.CRSAM, dict(beta=NAN)), (la.CRSAM, dict(gamma=INF)), (la.CRSAM, dict(rho=INF)),
]


@pytest.mark.parametrize("cls,kw", BASELINES, ids=[f"{c.__name__}-{k}" for c, k in BASELINES])
def test_baselines_refuse_non_finite(cls, kw):
    (key, value), = kw.items()
    with pytest.raises(ValueError, match=rf"^{key} must be a finite number in .*, got {value!r}$"):
        cls(mlp().parameters(), **kw)


def test_gsam_beta_in_a_param_group_is_checked():
    with pytest.raises(ValueError, match="^beta must be"):
        la.GSAM([dict(params=mlp().parameters(), beta=INF)])


@pytest.mark.parametrize("alpha", [INF, NAN])
def test_lookahead_refuses_non_finite_alpha(alpha):
    with pytest.raises(ValueError, match="^alpha must be"):
        la.Lookahead(torch.optim.SGD(mlp().parameters(), lr=0.1), alpha=alpha)


BIO = [dict(lr_w=INF), dict(lr_u=INF), dict(lr_lam=NAN), dict(momentum=NAN), dict(weight_decay=INF),
       dict(betas=(0.9, INF)), dict(eps=INF), dict(eps=0.0), dict(lam_weight_decay=INF), dict(alpha=INF),
       dict(beta_w=NAN), dict(beta_lam=INF)]


@pytest.mark.parametrize("kw", BIO, ids=[str(k) for k in BIO])
def test_lookahead_bio_refuses_non_finite(kw):
    (key, _), = kw.items()
    with pytest.raises(ValueError, match=rf"^{key}(\[1\])? must be"):
        la.LookaheadBio(mlp(), lambda m, b: m(b).squeeze(-1), 2, **kw)


# ----------------------------------------------------------------------------- item 8: step time
# (optimizer, key, bad value) written into param_groups after construction
STEP_CASES = [(la.CMLR, "rho", 0.0), (la.CMLR, "rho", INF), (la.CMLR, "lr", INF), (la.CMLR, "lr", -0.1),
              (la.CMLR, "lam", NAN), (la.CMLR, "norm_eps", 0.0), (la.CMLR, "weight_decay", INF),
              (la.CMLR, "alpha", 1.5), (la.CMLR, "k", 0), (la.CMLR, "momentum", 1.0),
              (la.SAM, "rho", 0.0), (la.FMLR, "rho", 0.0), (la.CR, "rho", 0.0),
              (la.GSAM, "beta", NAN), (la.CRSAM, "beta", INF), (la.LookbehindSAM, "rho", 0.0)]


@pytest.mark.parametrize("cls,key,bad", STEP_CASES, ids=[f"{c.__name__}-{k}={v}" for c, k, v in STEP_CASES])
def test_bad_group_value_is_refused_at_step_and_changes_nothing(cls, key, bad):
    model = mlp()
    kw = dict(k=3) if cls.lookahead and cls is not la.LookbehindSAM else {}
    opt = cls(model.parameters(), lr=0.1, backend="reference", **kw)
    closure = _closure(model)
    opt.step(closure)
    w, st, steps, evals = params_of(model), flat_state(opt), opt.num_steps, opt.num_evals
    good = opt.param_groups[0][key]
    opt.param_groups[0][key] = bad
    with pytest.raises(ValueError) as step_err:
        opt.step(closure)
    with pytest.raises(ValueError) as init_err:  # the same message as at construction
        cls(mlp().parameters(), **{"lr": 0.1, **kw, key: bad})
    assert str(step_err.value) == str(init_err.value)
    assert str(step_err.value).startswith(key)
    opt.param_groups[0][key] = good
    assert all(torch.equal(a, b) for a, b in zip(w, model.parameters()))
    assert_same_state(st, flat_state(opt))
    assert (opt.num_steps, opt.num_evals) == (steps, evals)
    opt.step(closure)  # fixed: training goes on
    assert opt.num_steps == steps + 1


def test_bad_value_in_a_later_group_is_refused_at_step():
    m = mlp()
    opt = la.CMLR([dict(params=[m[0].weight, m[0].bias]), dict(params=list(m[2].parameters()), rho=0.1)],
                  lr=0.1, k=2, backend="reference")
    opt.param_groups[1]["rho"] = 0.0
    with pytest.raises(ValueError, match=r"^rho must be a finite number in \(0.0, inf\), got 0.0$"):
        opt.step(_closure(m))
    assert opt.num_evals == 0


def test_probes_api_refuses_before_the_first_probe():
    m = mlp()
    opt = la.SAM(m.parameters(), lr=0.1, backend="reference")
    opt.param_groups[0]["lr"] = INF
    w = params_of(m)
    with pytest.raises(ValueError, match="^lr must be"):
        for _ in opt.probes():
            pytest.fail("a probe was requested")
    assert all(torch.equal(a, b) for a, b in zip(w, m.parameters()))


def test_tensor_lr_with_a_scheduler_and_no_host_read(monkeypatch):
    """A tensor lr (torch.optim allows it) passes every step with a scheduler writing it; the
    step-time check reads its shape only (no .item()/float(): a device sync on CUDA)."""
    m = mlp()
    opt = la.CMLR(m.parameters(), lr=torch.tensor(0.1), k=2, backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.step(_closure(m))
        sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)

    def no_read(*a, **k):
        raise AssertionError("the step-time check read a tensor")
    for name in ("item", "__float__", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, no_read)
    validation.check_groups(opt.param_groups)
    monkeypatch.undo()
    opt.param_groups[0]["lr"] = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match=r"^lr as a Tensor must have one element, got shape \(2,\)$"):
        opt.step(_closure(m))
    with pytest.raises(ValueError, match="^lr must be a finite number"):
        la.CMLR(mlp().parameters(), lr=torch.tensor(INF))


def test_error_never_prints_a_tensor():
    with pytest.raises(ValueError) as err:
        la.CMLR(mlp().parameters(), rho=torch.ones(3))
    assert "tensor(" not in str(err.value) and "(3,)" in str(err.value)


# ----------------------------------------------------------------------------- item 10: aliasing
def _impls(row):
    return [ops.resolve(row.backend, torch.device(row.device), torch.float32), reference]


def _refused(fn, *watch, match="share memory"):
    """fn raises ValueError naming shapes, never values, and writes nothing in `watch`."""
    before = [t.clone() for t in watch]
    with pytest.raises(ValueError, match=match) as err:
        fn()
    assert "tensor(" not in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, watch)), "written before the error"
    return str(err.value)


def _sgd_mom():
    return BaseStep("sgd", lr=0.1, momentum=0.9, first=True)


def test_partial_overlap_is_refused(backend):
    dev = backend.device
    for impl in _impls(backend):
        x = torch.randn(10, device=dev)
        msg = _refused(lambda: impl.perturb_([x[1:]], [x[:-1]], [torch.randn(9, device=dev)], 0.5), x)
        assert "out[0] (shape (9,)) and base[0] (shape (9,))" in msg
        # the direction overlapping the output by one element
        d = torch.randn(20, device=dev)
        _refused(lambda: impl.perturb_([d[9:19]], [torch.randn(10, device=dev)], [d[:10]], 0.5), d)
        # slow overlapping fast by a part of a 2-D tensor
        s = torch.randn(4, 5, device=dev)
        _refused(lambda: impl.lookahead_sync_([s[1:3]], [s[2:4]], 0.5), s)


def test_alias_across_list_indices_is_refused(backend):
    dev = backend.device
    for impl in _impls(backend):
        a, b, c = (torch.randn(6, device=dev) for _ in range(3))
        _refused(lambda: impl.lookahead_sync_([a, b], [c, a], 0.5), a, b, c)
        o1, o2 = torch.zeros(6, device=dev), torch.zeros(6, device=dev)
        # out[0] is base[1]: not the in-place pair (another index)
        _refused(lambda: impl.perturb_([o1, o2], [a, o1], [b, c], 0.5), o1, o2)
        # the same tensor twice in a written role
        _refused(lambda: impl.perturb_([o1, o1], [a, b], [b, c], 0.5), o1)
        # params[0] is the momentum buffer of another parameter
        p = [torch.randn(6, device=dev), torch.randn(6, device=dev)]
        mom = [torch.zeros(6, device=dev), p[0]]
        _refused(lambda: impl.combine_step_(p, [t.clone() for t in p], (None, [a, b], None), (0.0, 1.0, 0.0),
                                            _sgd_mom(), {"momentum_buffer": mom}), *p)
        # v_sq_out inside v
        v = torch.zeros(7, device=dev)
        _refused(lambda: impl.combine_step_([a.clone()], [a.clone()], (None, [b], None), (0.0, 1.0, 0.0),
                                            BaseStep(lr=0.1), {}, [v[:6]], (0.5, 0.0, 0.1, 0.0), v_sq_out=v[5:6]), v,
                 match="v_sq_out")


def test_unscaling_the_same_tensor_twice_is_refused(backend):
    dev = backend.device
    for impl in _impls(backend):
        g = torch.full((5,), 4.0, device=dev)
        _refused(lambda: impl.nonfinite_([[g], [g]], torch.tensor(0.5, device=dev)), g)
        assert float(impl.nonfinite_([[g], [g]])) == 0.0  # read only: allowed


def test_in_place_pairs_element_for_element_are_allowed(backend):
    dev = backend.device
    for impl in _impls(backend):
        w = torch.randn(4, 6, device=dev)
        view = w.view(24)[:].view(4, 6)  # another object, the same view
        d = torch.randn(4, 6, device=dev)
        want = w + 0.5 * d
        impl.perturb_([w], [view], [d], 0.5, [torch.empty(4, 6, device=dev)])
        assert torch.allclose(w, want)
        # the same start but another layout (a transposed view) or another dtype: refused
        sq = torch.randn(5, 5, device=dev)
        _refused(lambda: impl.perturb_([sq], [sq.t()], [torch.randn(5, 5, device=dev)], 0.5), sq,
                 match="only out")
        # params that are their own masters (LookaheadBio's float32 parameters)
        p = [torch.randn(9, device=dev)]
        impl.combine_step_(p, p, (None, [torch.randn(9, device=dev)], None), (0.0, 1.0, 0.0), BaseStep(lr=0.1), {})


def test_same_tensor_twice_in_a_read_only_role_is_allowed(backend):
    dev = backend.device
    impl = _impls(backend)[0]
    g = [torch.randn(33, device=dev), torch.randn(5, device=dev)]
    p = [torch.zeros(33, device=dev), torch.zeros(5, device=dev)]
    run_sample(impl, "perturb_", SampleInput("dir_is_base", (p, g, g, 0.25), writes=[(0, "param")]), backend)
    run_sample(impl, "perturb_", SampleInput("dir_twice", (p, [t + 1 for t in g], [g[0], g[0][:5]], 0.25),
                                             writes=[(0, "param")]), backend)
    masters = [torch.randn(33, device=dev), torch.randn(5, device=dev)]
    run_sample(impl, "combine_step_", SampleInput(
        "grads_overlap", (p, masters, (g, [g[0], g[0][:5]], g), (0.5, 0.25, 0.25), _sgd_mom(),
                          {"momentum_buffer": [torch.zeros(33, device=dev), torch.zeros(5, device=dev)]},
                          None, None, None, True), writes=[(0, "param"), (1, "state")]), backend)
    big = torch.randn(50, device=dev)
    run_sample(impl, "multi_dot", SampleInput("overlapping_reads", ([[big[:30], big[10:40]], [big[20:], big[:30]]],
                                                                     [(0, 1), (0, 0)], True), ret="reduce"), backend)


def test_views_of_one_flat_buffer_are_allowed(backend):
    """Bucketed / flattened parameters: every list a set of disjoint views of one buffer, edge to
    edge (one ends where the next starts), at odd offsets, 2-D views and an empty one."""
    dev = backend.device
    impl = _impls(backend)[0]
    sizes = [7, 0, 12, 1, 30]

    def views(seed):
        flat = torch.randn(sum(sizes) + 1, generator=torch.Generator().manual_seed(seed)).to(dev)
        out, at = [], 1
        for n in sizes:
            out.append(flat[at:at + n].view(3, 4) if n == 12 else flat[at:at + n])
            at += n
        return out
    base = _sgd_mom()
    st = {"momentum_buffer": views(5)}
    v = views(6)
    run_sample(impl, "combine_step_", SampleInput(
        "flat", (views(1), views(2), (None, views(3), views(4)), (0.0, 0.75, 0.25), base, st, v,
                 (0.5, 0.0, 0.1, 0.1), None, True),
        writes=[(0, "param"), (1, "state"), ((5, "momentum_buffer"), "state"), (6, "state")]), backend)
    run_sample(impl, "perturb_", SampleInput("flat", (views(1), views(2), views(3), 0.3, views(4)),
                                             writes=[(0, "param"), (4, "exact")]), backend)
    run_sample(impl, "lookahead_sync_", SampleInput("flat", (views(1), views(2), 0.5, views(3)),
                                                    writes=[(0, "state"), (1, "param"), (3, "param")]), backend)
    # all of them in one buffer: params, masters and grads side by side
    flat = torch.randn(90, device=dev)
    p, m, g = flat[:30], flat[30:60], flat[60:]
    impl.perturb_([p], [m], [g], 0.5)
    assert torch.allclose(p, m + 0.5 * g)


def test_empty_tensors_own_no_memory(backend):
    dev = backend.device
    for impl in _impls(backend):
        x = torch.randn(8, device=dev)
        e1, e2 = torch.empty(0, device=dev), torch.empty(0, device=dev)
        # an empty output inside the base's range, two empties at one address
        impl.perturb_([x[3:3], e1, torch.zeros(8, device=dev)], [x[2:2], e2, x], [e2, e1, x], 0.5)
        impl.lookahead_sync_([e1, x], [e1, torch.zeros(8, device=dev)], 0.5, [x[4:4], torch.empty(8, device=dev)])


def test_written_tensor_with_repeated_elements_is_refused():
    x = torch.zeros(1).expand(4)
    for impl in (reference,):
        _refused(lambda: impl.perturb_([x], [torch.ones(4)], [torch.ones(4)], 0.5), match="stride-0")


def test_interleaved_strided_views_are_refused():
    """The rule is on byte ranges (first to last element): x[::2] and x[1::2] share none of
    their elements but their ranges overlap; refused (documented)."""
    x = torch.randn(10)
    _refused(lambda: reference.perturb_([x[::2]], [x[1::2]], [torch.ones(5)], 0.5), x)


def test_overlap_check_is_host_only(monkeypatch):
    """No tensor value is read (no sync on a device): addresses, sizes and strides only."""
    def no_read(*a, **k):
        raise AssertionError("read a tensor")
    for name in ("item", "__float__", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, no_read)
    from lookahead_ext.ops.helpers import check_perturb_aliasing
    x = torch.randn(10)
    with pytest.raises(ValueError):
        check_perturb_aliasing([x[1:]], [x[:-1]], [torch.ones(9)], torch.tensor(0.5), None)
    check_perturb_aliasing([x[5:]], [x[:5]], [torch.ones(5)], torch.tensor(0.5), [torch.empty(5)])


def test_engine_steps_pass_the_check():
    """The optimizers' own calls (params perturbed in place over their backup, fp32 params as
    their own masters in LookaheadBio, g0 is g+ for FMLR's text anchor) are all allowed."""
    for cls, kw in FAMILY + [(la.FMLR, dict(k=2, anchor="g+"))]:
        m = mlp()
        opt = cls(m.parameters(), lr=0.1, backend="reference", **kw)
        for _ in range(3):
            opt.step(_closure(m))
        assert opt.num_steps == 3, cls.__name__
    assert math.isfinite(float(m[0].weight.detach().sum()))


def test_engine_checks_params_once_and_user_calls_always(monkeypatch):
    """The runtime's own op calls skip the per-call check (trust_engine_calls); its
    parameters are checked when the bucket plan is built; op calls from the closure are
    checked during the step; overlapping parameters are refused before anything changes."""
    from lookahead_ext.ops import helpers
    seen = []
    real = helpers.aliasing_errors
    monkeypatch.setattr(helpers, "aliasing_errors", lambda op, *a: (seen.append(op), real(op, *a))[1])
    import lookahead_ext.optim.runtime as runtime
    monkeypatch.setattr(runtime, "aliasing_errors", helpers.aliasing_errors)
    m = mlp()
    opt = la.CMLR(m.parameters(), lr=0.1, k=2)
    for _ in range(3):
        opt.step(_closure(m))
    assert seen == ["CMLR.step"]  # the plan, once; no per-call check of the engine's calls
    x = torch.zeros(10)

    def closure():
        with pytest.raises(ValueError, match="share memory"):
            ops.perturb_([x[1:]], [x[:-1]], [torch.ones(9)], 0.5)
        return _closure(m)()
    opt.step(closure)
    assert seen.count("perturb_") == 2  # once per probe of this carried-v step (g+, g-)
    flat = torch.zeros(10)
    a, b = torch.nn.Parameter(flat[:6]), torch.nn.Parameter(flat[4:])
    sam = la.SAM([a, b], lr=0.1)
    with pytest.raises(ValueError, match=r"SAM.step: params\[0\] \(shape \(6,\)\) and params\[1\]"):
        sam.step(lambda: (a.sum() + b.sum()).backward())
    assert torch.equal(flat, torch.zeros(10)) and sam.num_evals == 0

"""Checkpoints (issue 14, items 5 and 6, load_state_dict validation): resume at every cut point
is bit-identical with mixed base-state ages, the backend stays the running optimizer's, and a
state dict that does not fit is refused at load time, leaving the optimizer exactly as it was."""
import io
import re

import pytest
import torch
import torch.nn.functional as F

import lookahead_ext as la
from _prod_util import FAMILY, FAMILY_IDS, assert_same_state, flat_state, mlp, params_of
from conftest import small_batch, small_model
from lookahead_ext.integrations import needs_closure
from optim_db import OPTIM_IDS, optim_db

BACKENDS = ("reference", "cpp")
# every probe optimizer whose step carries v (the carried ||v||^2) or not, plus GraphSAM
RESUME = FAMILY + [(la.GSAM, dict(period=3))]
RESUME_IDS = FAMILY_IDS + ["GSAM"]


def roundtrip(obj):
    """torch.save / torch.load (weights_only, torch's default): what a checkpoint file does."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def closure(model, x, y, t):
    """Step t's loss; at t = 0 the first layer gets no gradient (its base state then lags the
    others' by one step: mixed ages in one bucket)."""
    def c():
        w, b = model[0].weight, model[0].bias
        h = torch.tanh(F.linear(x, w.detach(), b.detach()) if t == 0 else F.linear(x, w, b))
        loss = F.mse_loss(model[2](h), y)
        loss.backward()
        return loss
    return c


# ------------------------------------------------------------------ item 5: resume at every cut
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("cls,kw", RESUME, ids=RESUME_IDS)
def test_resume_at_every_cut_point_with_mixed_ages_is_bit_identical(cls, kw, base, backend):
    """A parameter without a gradient in step 0 gives its bucket two base-state ages (AdamW's
    step count from then on, SGD's momentum buffer for a step); the carried ||v||^2 must be
    what a resumed optimizer recomputes, so resuming at any step changes nothing."""
    x, y = small_batch()
    steps = 7
    kw = dict(kw, lr=0.05, base=base, backend=backend)
    if cls.lookahead:  # K = 3; a carried v also across cycles (more steps start from a carried norm)
        kw.update(k=3, init_v="carry" if cls.direction.carried else "grad")
    if base == "sgd":
        kw["momentum"] = 0.9

    m = small_model()
    opt = cls(m.parameters(), **kw)
    cuts = {}  # step t -> the checkpoint before it, written by the uninterrupted run
    for t in range(steps):
        if t:
            cuts[t] = roundtrip({"model": m.state_dict(), "opt": opt.state_dict()})
        opt.step(closure(m, x, y, t))
        carried = getattr(opt, "_v_sq", None)
        if carried is not None:  # what the next step uses, bitwise what a resumed one computes
            v = [[opt.state[p]["v"] for p in b.params] for b in opt._plan[1]]
            assert torch.equal(carried[0], opt._global_sq([[vl] for vl in v], [(0, 0)])[0]), t
    bad = []
    for cut, ck in cuts.items():
        m2 = small_model(seed=7)
        m2.load_state_dict(ck["model"])
        opt2 = cls(m2.parameters(), **kw)
        opt2.load_state_dict(ck["opt"])
        for t in range(cut, steps):
            opt2.step(closure(m2, x, y, t))
        if not all(torch.equal(a, b) for a, b in zip(params_of(m), params_of(m2))):
            bad.append(cut)
            continue
        assert_same_state(flat_state(opt), flat_state(opt2))
    assert not bad, f"resume before step(s) {bad} is not bit-identical"


# ------------------------------------------------------------------ item 6: the backend
def _trained(backend="reference", cls=la.CMLR, steps=2, **kw):
    m = mlp()
    opt = cls(m.parameters(), lr=0.05, k=3, backend=backend, **kw)
    x, y = small_batch(out=1)
    for t in range(steps):
        opt.step(closure(m, x[:, :4], y, 1))
    return m, opt


@pytest.mark.parametrize("target", ["cpp", "auto"])
def test_reference_checkpoint_keeps_the_running_backend(target):
    m, opt = _trained("reference")
    sd = roundtrip(opt.state_dict())
    assert sd["param_groups"][0]["backend"] == "reference"  # written, as a record of the run
    m2 = mlp(seed=3)
    m2.load_state_dict(m.state_dict())
    opt2 = la.CMLR(m2.parameters(), lr=0.5, k=3, backend=target)
    opt2.load_state_dict(sd)
    assert [g["backend"] for g in opt2.param_groups] == [target]
    assert opt2.param_groups[0]["lr"] == 0.05  # the hyperparameters do come from the checkpoint


@pytest.mark.parametrize("saved", ["cuda", "triton"])
@pytest.mark.parametrize("cls,kw", [(la.CMLR, {}), (la.SAM, {}), (la.LookbehindSAM, {})],
                         ids=["CMLR", "SAM", "LookbehindSAM"])
def test_gpu_checkpoint_loads_and_steps_on_the_cpu(saved, cls, kw):
    """A checkpoint written on a GPU machine (backend "cuda"/"triton" in its groups) loads into
    an "auto" optimizer here and continues exactly as the same checkpoint written with "auto"."""
    kw = dict(kw) if cls is la.SAM else dict(kw, k=3)
    m = mlp()
    opt = cls(m.parameters(), lr=0.05, backend="auto", **kw)
    x, y = small_batch(out=1)
    for _ in range(2):
        opt.step(closure(m, x[:, :4], y, 1))
    sd = roundtrip(opt.state_dict())
    gpu = roundtrip(opt.state_dict())
    for g in gpu["param_groups"]:
        g["backend"] = saved
    runs = []
    for ck in (sd, gpu):
        m2 = mlp(seed=4)
        m2.load_state_dict(m.state_dict())
        opt2 = cls(m2.parameters(), lr=0.05, backend="auto", **kw)
        opt2.load_state_dict(ck)
        assert opt2.param_groups[0]["backend"] == "auto"
        for _ in range(3):
            opt2.step(closure(m2, x[:, :4], y, 1))
        runs.append(params_of(m2))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_lookahead_wrapper_and_bio_keep_their_backend():
    m = mlp()
    inner = la.SAM(m.parameters(), lr=0.05, backend="reference")
    opt = la.Lookahead(inner, k=2, backend="reference")
    x, y = small_batch(out=1)
    opt.step(closure(m, x[:, :4], y, 1))
    sd = roundtrip(opt.state_dict())
    opt2 = la.Lookahead(la.SAM(mlp(seed=2).parameters(), lr=0.05, backend="cpp"), k=2, backend="cpp")
    opt2.load_state_dict(sd)
    assert opt2.backend == "cpp" and opt2.optimizer.param_groups[0]["backend"] == "cpp"


# ------------------------------------------------------------------ load_state_dict validation
def _step(opt, m, t=1):
    x, y = small_batch(out=1)
    c = closure(m, x[:, :4], y, t)
    if needs_closure(opt):
        return opt.step(c)
    opt.zero_grad()
    c()
    return opt.step()


def _pair(make):
    """Two identical optimizers after two steps: one gets the bad load, the twin does not."""
    out = []
    for _ in range(2):
        m = mlp()
        opt = make(m)
        for _ in range(2):
            _step(opt, m)
        out.append((m, opt))
    return out


def _refused(make, bad, match):
    """Loading ``bad`` raises a ValueError (checkpoint.StateDictError) and leaves the optimizer
    exactly as its twin: same state and groups now, same weights after one more step; the
    message names the problem (parameters by index and shape, no tensor printed)."""
    (m, opt), (m2, twin) = _pair(make)
    before = flat_state(opt)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(bad)
    assert_same_state(before, flat_state(opt))
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    msg = str(info.value)
    assert type(info.value).__name__ == "StateDictError", msg
    assert re.search(match, msg), msg
    assert "tensor(" not in msg and "Parameter containing" not in msg, msg
    for mm, o in ((m, opt), (m2, twin)):
        _step(o, mm)
    assert all(torch.equal(a, b) for a, b in zip(params_of(m), params_of(m2)))
    assert_same_state(flat_state(opt), flat_state(twin))
    return msg


def _cmlr(m):
    return la.CMLR(m.parameters(), lr=0.05, k=3, momentum=0.9, backend="reference")


def test_torch_sgd_state_dict_into_cmlr_is_refused():
    m = mlp()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = small_batch(out=1)
    closure(m, x[:, :4], y, 1)()
    sgd.step()
    _refused(_cmlr, roundtrip(sgd.state_dict()), r"no 'lookahead_ext' entry.*torch\.optim")


def test_plain_state_dict_into_lookahead_is_refused():
    def make(m):
        return la.Lookahead(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), k=3)
    sgd = torch.optim.SGD(mlp().parameters(), lr=0.1)
    msg = _refused(make, sgd.state_dict(), r"no 'lookahead' entry")
    assert "opt.optimizer.load_state_dict" in msg  # says what to do instead


def test_other_algorithms_checkpoint_is_refused():
    _, cmlr = _trained("reference")

    def sam(m):
        return la.SAM(m.parameters(), lr=0.05, backend="reference")
    _refused(sam, cmlr.state_dict(), "written by CMLR, not by SAM")

    def la_adamw(m):
        return la.Lookahead(torch.optim.AdamW(m.parameters(), lr=0.01), k=3)
    la_sgd = la.Lookahead(torch.optim.SGD(mlp().parameters(), lr=0.1, momentum=0.9), k=3)
    _refused(la_adamw, la_sgd.state_dict(), r"written by Lookahead\(SGD\), not by Lookahead\(AdamW\)")


def _transposed():
    """An mlp() checkpoint layout with the same parameter counts but other shapes."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(1, 8))


def test_wrong_shapes_are_refused_at_load():
    other = _transposed()
    o = la.CMLR(other.parameters(), lr=0.05, k=3, momentum=0.9, backend="reference")
    x = torch.randn(5, 8)

    def c():
        loss = other[2](other[0](x).sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        return loss
    o.step(c)
    msg = _refused(_cmlr, o.state_dict(), r"parameter 0 \(shape \(8, 4\)\).*shape \(4, 8\)")
    assert "a checkpoint of another model?" in msg

    def lookahead(m):
        return la.Lookahead(torch.optim.SGD(m.parameters(), lr=0.1), k=3)
    bad = la.Lookahead(torch.optim.SGD(_transposed().parameters(), lr=0.1), k=3).state_dict()
    _refused(lookahead, bad, r"parameter 0 \(shape \(8, 4\)\): the state dict's slow weights are of shape \(4, 8\)")


def test_layout_and_hyperparameter_errors_are_refused_at_load():
    _, opt = _trained("reference", momentum=0.9)
    sd = opt.state_dict()
    two = dict(sd, param_groups=[dict(sd["param_groups"][0], params=[0, 1]),
                                 dict(sd["param_groups"][0], params=[2, 3])])
    _refused(_cmlr, two, r"2 param group\(s\), this optimizer 1")
    short = dict(sd, param_groups=[dict(sd["param_groups"][0], params=[0, 1, 2])])
    _refused(_cmlr, short, r"param group 0 has 3 parameter\(s\) in the state dict, 4 in this")
    bad_rho = dict(sd, param_groups=[dict(sd["param_groups"][0], rho=0.0)])
    _refused(_cmlr, bad_rho, r"param group 0 of the state dict: rho must be a finite number in")
    engine = dict(sd["lookahead_ext"], engine=dict(sd["lookahead_ext"]["engine"], k=5))
    _refused(_cmlr, dict(sd, lookahead_ext=engine), r"cycle position is 5, not an integer in \[0, 3\)")
    stray = dict(sd, state={**sd["state"], 9: sd["state"][0]})
    _refused(_cmlr, stray, r"parameter id 9, which no param group")
    _refused(_cmlr, [1, 2], r"expected an optimizer state dict")


def test_bio_refused_load_changes_nothing():
    from test_bio import M, batches, loss_fn, make_model, snapshot, assert_same
    data = batches(4, seed=2)
    a = la.LookaheadBio(make_model(1), loss_fn, M, k=3, u_sync=False)
    for t in range(2):
        a.step(*data[t])
    b = la.LookaheadBio(make_model(2), loss_fn, M, k=3)
    b.step(*data[0])
    before = snapshot(b)
    a.k = 4  # a hyperparameter the load would take
    wide = la.LookaheadBio(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4)),
                           loss_fn, M, k=3)
    for bad, match in ((a.state_dict(), "u_sync=False, this LookaheadBio has u_sync=True"),
                       (_trained("reference")[1].state_dict(), "not a LookaheadBio state dict"),
                       (wide.state_dict(), r"w tensors entry 0 is shape \(7, 5\)")):
        with pytest.raises(ValueError) as info:
            b.load_state_dict(bad)
        assert_same(before, snapshot(b))
        assert b.k == 3 and b._w.steps == 1
        assert type(info.value).__name__ == "StateDictError" and re.search(match, str(info.value))


# ------------------------------------------------------------------ torch.optim conventions
@pytest.mark.parametrize("info", optim_db, ids=OPTIM_IDS)
def test_every_optimizer_round_trips_through_a_file(info):
    """state_dict -> torch.save -> torch.load (weights_only) -> a fresh optimizer of the same
    layout: the next steps are bit-identical."""
    x, y = small_batch(out=1)
    runs = []
    for resume in (False, True):
        m = mlp()
        opt = info.make(m.parameters(), "reference")
        for t in range(5):
            if resume and t == 3:
                ck = roundtrip({"model": m.state_dict(), "opt": opt.state_dict()})
                m = mlp(seed=5)
                m.load_state_dict(ck["model"])
                opt = info.make(m.parameters(), "reference")
                opt.load_state_dict(ck["opt"])
            c = closure(m, x[:, :4], y, 1)
            if info.closure:
                opt.step(c)
            else:
                opt.zero_grad()
                c()
                opt.step()
        runs.append(params_of(m))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_scheduler_and_load_hooks_follow_torch():
    """An lr scheduler loaded before the optimizer (torch's order) goes on as in the
    uninterrupted run; load_state_dict runs torch's pre hooks (which may replace the dict)
    before its checks and the post hooks after."""
    x, y = small_batch(out=1)

    def make(m):
        opt = _cmlr(m)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    runs = []
    for resume in (False, True):
        m = mlp()
        opt, sched = make(m)
        for t in range(6):
            if resume and t == 3:
                ck = roundtrip({"m": m.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()})
                m = mlp(seed=5)
                m.load_state_dict(ck["m"])
                opt, sched = make(m)
                sched.load_state_dict(ck["s"])
                calls = []
                opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre") or dict(sd))
                opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
                opt.load_state_dict(ck["o"])
                assert calls == ["pre", "post"]
            opt.step(closure(m, x[:, :4], y, 1))
            sched.step()
        runs.append((params_of(m), opt.param_groups[0]["lr"]))
    assert runs[0][1] == runs[1][1] == 0.05 * 0.5 ** 3
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))

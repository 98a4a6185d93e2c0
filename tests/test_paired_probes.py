"""Paired probes (optim/paired.py): g+ and g- in one torch.func.vmap pass equal the sequential
probes; skip, hooks, counters, refusals, dropout and BatchNorm rules (docs/paired-probes.md).

Tolerance (fp32 on CPU): weights, optimizer state and losses agree to rtol 1e-5, atol 1e-6
after every step. Both modes put the parameters at bit-identical probe points; the batched
kernels of the vmap pass may sum in another order than the unbatched ones."""
import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lookahead_ext as la
from lookahead_ext import ops
from lookahead_ext.batchnorm import apply_batchnorm_mode
from lookahead_ext.optim import PairedClosure, supports_paired
from lookahead_ext.optim.baselines import CRSAM, GSAM, LookbehindSAM

RTOL, ATOL = 1e-5, 1e-6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS = nn.functional.mse_loss

# (class, constructor kwargs): the members with paired probes; K = 3 puts syncs in 6 steps
MEMBERS = {
    "CMLR": (la.CMLR, dict(rho=0.05, lam=0.1, k=3)),
    "CLR": (la.CLR, dict(rho=0.05, lam=0.1, k=3)),
    "CR": (la.CR, dict(rho=0.05, lam=0.1)),
    "CRSAM": (CRSAM, dict(rho=0.05)),
}
REFUSED = {
    "SAM": (la.SAM, dict(rho=0.05)),
    "FR": (la.FR, dict(rho=0.05, lam=0.1)),
    "LR": (la.LR, dict(rho=0.05, lam=0.1, k=2)),
    "FMLR": (la.FMLR, dict(rho=0.05, lam=0.1, k=2)),
    "MLSAM": (la.MLSAM, dict(rho=0.05, k=2)),
    "LookbehindSAM": (LookbehindSAM, dict(rho=0.05, k=2)),
    "GSAM": (GSAM, dict(rho=0.05)),
}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 33), nn.Tanh(), nn.Linear(33, 3))


def _batch(n=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _pair_of(cls, kw, base="sgd", backend="reference", model=None, **extra):
    """Two identical (model, optimizer) pairs."""
    m = _model() if model is None else model
    out = []
    for _ in range(2):
        mm = copy.deepcopy(m)
        opt_kw = dict(kw, lr=0.1, base=base, backend=backend, **extra)
        if base == "sgd":
            opt_kw["momentum"] = 0.9
        out.append((mm, cls(mm.parameters(), **opt_kw)))
    return out


def _state_tensors(opt):
    out = []
    for p in sorted(opt.state, key=lambda t: id(t)):
        for k in sorted(opt.state[p]):
            if isinstance(opt.state[p][k], torch.Tensor):
                out.append((k, opt.state[p][k]))
    return out


def _assert_same(seq, par, evals_differ=False):
    (m1, o1), (m2, o2) = seq, par

    def cmp(a, b):
        return torch.allclose(a, b, rtol=RTOL, atol=ATOL)

    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert cmp(a.float(), b.float()), (a - b).abs().max()
    sd1, sd2 = o1.state_dict(), o2.state_dict()
    for i in sd1["state"]:
        for k, v in sd1["state"][i].items():
            if isinstance(v, torch.Tensor):
                assert cmp(v.float(), sd2["state"][i][k].float()), (i, k)
    for i, s in sd1["lookahead_ext"]["slow"].items():
        assert cmp(s, sd2["lookahead_ext"]["slow"][i])
    e1, e2 = dict(sd1["lookahead_ext"]["engine"]), dict(sd2["lookahead_ext"]["engine"])
    if evals_differ:  # a skip at g+: the paired pass evaluated g- as well (counted)
        assert e2.pop("evals") == e1.pop("evals") + 1
    assert e1 == e2


def _run(seq, par, steps, batch=None, paired_kw=None):
    x, y = _batch() if batch is None else batch
    c1 = PairedClosure(seq[0], LOSS, x, y)
    c2 = PairedClosure(par[0], LOSS, x, y, **(paired_kw or {}))
    for _ in range(steps):
        l1 = seq[1].step(c1.sequential)
        l2 = par[1].step(c2)
        torch.testing.assert_close(l2, l1.detach(), rtol=RTOL, atol=ATOL)
        _assert_same(seq, par)


# ----------------------------------------------------------------------------- equality
@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_paired_equals_sequential(member, base, backend):
    cls, kw = MEMBERS[member]
    seq, par = _pair_of(cls, kw, base, backend)
    _run(seq, par, steps=7)
    assert par[1].num_evals == seq[1].num_evals and par[1].num_steps == 7
    if par[1].lookahead:
        assert par[1].state_dict()["lookahead_ext"]["engine"]["cycles"] == 2
    # .grad after the step: the last probe's gradient, as in sequential mode
    for p, q in zip(seq[0].parameters(), par[0].parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.skipif(ops.available_backends().get("triton") != "ok", reason="triton backend absent")
def test_paired_equals_sequential_triton():
    seq, par = _pair_of(la.CMLR, dict(rho=0.05, lam=0.1, k=2), "sgd", "triton", model=nn.Linear(4, 2))
    _run(seq, par, steps=3, batch=(torch.randn(8, 4), torch.randn(8, 2)))


def test_max_grad_norm_and_init_carry():
    """Clipping (per probe, by its own norm) and a carried v: same as sequential."""
    seq, par = _pair_of(la.CMLR, dict(rho=0.05, lam=0.1, k=2, init_v="carry"), "adamw",
                        max_grad_norm=0.05)
    _run(seq, par, steps=5)
    assert par[1].last_grad_norm > 0.05  # it clipped
    assert par[1].last_grad_norm == pytest.approx(seq[1].last_grad_norm, rel=1e-5)


def test_bf16_parameters_with_fp32_masters():
    """bf16 parameters: both lanes are cast from the fp32 masters as the runtime's probes are;
    the gradients are bf16, so the tolerance is bf16's: rtol 2e-2, atol 2e-3 (2 ulp at 0.1)."""
    seq, par = _pair_of(la.CMLR, dict(rho=0.05, lam=0.1, k=3), "sgd", "native",
                        model=_model().to(torch.bfloat16))
    x, y = (t.to(torch.bfloat16) for t in _batch())
    for _ in range(4):
        seq[1].step(PairedClosure(seq[0], LOSS, x, y).sequential)
        par[1].step(PairedClosure(par[0], LOSS, x, y))
    for p, q in zip(seq[0].parameters(), par[0].parameters()):
        assert q.dtype == torch.bfloat16
        torch.testing.assert_close(q, p, rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(par[1].state[q]["master"], seq[1].state[p]["master"],
                                   rtol=2e-2, atol=2e-3)


class _Keywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _model()

    def forward(self, *, features):
        return {"out": self.net(features)}


def test_mapping_inputs_and_the_ordinary_paths():
    """model(**inputs) with a dict batch; the probes() path and a Probe kept after the loop
    (no reference to the step's direction) are unaffected."""
    seq, par = _pair_of(la.CR, dict(rho=0.05, lam=0.1), model=_Keywords())
    x, y = _batch()
    loss_fn = lambda out, target: LOSS(out["out"], target)  # noqa: E731
    for _ in range(3):
        seq[1].step(PairedClosure(seq[0], loss_fn, {"features": x}, y).sequential)
        par[1].step(PairedClosure(par[0], loss_fn, {"features": x}, y))
    _assert_same(seq, par)
    for probe in seq[1].probes():
        LOSS(seq[0](features=x)["out"], y).backward()
    assert probe.name == "g-" and probe._point is None


def test_probe_points_are_sequential_modes_bit_for_bit():
    """loss = ||w||^2 / 2 has gradient w: each lane's gradient is its probe point. The g- lane
    must be, bit for bit, the point the runtime's g- probe sets (and g+'s its g+ point)."""
    model = nn.Linear(5, 1, bias=False)
    opt = la.CMLR(model.parameters(), lr=0.1, rho=0.3, lam=0.1, k=4, backend="native")
    seen = {}

    def pre(_opt, probe):
        seen[probe.name, "point"] = model.weight.detach().clone()

    def post(_opt, probe, params):
        seen[probe.name, "grad"] = params[0].grad.clone()

    opt.register_probe_pre_hook(pre)
    opt.register_probe_hook(post)
    closure = PairedClosure(_SquareNorm(model), lambda w: 0.5 * (w ** 2).sum(), ())
    for _ in range(3):
        opt.step(closure)
        for name in ("g+", "g-"):
            assert torch.equal(seen[name, "grad"], seen[name, "point"]), name
        assert not torch.equal(seen["g+", "point"], seen["g-", "point"])


class _SquareNorm(nn.Module):
    """forward() returns the wrapped Linear's weight (the loss_fn squares it)."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self):
        return self.lin.weight


def test_hooks_order_counters_and_last_loss():
    """Pre/post hooks fire for both probes, in sequential order; num_evals counts 2 per
    pair; last_loss is the first probe's (CR: g0 on its first step, then g+)."""
    seq, par = _pair_of(la.CR, dict(rho=0.05, lam=0.1))
    logs = []
    for (_m, opt) in (seq, par):
        log = []
        opt.register_probe_pre_hook(lambda o, p, log=log: log.append(("pre", p.index, p.name)))
        opt.register_probe_hook(lambda o, p, ps, log=log: log.append(
            ("post", p.index, p.name, round(float(p.loss), 5), round(float(ps[0].grad.norm()), 4))))
        logs.append(log)
    x, y = _batch()
    for _ in range(3):
        seq[1].step(PairedClosure(seq[0], LOSS, x, y).sequential)
        loss = par[1].step(PairedClosure(par[0], LOSS, x, y))
        assert loss is par[1].last_loss
    assert logs[0] == logs[1]
    assert [e[2] for e in logs[1] if e[0] == "pre"] == ["g0", "g+", "g-", "g+", "g-", "g+", "g-"]
    assert par[1].num_evals == 7


def test_other_trainable_parameters_accumulate_like_backward():
    """A trainable model parameter that the optimizer does not own gets g+ + g- in .grad,
    as two backward() calls leave it; the optimizer's own are updated as in sequential mode."""
    model = _model()
    seq = copy.deepcopy(model), None
    par = copy.deepcopy(model), None
    seq = seq[0], la.CR(list(seq[0][2].parameters()), lr=0.1, backend="reference")
    par = par[0], la.CR(list(par[0][2].parameters()), lr=0.1, backend="reference")
    x, y = _batch()
    for _ in range(2):
        for m, _o in (seq, par):
            m[0].weight.grad = None
        seq[1].step(PairedClosure(seq[0], LOSS, x, y).sequential)
        par[1].step(PairedClosure(par[0], LOSS, x, y))
        torch.testing.assert_close(par[0][0].weight.grad, seq[0][0].weight.grad, rtol=RTOL, atol=ATOL)
        _assert_same(seq, par)


# ----------------------------------------------------------------------------- skip
class _Tripwire(nn.Module):
    """MLP whose loss is NaN (with NaN gradients) where the first weight has moved past
    ``self.limit`` on the side ``self.side`` (+1: the g+ side of w, -1: the g- side)."""

    def __init__(self):
        super().__init__()
        self.net = _model()
        self.limit, self.side, self.w0 = None, 1.0, None

    def forward(self, x):
        out = self.net(x)
        if self.limit is None:
            return out
        w = self.net[0].weight[0, 0]
        tripped = self.side * (w - self.w0) > self.limit
        return out * torch.where(tripped, torch.full_like(w, float("nan")), torch.ones_like(w))


@pytest.mark.parametrize("member", ["CMLR", "CRSAM"])
@pytest.mark.parametrize("side", ["g+", "g-"])
def test_nonfinite_probe_skips_bit_identically(member, side):
    cls, kw = MEMBERS[member]
    seq, par = _pair_of(cls, kw, "adamw", "native", model=_Tripwire())
    x, y = _batch()
    _run(seq, par, steps=2)  # state exists (v, exp_avg, slow)
    for m, opt in (seq, par):
        before_w = [t.clone() for t in m.state_dict().values()]
        before_s = [(k, t.clone()) for k, t in _state_tensors(opt)]
        evals, skipped = opt.num_evals, opt.num_skipped
        w00 = m.net[0].weight[0, 0].detach().clone()

        def arm(_opt, probe, m=m, w00=w00):  # at g+ (before the pass): trip half way to
            if probe.name == "g+" and m.limit is None:  # the chosen probe's point
                moved = m.net[0].weight[0, 0].detach() - w00
                m.w0, m.side = w00, float(moved.sign()) * (1.0 if side == "g+" else -1.0)
                m.limit = 0.5 * moved.abs()

        h = opt.register_probe_pre_hook(arm)
        with pytest.warns(RuntimeWarning, match=f"probe {side}"):
            opt.step(PairedClosure(m, LOSS, x, y) if opt is par[1] else PairedClosure(m, LOSS, x, y).sequential)
        h.remove()
        m.limit = None
        assert opt.num_skipped == skipped + 1
        assert all(torch.equal(a, b) for a, b in zip(before_w, m.state_dict().values()))
        after_s = _state_tensors(opt)
        assert [k for k, _ in before_s] == [k for k, _ in after_s]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before_s, after_s))
        assert all(p.grad is None for p in m.parameters())
        # both lanes were evaluated in paired mode; sequential stops at a g+ skip
        g0 = 1 if member == "CRSAM" else 0  # CRSAM probes w first; CMLR at k = 2 does not
        assert opt.num_evals - evals == g0 + (2 if (opt is par[1] or side == "g-") else 1)
    _assert_same(seq, par, evals_differ=side == "g+")
    par[1]._engine["evals"] = seq[1].num_evals
    _run(seq, par, steps=1)  # and both go on alike


def test_exception_in_the_pass_restores_and_says_where():
    model = _model()
    opt = la.CMLR(model.parameters(), lr=0.1, k=2)
    x, y = _batch()
    opt.step(PairedClosure(model, LOSS, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    state = [(k, t.clone()) for k, t in _state_tensors(opt)]

    def bad_loss(out, target):
        raise KeyError("boom")

    with pytest.raises(KeyError) as info:
        opt.step(PairedClosure(model, bad_loss, x, y))
    assert any("paired evaluation of g+ and g-" in n for n in info.value.__notes__)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(state, _state_tensors(opt)))
    opt.step(PairedClosure(model, LOSS, x, y))  # and it goes on


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("member", sorted(REFUSED))
def test_members_without_a_pair_refuse(member):
    cls, kw = REFUSED[member]
    model = _model()
    opt = cls(model.parameters(), lr=0.1, **kw)
    assert not supports_paired(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"{cls.__name__} does not take paired probes"):
        opt.step(PairedClosure(model, LOSS, *_batch()))
    assert opt.num_evals == 0 and opt.num_steps == 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.step(PairedClosure(model, LOSS, *_batch()).sequential)  # the ordinary path still runs


def test_supporting_members():
    model = _model()
    for cls, kw in MEMBERS.values():
        assert supports_paired(cls(model.parameters(), **kw))


def test_refusals_name_the_cause():
    model, x_y = _model(), _batch()
    with pytest.raises(ValueError, match="randomness"):
        PairedClosure(model, LOSS, *x_y, randomness="sometimes")
    with pytest.raises(TypeError, match="nn.Module"):
        PairedClosure(lambda x: x, LOSS, *x_y)
    extra = nn.Parameter(torch.zeros(4, 2))
    opt = la.CR(list(model.parameters()) + [extra], lr=0.1)
    with pytest.raises(ValueError, match=r"shape \(4, 2\) is not a parameter"):
        opt.step(PairedClosure(model, LOSS, *x_y))
    opt = la.CR(model.parameters(), lr=0.1)
    handle = opt.register_grad_unscaler(lambda o: None)
    with pytest.raises(ValueError, match="grad unscaler"):
        opt.step(PairedClosure(model, LOSS, *x_y))
    handle.remove()
    assert opt.num_evals == 0
    # a torch optimizer calls it as an ordinary closure
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert sgd.step(PairedClosure(model, LOSS, *x_y)).grad_fn is not None


# ----------------------------------------------------------------------------- dropout, BatchNorm
def _dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 33), nn.Tanh(), nn.Dropout(0.5), nn.Linear(33, 3))


def test_dropout_same_is_sequential_with_one_draw_per_step():
    """randomness="same" (default): both probes see one dropout mask, i.e. the sequential step
    whose closure reseeds the generator before each probe (common random numbers)."""
    seq, par = _pair_of(la.CMLR, dict(rho=0.05, lam=0.1, k=3), model=_dropout_model())
    for _m, opt in (seq, par):
        opt.register_probe_pre_hook(lambda o, p: torch.manual_seed(1234 + o.num_steps))
    _run(seq, par, steps=4)


def test_dropout_different_draws_per_probe():
    """randomness="different": independent masks per probe, so not the reseeded sequential
    step; "error" refuses random ops with vmap's error and the paired note."""
    runs = []
    for randomness in ("same", "different"):
        m = _dropout_model()
        opt = la.CR(m.parameters(), lr=0.1, backend="reference")
        grads = {}
        opt.register_probe_pre_hook(lambda o, p: torch.manual_seed(7))
        opt.register_probe_hook(lambda o, p, ps, grads=grads: grads.__setitem__(p.name, ps[0].grad.clone()))
        x, y = _batch(n=1)  # one sample: the mask is one draw per hidden unit
        opt.step(PairedClosure(m, LOSS, x, y, randomness=randomness))
        opt.step(PairedClosure(m, LOSS, x, y, randomness=randomness))
        # a dropped hidden unit leaves a zero row in the first layer's gradient
        dropped = {n: (grads[n] == 0).all(1) for n in ("g+", "g-")}
        runs.append(torch.equal(dropped["g+"], dropped["g-"]))
    assert runs == [True, False]
    m = _dropout_model()
    opt = la.CR(m.parameters(), lr=0.1)
    opt.step(PairedClosure(m, LOSS, *_batch()).sequential)
    with pytest.raises(RuntimeError) as info:
        opt.step(PairedClosure(m, LOSS, *_batch(), randomness="error"))
    assert any("paired evaluation" in n for n in info.value.__notes__)


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


def test_batchnorm_first_mode_equals_sequential():
    """With apply_batchnorm_mode(..., "first"), running statistics, weights and state equal
    sequential mode's over steps where g0 (k = 0, init_v="grad") or g+ comes first."""
    seq, par = _pair_of(la.CMLR, dict(rho=0.05, lam=0.1, k=3), model=_bn_model())
    for m, opt in (seq, par):
        apply_batchnorm_mode(m, opt, "first")
    _run(seq, par, steps=6)
    assert int(par[0][1].num_batches_tracked) == 6  # one update per step


def test_batchnorm_without_helper_updates_once_per_pair():
    """Without the helper, sequential mode updates the running stats at every probe; the
    paired pass updates them from g+ only (the g- lane's update is discarded)."""
    seq, par = _pair_of(la.CR, dict(rho=0.05, lam=0.1), model=_bn_model())
    x, y = _batch()
    for _ in range(3):
        seq[1].step(PairedClosure(seq[0], LOSS, x, y).sequential)
        par[1].step(PairedClosure(par[0], LOSS, x, y))
    assert int(seq[0][1].num_batches_tracked) == 3 + 2 + 2  # CR's first step has g0 too
    assert int(par[0][1].num_batches_tracked) == 2 + 1 + 1
    for m in (seq[0], par[0]):  # and an eval-mode BatchNorm is a plain buffer read
        m.eval()
    opt = la.CR(par[0].parameters(), lr=0.1)
    before = par[0][1].running_mean.clone()
    opt.step(PairedClosure(par[0], LOSS, x, y))
    opt.step(PairedClosure(par[0], LOSS, x, y))
    assert torch.equal(before, par[0][1].running_mean)


# ----------------------------------------------------------------------------- benchmark smoke
def test_bench_paired_smoke(tmp_path):
    """bench/paired.py --quick runs and writes its files (numbers not checked)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "paired.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads((tmp_path / "paired_cpu.json").read_text())
    assert payload["env"]["torch"] and payload["rows"]
    assert {r["mode"] for r in payload["rows"]} == {"sequential", "paired"}
    assert (tmp_path / "paired_cpu.md").read_text().strip()
    assert importlib.util.find_spec("torch.func") is not None

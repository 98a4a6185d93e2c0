"""Optimizer-level max_grad_norm and last_grad_norm, against torch.nn.utils.clip_grad_norm_
applied inside the closure (which clips every probe), and the schedulers' momentum cycling."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import lookahead_ext as la
from lookahead_ext import amp
from _prod_util import FAMILY, FAMILY_IDS, data, mlp

CLIP = 0.05  # far below the gradient norms of these models: every probe is clipped


def run(cls, kw, steps=4, clip_in_closure=None, max_grad_norm=None, scaler=None):
    model = mlp()
    x, y = data()
    opt = cls(model.parameters(), lr=0.1, max_grad_norm=max_grad_norm, **kw)
    norms, seen = [], []

    def closure():
        loss = F.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
        if clip_in_closure is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_in_closure)))
        return loss

    for _ in range(steps):
        norms.clear()
        if scaler is None:
            opt.step(closure)
        else:
            amp.step(opt, scaler, closure)
            scaler.update()
        seen.append((list(norms), opt.last_grad_norm))
    return model, opt, seen


@pytest.mark.parametrize("cls,kw", FAMILY + [(la.CRSAM, {}), (la.GSAM, dict(period=2))],
                         ids=FAMILY_IDS + ["CRSAM", "GSAM"])
def test_max_grad_norm_equals_clipping_every_probe(cls, kw):
    """The family's coefficient path (and the overriding baselines' in-place path) equal
    clip_grad_norm_ run on every probe's gradient inside the closure; last_grad_norm is the
    largest pre-clip norm of the step's probes."""
    ref, _, seen = run(cls, kw, clip_in_closure=CLIP)
    got, opt, seen_got = run(cls, kw, max_grad_norm=CLIP)
    for a, b in zip(ref.parameters(), got.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    unclipped, _, _ = run(cls, kw)
    assert any(not torch.allclose(a, b) for a, b in zip(unclipped.parameters(), got.parameters()))
    # last_grad_norm: the probes' pre-clip norms of the clipped run (measured there by the closure
    # of a run with clipping both ways would see clipped norms, so compare with the ref run's)
    ref_norms = [max(n) for n, _ in seen]
    assert seen_got[0][1] == pytest.approx(ref_norms[0], rel=1e-5)
    assert all(ln > CLIP for _, ln in seen_got)


def test_last_grad_norm_without_clipping_and_on_skip():
    model = mlp()
    x, y = data()
    opt = la.SAM(model.parameters(), lr=0.1)
    assert opt.last_grad_norm is None
    norms = []

    def closure():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        norms.append(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))))
        return loss
    opt.step(closure)
    assert opt.last_grad_norm == pytest.approx(max(norms), rel=1e-6)

    def bad():
        loss = F.mse_loss(model(x), y) * float("inf")
        loss.backward()
        return loss
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(bad)
    assert math.isnan(opt.last_grad_norm)


def test_max_grad_norm_unscaled_under_gradscaler():
    """With a power-of-two GradScaler the clip acts on the unscaled norm: same result bit
    for bit as without the scaler."""
    plain, opt0, _ = run(la.CMLR, dict(k=2), max_grad_norm=CLIP)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled, opt1, _ = run(la.CMLR, dict(k=2), max_grad_norm=CLIP, scaler=scaler)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)
    assert opt1.last_grad_norm == opt0.last_grad_norm


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_max_grad_norm_validated(bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        la.SAM(mlp().parameters(), max_grad_norm=bad)


@pytest.mark.parametrize("sched", ["onecycle", "cyclic"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_cyclic_schedulers_cycle_the_base_momentum(sched, base):
    """torch's OneCycleLR/CyclicLR cycle group["betas"][0] whenever the defaults carry
    "betas", else group["momentum"]: base="sgd" must cycle momentum, "adamw" betas."""
    model = mlp()
    opt = la.CMLR(model.parameters(), lr=0.1, base=base, momentum=0.9, k=2)
    assert ("betas" in opt.defaults) == (base == "adamw")
    if sched == "onecycle":
        s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    else:
        s = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=5)
    x, y = data()
    seen = []
    for _ in range(5):
        opt.step(lambda: F.mse_loss(model(x), y).backward())
        s.step()
        g = opt.param_groups[0]
        seen.append(g["betas"][0] if base == "adamw" else g["momentum"])
    assert len(set(seen)) > 1 and seen[-1] < seen[0]  # momentum falls while lr rises
    if base == "sgd":
        assert "betas" not in opt.param_groups[0]


def test_gradients_from_outside_the_step_are_discarded_with_a_warning():
    """The torch habit backward-clip-step: the step evaluates its own gradients, so the
    clipped ones are discarded; that is said (once per optimizer), and the step equals
    one taken from zeroed gradients."""
    x, y = data()
    runs = []
    for outside in (False, True):
        model = mlp()
        opt = la.CMLR(model.parameters(), lr=0.1, k=2)

        def closure():
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(3):
                if outside:
                    closure()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
                opt.step(closure)
        msgs = [str(w.message) for w in seen if "already hold gradients" in str(w.message)]
        assert len(msgs) == (1 if outside else 0)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))

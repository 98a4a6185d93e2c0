"""Tests of lookahead_ext.LookaheadBio (issue 5)."""
import copy
import io
import json
import math
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lookahead_ext import LookaheadBio

M = 3  # sources


def make_data(seed=0, n=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    srcs = []
    for i in range(M):
        x = torch.randn(n, 5, generator=g, dtype=dtype) + i
        y = torch.randint(0, 4, (n,), generator=g)
        srcs.append((x, y))
    val = (torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g))
    return srcs, val


def batches(steps, seed=0, dtype=torch.float32):
    return [make_data(seed * 1000 + t, dtype=dtype) for t in range(steps)]


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(dtype)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def snapshot(bio):
    return {"w": [p.detach().clone() for p in bio.params], "u": [t.clone() for t in bio.u],
            "slow_w": [t.clone() for t in bio.slow_w], "lam": bio.lam.clone(),
            "slow_lam": bio.slow_lam.clone(), "counter": bio.cycle_position}


def assert_same(a, b):
    for k in a:
        if isinstance(a[k], list):
            for x, y in zip(a[k], b[k]):
                assert torch.equal(x, y), k
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ------------------------------------------------------------------ λ gradient vs FD
@pytest.mark.parametrize("l1_uses_weights", [False, True])
def test_lambda_gradient_matches_finite_differences(l1_uses_weights):
    """The λ step of line 10 (hypergrad='shared', SGD on λ) is −η_λ ∂L^α/∂λ (eq. 2), with
    ∂L^α/∂λ from central finite differences of L^α(λ, w, u) at the pre-step w, u."""
    dt = torch.float64
    model = make_model(1, dt)
    alpha, lr_lam = 7.0, 0.1

    def val_fn(model, batch, p=None):
        losses = loss_fn(model, batch)
        return losses * (1.0 + (p[0] if p is not None else 0.0))  # L1 depending on λ

    bio = LookaheadBio(model, loss_fn, M, val_loss_fn=val_fn, l1_uses_weights=l1_uses_weights,
                       alpha=alpha, lr_w=0.05, lr_lam=lr_lam, k=1, beta_w=1.0, beta_lam=1.0,
                       lam_init=[0.3, -0.2, 0.1], backend="reference")
    # move u away from w so that L2(λ, w) != L2(λ, u)
    for t, (srcs, val) in enumerate(batches(3, seed=5, dtype=dt)):
        bio.step(srcs, val)
    srcs, val = make_data(77, dtype=dt)
    w = [p.detach().clone() for p in bio.params]
    u = [t.clone() for t in bio.u]
    lam0 = bio.lam.clone()

    def L_alpha(lam):
        p = torch.softmax(lam, 0)

        def l2(params):
            with torch.no_grad():
                for q, v in zip(bio.params, params):
                    q.copy_(v)
                return sum(p[i] * loss_fn(model, srcs[i]).mean() for i in range(M))
        l2u = l2(u)
        l2w = l2(w)
        with torch.no_grad():
            l1 = val_fn(model, val, p if l1_uses_weights else None).mean()
        return l1 + alpha * (l2w - l2u)

    h = 1e-6
    fd = torch.zeros(M, dtype=dt)
    for i in range(M):
        e = torch.zeros(M, dtype=dt)
        e[i] = h
        fd[i] = (L_alpha(lam0.double() + e) - L_alpha(lam0.double() - e)) / (2 * h)
    with torch.no_grad():
        for q, v in zip(bio.params, w):
            q.copy_(v)
    assert fd.abs().max() > 1e-3  # the test can fail: the gradient is not trivially 0
    bio.step(srcs, val)
    step = (lam0 - bio.lam).double() / lr_lam
    torch.testing.assert_close(step, fd, rtol=1e-5, atol=1e-7)


def test_lam_direction_is_softmax_jacobian():
    bio = LookaheadBio(make_model(), loss_fn, M, alpha=3.0)
    p = torch.tensor([0.2, 0.5, 0.3])
    d = torch.tensor([1.0, -2.0, 0.5])
    J = torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(bio.lam_direction(p, d), 3.0 * J @ d)


# ------------------------------------------------------------------ ScaleBiO special case
def scalebio_loop(model, data, steps, base, alpha, lr_w, lr_u, lr_lam, hypergrad="shared",
                  momentum=0.0, weight_decay=0.0):
    """A straightforward ScaleBiO loop (Algorithm 1 with k = 1, β = 1; two model copies,
    torch.optim optimizers, λ-gradient by autograd through the softmax)."""
    model_w = model
    model_u = copy.deepcopy(model)
    lam = torch.zeros(M, requires_grad=True)
    if base == "sgd":
        opt_w = torch.optim.SGD(model_w.parameters(), lr=lr_w, momentum=momentum, weight_decay=weight_decay)
        opt_u = torch.optim.SGD(model_u.parameters(), lr=lr_u, momentum=momentum, weight_decay=weight_decay)
        opt_l = torch.optim.SGD([lam], lr=lr_lam)
    else:
        opt_w = torch.optim.AdamW(model_w.parameters(), lr=lr_w, weight_decay=weight_decay, foreach=False)
        opt_u = torch.optim.AdamW(model_u.parameters(), lr=lr_u, weight_decay=weight_decay, foreach=False)
        opt_l = torch.optim.AdamW([lam], lr=lr_lam, weight_decay=0.0, foreach=False)
    for srcs, val in data[:steps]:
        p = torch.softmax(lam.detach(), 0)
        ell_u = torch.stack([loss_fn(model_u, b).mean() for b in srcs])
        opt_u.zero_grad()
        (p * ell_u).sum().backward()
        ell_w = torch.stack([loss_fn(model_w, b).mean() for b in srcs])
        l1 = loss_fn(model_w, val).float().mean()
        opt_w.zero_grad()
        (l1 + alpha * (p * ell_w).sum()).backward()
        opt_u.step()
        opt_w.step()
        if hypergrad == "updated":
            with torch.no_grad():
                ell_w = torch.stack([loss_fn(model_w, b).mean() for b in srcs])
                ell_u = torch.stack([loss_fn(model_u, b).mean() for b in srcs])
        opt_l.zero_grad()
        (torch.softmax(lam, 0) * (alpha * (ell_w - ell_u)).detach()).sum().backward()
        opt_l.step()
    return model_w, model_u, lam


@pytest.mark.parametrize("base,hypergrad,momentum,wd", [
    ("sgd", "shared", 0.0, 0.0), ("sgd", "updated", 0.9, 1e-3), ("adamw", "shared", 0.0, 5e-4),
    ("adamw", "updated", 0.0, 0.0)])
def test_scalebio_special_case_is_exact(base, hypergrad, momentum, wd):
    data = batches(8, seed=2)
    kw = dict(alpha=50.0, lr_w=0.01, lr_u=0.02, lr_lam=0.05)
    ref_w, ref_u, ref_lam = scalebio_loop(make_model(3), data, 8, base, hypergrad=hypergrad,
                                          momentum=momentum, weight_decay=wd, **kw)
    model = make_model(3)
    bio = LookaheadBio(model, loss_fn, M, k=1, beta_w=1.0, beta_lam=1.0, base=base,
                       momentum=momentum, weight_decay=wd, hypergrad=hypergrad,
                       backend="reference", **kw)
    for srcs, val in data:
        bio.step(srcs, val)
    for a, b in zip(model.parameters(), ref_w.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(bio.u, ref_u.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(bio.lam, ref_lam.detach())
    assert torch.equal(bio.slow_lam, ref_lam.detach())
    assert not torch.equal(bio.lam, torch.zeros(M))


class _PlainLookahead:
    """Lookahead (Zhang et al. 2019) around a torch optimizer, as the authors' code wraps
    each of its optimizers: every k steps slow += alpha (fast - slow), fast <- slow."""

    def __init__(self, opt, k, alpha):
        self.opt, self.k, self.alpha, self.n = opt, k, alpha, 0
        self.slow = [p.detach().clone() for g in opt.param_groups for p in g["params"]]

    def step(self):
        self.opt.step()
        self.n += 1
        if self.n % self.k == 0:
            with torch.no_grad():
                ps = [p for g in self.opt.param_groups for p in g["params"]]
                for p, s in zip(ps, self.slow):
                    s += self.alpha * (p - s)
                    p.copy_(s)


def test_authors_preset_matches_their_loop():
    """LookaheadBio.authors_preset against a plain re-statement of the authors' loop:
    ScaleBiO's step (w, u, λ) with torch AdamW for all three (w/u weight decay 5e-4, λ
    weight decay 0.01), each optimizer wrapped in Lookahead(k=5, alpha=0.5); float64 model.
    Control: the λ optimizer without its weight decay misses."""
    steps, alpha = 12, 20.0
    data = batches(steps, seed=7, dtype=torch.float64)
    lr = dict(lr_w=0.01, lr_u=0.01, lr_lam=0.05)
    model_w = make_model(8, dtype=torch.float64)
    model_u = copy.deepcopy(model_w)
    lam = torch.zeros(M, requires_grad=True)
    la_w = _PlainLookahead(torch.optim.AdamW(model_w.parameters(), lr=0.01, weight_decay=5e-4, foreach=False), 5, 0.5)
    la_u = _PlainLookahead(torch.optim.AdamW(model_u.parameters(), lr=0.01, weight_decay=5e-4, foreach=False), 5, 0.5)
    la_l = _PlainLookahead(torch.optim.AdamW([lam], lr=0.05, weight_decay=0.01, foreach=False), 5, 0.5)
    for srcs, val in data:
        p = torch.softmax(lam.detach(), 0)
        ell_u = torch.stack([loss_fn(model_u, b).mean() for b in srcs])
        la_u.opt.zero_grad()
        (p * ell_u).sum().backward()
        ell_w = torch.stack([loss_fn(model_w, b).mean() for b in srcs])
        la_w.opt.zero_grad()
        (loss_fn(model_w, val).mean() + alpha * (p * ell_w).sum()).backward()
        la_u.step()
        la_w.step()
        la_l.opt.zero_grad()
        (torch.softmax(lam, 0) * (alpha * (ell_w - ell_u)).detach()).sum().backward()
        la_l.step()
    runs = {}
    for wd in (0.01, 0.0):
        bio = LookaheadBio.authors_preset(make_model(8, dtype=torch.float64), loss_fn, M, alpha=alpha, backend="reference",
                                          lam_weight_decay=wd, **lr)
        for srcs, val in data:
            bio.step(srcs, val)
        runs[wd] = max([float((a.detach() - b.detach()).abs().max())
                        for a, b in zip(bio.params, model_w.parameters())]
                       + [float((a - b.detach()).abs().max()) for a, b in zip(bio.u, model_u.parameters())]
                       + [float((bio.lam - lam.detach()).abs().max())])
    assert runs[0.01] < 1e-7   # measured 7.5e-9 (λ is float32)
    assert runs[0.0] > 1e-5    # measured 2.6e-4
    assert LookaheadBio.AUTHORS_PRESET["lam_weight_decay"] == 0.01


# ------------------------------------------------------------------ Lookahead semantics
@pytest.mark.parametrize("u_sync", [True, False])
def test_lookahead_on_both_levels(u_sync):
    """After k steps: φ ← φ + β(θ − φ) on w (β_w) and λ (β_λ), θ ← φ; u carries on
    (u_sync=False, Algorithm 1 line 14) or gets the same cycle as w (u_sync=True)."""
    data = batches(6, seed=4)
    k, bw, bl = 3, 0.3, 0.6
    kw = dict(base="adamw", lr_w=0.02, lr_lam=0.1, alpha=20.0, backend="reference", u_sync=u_sync)
    a = LookaheadBio(make_model(5), loss_fn, M, k=k, beta_w=bw, beta_lam=bl, **kw)
    b = LookaheadBio(make_model(5), loss_fn, M, k=10**9, beta_w=bw, beta_lam=bl, **kw)  # never syncs
    phi_w0 = [t.clone() for t in a.slow_w]
    phi_l0 = a.slow_lam.clone()
    u0 = [t.clone() for t in a.u]
    for t in range(k):
        a.step(*data[t])
        b.step(*data[t])
        if t < k - 1:
            assert a.cycle_position == t + 1
            for s, s0 in zip(a.slow_w, phi_w0):
                assert torch.equal(s, s0)
            assert torch.equal(a.slow_lam, phi_l0)
    assert a.cycle_position == 0
    for s, s0, th, p in zip(a.slow_w, phi_w0, b.params, a.params):
        assert torch.equal(s, torch.lerp(s0, th.detach(), bw))
        assert torch.equal(p.detach(), s)
    assert torch.equal(a.slow_lam, torch.lerp(phi_l0, b.lam, bl))
    assert torch.equal(a.lam, a.slow_lam)
    for ua, ub, uz in zip(a.u, b.u, u0):
        assert torch.equal(ua, torch.lerp(uz, ub, bw) if u_sync else ub)
    # optimizer states carry on through the sync (choice 4)
    assert a._w.steps == b._w.steps == k
    for n in a._w.state:
        for x, y in zip(a._w.state[n], b._w.state[n]):
            assert torch.equal(x, y)
    # second cycle moves from the new slow point
    phi_w1 = [t.clone() for t in a.slow_w]
    c = copy.deepcopy(a)
    c.k = 10**9
    for t in range(k, 2 * k):
        a.step(*data[t])
        c.step(*data[t])
    for s, s1, th in zip(a.slow_w, phi_w1, c.params):
        assert torch.equal(s, torch.lerp(s1, th.detach(), bw))
    assert len(a.history()) == 2 * k and sum(r["synced"] for r in a.history()) == 2


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_is_bit_identical(base):
    data = batches(13, seed=6)
    kw = dict(k=5, base=base, momentum=0.9 if base == "sgd" else 0.0, lr_w=0.02, lr_lam=0.1, alpha=30.0)
    a = LookaheadBio(make_model(7), loss_fn, M, **kw)
    for t in range(7):
        a.step(*data[t])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    for t in range(7, 13):
        a.step(*data[t])
    b = LookaheadBio(make_model(99), loss_fn, M, **kw)  # different init: everything must come from the state
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert b.cycle_position == 2
    for t in range(7, 13):
        b.step(*data[t])
    assert_same(snapshot(a), snapshot(b))
    assert a.history() == b.history()
    for n in a._u.state:
        for x, y in zip(a._u.state[n] + a._w.state[n], b._u.state[n] + b._w.state[n]):
            assert torch.equal(x, y)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_and_change_nothing():
    srcs, val = make_data(0)
    bio = LookaheadBio(make_model(), loss_fn, M, lr_lam=0.1)
    bio.step(srcs, val)
    before = snapshot(bio)
    with pytest.raises(ValueError, match="expected 3 source batches"):
        bio.step(srcs[:2], val)
    empty = (srcs[1][0][:0], srcs[1][1][:0])
    with pytest.raises(ValueError, match="empty batch for source 1"):
        bio.step([srcs[0], empty, srcs[2]], val)
    x = torch.cat([b[0] for b in srcs])
    y = torch.cat([b[1] for b in srcs])
    with pytest.raises(ValueError, match="source_ids must lie"):
        bio.step((x, y), val, source_ids=torch.full((len(y),), 3))
    with pytest.raises(ValueError, match="empty source batch"):
        bio.step((x, y), val, source_ids=torch.zeros(len(y), dtype=torch.long))
    with pytest.raises(ValueError, match="per-example"):
        LookaheadBio(make_model(), lambda m, b: loss_fn(m, b).mean(), M).step(srcs, val)
    with pytest.raises(ValueError):
        LookaheadBio(make_model(), loss_fn, 1)
    assert_same(before, snapshot(bio))
    assert len(bio.history()) == 1


@pytest.mark.parametrize("where", ["train", "val"])
def test_nonfinite_loss_skips_step(where):
    srcs, val = make_data(0)
    bio = LookaheadBio(make_model(), loss_fn, M, lr_lam=0.1, k=2)
    bio.step(srcs, val)
    before = snapshot(bio)
    bad = [list(b) for b in srcs]
    badval = list(val)
    if where == "train":
        bad[2][0] = bad[2][0].clone()
        bad[2][0][0, 0] = float("nan")
    else:
        badval[0] = badval[0].clone()
        badval[0][3, 1] = float("inf")
    row = bio.step([tuple(b) for b in bad], tuple(badval))
    assert row["skipped"]
    assert_same(before, snapshot(bio))  # cycle position included
    assert torch.isfinite(bio.lam).all() and torch.isfinite(bio.slow_lam).all()
    bio.step(srcs, val)  # carries on normally
    assert bio.cycle_position == 0 and torch.isfinite(bio.lam).all()
    strict = LookaheadBio(make_model(), loss_fn, M, on_nonfinite="raise")
    with pytest.raises(FloatingPointError):
        strict.step([tuple(b) for b in bad], tuple(badval))


# ------------------------------------------------------------------ input forms, options
def test_source_ids_form_matches_list_form():
    data = batches(4, seed=8)
    a = LookaheadBio(make_model(2), loss_fn, M, lr_lam=0.1)
    b = LookaheadBio(make_model(2), loss_fn, M, lr_lam=0.1)
    for srcs, val in data:
        a.step(srcs, val)
        x = torch.cat([s[0] for s in srcs])
        y = torch.cat([s[1] for s in srcs])
        ids = torch.cat([torch.full((len(s[1]),), i) for i, s in enumerate(srcs)])
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        b.step((x[perm], y[perm]), val, source_ids=ids[perm])
    for p, q in zip(a.params, b.params):
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(a.lam, b.lam)


def test_sample_mode():
    bio = LookaheadBio(make_model(), loss_fn, M, mode="sample", lam_init=[5.0, 0.0, -5.0])
    counts = bio.sample_counts(64)
    assert sum(counts) == 64 and counts[0] > counts[2]
    srcs, val = make_data(0)
    row = bio.step([srcs[0], srcs[1], None], val)  # a source drawn zero times
    assert not row["skipped"] and torch.isfinite(bio.lam).all()


def test_param_subset_leaves_others_untouched():
    model = make_model()
    frozen = [p.detach().clone() for p in model[0].parameters()]
    bio = LookaheadBio(model, loss_fn, M, params=list(model[2].parameters()), lr_w=0.1)
    for srcs, val in batches(3):
        bio.step(srcs, val)
    for p, f in zip(model[0].parameters(), frozen):
        assert torch.equal(p.detach(), f)
    assert len(bio.u) == 2 and len(bio.slow_w) == 2


def test_history_export_and_plot(tmp_path):
    bio = LookaheadBio(make_model(), loss_fn, M, source_names=["a", "b", "c"])
    for srcs, val in batches(4):
        bio.step(srcs, val)
    rows = bio.history()
    assert len(rows) == 4 and {"step", "val_loss", "p_a", "loss_w_b", "p_fast_c"} <= set(rows[0])
    assert math.isclose(sum(rows[-1][f"p_{n}"] for n in "abc"), 1.0, rel_tol=1e-6)
    bio.save_history(str(tmp_path / "h.csv"))
    bio.save_history(str(tmp_path / "h.json"))
    assert len(open(tmp_path / "h.csv").read().splitlines()) == 5
    assert len(json.load(open(tmp_path / "h.json"))["rows"]) == 4
    bio.plot_weights(str(tmp_path / "w.png"))
    assert os.path.getsize(tmp_path / "w.png") > 1000


def test_hf_causal_lm_smoke():
    transformers = pytest.importorskip("transformers")
    from lookahead_ext.bio.demos import causal_lm_loss
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    trained = [p for n, p in model.named_parameters() if "wte" not in n]
    wte = model.transformer.wte.weight.detach().clone()
    bio = LookaheadBio(model, causal_lm_loss, 2, params=trained, base="adamw", k=2, lr_w=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tr = [torch.randint(0, 128, (2, 9), generator=g), torch.randint(128, 256, (2, 9), generator=g)]
        bio.step(tr, torch.randint(0, 128, (2, 9), generator=g))
    assert torch.equal(model.transformer.wte.weight.detach(), wte)
    assert torch.isfinite(bio.lam).all() and not torch.equal(bio.lam, torch.zeros(2))


# ------------------------------------------------------------------ fast demo 1
def test_quality_demo_fast_upweights_clean_source():
    from lookahead_ext.bio.demos import run_quality
    r = run_quality(steps=250, quiet=True, save=False)
    assert r["final_weights"]["clean"] > 0.5  # the prior (uniform) is 0.5; the data share is 0.1

"""Paper readings offered as options (docs/paper-readings.md): beta_k over training, FMLR's text anchor."""
import math

import pytest
import torch
import torch.nn.functional as F

import lookahead_ext as la


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    return model, x, y


def _unit(ts):
    n = math.sqrt(sum(float((t * t).sum()) for t in ts)) + 1e-12
    return [t / n for t in ts]


def _beta_training(t, T, bs=0.9, be=0.99):
    return bs + (be - bs) * min(t, T - 1) / (T - 1)


@pytest.mark.parametrize("schedule", ["training", "cycle"])
def test_beta_schedule_training_anneals_over_total_steps(schedule):
    """CMLR's momentum update with beta_schedule="training" uses beta_t = beta_s +
    (beta_e - beta_s) min(t, T-1)/(T-1), t = inner steps applied: each step's v is
    re-stated from the step's own probes (eq. 115, gamma = 0.5). The "cycle" run is the
    control: its beta_k (k within the cycle) fails the same re-statement."""
    model, x, y = _setup()
    T, K = 12, 3
    kw = dict(beta_schedule="training", total_steps=T) if schedule == "training" else {}
    opt = la.CMLR(model.parameters(), lr=0.05, k=K, init_v="carry", **kw)
    params = list(model.parameters())
    worst = 0.0
    for t in range(T + 3):
        v_old = [opt.state[p]["v"].clone() for p in params] if t > 0 else None
        grads = {}
        for probe in opt.probes():
            for p in params:
                p.grad = None
            F.cross_entropy(model(x), y).backward()
            grads[probe.name] = [p.grad.clone() for p in params]
        if v_old is None:
            continue  # the first step starts v from g0 (line 4)
        beta = _beta_training(t, T)
        gp, gm = _unit(grads["g+"]), _unit(grads["g-"])
        expect = [beta * v + (1 - beta) * (0.5 * a + 0.5 * b)
                  for v, a, b in zip(_unit(v_old), gp, gm)]
        worst = max(worst, max(float((opt.state[p]["v"] - e).abs().max()) for p, e in zip(params, expect)))
    if schedule == "training":
        assert worst < 1e-12
        assert opt.beta_k() == pytest.approx(0.99)
    else:
        assert worst > 1e-4


def test_beta_schedule_validation():
    model, _, _ = _setup()
    with pytest.raises(ValueError, match="total_steps"):
        la.CMLR(model.parameters(), beta_schedule="training")
    with pytest.raises(ValueError, match="beta_schedule"):
        la.CMLR(model.parameters(), beta_schedule="epoch")
    opt = la.CMLR(model.parameters(), k=4)
    assert [opt.beta_k(k) for k in range(4)] == pytest.approx([0.9, 0.93, 0.96, 0.99])


def _grad(model, x, y, at):
    """The loss gradient at the weights `at` (the model's params are restored after)."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, a in zip(params, at):
            p.copy_(a)
    for p in params:
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    g = [p.grad.clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return g


def test_fmlr_text_anchor_is_g_plus_from_k1():
    """FMLR(anchor="g+"), re-stated in float64: k = 0 as FMLR (probe at w, v_0 = g_0,
    d = (1 - lam/rho) g0 + lam/rho g+); k >= 1: d = g+ and v <- beta_k v_hat + (1 - beta_k)
    g+/||g+||; K+1 evaluations per cycle. Control: the default anchor="g0" misses."""
    lr, rho, lam, K, alpha, gamma = 0.1, 0.05, 0.1, 3, 0.8, 0.5
    model, x, y = _setup(1)
    w = [p.detach().clone() for p in model.parameters()]
    slow = [t.clone() for t in w]
    v = None
    for _ in range(2):
        for k in range(K):
            beta = 0.9 + 0.09 * k / (K - 1)
            if k == 0:
                g0 = _grad(model, x, y, w)
                v = g0
            vh = _unit(v)
            gp = _grad(model, x, y, [a + rho * b for a, b in zip(w, vh)])
            if k == 0:
                d = [(1 - lam / rho) * a + lam / rho * b for a, b in zip(g0, gp)]
                mix = [gamma * a + (1 - gamma) * b for a, b in zip(_unit(gp), _unit(g0))]
            else:
                d, mix = gp, _unit(gp)
            w = [a - lr * b for a, b in zip(w, d)]
            v = [beta * a + (1 - beta) * b for a, b in zip(vh, mix)]
        slow = [s + alpha * (a - s) for s, a in zip(slow, w)]
        w = [s.clone() for s in slow]
    results = {}
    for anchor in ("g+", "g0"):
        m, _, _ = _setup(1)
        opt = la.FMLR(m.parameters(), lr=lr, rho=rho, lam=lam, k=K, alpha=alpha, anchor=anchor)

        def closure():
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss
        for _ in range(2 * K):
            opt.step(closure)
        results[anchor] = (max(float((p.detach() - e).abs().max()) for p, e in zip(m.parameters(), w)),
                           opt.num_evals, opt.evals_per_update())
    assert results["g+"][0] < 1e-12
    assert results["g+"][1:] == (2 * (K + 1), K + 1)
    assert results["g0"][0] > 1e-4 and results["g0"][1:] == (4 * K, 2 * K)
    with pytest.raises(ValueError, match="anchor"):
        la.FMLR(model.parameters(), anchor="w")


def test_per_cycle_feeds_one_batch_per_cycle():
    """lookahead_ext.data.per_cycle: Algorithm 1 line 3 (one mini-batch for the K inner
    steps) in one line; equals the hand-written loop, and a skipped step keeps the batch."""
    import copy
    import warnings

    from lookahead_ext.data import per_cycle

    model, _, _ = _setup(2)
    torch.manual_seed(3)
    batches = [(torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(4)]
    K = 3
    m2 = copy.deepcopy(model)
    opt = la.CMLR(model.parameters(), lr=0.05, k=K)
    seen = []
    for i, (x, y) in enumerate(per_cycle(batches, opt)):
        seen.append(next(j for j, b in enumerate(batches) if b[0] is x))
        bad = i == 4  # one non-finite loss: the step is skipped, the cycle keeps its batch

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss * float("nan") if bad else loss
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step(closure)
    assert seen == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert opt.num_skipped == 1
    o2 = la.CMLR(m2.parameters(), lr=0.05, k=K)
    for x, y in batches:
        for _ in range(K):
            o2.step(lambda: _ce_backward(m2, x, y))
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def _ce_backward(model, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss

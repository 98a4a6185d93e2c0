"""Paper readings offered as options (docs/paper-readings.md): beta_k over training."""
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

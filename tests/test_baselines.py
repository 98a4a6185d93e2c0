"""The paper's baselines (lookahead_ext.optim.baselines): evaluation counts, state dicts, base
optimizers, bad arguments (the published-update comparisons are in test_baselines_published.py)."""
import pytest
import torch

from lookahead_ext.optim.baselines import CRSAM, GSAM, LookbehindSAM


def _problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    x, y = torch.randn(24, 5), torch.randn(24, 2)
    return model, x, y


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _closure(model, x, y):
    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("cls,kw,steps,evals", [
    (LookbehindSAM, dict(k=2), 6, 12), (LookbehindSAM, dict(k=5), 15, 30),
    (GSAM, dict(period=2), 6, 9), (GSAM, dict(period=5), 15, 18), (CRSAM, {}, 3, 9)])
def test_evaluation_counts(cls, kw, steps, evals):
    """Closure calls = num_evals: 2K per Lookbehind cycle, period + 1 per GraphSAM
    re-anchor period, 3 per CR-SAM step."""
    model, x, y = _problem()
    opt = cls(model.parameters(), lr=0.05, backend="reference", **kw)
    calls = [0]
    base = _closure(model, x, y)

    def counted():
        calls[0] += 1
        return base()
    for _ in range(steps):
        opt.step(counted)
    assert calls[0] == opt.num_evals == evals
    if cls is GSAM:
        assert opt.evals_per_update() == (kw["period"] + 1) / kw["period"]


@pytest.mark.parametrize("cls,kw", [(LookbehindSAM, dict(k=3, alpha="adaptive")),
                                    (GSAM, dict(period=4)), (CRSAM, {})])
def test_state_dict_roundtrip_continues_identically(cls, kw):
    import copy
    m1, x, y = _problem(5)
    o1 = cls(m1.parameters(), lr=0.05, momentum=0.9, **kw)
    for _ in range(4):
        o1.step(_closure(m1, x, y))
    m2 = copy.deepcopy(m1)
    o2 = cls(m2.parameters(), lr=0.05, momentum=0.9, **kw)
    o2.load_state_dict(o1.state_dict())
    for _ in range(5):
        o1.step(_closure(m1, x, y))
        o2.step(_closure(m2, x, y))
    assert torch.equal(_flat(m1), _flat(m2))


@pytest.mark.parametrize("cls", [LookbehindSAM, GSAM, CRSAM])
def test_momentum_adamw_and_unused_param(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    unused = torch.nn.Parameter(torch.randn(3))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for base_kw in (dict(momentum=0.9, weight_decay=1e-3), dict(base="adamw", weight_decay=1e-2)):
        opt = cls(list(model.parameters()) + [unused], lr=0.01, backend="reference", **base_kw)
        before = unused.detach().clone()
        first = float(torch.nn.functional.mse_loss(model(x), y).detach())
        for _ in range(20):
            opt.step(_closure(model, x, y))
        assert torch.equal(unused, before)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert float(torch.nn.functional.mse_loss(model(x), y).detach()) < first


@pytest.mark.parametrize("cls, kw, error", [
    (LookbehindSAM, dict(lam=0.1), TypeError),
    (LookbehindSAM, dict(alpha=1.5), ValueError),
    (GSAM, dict(beta=1.5), ValueError),
    (GSAM, dict(period=0), ValueError),
    (GSAM, dict(k=3), TypeError),
    (CRSAM, dict(k=3), TypeError),
    (CRSAM, dict(curv=0.5), TypeError),
    (CRSAM, dict(beta=-1.0), ValueError),
])
def test_invalid_arguments(cls, kw, error):
    model, _, _ = _problem()
    with pytest.raises(error):
        cls(model.parameters(), **kw)


def test_crsam_gamma_beta_zero_is_sam():
    import lookahead_ext as la
    m1, x, y = _problem(4)
    m2, _, _ = _problem(4)
    o1 = CRSAM(m1.parameters(), lr=0.1, rho=0.05, gamma=0.0, beta=0.0, backend="reference")
    o2 = la.SAM(m2.parameters(), lr=0.1, rho=0.05, backend="reference")
    for _ in range(3):
        o1.step(_closure(m1, x, y))
        o2.step(_closure(m2, x, y))
    torch.testing.assert_close(_flat(m1), _flat(m2), rtol=1e-6, atol=1e-7)

"""Schemes and directions as values: their coefficients against the paper's formulas, the
family's table of (scheme, direction, lookahead), and a new family member built the way
docs/extending.md shows (one Scheme + one class + one optim_db entry)."""
import pytest
import torch
import torch.nn.functional as F

import lookahead_ext as la
from lookahead_ext.optim import ProbeOptimizer
from lookahead_ext.optim.scheme import (CENTRAL, CENTRAL_BASE, FORWARD, GRAD, LAGGED, MOMENTUM,
                                        Scheme, direction_of, scheme_of)

RHO_LAM = [(0.05, 0.1), (0.07, 0.07), (0.2, 0.0), (1e-3, 2.5)]


@pytest.mark.parametrize("rho,lam", RHO_LAM)
def test_coefficients_are_the_papers(rho, lam):
    # eqs. 6, 9 and 8, re-stated here from cmlr.txt
    assert FORWARD.coefs(rho, lam) == (1 - lam / rho, lam / rho, 0.0)
    assert CENTRAL.coefs(rho, lam) == (0.0, (rho + lam) / (2 * rho), (rho - lam) / (2 * rho))
    assert CENTRAL_BASE.coefs(rho, lam) == (1.0, lam / (2 * rho), -lam / (2 * rho))
    assert FORWARD.coef_dict(rho, lam) == {"g0": 1 - lam / rho, "g+": lam / rho}
    assert set(CENTRAL.coef_dict(rho, lam)) == {"g+", "g-"}


def test_v_update_slots():
    # (bv, a0, a+, a-): eq. 115 weighs g+ by gamma and g- (FMLR: g0) by 1 - gamma
    assert CENTRAL.v_coefs("bv", "first", "other", 0) == ("bv", 0, "first", "other")
    assert FORWARD.v_coefs("bv", "first", "other", 0) == ("bv", "other", "first", 0)


def test_family_table():
    """cmlr.txt Table 8 as (scheme, direction, lookahead) and evaluations per update."""
    table = {"SAM": (FORWARD, GRAD, False, 2), "FR": (FORWARD, GRAD, False, 2),
             "CR": (CENTRAL, LAGGED, False, 2), "LR": (FORWARD, GRAD, True, 2 * 3),
             "CLR": (CENTRAL_BASE, GRAD, True, 3 * 3), "FMLR": (FORWARD, MOMENTUM, True, 2 * 3),
             "MLSAM": (FORWARD, MOMENTUM, True, 2 * 3), "CMLR": (CENTRAL, MOMENTUM, True, 2 * 3 + 1)}
    p = [torch.nn.Parameter(torch.zeros(2))]
    for name, (scheme, direction, look, evals) in table.items():
        cls = getattr(la, name)
        assert (cls.scheme, cls.direction, cls.lookahead) == (scheme, direction, look), name
        opt = cls(p, k=3) if look else cls(p)
        assert opt.evals_per_update() == evals, name
    assert la.CMLR(p, k=3, init_v="carry").evals_per_update() == 6
    assert la.CR(p).beta_k() == 0.0 and la.CMLR(p, k=3).beta_k(2) == pytest.approx(0.99)


def test_names_resolve_and_bad_schemes_raise():
    assert scheme_of("central_base") is CENTRAL_BASE and direction_of("lagged") is LAGGED
    with pytest.raises(ValueError, match="unknown scheme"):
        scheme_of("backward")
    with pytest.raises(ValueError, match="unknown direction"):
        direction_of("random")
    with pytest.raises(ValueError, match="unknown probe"):
        Scheme("bad", ("g0", "gx"), lambda r, l: (1.0, 0.0, 0.0), ("g0", "gx"), "-")

    class Old(ProbeOptimizer):  # string class attributes (as older subclasses write them)
        scheme, direction, lookahead = "forward", "grad", False
    assert Old.scheme is FORWARD and Old.direction is GRAD


def test_d_coefs_per_group_and_sam_ties_lam():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = la.FR([dict(params=[p1]), dict(params=[p2], rho=0.2, lam=0.05)], rho=0.1, lam=0.1)
    assert opt.d_coefs() == {"g0": 0.0, "g+": 1.0}
    assert opt.d_coefs(opt.param_groups[1]) == {"g0": 0.75, "g+": 0.25}
    sam = la.SAM([p1], rho=0.1)
    sam.param_groups[0]["rho"] = 0.3   # a scheduled rho: lam follows it
    assert sam.d_coefs() == {"g0": 0.0, "g+": 1.0}


# ------------------------------------------------------------------ a new family member
def _backward(rho, lam):
    return (1.0 + lam / rho, 0.0, -lam / rho)


#: d = (1 + lam/rho) g0 - lam/rho g-: the backward difference of eq. 6
BACKWARD = Scheme("backward", probes=("g0", "g-"), d=_backward, v_terms=("g-", "g0"),
                  equation="eq. 6, backward")


class BR(ProbeOptimizer):
    """Backward-difference gradient regularization (test member)."""
    scheme, direction, lookahead = BACKWARD, GRAD, False


OPTIM_DB_ENTRY = dict(cls=BR, kwargs=dict(lr=0.1, rho=0.05, lam=0.1, k=1, alpha=1.0))


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_new_member_from_one_scheme_and_one_class():
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    model, ref = _mlp(), _mlp()
    opt = OPTIM_DB_ENTRY["cls"](model.parameters(), backend="reference",
                                **OPTIM_DB_ENTRY["kwargs"])
    rho, lam, lr = 0.05, 0.1, 0.1

    def grads_at(params):
        with torch.enable_grad():
            for p in params:
                p.grad = None
            F.cross_entropy(ref(x), y).backward()
        return [p.grad.clone() for p in params]

    for _ in range(3):
        opt.step(lambda: (lambda loss: (loss.backward(), loss)[1])(F.cross_entropy(model(x), y)))
        ps = list(ref.parameters())
        w = [p.detach().clone() for p in ps]
        g0 = grads_at(ps)
        norm = torch.sqrt(sum((g * g).sum() for g in g0))
        with torch.no_grad():
            for p, wi, g in zip(ps, w, g0):
                p.copy_(wi - rho * g / (norm + 1e-12))
        gm = grads_at(ps)
        with torch.no_grad():
            for p, wi, a, b in zip(ps, w, g0, gm):
                p.copy_(wi - lr * ((1 + lam / rho) * a - lam / rho * b))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.num_evals == 6 and opt.evals_per_update() == 2
    assert opt.d_coefs() == {"g0": 1 + lam / rho, "g-": -lam / rho}

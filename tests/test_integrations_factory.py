"""lookahead_ext.create_optimizer: every name, no-decay groups, the lookahead_ prefix (timm itself:
test_integrations_timm.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lookahead_ext as la
import lookahead_ext.amp
from lookahead_ext.factory import PROBE, TORCH, optimizer_names


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))


def one_step(m, opt):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(m(x), y)
        loss.backward()
        return loss
    opt.step(closure)


@pytest.mark.parametrize("name", optimizer_names())
def test_every_name_builds_the_class_and_steps(name):
    """create_optimizer(model, name, lr, weight_decay) == the class built by hand with
    timm's no-decay groups, bit for bit after one step."""
    base = name.removeprefix("lookahead_")
    cls = PROBE.get(base) or TORCH[base]
    m1, m2 = model(), model()
    got = la.create_optimizer(m1, name.upper(), lr=0.01, weight_decay=0.1)
    decay = [m2[0].weight, m2[3].weight]
    no_decay = [m2[0].bias, m2[1].weight, m2[1].bias, m2[3].bias]
    ref = cls([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.1}],
              lr=0.01, weight_decay=0.1)
    if name.startswith("lookahead_"):
        assert isinstance(got, la.Lookahead) and isinstance(got.optimizer, cls)
        ref = la.Lookahead(ref, k=5, alpha=0.5)
    else:
        assert type(got) is cls
    assert [len(g["params"]) for g in got.param_groups] == [4, 2]
    assert [g["weight_decay"] for g in got.param_groups] == [0.0, 0.1]
    one_step(m1, got)
    one_step(m2, ref)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_params_keywords_and_defaults_pass_through():
    m = model()
    opt = la.create_optimizer(m.parameters(), "cmlr", base="adamw", rho=0.1, k=3)
    assert len(opt.param_groups) == 1 and opt.defaults["weight_decay"] == 1e-2  # the class default
    assert opt.defaults["rho"] == 0.1 and opt.defaults["k"] == 3 and opt.defaults["base"] == "adamw"
    frozen = model()
    frozen[0].weight.requires_grad_(False)
    opt = la.create_optimizer(frozen, "sam", lr=0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == 5


def test_no_weight_decay_list_of_the_model():
    m = model()
    m.no_weight_decay = lambda: {"0.weight"}
    opt = la.create_optimizer(m, "sgd", lr=0.1, weight_decay=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [5, 1]
    m.no_weight_decay = lambda: {"3.*"}  # timm reads them as shell-style patterns (xcit: "pos_embed.*")
    opt = la.create_optimizer(m, "sgd", lr=0.1, weight_decay=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [5, 1] and opt.param_groups[1]["params"][0] is m[0].weight


def test_bad_names_refused():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'; known: .*cmlr"):
        la.create_optimizer(model(), "lamb")
    with pytest.raises(ValueError, match="CMLR already runs a lookahead cycle"):
        la.create_optimizer(model(), "lookahead_cmlr")


def test_lookahead_prefix_under_a_grad_scaler():
    """la.amp.step drives "lookahead_sam" (lookahead_ext's Lookahead has probes()) and returns
    the first probe's loss (it read a last_loss the Lookahead does not have)."""
    m = model()
    opt = la.create_optimizer(m, "lookahead_sam", lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def closure():
        loss = F.mse_loss(m(x), y)
        scaler.scale(loss).backward()
        return loss
    want = F.mse_loss(m(x), y)
    assert torch.equal(la.amp.step(opt, scaler, closure), want) and opt.optimizer.num_steps == 1

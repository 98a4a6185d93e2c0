"""Gradient accumulation per probe, and torch.compile'd models inside the closure."""
import shutil

import pytest
import torch
import torch.nn.functional as F

import lookahead_ext as la
from lookahead_ext.batchnorm import apply_batchnorm_mode
from _prod_util import FAMILY, FAMILY_IDS, accumulated_loss, data, mlp


@pytest.mark.parametrize("cls,kw", FAMILY, ids=FAMILY_IDS)
def test_accumulation_equals_one_big_batch(cls, kw):
    x, y = data(32)
    big, acc = mlp(), mlp()
    o_big = cls(big.parameters(), lr=0.1, backend="reference", **kw)
    o_acc = cls(acc.parameters(), lr=0.1, backend="reference", **kw)
    for _ in range(4):
        o_big.step(lambda: F.mse_loss(big(x), y).backward())
        for probe in o_acc.probes():            # 4 micro-batches of 8 per probe
            probe.loss = accumulated_loss(acc, x, y, 4)
    for a, b in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(next(big.parameters()), next(mlp().parameters()))
    assert o_big.num_evals == o_acc.num_evals


def _backend():
    return "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"


def test_compiled_model_in_closure_matches_eager_without_recompiles():
    import torch._dynamo as dynamo
    dynamo.reset()
    x, y = data(16)
    eager, net = mlp(), mlp()
    compiled = torch.compile(net, backend=_backend(), dynamic=False)
    o_e = la.CMLR(eager.parameters(), lr=0.1, k=2, backend="reference")
    o_c = la.CMLR(net.parameters(), lr=0.1, k=2, backend="reference")
    frames = []
    dynamo.utils.counters.clear()
    with dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            o_e.step(lambda: F.mse_loss(eager(x), y).backward())
            o_c.step(lambda: F.mse_loss(compiled(x), y).backward())
    frames.append(dynamo.utils.counters["stats"]["unique_graphs"])
    for a, b in zip(eager.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert frames[0] >= 1                      # it really ran compiled
    dynamo.reset()


def test_compiled_bn_model_with_probe_mode():
    """The BatchNorm helper flips track_running_stats for later probes: one more graph in
    the first step, then no recompiles; running stats as in eager mode."""
    import torch._dynamo as dynamo
    dynamo.reset()
    x, y = data(16)

    def bn():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                   torch.nn.ReLU(), torch.nn.Linear(8, 1))
    eager, net = bn(), bn()
    compiled = torch.compile(net, backend="aot_eager", dynamic=False)
    o_e = la.SAM(eager.parameters(), lr=0.1, backend="reference")
    o_c = la.SAM(net.parameters(), lr=0.1, backend="reference")
    apply_batchnorm_mode(eager, o_e)
    apply_batchnorm_mode(net, o_c)
    o_e.step(lambda: F.mse_loss(eager(x), y).backward())
    o_c.step(lambda: F.mse_loss(compiled(x), y).backward())   # two graphs: tracking or not
    with dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            o_e.step(lambda: F.mse_loss(eager(x), y).backward())
            o_c.step(lambda: F.mse_loss(compiled(x), y).backward())
    assert int(net[1].num_batches_tracked) == 4
    torch.testing.assert_close(eager[1].running_mean, net[1].running_mean)
    for a, b in zip(eager.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    dynamo.reset()

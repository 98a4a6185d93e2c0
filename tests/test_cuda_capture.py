"""GPU only (marker `cuda`): a whole training step (forward, backward, optimizer) of SAM and CMLR
captured in a CUDA graph and replayed against eager, and a step under
torch.cuda.set_sync_debug_mode("error") (issue 18 part 3, docs/gpu.md "A capturable step").

Both need the device-flag mode (``device_skip=True``) and a tensor learning rate on the device.
Run by bench/gpu_session.sh (`capture`); skipped without CUDA.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lookahead_ext as la

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = {
    "SAM": (la.SAM, dict(rho=0.05, momentum=0.9)),
    "SAM_adamw": (la.SAM, dict(rho=0.05, base="adamw")),
    "CMLR": (la.CMLR, dict(momentum=0.9, k=2)),          # K=2: replays cross Lookahead syncs
    "CMLR_adamw": (la.CMLR, dict(base="adamw", k=3)),
}


def _backends():
    ok = la.ops.available_backends()
    return [b for b in ("native", "triton", "reference") if ok.get(b) == "ok" or b == "reference"]


def _setup(name, backend):
    cls, kw = CASES[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 8)).cuda()
    x = torch.randn(128, 32, device="cuda")  # static inputs: a graph reads these addresses
    y = torch.randn(128, 8, device="cuda")
    lr = torch.tensor(0.05 if kw.get("base") != "adamw" else 1e-3, device="cuda")
    opt = cls(model.parameters(), lr=lr, backend=backend, device_skip=True, **kw)
    return model, opt, x, y


def _step(model, opt, x, y):
    """One training step through probes(): every probe's forward and backward."""
    loss = None
    for probe in opt.probes():
        out = torch.nn.functional.mse_loss(model(x), y)
        out.backward()
        probe.loss = out
        loss = out if loss is None else loss
    return loss


def _twin(model, opt, x, y, backend, name):
    """An identical model and optimizer (same weights, same state) for the eager run."""
    m2, o2, _, _ = _setup(name, backend)
    m2.load_state_dict(model.state_dict())
    o2.load_state_dict(copy.deepcopy(opt.state_dict()))
    return m2, o2


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(CASES))
def test_captured_step_replays_like_eager(name, backend):
    model, opt, x, y = _setup(name, backend)
    # warm-up on a side stream (torch.cuda.graphs recipe): state, buckets, kernels, plans built
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            _step(model, opt, x, y)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    eager_model, eager_opt = _twin(model, opt, x, y, backend, name)
    for p in model.parameters():
        p.grad = None  # the probes' backward allocate them in the graph's pool
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss = _step(model, opt, x, y)
    # capture recorded the work without running it: the weights are those of the warm-up
    steps0 = eager_opt.num_steps
    for i in range(5):
        g.replay()
        eager_loss = _step(eager_model, eager_opt, x, y)
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-5, atol=1e-6)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the device counters advanced with every replay (the host's num_evals did not: documented)
    assert opt.num_steps == eager_opt.num_steps == steps0 + 5
    assert opt.cycle_position == eager_opt.cycle_position
    if opt.lookahead:
        slow = []
        for m, o in ((model, opt), (eager_model, eager_opt)):
            with o.slow_weights():  # the model holds the slow weights inside
                slow.append([p.detach().clone() for p in m.parameters()])
        for a, b in zip(*slow):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(CASES))
def test_step_makes_no_sync(name, backend):
    """After a first step (state, counters and plans created), whole steps with a skipped one
    among them run under sync debug mode "error": any synchronising call raises."""
    model, opt, x, y = _setup(name, backend)
    _step(model, opt, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(4):
            if i == 2:
                x[0, 0] = float("nan")  # a device write: this step is skipped on the device
            _step(model, opt, x, y)
            if i == 2:
                x[0, 0] = 0.0
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.num_skipped == 1 and opt.num_steps == 4

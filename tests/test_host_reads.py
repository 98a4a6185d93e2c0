"""Which host reads of tensor values a step makes today (groundwork for the device-side skip
of issue 18, see docs/gpu.md): Tensor.item / tolist / __bool__ / __float__ / __int__ are
recorded, with the lookahead_ext function that called them, during real steps on CPU.

The recorded set is pinned: a new host read in the step path fails this test (and removing
one, as the device-side skip will, shows up here as an intended change).
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch

from lookahead_ext import ops as la_ops
from lookahead_ext.optim import CMLR, SAM

_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")
_PKG = os.path.dirname(os.path.abspath(sys.modules["lookahead_ext"].__file__))


@pytest.fixture
def host_reads(monkeypatch):
    """Counter of (module file, function, method) for reads made from inside lookahead_ext."""
    reads: Counter = Counter()
    for name in _METHODS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *args, _orig=orig, _name=name):
            f = sys._getframe(1)
            while f is not None and f.f_code.co_filename.endswith("_tensor.py"):
                f = f.f_back  # torch's own Tensor wrappers (e.g. __bool__ -> item)
            if f is not None and f.f_code.co_filename.startswith(_PKG):
                reads[(os.path.relpath(f.f_code.co_filename, _PKG), f.f_code.co_name, _name)] += 1
            return _orig(self, *args)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return reads


def _train(opt_cls, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = opt_cls(model.parameters(), lr=0.1, **kw)
    x, y = torch.randn(16, 6), torch.randn(16, 1)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return opt, closure


PER_PROBE = {
    ("optim/runtime.py", "_capture", "tolist"),          # [NaN/Inf flag, ||g||^2] of each probe
    ("optim/runtime.py", "_finite_loss", "__bool__"),  # isfinite(loss) of each probe
}
# CPU only: ||v||^2 carried from the last combine_step_ (a 1-element tensor) becomes a host
# float in groups.inv_norm (on CUDA it stays a device scalar)
CARRIED_V = ("optim/groups.py", "inv_norm", "__float__")


@pytest.mark.parametrize("opt_cls,kw,carried", [(CMLR, dict(momentum=0.9, k=2), 2), (SAM, {}, 0)],
                         ids=["CMLR", "SAM"])
def test_host_reads_of_a_step_on_cpu(host_reads, opt_cls, kw, carried):
    opt, closure = _train(opt_cls, **kw)
    for _ in range(5):
        opt.step(closure)
    evals = opt.num_evals
    want = {key: evals for key in PER_PROBE}
    if carried:  # CMLR, K=2, init_v="grad": steps 2 and 4 perturb along the carried v
        want[CARRIED_V] = carried
    assert dict(host_reads) == want


def test_no_loss_no_loss_read(host_reads):
    """Driving the probes without setting probe.loss leaves the gradient check's read."""
    opt, closure = _train(SAM)
    for _ in range(2):
        for probe in opt.probes():
            closure()
    assert dict(host_reads) == {("optim/runtime.py", "_capture", "tolist"): opt.num_evals}


# ----------------------------------------------------------------------------- device-flag mode
@pytest.fixture
def no_host_reads(monkeypatch):
    """Tensor.item / tolist / __bool__ / __float__ / __int__ raise while ``armed`` is set."""
    armed = [False]
    for name in _METHODS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *args, _orig=orig, _name=name):
            if armed[0]:
                raise AssertionError(f"host read: Tensor.{_name}")
            return _orig(self, *args)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return armed


_DEVICE_CASES = [(CMLR, dict(momentum=0.9, k=2)), (CMLR, dict(base="adamw", k=3)),
                 (SAM, dict(momentum=0.5, nesterov=True)), (SAM, dict(base="adamw")),
                 (CMLR, dict(k=2, max_grad_norm=0.5, beta_schedule="training", total_steps=5))]


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("opt_cls,kw", _DEVICE_CASES, ids=["CMLR_sgd", "CMLR_adamw", "SAM_sgd", "SAM_adamw",
                                                           "CMLR_clip"])
def test_device_mode_makes_no_host_read(no_host_reads, opt_cls, kw, backend):
    """The device-flag mode forced on CPU tensors: whole cycles with their Lookahead syncs and
    skipped steps (a NaN gradient, an infinite loss) without one host read; the counters are
    exact when read afterwards."""
    if backend != "reference" and la_ops.available_backends()[backend] != "ok":
        pytest.skip(f"{backend}: {la_ops.available_backends()[backend]}")
    opt, closure = _train(opt_cls, device_skip=True, backend=backend, **kw)
    params = [p for g in opt.param_groups for p in g["params"]]
    tensor_lr = torch.tensor(0.1)  # a tensor lr is read on the device
    for g in opt.param_groups:
        g["lr"] = tensor_lr

    def spoiled(step, probe):
        loss = closure()
        if step == 2:
            params[0].grad.view(-1)[0] = float("nan")
        if step == 4 and probe.index == 1:
            loss = loss * float("inf")
        return loss
    no_host_reads[0] = True
    for step in range(7):
        for probe in opt.probes():
            probe.loss = spoiled(step, probe)
        tensor_lr.mul_(0.9)  # a scheduler's in-place update
    no_host_reads[0] = False
    assert opt.num_skipped == 2 and opt.num_steps == 5
    assert opt.device_skip_active

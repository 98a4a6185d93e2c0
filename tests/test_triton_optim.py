"""Optimizer-level parity: CMLR, SAM, FMLR, Lookahead with backend="triton" vs "reference"
over several steps (interpreter on CPU, compiled kernels on CUDA)."""
from __future__ import annotations

import pytest
import torch

import lookahead_ext as la
from lookahead_ext import ops

from _triton_util import DEVICE, ON_GPU, requires_triton

pytestmark = requires_triton


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 33), torch.nn.Tanh(), torch.nn.Linear(33, 1))
    return m.to(device=DEVICE, dtype=dtype)


def _data(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g).to(DEVICE, dtype)
    y = torch.randn(32, 1, generator=g).to(DEVICE, dtype)
    return x, y


def _train(make_opt, dtype, backend, steps, closure_style=True):
    model = _model(dtype)
    x, y = _data(dtype)
    opt = make_opt(model.parameters(), backend)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        return loss

    losses = []
    for _ in range(steps):
        if closure_style:
            losses.append(float(opt.step(closure).detach()))
        else:
            opt.zero_grad()
            losses.append(float(closure()))
            opt.step()
    return model, opt, losses


OPTIMS = {
    "CMLR_sgd_mom": lambda p, b: la.CMLR(p, lr=0.05, momentum=0.9, weight_decay=1e-3, k=3, backend=b),
    "CMLR_adamw": lambda p, b: la.CMLR(p, lr=1e-2, base="adamw", weight_decay=0.01, k=3, backend=b),
    "SAM_sgd": lambda p, b: la.SAM(p, lr=0.05, momentum=0.5, nesterov=True, backend=b),
    "SAM_adamw": lambda p, b: la.SAM(p, lr=1e-2, base="adamw", backend=b),
    "FMLR_sgd": lambda p, b: la.FMLR(p, lr=0.05, k=2, backend=b),
    "CLR_sgd": lambda p, b: la.CLR(p, lr=0.05, k=2, backend=b),
}
LOOKAHEADS = {
    "Lookahead_SGD": lambda p, b: la.Lookahead(torch.optim.SGD(p, lr=0.1, momentum=0.9), k=3,
                                               alpha=0.5, backend=b),
    # eps=1e-3: torch.optim.AdamW keeps fp16 state for fp16 params, where 1e-8 underflows
    "Lookahead_AdamW": lambda p, b: la.Lookahead(torch.optim.AdamW(p, lr=1e-2, eps=1e-3), k=2, alpha=0.8,
                                                 backend=b),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tols(dtype):
    # fp32: the kernels mirror the reference's operation order; the reductions
    # (norms) differ in summation order only. bf16/fp16: param casts can differ by one
    # ulp (interpreter rounds toward zero) and feed back through the forward passes.
    # Measured on the interpreter: fp32 <= 6e-8, bf16 <= 6e-3, fp16 <= 1.3e-4 after 7 steps.
    return {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
            torch.float16: dict(rtol=5e-3, atol=1e-3)}[dtype]


def _compare(m_t, m_r, dtype):
    for (name, a), b in zip(m_t.named_parameters(), m_r.parameters()):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), msg=lambda s: f"{name}: {s}", **_tols(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(OPTIMS))
def test_family_parity(name, dtype):
    steps = 7  # crosses two Lookahead syncs for k=3
    m_t, opt_t, l_t = _train(OPTIMS[name], dtype, "triton", steps)
    m_r, opt_r, l_r = _train(OPTIMS[name], dtype, "reference", steps)
    _compare(m_t, m_r, dtype)
    torch.testing.assert_close(torch.tensor(l_t), torch.tensor(l_r), **_tols(dtype))
    assert opt_t.num_steps == opt_r.num_steps == steps
    # optimizer state (v, masters, Adam moments, slow weights) matches too
    for p_t, p_r in zip(m_t.parameters(), m_r.parameters()):
        st_t, st_r = opt_t.state[p_t], opt_r.state[p_r]
        assert set(st_t) == set(st_r)
        for k in st_t:
            if isinstance(st_t[k], torch.Tensor) and st_t[k].is_floating_point():
                torch.testing.assert_close(st_t[k].float(), st_r[k].float(), msg=lambda s: f"{k}: {s}",
                                           **_tols(dtype))
    if getattr(opt_t, "lookahead", False):
        for p_t, p_r in zip(m_t.parameters(), m_r.parameters()):
            torch.testing.assert_close(opt_t._slow[p_t], opt_r._slow[p_r], **_tols(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(LOOKAHEADS))
def test_lookahead_parity(name, dtype):
    steps = 7
    m_t, opt_t, _ = _train(LOOKAHEADS[name], dtype, "triton", steps, closure_style=False)
    m_r, opt_r, _ = _train(LOOKAHEADS[name], dtype, "reference", steps, closure_style=False)
    _compare(m_t, m_r, dtype)
    for p_t, p_r in zip(m_t.parameters(), m_r.parameters()):
        torch.testing.assert_close(opt_t._slow[p_t], opt_r._slow[p_r], **_tols(dtype))


def test_triton_backend_is_really_used(monkeypatch):
    """Guard against a silent fallback: every op of a CMLR step goes through the Triton module."""
    mod = ops.resolve("triton", DEVICE, torch.float32)
    calls = []
    for name in ("multi_dot", "perturb_", "combine_step_", "lookahead_sync_", "nonfinite_"):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    _train(OPTIMS["CMLR_sgd_mom"], torch.float32, "triton", 3)
    # no multi_dot: the norms come from the fused nonfinite_ check and combine_step_'s v_sq_out
    assert set(calls) == {"perturb_", "combine_step_", "lookahead_sync_", "nonfinite_"}



def test_skip_on_nonfinite_gradient_with_triton():
    model = _model(torch.float32)
    x, y = _data(torch.float32)
    opt = la.SAM(model.parameters(), lr=0.1, backend="triton")
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y) * float("inf")
        loss.backward()
        return torch.tensor(1.0)  # finite loss: the gradient check must catch it

    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step(closure)
    assert opt.num_skipped == 1
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_auto_on_cuda_resolves_to_a_fused_backend():
    mod = ops.resolve("auto", torch.device("cuda"), torch.float32)
    assert mod.__name__ != "lookahead_ext.ops.reference" or ops.available_backends()["triton"] != "ok"

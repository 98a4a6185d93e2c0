"""Optimizer-level parity of the fused backend: 20 steps of CMLR, FMLR, SAM and Lookahead
with backend="cpp" (and "cuda" on a GPU) match backend="reference"; a skipped step leaves
every piece of state bit-identical; the registered torch ops pass torch.library.opcheck."""
import copy
import warnings

import pytest
import torch

import lookahead_ext as la
from lookahead_ext.ops import native

from _native_util import DEVICES, needs_cpp


def _model(dtype, device, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return m.to(device=device, dtype=dtype)


def _data(dtype, device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g).to(device, dtype), torch.randn(32, 3, generator=g).to(device, dtype)


def _closure(model, x, y):
    def closure():
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        return loss
    return closure


def _make(name, params, backend):
    if name == "CMLR":
        return la.CMLR(params, lr=0.05, momentum=0.9, weight_decay=1e-3, k=4, backend=backend)
    if name == "CMLR_adamw":
        return la.CMLR(params, lr=1e-2, base="adamw", weight_decay=1e-2, k=3, backend=backend)
    if name == "FMLR":
        return la.FMLR(params, lr=0.05, momentum=0.9, nesterov=True, k=5, backend=backend)
    if name == "SAM":
        return la.SAM(params, lr=0.05, momentum=0.5, backend=backend)
    if name == "Lookahead":
        return la.Lookahead(torch.optim.SGD(params, lr=0.05, momentum=0.9), k=3, alpha=0.5, backend=backend)
    raise ValueError(name)


OPTS = ["CMLR", "CMLR_adamw", "FMLR", "SAM", "Lookahead"]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_twenty_steps_match_reference(device, backend, name, dtype):
    x, y = _data(dtype, device)
    runs = {}
    for b in ("reference", backend):
        model = _model(dtype, device)
        opt = _make(name, model.parameters(), b)
        closure = _closure(model, x, y)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = opt.step(closure)
            losses.append(float(loss.detach()))
        runs[b] = (model, losses, opt)
    (m_ref, l_ref, o_ref), (m_fast, l_fast, o_fast) = runs["reference"], runs[backend]
    assert l_ref[-1] < l_ref[0]  # the problem trains at all
    for p, q in zip(m_ref.parameters(), m_fast.parameters()):
        torch.testing.assert_close(q.float(), p.float(), **TOL[dtype])
    torch.testing.assert_close(torch.tensor(l_fast), torch.tensor(l_ref), **TOL[dtype])
    if hasattr(o_ref, "_slow"):  # slow weights agree too
        for s_ref, s_fast in zip(o_ref._slow.values(), o_fast._slow.values()):
            torch.testing.assert_close(s_fast.float(), s_ref.float(), **TOL[dtype])


def _snapshot(model, opt):
    sd = copy.deepcopy(opt.state_dict())
    for key in ("evals", "skipped"):  # counters of work done, not optimizer state
        sd.get("lookahead_ext", {}).get("engine", {}).pop(key, None)
    return [p.detach().clone() for p in model.parameters()], sd


def _assert_bit_identical(a, b):
    pa, sa = a
    pb, sb = b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)

    def walk(u, v):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v)
        elif isinstance(u, dict):
            assert u.keys() == v.keys()
            for k in u:
                walk(u[k], v[k])
        elif isinstance(u, (list, tuple)):
            assert len(u) == len(v)
            for s, t in zip(u, v):
                walk(s, t)
        else:
            assert u == v
    walk(sa, sb)


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("name", ["CMLR", "FMLR"])
def test_skipped_step_leaves_state_bit_identical(device, backend, name, where):
    """A NaN gradient at one probe: the fused nonfinite_ check skips the update and no
    parameter, momentum, v, base state or slow weight changes by a single bit."""
    model = _model(torch.float32, device)
    x, y = _data(torch.float32, device)
    opt = _make(name, model.parameters(), backend)
    closure = _closure(model, x, y)
    for _ in range(3):
        opt.step(closure)
    before = _snapshot(model, opt)
    calls = {"n": 0}
    evals = 1 if where == "first" else 2  # k = 3 of the cycle: probes g+ then g- (or g0, g+)

    def bad_closure():
        calls["n"] += 1
        loss = closure()
        if calls["n"] == evals:
            next(model.parameters()).grad[0, 0] = float("nan")
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(bad_closure)
    assert opt.num_skipped == 1
    _assert_bit_identical(before, _snapshot(model, opt))


# ----------------------------------------------------------------------------- opcheck
def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    n = [5, 1, 70000]
    P = [r(k, dtype=torch.bfloat16) for k in n]
    W, G1, G2, B1, V, S = ([r(k) for k in n] for _ in range(6))
    ops = torch.ops.lookahead_ext
    return [
        (ops.multi_dot.default, (W + G1, 2, [0, 0, 0, 1], False)),
        (ops.multi_dot.default, (W + G1, 2, [1, 1], True)),
        (ops.perturb_.default, (P, W, V, torch.tensor(0.3, device=device), -1.0, [])),
        (ops.combine_step_.default, (P, W, [], [g.bfloat16() for g in G1], [g.bfloat16() for g in G2],
                                     [0.0, 1.5, -0.5], B1, [], V, [torch.rand((), device=device), None, torch.rand((), device=device), torch.rand((), device=device)], [0.0, 0.25, 0.0, 0.0],
                                     0, [0.1, 0.0, 0.9, 0.0], [1, 0, 0, 1, 1])),
        (ops.lookahead_sync_.default, (S, W, 0.5, P)),
        (ops.nonfinite_.default, (G1, torch.tensor(0.5, device=device))),
        (ops.nonfinite_.default, (G2, None)),
        (ops.nonfinite_.default, (G1 + G2, torch.tensor(0.5, device=device), [2, 4], True)),
        (ops.nonfinite_.default, (P, None, [], True)),
        (ops.combine_step_.default, (S, W, [], G1, G2, [0.0, 1.5, -0.5], B1, [], V,
                                     [torch.rand((), device=device) for _ in range(4)], [0.0] * 4, 0,
                                     [0.1, 0.0, 0.9, 0.0], [0, 0, 0, 1, 1], torch.zeros(1, device=device), False)),
    ]


@pytest.mark.parametrize("device,backend", DEVICES)
def test_opcheck_registered_ops(device, backend):
    for op, args in _opcheck_cases(device):
        # schema + fake (meta) kernels + autograd registration + functionalization
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_autograd_registration"))


@needs_cpp
def test_cpu_isa_reported():
    assert torch.ops.lookahead_ext.cpu_isa() in ("base", "avx2")
    assert native.available("cpp") == (True, "ok")

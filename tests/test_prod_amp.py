"""bf16/fp16 parameters, autocast inside closures, GradScaler with the multi-probe step."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import lookahead_ext as la
from lookahead_ext import amp
from _prod_util import FAMILY, FAMILY_IDS, assert_same_state, data, flat_state, mlp, params_of


def _closure(model, x, y, scaler=None, autocast=None, boom=None, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        if autocast is not None:
            with torch.autocast("cpu", dtype=autocast):
                loss = F.mse_loss(model(x).float(), y)
        else:
            loss = F.mse_loss(model(x), y)
        scaled = scaler.scale(loss) if scaler is not None else loss
        if boom is not None and boom(len(calls)):
            scaled = scaled * float("inf")       # forced overflow of this probe's gradient
        scaled.backward()
        return loss.detach()
    return closure


@pytest.mark.parametrize("cls,kw", FAMILY, ids=FAMILY_IDS)
def test_scaler_equals_unscaled_run(cls, kw):
    """A power-of-two loss scale is exact: with the probes unscaled in the engine the
    trajectory is bit-identical to the run without a scaler."""
    x, y = data()
    ref, mod = mlp(), mlp()
    o_ref = cls(ref.parameters(), lr=0.05, backend="reference", **kw)
    o = cls(mod.parameters(), lr=0.05, backend="reference", **kw)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)
    for _ in range(5):
        o_ref.step(_closure(ref, x, y))
        amp.step(o, sc, _closure(mod, x, y, scaler=sc))
        sc.update()
    for a, b in zip(ref.parameters(), mod.parameters()):
        assert torch.equal(a, b)
    assert sc.get_scale() == 2.0 ** 13  # one growth after 3 clean steps, none after 5
    assert o.num_skipped == 0


@pytest.mark.parametrize("which", ["first", "last"])
def test_forced_overflow_skips_whole_update_and_backs_off(which):
    x, y = data()
    model = mlp()
    opt = la.CMLR(model.parameters(), lr=0.05, k=3, backend="reference")
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    # the same overflow pattern on a plain optimizer tells what the scaler must do
    pm = mlp()
    plain = torch.optim.SGD(pm.parameters(), lr=0.05)
    psc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    for it in range(4):
        overflow = it == 2
        per_step = opt.evals_per_update() // 3 + (1 if opt.cycle_position == 0 else 0)
        calls = []
        before_p, before_s = params_of(model), flat_state(opt)
        nth = 1 if which == "first" else per_step
        boom = (lambda n, nth=nth: n == nth) if overflow else None
        amp.step(opt, sc, _closure(model, x, y, scaler=sc, boom=boom, calls=calls))
        if overflow:
            assert len(calls) == nth            # the step stopped at the overflowing probe
            assert opt.num_skipped == 1
            for a, b in zip(before_p, model.parameters()):
                assert torch.equal(a, b)
            assert_same_state(before_s, flat_state(opt))
            assert all(p.grad is None for p in model.parameters())
        sc.update()
        pl = F.mse_loss(pm(x), y)
        (psc.scale(pl) * (float("inf") if overflow else 1.0)).backward()
        psc.step(plain)
        psc.update()
        plain.zero_grad()
        assert sc.get_scale() == psc.get_scale()
        assert int(sc._growth_tracker) == int(psc._growth_tracker)
    assert opt.num_steps == 3


def test_nonfinite_loss_counts_as_overflow():
    x, y = data()
    model = mlp()
    opt = la.SAM(model.parameters(), lr=0.05, backend="reference")
    sc = torch.amp.GradScaler("cpu", init_scale=256.0)

    def closure():
        loss = F.mse_loss(model(x), y) * float("nan")
        sc.scale(loss).backward()
        return loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # the skip warning is silenced under a scaler
        amp.step(opt, sc, closure)
    sc.update()
    assert sc.get_scale() == 128.0 and opt.num_skipped == 1


def test_call_by_call_and_abandon():
    x, y = data()
    model = mlp()
    opt = la.FR(model.parameters(), lr=0.05, backend="reference")
    sc = torch.amp.GradScaler("cpu", init_scale=64.0)
    before = params_of(model)
    for probe in amp.probes(opt, sc):
        loss = F.mse_loss(model(x), y)
        sc.scale(loss).backward()
        probe.loss = loss
        break                                  # abandon: weights restored, nothing recorded
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert not opt._grad_unscalers             # the step's unscaler handle was removed
    with pytest.raises(AssertionError, match="No inf checks"):
        sc.update()
    for probe in amp.probes(opt, sc):
        loss = F.mse_loss(model(x), y)
        sc.scale(loss).backward()
        probe.loss = loss
    sc.update()
    assert opt.num_steps == 1 and sc.get_scale() == 64.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_fp16_bf16_with_scaler_trains(dtype):
    x, y = data(64)
    model = mlp(width=16)
    opt = la.CMLR(model.parameters(), lr=0.1, k=2, backend="reference")
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, enabled=dtype == torch.float16)
    seen = []

    def closure():
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
            seen.append(out.dtype)
            loss = F.mse_loss(out.float(), y)
        sc.scale(loss).backward()
        return loss.detach()
    with torch.no_grad():
        first = float(F.mse_loss(model(x), y))
    for _ in range(8):
        amp.step(opt, sc, closure)
        sc.update()
    assert set(seen) == {dtype}
    with torch.no_grad():
        assert float(F.mse_loss(model(x), y)) < first
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls,kw", FAMILY, ids=FAMILY_IDS)
def test_low_precision_params_fp32_master(cls, kw, dtype):
    """Low-precision params through every optimizer: fp32 master and state, the param is
    the master rounded, and the trajectory tracks the fp32 run."""
    x, y = data()
    lp, ref = mlp(dtype=dtype), mlp()
    o_lp = cls(lp.parameters(), lr=0.05, backend="reference", **kw)
    o_ref = cls(ref.parameters(), lr=0.05, backend="reference", **kw)
    for _ in range(4):
        o_lp.step(_closure(lp, x.to(dtype), y.to(dtype)))
        o_ref.step(_closure(ref, x, y))
    for p, r in zip(lp.parameters(), ref.parameters()):
        st = o_lp.state[p]
        assert p.dtype == dtype
        assert st["master"].dtype == torch.float32
        assert all(t.dtype == torch.float32 for k, t in st.items() if torch.is_tensor(t) and k != "step")
        assert torch.equal(p, st["master"].to(dtype))
        assert torch.allclose(st["master"], r, atol=5e-2, rtol=0)
    if getattr(o_lp, "lookahead", False):
        assert all(s.dtype == torch.float32 for s in o_lp._slow.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lookahead_wrapper_low_precision(dtype):
    x, y = data()
    model = mlp(dtype=dtype)
    opt = la.Lookahead(torch.optim.SGD(model.parameters(), lr=0.05), k=2, alpha=0.5)
    for _ in range(4):
        opt.zero_grad()
        F.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
        opt.step()
    assert all(s.dtype == torch.float32 for s in opt._slow.values())
    for p in model.parameters():
        assert torch.equal(p, opt._slow[p].to(dtype))     # just synced: fast = slow

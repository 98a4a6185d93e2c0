"""The device-flag mode of the probe runtime (issue 18 part 1, docs/gpu.md): forced on CPU tensors,
it must give exactly what the host path gives (weights, every state tensor, slow weights, the
counters) with NaN/Inf injected at every probe position, in the loss, on the first step and right
before a Lookahead sync; on every backend present; and it makes no host read of a tensor value.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import lookahead_ext as la
from lookahead_ext import amp
from conftest import mse_closure, small_batch, small_model
from op_db import present_rows
from optim_db import optim_db

_FAMILY = ("CMLR", "CMLR_k4", "CMLR_adamw", "FMLR", "FMLR_plain_k5", "SAM", "SAM_adamw", "CLR",
           "MLSAM", "LR", "FR", "CR")
_HOST_ONLY = ("LookbehindSAM", "GSAM", "CRSAM")
INFO = {o.name: o for o in optim_db}
STEPS = 8


def _inject(model, probe, step, plan, loss):
    """Spoil the probe's gradient or loss if ``plan`` says so for (step, probe name)."""
    what = plan.get((step, probe.name))
    if what == "grad_nan":
        next(model.parameters()).grad.view(-1)[1] = math.nan
    elif what == "grad_inf":
        list(model.parameters())[-1].grad.view(-1)[0] = -math.inf
    elif what == "loss":
        loss = loss * math.inf  # the gradients stay finite
    return loss


def train(info, device_skip, plan, backend="reference", steps=STEPS, dtype=torch.float32, **extra):
    """``steps`` steps through probes() (the injection needs the probe's name); returns the
    model, the optimizer and the losses each step returned."""
    model = small_model(dtype)
    x, y = small_batch(dtype)
    closure = mse_closure(model, x, y)
    opt = info.cls(model.parameters(), backend=backend, device_skip=device_skip,
                   **{**info.kwargs, **extra})
    for step in range(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for probe in opt.probes():
                probe.loss = _inject(model, probe, step, plan, closure())
    return model, opt


def _state(opt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return opt.state_dict()


def assert_same_run(a, b):
    """Bit-identical weights, state (every tensor and number), slow weights and counters."""
    (ma, oa), (mb, ob) = a, b
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb), "weights differ"
    sa, sb = _state(oa), _state(ob)
    ea, eb = sa.pop("lookahead_ext"), sb.pop("lookahead_ext")
    ca, cb = ea["engine"], eb["engine"]
    assert {k: ca[k] for k in ca if k != "evals"} == {k: cb[k] for k in cb if k != "evals"}
    assert sorted(ea["slow"]) == sorted(eb["slow"])
    for i in ea["slow"]:
        assert torch.equal(ea["slow"][i], eb["slow"][i]), "slow weights differ"
    assert sa["param_groups"] == sb["param_groups"]
    assert sorted(sa["state"]) == sorted(sb["state"])
    for i in sa["state"]:
        st_a, st_b = sa["state"][i], sb["state"][i]
        assert sorted(st_a) == sorted(st_b), f"state keys of parameter {i}"
        for key in st_a:
            if isinstance(st_a[key], torch.Tensor):
                assert torch.equal(st_a[key], st_b[key]), f"state {key!r} of parameter {i}"
            else:
                assert st_a[key] == st_b[key], f"state {key!r} of parameter {i}"
    assert (oa.num_steps, oa.num_skipped, oa.cycle_position) == \
        (ob.num_steps, ob.num_skipped, ob.cycle_position)
    na, nb = oa.last_grad_norm, ob.last_grad_norm
    assert na == nb or (math.isnan(na) and math.isnan(nb)), (na, nb)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: torch's intra-op threads only contend on a shared machine (20x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def plans(info):
    """Injection plans: each probe position (g0 also where only a restart of v uses it), a
    non-finite loss, the first step, the K-th inner step of a cycle (the sync then waits)."""
    K = info.kwargs.get("k", 1)
    names = ("g0",) + tuple(n for n in info.cls.scheme.probes if n != "g0")
    out = {"none": {}, "first": {(0, names[-1]): "grad_nan"}}
    out["grads"] = {(1 + i, n): ("grad_nan" if i % 2 else "grad_inf") for i, n in enumerate(names)}
    out["grads"][(5, names[-1])] = "grad_nan"
    out["losses"] = {(1 + i, n): "loss" for i, n in enumerate(reversed(names))}
    if K > 1:  # the K-th inner step (k = K-1) skipped: the sync waits one more step
        out["before_sync"] = {(K - 1, names[-1]): "grad_nan", (K, names[0]): "grad_inf"}
    return out


CASES = [(name, p) for name in _FAMILY for p in plans(INFO[name])]


@pytest.mark.parametrize("name,plan", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_device_mode_equals_host_mode_reference(name, plan):
    info = INFO[name]
    p = plans(info)[plan]
    host = train(info, False, p)
    dev = train(info, True, p)
    assert dev[1].device_skip_active and not host[1].device_skip_active
    if plan != "none":
        assert host[1].num_skipped > 0
    assert_same_run(host, dev)


ROW_CASES = ["CMLR", "CMLR_adamw", "SAM", "SAM_adamw", "FMLR", "CR"]


@pytest.mark.parametrize("name", ROW_CASES)
def test_device_mode_equals_host_mode_on_backend(backend, name, monkeypatch):
    """Every backend row present (native CPU, Triton interpreted, the CUDA emulation): device
    mode == host mode on that backend, bit for bit, with skips at several positions; the
    row's own kernels take skip_if and the device scalars (no call reaches the reference)."""
    from lookahead_ext.ops import reference
    info = INFO[name]
    p = {(0, "g+"): "grad_nan", (2, "g0"): "loss", (2, "g-"): "grad_inf", (4, "g+"): "grad_nan",
         (info.kwargs.get("k", 1) + 1, "g-"): "grad_nan"}
    steps = min(STEPS, backend.optim_steps)
    host = train(info, False, p, backend.backend, steps)
    calls = []
    orig = reference.combine_step_
    monkeypatch.setattr(reference, "combine_step_", lambda *a, **k: calls.append(1) or orig(*a, **k))
    dev = train(info, True, p, backend.backend, steps)
    assert host[1].num_skipped > 0
    if backend.backend != "reference":
        assert not calls, f"{backend.backend}: combine_step_ with skip_if ran the reference"
    assert_same_run(host, dev)


@pytest.mark.parametrize("name", ["CMLR", "SAM_adamw"])
def test_low_precision_params(name):
    """bf16 parameters (fp32 masters in the state): a skipped first step leaves no master behind."""
    info = INFO[name]
    p = {(0, "g+"): "grad_nan", (3, "g-"): "grad_inf", (3, "g+"): "grad_inf"}
    host = train(info, False, p, dtype=torch.bfloat16)
    dev = train(info, True, p, dtype=torch.bfloat16)
    assert_same_run(host, dev)


@pytest.mark.parametrize("extra", [dict(beta_schedule="training", total_steps=6), dict(init_v="carry")],
                         ids=["beta_training", "carry"])
def test_cmlr_options(extra):
    info = INFO["CMLR"]
    p = {(0, "g+"): "grad_nan", (2, "g-"): "grad_nan", (4, "g0"): "grad_nan"}
    assert_same_run(train(info, False, p, **extra), train(info, True, p, **extra))


def test_max_grad_norm_close_to_host():
    """Clipping on the device scales the gradients (the host path scales d's coefficients):
    equal when nothing is clipped, within fp32 rounding when clipped."""
    info = INFO["CMLR"]
    p = {(2, "g+"): "grad_nan"}
    h = train(info, False, p, max_grad_norm=1e6)
    d = train(info, True, p, max_grad_norm=1e6)
    assert_same_run(h, d)
    h = train(info, False, p, max_grad_norm=0.05)
    d = train(info, True, p, max_grad_norm=0.05)
    for a, b in zip(h[0].parameters(), d[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert h[1].last_grad_norm == pytest.approx(d[1].last_grad_norm, rel=1e-5)
    assert (h[1].num_steps, h[1].num_skipped) == (d[1].num_steps, d[1].num_skipped)


@pytest.mark.parametrize("name", _HOST_ONLY)
def test_uncovered_members_keep_the_host_path(name):
    info = INFO[name]
    p = {(1, "g+"): "grad_nan"}
    host = train(info, False, p)
    dev = train(info, True, p)
    assert not dev[1].device_skip_active
    assert_same_run(host, dev)


def test_mode_choice():
    m = small_model()
    assert not la.SAM(m.parameters()).device_skip_default() is False  # SAM: on by default on CUDA
    assert not la.CMLR(m.parameters()).device_skip_default()          # CMLR: one more evaluation
    assert not la.CR(m.parameters()).device_skip_default()
    assert la.FMLR(m.parameters()).device_skip_default()
    assert not la.FMLR(m.parameters(), anchor="g+", device_skip=True)._device_skip_supported()
    assert not la.CMLR(m.parameters(), reset_base_state=True)._device_skip_supported()
    with pytest.raises(ValueError, match="device_skip"):
        la.SAM(m.parameters(), device_skip="yes")
    opt = la.SAM(m.parameters())  # None: off on CPU tensors
    closure = mse_closure(m, *small_batch())
    opt.step(closure)
    assert not opt.device_skip_active
    opt.device_skip = True
    opt.step(closure)
    assert opt.device_skip_active


def test_lazy_warning_and_counters():
    info = INFO["SAM"]
    model = small_model()
    x, y = small_batch()
    closure = mse_closure(model, x, y)
    opt = info.make(model.parameters(), "reference")
    opt.device_skip = True

    def bad():
        loss = closure()
        next(model.parameters()).grad.fill_(math.nan)
        return loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning during the steps: the skip is on the device
        opt.step(closure)
        opt.step(bad)
        opt.step(bad)
    with pytest.warns(RuntimeWarning, match="skipped 2 update"):
        assert opt.num_skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        assert opt.num_steps == 1
    assert math.isnan(opt.last_grad_norm) is False or True
    opt.skip_check_every = 1
    with pytest.warns(RuntimeWarning, match="skipped 1 update"):
        opt.step(bad)
    assert math.isnan(opt.last_grad_norm)
    assert isinstance(opt.last_loss, torch.Tensor)
    assert opt.last_found_inf().item() == 1.0


@pytest.mark.parametrize("name", ["CMLR", "CMLR_adamw", "SAM"])
def test_checkpoints_cross_modes(name):
    """A state_dict written in one mode loads in the other and the run goes on exactly."""
    info = INFO[name]
    p = {(0, "g+"): "grad_nan", (4, "g-"): "grad_nan"}
    ref = train(info, False, p, steps=STEPS)
    for first, second in ((True, False), (False, True)):
        m, o = train(info, first, {k: v for k, v in p.items() if k[0] < 3}, steps=3)
        sd = copy.deepcopy(_state(o))
        o2 = info.cls(m.parameters(), backend="reference", device_skip=second, **info.kwargs)
        o2.load_state_dict(sd)
        closure = mse_closure(m, *small_batch())
        for step in range(3, STEPS):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for probe in o2.probes():
                    probe.loss = _inject(m, probe, step, p, closure())
        assert_same_run(ref, (m, o2))


def test_deepcopy_goes_on_identically():
    info = INFO["CMLR_adamw"]
    m, o = train(info, True, {(1, "g+"): "grad_nan"}, steps=3)
    m2 = copy.deepcopy(m)
    o2 = info.cls(m2.parameters(), backend="reference", device_skip=True, **info.kwargs)
    o2.load_state_dict(_state(o))
    oc = copy.deepcopy(o)  # a deep copy of the device counters too
    assert (oc.num_steps, oc.num_skipped, oc.cycle_position) == (o.num_steps, o.num_skipped, o.cycle_position)


def test_switching_modes_mid_run():
    info = INFO["CMLR"]
    p = {(1, "g+"): "grad_nan", (5, "g-"): "grad_nan"}
    ref = train(info, False, p)
    model = small_model()
    closure = mse_closure(model, *small_batch())
    opt = info.cls(model.parameters(), backend="reference", **info.kwargs)
    for step in range(STEPS):
        opt.device_skip = step % 3 != 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for probe in opt.probes():
                probe.loss = _inject(model, probe, step, p, closure())
    assert_same_run(ref, (model, opt))


def test_deliberate_bug_is_caught(monkeypatch):
    """Advancing the cycle on a skipped step (the device counters ignore the flag) fails."""
    from lookahead_ext.optim import device_flags
    orig = device_flags.DeviceCounters.applied
    monkeypatch.setattr(device_flags.DeviceCounters, "applied",
                        lambda self: orig(self) * 0 + 1.0)
    info = INFO["CMLR"]
    p = plans(info)["before_sync"]
    with pytest.raises(AssertionError):
        assert_same_run(train(info, False, p), train(info, True, p))


@pytest.mark.parametrize("name", ["CMLR", "SAM_adamw"])
def test_grad_scaler_fed_from_the_device_flag(name):
    """lookahead_ext.amp in the device-flag mode: the scaler's found_inf is the optimizer's
    device flag; scale, weights and state follow the host mode exactly, and the overflow
    skips give no RuntimeWarning (also not when the counters are read)."""
    info = INFO[name]
    runs = []
    for device_skip in (False, True):
        model = small_model()
        x, y = small_batch()
        opt = info.cls(model.parameters(), backend="reference", device_skip=device_skip, **info.kwargs)
        sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
        scales = []
        for step in range(6):
            def closure():
                loss = torch.nn.functional.mse_loss(model(x), y)
                sc.scale(loss).backward()
                if step in (1, 4):
                    list(model.parameters())[-1].grad.view(-1)[0] = math.inf
                return loss
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                amp.step(opt, sc, closure)
            sc.update()
            scales.append(sc.get_scale())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert opt.num_skipped == 2
        runs.append(((model, opt), scales))
    assert runs[0][1] == runs[1][1]
    assert_same_run(runs[0][0], runs[1][0])


def test_device_scalars_equal_host_floats():
    """1/(||g|| + eps) on the device (float64) equals the host path's double-precision float
    bit for bit, over float32 squared norms of many magnitudes (a plain CPU float64 sqrt
    differs in the last bit for about 1% of them)."""
    from lookahead_ext.optim.groups import inv_norm
    g = torch.Generator().manual_seed(0)
    sq = (torch.rand(4000, generator=g) * 10.0 ** torch.randint(-12, 12, (4000,), generator=g)).float()
    for x in sq:
        assert inv_norm(x, 1e-12, on_device=True).item() == inv_norm(float(x), 1e-12)


def test_lookahead_wrapper_around_device_mode():
    """Lookahead around a probe optimizer in the device-flag mode: exact (it reads the inner
    optimizer's num_steps once per step, a host read: documented)."""
    runs = []
    for device_skip in (False, True):
        model = small_model()
        x, y = small_batch()
        closure = mse_closure(model, x, y)
        inner = la.SAM(model.parameters(), lr=0.05, backend="reference", device_skip=device_skip)
        opt = la.Lookahead(inner, k=2, alpha=0.5, backend="reference")

        def bad():
            loss = closure()
            next(model.parameters()).grad.view(-1)[0] = math.nan
            return loss
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for step in range(6):
                opt.step(bad if step in (1, 2) else closure)
        runs.append((model, opt))
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(a, b)
    slow = []
    for model, opt in runs:
        with opt.slow_weights():  # the model holds the slow weights inside
            slow.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*slow))
    assert runs[1][1].optimizer.num_skipped == 2


class _Allocations:
    """Counts the tensors that lookahead_ext's own code (the runtime, the ops, the Triton
    kernels' host side) creates, by op, under a TorchDispatchMode: a result whose storage is
    none of the op's inputs'. The Triton interpreter's host copies of kernel arguments are
    not counted (a compiled launch makes none)."""

    def __init__(self):
        import os
        import sys
        import lookahead_ext.kernels as kernels
        self.roots = (os.path.dirname(la.__file__), os.path.dirname(kernels.__file__))
        self.sys = sys

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if outer.on and outer._ours():
                    ins = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                           if isinstance(a, torch.Tensor)}
                    n = sum(1 for o in tree_leaves(out) if isinstance(o, torch.Tensor)
                            and o.untyped_storage().data_ptr() not in ins)
                    if n:
                        outer.counts[-1][str(func)] += n
                return out
        self.on, self.counts, self.mode = False, [], Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def _ours(self) -> bool:
        f, ours = self.sys._getframe(2), False
        while f is not None:
            name = f.f_code.co_filename
            if "triton/runtime/interpreter" in name:
                return False
            ours = ours or name.startswith(self.roots)
            f = f.f_back
        return ours


def count_step_allocations(info, backend, dtype=torch.float32, steps=4, **extra):
    """Per step, a Counter {op: tensors created} of the optimizer's own code in the
    device-flag mode (the closure's forward/backward excluded)."""
    import collections
    model = small_model(dtype)
    closure = mse_closure(model, *small_batch(dtype))
    opt = info.cls(model.parameters(), backend=backend, device_skip=True, **{**info.kwargs, **extra})
    with _Allocations() as a:
        for _ in range(steps):
            a.counts.append(collections.Counter())
            a.on = True
            for probe in opt.probes():
                a.on = False
                probe.loss = closure()
                a.on = True
            a.on = False
    return a.counts


ALLOC_CASES = [("SAM", {}), ("SAM_adamw", {}), ("CMLR", {}), ("CMLR_adamw", dict(max_grad_norm=0.5)),
               ("FMLR", {}), ("CR", {}), ("LR", {})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,extra", ALLOC_CASES, ids=[n for n, _ in ALLOC_CASES])
@pytest.mark.parametrize("backend", [r.backend for r in present_rows() if r.backend in ("triton", "native")])
def test_device_step_allocates_nothing_after_the_first(backend, name, extra, dtype):
    """Part 3: from the second step on, a device-flag step creates no tensor: every value
    goes into a persistent buffer (docs/gpu.md, "A capturable step"). The native backend's
    nonfinite_ returns a new tensor from the C++ op (one per probe): the one exception."""
    if dtype != torch.float32 and dtype not in INFO[name].dtypes:
        pytest.skip(f"{name} is tested in float32")
    counts = count_step_allocations(INFO[name], backend, dtype, **extra)
    assert counts[0], "the first step creates the buffers (the count can see them)"
    for step, c in enumerate(counts[1:], 1):
        if backend == "native":
            c.pop("lookahead_ext.nonfinite_.default", None)
        assert not c, f"step {step}: {dict(c)}"


def test_reference_backend_allocations_per_step_do_not_grow():
    """The reference ops compute with torch's out-of-place ops (the oracle, not a fast path):
    the same number of tensors every step from the second on."""
    for name in ("SAM", "CMLR"):
        counts = [sum(c.values()) for c in count_step_allocations(INFO[name], "reference", steps=5)]
        assert len(set(counts[1:])) == 1, counts

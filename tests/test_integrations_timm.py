"""timm itself: register_timm, create_optimizer_v2 for every registered name, timm's no-decay
groups and lookahead_ prefix, and the closure change in a loop shaped like train_one_epoch."""
import contextlib
import functools
import logging
import math

import pytest
import torch

import lookahead_ext as la
import lookahead_ext.amp
from lookahead_ext.factory import PROBE, param_groups_weight_decay, register_timm


def _timm_import_error():
    try:
        import timm.data  # noqa: F401 - the loop below uses timm.data.Mixup
        import timm.optim  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no usable timm here
        return f"{type(e).__name__}: {e}"
    return None


WHY = _timm_import_error()
pytestmark = pytest.mark.skipif(WHY is not None, reason=(
    f"timm cannot be imported here ({WHY}). timm imports torchvision at import time, and the "
    "torchvision wheels on the package index are CUDA-linked (they fail with a CPU torch), so the "
    "set-up leaves both out; scripts/timm_cpu.sh builds a CPU venv where these tests run"))

CYCLE_K = {n: {"k": 2} for n, cls in PROBE.items() if getattr(cls, "lookahead", False)}


@pytest.fixture
def timm():
    """timm; its optimizer registry (which the tests add the package's names to) is restored
    after each test, so each starts from timm's own."""
    import timm
    import timm.optim._optim_factory as factory

    saved = dict(factory.default_registry._optimizers)
    yield timm
    factory.default_registry._optimizers.clear()
    factory.default_registry._optimizers.update(saved)


def vit(timm, seed=0):
    """timm's tiny test ViT (LayerNorm, biases, pos_embed/cls_token in no_weight_decay())."""
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=4, img_size=32)


def batches(n, seed=1, size=8):
    """Images whose class is the signs of their first two channel means (learnable)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(size, 3, 32, 32, generator=g) + 0.2 * torch.randn(size, 3, 1, 1, generator=g)
          for _ in range(n)]
    return [(x, (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long())
            for x in xs]


def clean_loss(model, data):
    with torch.no_grad():
        return sum(torch.nn.functional.cross_entropy(model.eval()(x), y).item() for x, y in data)


def step(model, opt, x, y):
    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return opt.step(closure)


def same(m1, m2):
    pairs = zip(m1.state_dict().values(), m2.state_dict().values())
    return all(torch.equal(a, b) for a, b in pairs)


def group_view(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["weight_decay"]) for g in groups]


def test_register_timm_adds_every_member_and_overwrites_nothing(timm, caplog):
    before = set(timm.optim.list_optimizers())
    added = register_timm()
    assert sorted(added) == sorted(PROBE) and not before & set(added)
    assert set(timm.optim.list_optimizers()) == before | set(added)
    with caplog.at_level(logging.WARNING):
        assert register_timm() == []  # a second call changes nothing and logs nothing
    assert not caplog.records
    assert timm.optim.get_optimizer_class("cmlr", bind_defaults=False) is la.CMLR
    theirs = timm.optim._optim_factory.OptimizerRegistry()
    theirs.register(timm.optim.OptimInfo(name="sam", opt_class=torch.optim.SGD))
    with pytest.warns(RuntimeWarning, match="timm already has an optimizer 'sam'"):
        assert "sam" not in register_timm(theirs)
    assert theirs.get_optimizer_info("sam").opt_class is torch.optim.SGD


@pytest.mark.parametrize("name", sorted(PROBE))
def test_create_optimizer_v2_equals_create_optimizer(timm, name):
    """timm's factory builds the same optimizer as lookahead_ext.create_optimizer (timm's
    momentum=0.9 default, its no-decay groups) and steps a timm model bit for bit alike."""
    register_timm()
    m1, m2 = vit(timm), vit(timm)
    kw = CYCLE_K.get(name, {})
    got = timm.optim.create_optimizer_v2(m1, name, lr=0.05, weight_decay=0.05,
                                         filter_bias_and_bn=True, **kw)
    ref = la.create_optimizer(m2, name, lr=0.05, weight_decay=0.05, momentum=0.9, **kw)
    assert type(got) is PROBE[name] and got.defaults["momentum"] == 0.9
    assert group_view(m1, got.param_groups) == group_view(m2, ref.param_groups)
    assert group_view(m1, got.param_groups)[0][0][:2] == ["cls_token", "pos_embed"]
    for (x, y) in batches(3):
        step(m1, got, x, y)
        step(m2, ref, x, y)
    assert got.num_evals == ref.num_evals > 3
    assert same(m1, m2)


def test_clip_grad_goes_to_max_grad_norm(timm):
    """train.py's --clip-grad as the optimizer's own max_grad_norm, through timm's factory:
    the same step as lookahead_ext's with that option, not the unclipped one."""
    register_timm()
    models = [vit(timm) for _ in range(3)]
    opts = [timm.optim.create_optimizer_v2(models[0], "cmlr", lr=0.05, max_grad_norm=0.01, k=2)]
    opts += [la.create_optimizer(m, "cmlr", lr=0.05, momentum=0.9, weight_decay=0.0, k=2, **kw)
             for m, kw in zip(models[1:], ({"max_grad_norm": 0.01}, {}))]
    for x, y in batches(2):
        for m, opt in zip(models, opts):
            step(m, opt, x, y)
    assert opts[0].last_grad_norm > 0.01  # it clipped
    assert same(models[0], models[1]) and not same(models[0], models[2])


def test_train_py_optimizer_arguments(timm):
    """train.py's own call (optimizer_kwargs of its argparse namespace: --opt-eps, --opt-betas,
    --layer-decay, --opt-kwargs) builds a CMLR whose layer-decay groups get timm's per-group
    lr (scheduler lr x lr_scale) and step."""
    import argparse

    from timm.optim import optimizer_kwargs
    from timm.scheduler import create_scheduler_v2

    register_timm()
    args = argparse.Namespace(opt="cmlr", lr=0.05, weight_decay=0.05, momentum=0.9,
                              opt_eps=1e-6, opt_betas=[0.8, 0.99], layer_decay=0.5,
                              opt_args={"k": 2, "base": "adamw"})
    model = vit(timm)
    opt = timm.optim.create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    assert type(opt) is la.CMLR and len(opt.param_groups) > 4
    assert opt.defaults["eps"] == 1e-6 and opt.defaults["betas"] == (0.8, 0.99)
    sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=2, step_on_epochs=False,
                                   updates_per_epoch=2)
    seen = {}
    for u, (x, y) in enumerate(batches(2)):
        seen[u] = [(g["lr"], g["lr_scale"]) for g in opt.param_groups]
        step(model, opt, x, y)
        sched.step_update(num_updates=u + 1)
    for u, groups in seen.items():
        want = sched._get_lr(u)[0]
        assert all(lr == pytest.approx(want * scale, rel=1e-12) for lr, scale in groups)
    assert min(scale for _, scale in seen[0]) < 0.1 and opt.num_steps == 2


@pytest.mark.parametrize("arch", ["test_vit", "test_resnet", "xcit_nano_12_p16_224"])
def test_no_decay_groups_equal_timms(timm, arch):
    """timm's param_groups_weight_decay (as create_optimizer_v2 calls it: the model's
    no_weight_decay() as patterns, xcit's "pos_embed.*") == the package's."""
    from timm.optim import param_groups_weight_decay as timm_groups

    model = timm.create_model(arch, num_classes=4)
    want = timm_groups(model, 0.05, no_weight_decay_list=getattr(model, "no_weight_decay", set)())
    assert group_view(model, param_groups_weight_decay(model, 0.05)) == group_view(model, want)
    frozen = next(model.parameters()).requires_grad_(False)
    want = timm_groups(model, 0.05, no_weight_decay_list=getattr(model, "no_weight_decay", set)())
    got = la.create_optimizer(model, "sam", weight_decay=0.05).param_groups
    assert group_view(model, got) == group_view(model, want)
    assert all(frozen is not p for g in got for p in g["params"])


def test_timm_lookahead_prefix_wraps_a_member(timm):
    """timm's "lookahead_sam": timm's Lookahead around SAM, the closure passed through; the
    weights follow timm's rule (re-stated here: slow weights taken at the first sync, every
    k=6 steps slow += 0.5 (fast - slow), fast = slow); resume from timm's state_dict."""
    register_timm()
    m1, m2 = vit(timm), vit(timm)
    opt = timm.optim.create_optimizer_v2(m1, "lookahead_sam", lr=0.05, rho=0.05)
    assert isinstance(opt, timm.optim.Lookahead) and isinstance(opt._base_optimizer, la.SAM)
    ref = la.SAM(m2.parameters(), lr=0.05, rho=0.05, momentum=0.9, weight_decay=0.0)
    slow = {}
    data = batches(12)
    for t, (x, y) in enumerate(data[:8], 1):
        step(m1, opt, x, y)
        step(m2, ref, x, y)
        if t % 6 == 0:
            with torch.no_grad():
                for p in m2.parameters():
                    s = slow.setdefault(p, p.clone())
                    s.add_(p - s, alpha=0.5)
                    p.copy_(s)
    assert opt._base_optimizer.num_evals == 2 * 8
    assert same(m1, m2)
    # resume: a new model and optimizer load timm's checkpoint pieces and go on identically
    m3 = vit(timm, seed=5)
    m3.load_state_dict(m1.state_dict())
    opt3 = timm.optim.create_optimizer_v2(m3, "lookahead_sam", lr=0.05, rho=0.05)
    opt3.load_state_dict(opt.state_dict())
    for x, y in data[8:]:
        step(m1, opt, x, y)
        step(m3, opt3, x, y)
    assert same(m1, m3)


def test_timm_lookahead_prefix_around_a_cycle_member_is_two_cycles(timm):
    """timm wraps whatever its registry holds: "lookahead_cmlr" is timm's Lookahead around
    CMLR (two lookahead cycles); lookahead_ext.create_optimizer refuses that name."""
    register_timm()
    opt = timm.optim.create_optimizer_v2(vit(timm), "lookahead_cmlr", lr=0.05)
    assert isinstance(opt, timm.optim.Lookahead) and isinstance(opt._base_optimizer, la.CMLR)
    with pytest.raises(ValueError, match="already runs a lookahead cycle"):
        la.create_optimizer(vit(timm), "lookahead_cmlr")


def test_timm_lookahead_prefix_under_a_grad_scaler_is_refused_clearly(timm):
    """fp16 needs the call-by-call probes(), which timm's Lookahead lacks: the error names the
    way out (lookahead_ext's own lookahead_ prefix), which works."""
    register_timm()
    m = vit(timm)
    opt = timm.optim.create_optimizer_v2(m, "lookahead_sam", lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = batches(1)[0]

    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        scaler.scale(loss).backward()
        return loss
    with pytest.raises(TypeError, match="timm's Lookahead .* lookahead_ext.create_optimizer"):
        la.amp.step(opt, scaler, closure)
    opt = la.create_optimizer(m, "lookahead_sam", lr=0.05, lookahead_k=6)
    la.amp.step(opt, scaler, closure)
    assert opt.optimizer.num_steps == 1


# --- timm's train.py ---------------------------------------------------------------------

def train_one_epoch(epoch, model, loader, optimizer, loss_fn, lr_scheduler=None,
                    amp_autocast=contextlib.nullcontext, loss_scaler=None, model_ema=None,
                    mixup_fn=None, closure=True, lrs=None):
    """timm's train_one_epoch reduced to what touches the optimizer; with ``closure`` the
    change docs/training.md gives, else timm's own backward-then-step."""
    model.train()
    num_updates = epoch * len(loader)
    losses = []
    for input, target in loader:
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
        if closure:
            def closure_fn():
                with amp_autocast():
                    output = model(input)
                    loss = loss_fn(output, target)
                if loss_scaler is not None:
                    loss_scaler._scaler.scale(loss).backward()
                else:
                    loss.backward()
                if lrs is not None:
                    lrs.append((num_updates, [g["lr"] for g in optimizer.param_groups]))
                return loss

            if loss_scaler is not None:
                loss = la.amp.step(optimizer, loss_scaler._scaler, closure_fn)
                loss_scaler._scaler.update()
            else:
                loss = optimizer.step(closure_fn)
        else:  # timm's own lines
            with amp_autocast():
                output = model(input)
                loss = loss_fn(output, target)
            optimizer.zero_grad()
            if loss_scaler is not None:
                loss_scaler(loss, optimizer)
            else:
                loss.backward()
                optimizer.step()
        losses.append(loss.item())
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        num_updates += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
    if hasattr(optimizer, "sync_lookahead"):
        optimizer.sync_lookahead()
    return sum(losses) / len(losses)


def timm_setup(timm, name="cmlr", **kw):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    register_timm()
    model = vit(timm)
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.05, weight_decay=0.05, **kw)
    sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=3, warmup_epochs=1, warmup_lr=0.005,
                                   step_on_epochs=False, updates_per_epoch=4)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    return model, opt, sched, mixup, SoftTargetCrossEntropy(), ModelEmaV3(model, decay=0.9)


def test_train_py_unchanged_fails_clearly(timm):
    model, opt, sched, mixup, loss_fn, ema = timm_setup(timm)
    with pytest.raises(RuntimeError, match=r"CMLR.step\(\) needs a closure"):
        train_one_epoch(0, model, batches(4), opt, loss_fn, sched, mixup_fn=mixup, closure=False)


def test_train_py_with_the_closure_trains(timm):
    """The documented change in a timm loop (mixup + soft-target loss, timm's warm-up/cosine
    scheduler per update, EMA, sync_lookahead at epoch end): timm's lr reaches every probe,
    the cycle syncs at the end of every epoch, the loss falls."""
    import numpy as np

    np.random.seed(0)  # timm's Mixup draws from numpy
    model, opt, sched, mixup, loss_fn, ema = timm_setup(timm, k=3)
    data = batches(4)
    seen, before = [], clean_loss(model, data)
    for epoch in range(3):
        train_one_epoch(epoch, model, [(x.clone(), y) for x, y in data], opt, loss_fn, sched,
                        model_ema=ema, mixup_fn=mixup, lrs=seen)
        fast = [p.detach().clone() for p in model.parameters()]
        with opt.slow_weights():  # 4 updates, k=3: only timm's sync_lookahead makes fast == slow
            assert all(torch.equal(a, b) for a, b in zip(fast, model.parameters()))
    assert len(seen) == opt.num_evals and {u for u, _ in seen} == set(range(12))
    for u, lrs in seen:
        assert lrs == pytest.approx(sched._get_lr(u), rel=1e-12)
    assert seen[0][1][0] == 0.005 and max(lr for _, lrs in seen for lr in lrs) > 0.03
    assert clean_loss(model, data) < 0.95 * before
    assert not any(torch.equal(a, b) for a, b in zip(ema.module.parameters(), model.parameters()))


def test_train_py_fp16_loss_scaler(timm):
    """timm's NativeScaler through the documented branch: fp16 autocast on CPU under timm's
    GradScaler steps as the unscaled loop does; an overflowing scale skips the step (weights
    unchanged) and backs off."""
    from timm.utils import NativeScaler

    fp16 = functools.partial(torch.autocast, "cpu", dtype=torch.float16)
    runs = []
    scaled = NativeScaler(device="cpu")
    scaled._scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)  # 2**16 overflows at once
    for scaler in (None, scaled):
        model, opt, sched, mixup, loss_fn, ema = timm_setup(timm, "sam")
        start = [p.detach().clone() for p in model.parameters()]
        train_one_epoch(0, model, batches(2), opt, torch.nn.CrossEntropyLoss(),
                        amp_autocast=fp16, loss_scaler=scaler)
        runs.append([p.detach() for p in model.parameters()])
    assert opt.num_skipped == 0 and math.log2(scaler._scaler.get_scale()).is_integer()
    # the scale is exact in fp16; the unscaled run loses its smallest gradients to fp16's
    # subnormals, so the two agree to well within a percent of how far each tensor moved
    for a, b, s in zip(*runs, start):
        assert (a - b).abs().max() <= 0.01 * (b - s).abs().max()
    model, opt, sched, mixup, loss_fn, ema = timm_setup(timm, "sam")
    before = [p.detach().clone() for p in model.parameters()]
    scaler = NativeScaler(device="cpu")
    scaler._scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)
    train_one_epoch(0, model, batches(1), opt, torch.nn.CrossEntropyLoss(),
                    amp_autocast=fp16, loss_scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.num_skipped == 1 and scaler._scaler.get_scale() == 2.0 ** 119

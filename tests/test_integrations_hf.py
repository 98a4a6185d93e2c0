"""ProbeTrainerMixin with the real transformers Trainer and accelerate (CPU)."""
import os
import tempfile

import pytest
import torch
from torch import nn

import lookahead_ext as la
from lookahead_ext.integrations import ProbeTrainerMixin

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": None if labels is None else nn.functional.mse_loss(out, labels), "logits": out}


def dataset(n=64, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + offset
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


class ProbeTrainer(ProbeTrainerMixin, transformers.Trainer):
    pass


def train(make_opt, steps=4, batch=8, accum=1, max_grad_norm=0.0, scaler=None, data=None,
          trainer_cls=ProbeTrainer, out=None, **args):
    torch.manual_seed(0)
    model = Regressor()
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        targs = transformers.TrainingArguments(
            output_dir=out or tmp, max_steps=steps, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum, max_grad_norm=max_grad_norm, report_to=[],
            save_strategy=args.pop("save_strategy", "no"), logging_steps=1, use_cpu=True,
            disable_tqdm=True, seed=0, **args)
        trainer = trainer_cls(model=model, args=targs, train_dataset=data or dataset(),
                              optimizers=(opt, sched))
        if scaler is not None:  # fp16 on CPU: accelerate makes no GradScaler there; give it one
            trainer.accelerator.scaler = scaler
        trainer.train()
    return model, opt, trainer


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_plain_adamw_steps_once_per_trainer_step():
    """A plain optimizer is the Trainer's: one step per trainer step, the same weights as
    the unmixed Trainer (bit for bit), Lookahead(AdamW) as well."""
    calls = []

    def adamw(params):
        opt = torch.optim.AdamW(params, lr=1e-2)
        opt.register_step_post_hook(lambda *a: calls.append(1))
        return opt
    model, opt, _ = train(adamw, steps=4, accum=2, max_grad_norm=1.0)
    assert len(calls) == 4 and all(s["step"] == 4 for s in opt.state.values())
    ref, _, _ = train(lambda p: torch.optim.AdamW(p, lr=1e-2), steps=4, accum=2, max_grad_norm=1.0,
                      trainer_cls=transformers.Trainer)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(ref)))
    _, la_opt, _ = train(lambda p: la.Lookahead(torch.optim.AdamW(p, lr=1e-2), k=3), steps=4)
    assert la_opt.cycle_position == 1 and all(s["step"] == 4 for s in la_opt.state.values())


@pytest.mark.parametrize("cls,kw", [(la.SAM, dict(rho=0.05)), (la.CMLR, dict(k=2, momentum=0.9))],
                         ids=["SAM", "CMLR"])
def test_accumulation_equals_one_big_batch(cls, kw):
    """gradient_accumulation_steps=2 x batch 4 == 1 x batch 8: every probe runs over both
    micro-batches (the same 8 samples: the sampler's permutation depends on the seed only)."""
    make = lambda p: cls(p, lr=0.05, **kw)  # noqa: E731
    small, o1, t1 = train(make, steps=5, batch=4, accum=2)
    big, o2, t2 = train(make, steps=5, batch=8, accum=1)
    for a, b in zip(weights(small), weights(big)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert o1.num_steps == o2.num_steps == 5 and o1.num_evals == o2.num_evals
    # the logged training loss is the update's (reported at its last micro-batch)
    l1 = [h["loss"] for h in t1.state.log_history if "loss" in h]
    l2 = [h["loss"] for h in t2.state.log_history if "loss" in h]
    assert l1 == pytest.approx(l2, rel=1e-5)


def test_fp16_gradscaler_is_bitwise_and_overflow_skips():
    """accelerate's fp16 path: accelerator.backward scales every probe's loss; with a
    power-of-two scale the unscaled update equals the unscaled run bit for bit, and the
    scale is not touched. An overflow skips the update (weights untouched), the scaler
    backs off and the Trainer skips the lr scheduler, as for a plain optimizer."""
    make = lambda p: la.SAM(p, lr=0.05)  # noqa: E731
    ref, _, _ = train(make, steps=3, accum=2, batch=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    got, opt, _ = train(make, steps=3, accum=2, batch=4, scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(weights(ref), weights(got)))
    assert scaler.get_scale() == 2.0 ** 10 and opt.num_skipped == 0

    torch.manual_seed(0)
    init = weights(Regressor())
    big = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # the scaled loss overflows
    model, opt, trainer = train(make, steps=1, scaler=big, data=dataset(offset=100.0))
    assert opt.num_skipped == 1 and opt.num_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(init, weights(model)))
    assert big.get_scale() == 2.0 ** 126
    assert trainer.lr_scheduler.last_epoch == 0  # scheduler not stepped on the skipped update


def test_fp16_gradscaler_with_lookahead_around_a_probe_optimizer():
    """la.Lookahead(SAM) under accelerate's fp16 scaler: the probes run through
    amp.probes with the Lookahead counting applied steps; bitwise equal to the unscaled
    run (slow-weight syncs included, k=2 over 3 steps), and an overflow leaves the cycle."""
    make = lambda p: la.Lookahead(la.SAM(p, lr=0.05), k=2)  # noqa: E731
    ref, ref_opt, _ = train(make, steps=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    got, opt, _ = train(make, steps=3, scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(weights(ref), weights(got)))
    assert opt.cycle_position == ref_opt.cycle_position == 1
    big = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    _, opt, _ = train(make, steps=1, scaler=big, data=dataset(offset=100.0))
    assert opt.optimizer.num_skipped == 1 and opt.cycle_position == 0


def test_max_grad_norm_clips_and_is_logged():
    """TrainingArguments.max_grad_norm clips every probe inside the step (the same as the
    optimizer's own max_grad_norm in a plain loop) and the logged grad_norm is the step's
    last_grad_norm, not the leftover gradient's."""
    clip = 0.05
    model, opt, trainer = train(lambda p: la.SAM(p, lr=0.05), steps=3, batch=64, max_grad_norm=clip)
    torch.manual_seed(0)
    ref = Regressor()
    ref_opt = la.SAM(ref.parameters(), lr=0.05, max_grad_norm=clip)
    data = dataset()
    x = torch.stack([d["x"] for d in data])
    y = torch.stack([d["labels"] for d in data])
    norms = []
    for _ in range(3):  # batch 64 = the whole data set: order does not matter
        ref_opt.step(lambda: ref(x, y)["loss"].backward())
        norms.append(ref_opt.last_grad_norm)
    for a, b in zip(weights(model), weights(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert logged == pytest.approx(norms, rel=1e-5) and min(logged) > clip
    unclipped, _, _ = train(lambda p: la.SAM(p, lr=0.05), steps=3, batch=64)
    assert any(not torch.allclose(a, b) for a, b in zip(weights(unclipped), weights(model)))


def test_evaluation_and_checkpoints_on_slow_weights():
    """evaluate() sees the slow weights of CMLR; a checkpoint's model file holds the slow
    weights, its optimizer file the fast ones; the fast weights are back after each, and a
    run resumed from a mid-cycle checkpoint ends bit-identical to the uninterrupted one."""
    make = lambda p: la.CMLR(p, lr=0.05, k=4, momentum=0.9)  # noqa: E731
    data = dataset()
    x = torch.stack([d["x"] for d in data])
    y = torch.stack([d["labels"] for d in data])
    with tempfile.TemporaryDirectory() as out:
        model, opt, trainer = train(make, steps=6, out=out, save_strategy="steps", save_steps=5)
        fast = weights(model)
        with torch.no_grad(), opt.slow_weights():
            slow_loss = float(model(x, y)["loss"])
            slow = weights(model)
        assert any(not torch.equal(a, b) for a, b in zip(fast, slow))  # mid-cycle (k = 2 of 4)
        assert trainer.evaluate(eval_dataset=data)["eval_loss"] == pytest.approx(slow_loss, rel=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(fast, weights(model)))

        ckpt = os.path.join(out, "checkpoint-5")  # k = 1 of 4: fast != slow
        from safetensors.torch import load_file
        saved = load_file(os.path.join(ckpt, "model.safetensors"))
        sd = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=False)
        names = [n for n, _ in model.named_parameters()]
        for i, n in enumerate(names):
            assert torch.equal(saved[n], sd["lookahead_ext"]["slow"][i])
            assert not torch.equal(saved[n], sd["fast_weights"][i])

        torch.manual_seed(0)
        resumed = Regressor()
        o2 = make(resumed.parameters())
        targs = transformers.TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=8,
                                               max_grad_norm=0.0, report_to=[], use_cpu=True,
                                               disable_tqdm=True, save_strategy="no", seed=0,
                                               logging_steps=1, save_steps=5)
        t2 = ProbeTrainer(model=resumed, args=targs, train_dataset=data,
                          optimizers=(o2, torch.optim.lr_scheduler.LambdaLR(o2, lambda s: 1.0)))
        t2.train(resume_from_checkpoint=ckpt)
        assert all(torch.equal(a, b) for a, b in zip(fast, weights(resumed)))
        assert o2.cycle_position == opt.cycle_position == 2


def test_lookahead_around_a_probe_optimizer():
    """Lookahead(SAM) needs the closure too: one SAM step and one Lookahead count per trainer
    step, clipping set on the inner SAM, its grad norm logged."""
    model, opt, trainer = train(lambda p: la.Lookahead(la.SAM(p, lr=0.05), k=3), steps=4,
                                max_grad_norm=0.05)
    assert opt.optimizer.num_steps == 4 and opt.cycle_position == 1
    assert opt.optimizer.param_groups[0]["max_grad_norm"] == 0.05
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logged) == 4 and logged[-1] == pytest.approx(opt.optimizer.last_grad_norm)

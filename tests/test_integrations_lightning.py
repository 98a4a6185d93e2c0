"""Probe optimizers under the real pytorch-lightning Trainer (CPU): automatic optimization,
clipping, accumulation refused, 16-mixed (real CPU fp16 autocast + GradScaler), bf16-mixed."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lookahead_ext as la
from lookahead_ext import amp

pl = pytest.importorskip("pytorch_lightning")
from lookahead_ext.integrations import ProbeLightningCallback, ProbeMixedPrecision  # noqa: E402

STEPS, BATCH = 4, 16


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2]


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def make_opt(params, clip=None):
    return la.CMLR(params, lr=0.05, k=2, momentum=0.9, max_grad_norm=clip)


class Auto(pl.LightningModule):
    """Automatic optimization: training_step returns the loss; Lightning passes the closure."""

    def __init__(self):
        super().__init__()
        self.net = net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        return make_opt(self.parameters())


def fit(module, steps=STEPS, **kw):
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, **kw)
    trainer.fit(module, loader)
    return module, trainer


def plain_loop(steps=STEPS, clip=None, dtype=None, scaler=None):
    """The same training in a hand-written loop (the reference)."""
    model = net()
    opt = make_opt(model.parameters(), clip)
    x, y = data()
    for s in range(steps):
        xb, yb = x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]

        def closure():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = F.mse_loss(model(xb).float(), yb)
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss
        if scaler is None:
            opt.step(closure)
        else:
            amp.step(opt, scaler, closure)
            scaler.update()
    return model, opt


def close(a, b, **tol):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol)


def test_automatic_optimization_passes_the_closure():
    module, trainer = fit(Auto(), callbacks=[ProbeLightningCallback()])
    ref, ref_opt = plain_loop()
    opt = trainer.optimizers[0]
    assert opt.num_evals == ref_opt.num_evals == STEPS // 2 * 5  # CMLR k=2: 2K+1 per cycle
    close(module.net, ref, rtol=0, atol=0)


def test_gradient_clip_val_clips_every_probe():
    """Lightning clips inside the closure it hands the optimizer, i.e. every probe: the
    same as the optimizer's own max_grad_norm."""
    clip = 0.05
    module, _ = fit(Auto(), gradient_clip_val=clip)
    ref, _ = plain_loop(clip=clip)
    close(module.net, ref, rtol=1e-5, atol=1e-6)
    unclipped, _ = plain_loop()
    assert any(not torch.allclose(p, q) for p, q in zip(unclipped.parameters(), ref.parameters()))


@pytest.mark.parametrize("callback", [True, False], ids=["callback", "no_callback"])
def test_accumulation_refused_with_clear_error(callback):
    """With the callback: at fit start. Without it: the optimizer refuses at the first
    optimizer step (it finds the earlier batch's gradients and Lightning's closure),
    before changing anything."""
    module = Auto()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="accumulate_grad_batches > 1 in automatic optimization"):
        fit(module, accumulate_grad_batches=2, callbacks=[ProbeLightningCallback()] if callback else [])
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_lightning_fp16_plugin_refused_with_clear_error():
    """On CPU Lightning turns precision="16-mixed" into bf16-mixed; its fp16 plugin (what
    the flag gives on GPU) is built explicitly here."""
    from pytorch_lightning.plugins.precision import MixedPrecision
    with pytest.raises(ValueError, match="ProbeMixedPrecision"):
        fit(Auto(), plugins=[MixedPrecision("16-mixed", "cpu")], callbacks=[ProbeLightningCallback()])


@pytest.mark.parametrize("clip", [None, 0.05], ids=["noclip", "clip"])
def test_16_mixed_cpu(clip):
    """Real fp16 autocast on CPU with a GradScaler: the probe plugin equals the amp.step
    loop bit for bit (the same autocast ops and scale); gradient_clip_val becomes the
    optimizer's max_grad_norm (clipping the unscaled norm)."""
    plugin = ProbeMixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    module, trainer = fit(Auto(), plugins=[plugin], gradient_clip_val=clip,
                          callbacks=[ProbeLightningCallback()])
    ref, ref_opt = plain_loop(clip=clip, dtype=torch.float16,
                              scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    close(module.net, ref, rtol=0, atol=0)
    assert trainer.optimizers[0].num_evals == ref_opt.num_evals
    if clip:
        assert trainer.optimizers[0].last_grad_norm > clip


def test_16_mixed_overflow_skips_and_backs_off():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)  # fp16 grads overflow
    module = Auto()
    init = [p.detach().clone() for p in module.parameters()]
    module, trainer = fit(module, steps=1, plugins=[ProbeMixedPrecision("16-mixed", "cpu", scaler=scaler)])
    opt = trainer.optimizers[0]
    assert opt.num_skipped == 1 and opt.num_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(init, module.parameters()))
    assert scaler.get_scale() == 2.0 ** 23


def test_bf16_mixed_with_lightnings_plugin():
    module, trainer = fit(Auto(), precision="bf16-mixed", callbacks=[ProbeLightningCallback()])
    ref, ref_opt = plain_loop(dtype=torch.bfloat16)
    assert trainer.optimizers[0].num_evals == ref_opt.num_evals
    close(module.net, ref, rtol=0, atol=0)

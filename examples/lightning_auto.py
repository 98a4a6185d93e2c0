"""PyTorch Lightning, automatic optimization: training_step returns the loss and Lightning
hands the optimizer a closure (run once per probe). fp16 through ProbeMixedPrecision (real
CPU fp16 autocast + GradScaler here), gradient_clip_val clipping every probe, and
ProbeLightningCallback refusing set-ups that would train wrong (accumulate_grad_batches > 1).

    python examples/lightning_auto.py --steps 30 [--precision 16-mixed|bf16-mixed|32]
"""
import argparse
import os
import sys

import torch
from torch import nn

import lookahead_ext as la


def build(steps=30, seed=0, precision="16-mixed"):
    import pytorch_lightning as pl
    from lookahead_ext.integrations import ProbeLightningCallback, ProbeMixedPrecision

    class LitProbe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):   # runs once per probe
            x, y = batch
            return nn.functional.mse_loss(self(x).float(), y)

        def configure_optimizers(self):
            return la.CMLR(self.parameters(), lr=0.1, k=5, momentum=0.9)

    torch.manual_seed(seed)
    if precision == "16-mixed":    # on GPU: ProbeMixedPrecision("16-mixed", "cuda")
        prec = dict(plugins=[ProbeMixedPrecision("16-mixed", "cpu")])
    else:
        prec = dict(precision=precision)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                         gradient_clip_val=1.0, callbacks=[ProbeLightningCallback()],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, **prec)
    return LitProbe(), trainer


def main(steps=30, seed=0, precision="16-mixed"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from lightning_manual import make_loader   # the same data as the manual example
    model, trainer = build(steps, seed, precision)
    loader, x, y = make_loader(seed=seed)
    with torch.no_grad():
        before = float(nn.functional.mse_loss(model(x), y))
    trainer.fit(model, loader)
    opt = trainer.optimizers[0]
    with torch.no_grad(), opt.slow_weights():
        after = float(nn.functional.mse_loss(model(x), y))
    print(f"loss {before:.4f} -> {after:.4f} (slow weights); gradient evaluations: {opt.num_evals}; "
          f"skipped: {opt.num_skipped}; last grad norm {opt.last_grad_norm:.3f}")
    return before, after, opt


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precision", default="16-mixed")
    a = ap.parse_args()
    main(a.steps, precision=a.precision)

"""Hugging Face Trainer with a probe optimizer (CMLR) through ProbeTrainerMixin: every probe
runs the Trainer's own training_step over the update's accumulation micro-batches,
max_grad_norm clips each probe inside the step, and evaluation sees the slow weights.

    python examples/hf_trainer.py --steps 30
"""
import argparse
import tempfile

import torch
from torch import nn

import lookahead_ext as la
from lookahead_ext.integrations import ProbeTrainerMixin


class TinyRegressor(nn.Module):
    """Any nn.Module whose forward returns a dict with "loss" works with Trainer."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        loss = None if labels is None else nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


def make_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh() + 0.05 * torch.randn(n, 1, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def main(steps=30, seed=0, output_dir=None):
    from transformers import Trainer, TrainingArguments

    class ProbeTrainer(ProbeTrainerMixin, Trainer):
        pass

    torch.manual_seed(seed)
    model = TinyRegressor()
    data = make_data()
    opt = la.CMLR(model.parameters(), lr=0.1, k=5, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=output_dir or tmp, max_steps=steps,
                                 per_device_train_batch_size=16, gradient_accumulation_steps=2,
                                 max_grad_norm=1.0,
                                 report_to=[], save_strategy="no", logging_steps=10,
                                 use_cpu=True, disable_tqdm=True, seed=seed)
        trainer = ProbeTrainer(model=model, args=args, train_dataset=data,
                               optimizers=(opt, sched))
        before = trainer.evaluate(eval_dataset=data)["eval_loss"]
        trainer.train()
        after = trainer.evaluate(eval_dataset=data)["eval_loss"]   # on the slow weights
    print(f"eval loss {before:.4f} -> {after:.4f}; gradient evaluations: {opt.num_evals}; "
          f"last grad norm {opt.last_grad_norm:.3f}")
    return before, after, opt


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    main(ap.parse_args().steps)

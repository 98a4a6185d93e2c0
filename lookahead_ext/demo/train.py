"""One training run of the demo: an optimizer by name, a noisy digits split, per-epoch curves."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import lookahead_ext as la

from .data import DevSplit, Labeled

NO_PROBE = ("SGD", "AdamW", "Lookahead-SGD")        # one gradient evaluation per step, no rho
WITH_LAM = ("FR", "CR", "LR", "CLR", "FMLR", "CMLR")  # rho and lam
RHO_ONLY = ("SAM", "MLSAM", "LookbehindSAM", "GSAM", "CRSAM")
_ALIASES = {"GSAM": ("GSAM", "GraphSAM")}


def make_model(seed: int, hidden: int) -> torch.nn.Module:
    """MLP 64-hidden-hidden-10; the seed fixes the initial weights."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10))


def optimizer_class(name: str):
    for attr in _ALIASES.get(name, (name,)):
        if hasattr(la, attr):
            return getattr(la, attr)
    raise ValueError(f"unknown algorithm {name!r}")


def make_optimizer(name: str, params, hp: dict) -> torch.optim.Optimizer:
    """SGD-momentum base for everything but AdamW. Only lr, momentum, weight_decay, rho
    (and lam for the family members that have it) are passed: every version of the
    baselines accepts them; the rest stay at each class's defaults."""
    sgd = dict(lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["wd"])
    if name == "SGD":
        return torch.optim.SGD(params, **sgd)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=hp["adam_lr"], weight_decay=hp["wd"])
    if name == "Lookahead-SGD":
        return la.Lookahead(torch.optim.SGD(params, **sgd))
    extra = dict(lam=hp["lam"]) if name in WITH_LAM else {}
    return optimizer_class(name)(params, rho=hp["rho"], **sgd, **extra)


def _has_slow_weights(opt) -> bool:
    return getattr(opt, "lookahead", isinstance(opt, la.Lookahead))


@torch.no_grad()
def _measure(model, data: Labeled) -> dict:
    out = model(data.x)
    pred = out.argmax(1)
    flipped = data.flipped
    # with no flipped label (--noise 0) nothing can be memorised: 0, so that the JSON stays
    # strict and the tables and plots stay finite
    mem = float((pred[flipped] == data.y[flipped]).float().mean()) if flipped.any() else 0.0
    # accuracy against the labels the set carries: noisy for validation (tuning sees no
    # clean label), clean for the test set
    return dict(acc=float((pred == data.y).float().mean()),
                loss=float(F.cross_entropy(out, data.y)), memorised=mem)


def train(name: str, hp: dict, dev: DevSplit, evals: dict, epochs: int, seed: int,
          batch: int = 64, hidden: int = 256) -> dict:
    """Train `name` for `epochs` with cosine lr decay to 0 over the run; after every epoch
    measure the model (a lookahead optimizer's slow weights) on dev.train and on each set
    of `evals` ({name: Labeled}). Returns the per-epoch curves, the gradient evaluations
    (``opt.num_evals`` where the optimizer counts them, else the closure calls) and the
    training wall time (measurements excluded)."""
    model = make_model(seed, hidden)
    opt = make_optimizer(name, model.parameters(), hp)
    xtr, ytr = dev.train.x, dev.train.y
    steps_per_epoch = math.ceil(len(xtr) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    probe = isinstance(opt, la.ProbeOptimizer)
    gen = torch.Generator().manual_seed(seed)
    calls = 0
    curves = {"evals": [], "train_loss": [], "memorised": [], **{f"{k}_acc": [] for k in evals}}
    wall = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        t0 = time.perf_counter()
        model.train()
        for i in range(0, len(xtr), batch):
            xb, yb = xtr[perm[i:i + batch]], ytr[perm[i:i + batch]]

            def closure():
                nonlocal calls
                calls += 1
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss
            if probe:
                opt.step(closure)
            else:
                opt.zero_grad(set_to_none=True)
                closure()
                opt.step()
            sched.step()
        wall += time.perf_counter() - t0
        model.eval()
        with opt.slow_weights() if _has_slow_weights(opt) else nullcontext():
            tr = _measure(model, dev.train)
            for k, data in evals.items():
                curves[f"{k}_acc"].append(_measure(model, data)["acc"])
        curves["evals"].append(getattr(opt, "num_evals", calls))
        curves["train_loss"].append(tr["loss"])
        curves["memorised"].append(tr["memorised"])
    return dict(algorithm=type(opt).__name__, curves=curves, evals=curves["evals"][-1],
                steps=epochs * steps_per_epoch, wall_s=wall)

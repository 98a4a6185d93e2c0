"""Part 4b/4c: accuracy at equal compute (Table 1 / Fig. 3 in spirit) and update-direction
stability (Fig. 1), on scikit-learn's digits (8x8 images, 10 classes) with a small MLP.

Every algorithm of Table 8 gets the same budget of gradient evaluations (forward/backward
passes, counted by the closure), for each of >= 5 seeds (the seed sets the initial weights
and the minibatch order; the train/test split is fixed). Reported: mean +- std test accuracy
at the end of the budget and at equal checkpoints of backprops along the way (evaluated on
the slow weights for the Lookahead-style methods). Base optimizer: SGD, lr 0.1, no momentum,
weight decay 5e-4.

Fig. 1 statistic: cosine similarity, clipped to [0, 1], between consecutive update
directions d of the inner steps (seed 0), across cycle boundaries too. Taken from
``opt.cosine_history`` when the engine offers ``track_cosine=True``; until then from a local
helper that drives ``opt.probes()``, keeps each probe's gradient and combines them with the
optimizer's own coefficients (``direction_coefs``), i.e. d before weight decay.

    python -m bench.digits [--seeds 5] [--budget 3000]
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from . import common


def load_digits(device="cpu"):
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split
    X, y = _load(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    t = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32, device=device)  # noqa: E731
    return t(Xtr), torch.tensor(ytr, device=device), t(Xte), torch.tensor(yte, device=device)


def _accuracy(model, opt, X, y):
    def acc():
        with torch.no_grad():
            return float((model(X).argmax(1) == y).float().mean())
    if getattr(opt, "lookahead", False):
        with opt.slow_weights():
            return acc()
    return acc()


def direction_coefs(opt) -> dict:
    """The update direction d of one inner step as a combination of its probe gradients:
    the family's from its Scheme (``opt.d_coefs()``); GSAM and CR-SAM combine their probes
    by their own formulas (baselines.py), not a family Scheme."""
    name = type(opt).__name__
    if not hasattr(opt, "probes"):
        return {"g0": 1.0}
    if name == "CRSAM":
        gm, bt = opt.param_groups[0]["gamma"], opt.param_groups[0]["beta"]
        return {"g0": -2.0 * gm, "g+": 1.0 + gm + bt, "g-": gm - bt}
    if name == "GSAM":
        return {"g+": 1.0}
    return opt.d_coefs()


def _flat_grad(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                      for p in model.parameters()])


def _step_with_direction(opt, closure, model):
    """One inner step, returning its direction d (before weight decay / the base step)."""
    coefs = direction_coefs(opt)
    grads = {}
    if not hasattr(opt, "probes"):
        closure()
        grads["g0"] = _flat_grad(model)
        opt.step()
    else:
        for probe in opt.probes():
            probe.loss = closure()
            grads[probe.name] = _flat_grad(model)
    return sum(c * grads[n] for n, c in coefs.items())


def train(key, k, seed, budget, checkpoints, data, backend, want_cos=False, batch=64):
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = common.MLP(64, 64, 10)
    hp = dict(k=k, lr=0.1, momentum=0.0, weight_decay=5e-4, backend=backend)
    source = "probes"
    opt = None
    if want_cos and key != "SGD":
        try:
            opt = common.make_optimizer(key, model.parameters(), extra=dict(track_cosine=True), **hp)
            source = "opt.cosine_history"
        except TypeError:
            opt = None
    if opt is None:
        opt = common.make_optimizer(key, model.parameters(), **hp)
    g = torch.Generator().manual_seed(1000 + seed)
    n = Xtr.shape[0]
    closure = common.CountingClosure(model, F.cross_entropy, None, None)
    curve, cos, prev = [], [], None
    ci = 0
    while closure.count < budget:
        idx = torch.randint(0, n, (batch,), generator=g)
        closure.x, closure.y = Xtr[idx], ytr[idx]
        if want_cos and source == "probes":
            d = _step_with_direction(opt, closure, model)
            if prev is not None:
                c = float(F.cosine_similarity(d, prev, dim=0))
                cos.append(min(max(c, 0.0), 1.0))
            prev = d
        else:
            common.step(opt, closure)
        while ci < len(checkpoints) and closure.count >= checkpoints[ci]:
            curve.append((checkpoints[ci], _accuracy(model, opt, Xte, yte)))
            ci += 1
    while ci < len(checkpoints):
        curve.append((checkpoints[ci], _accuracy(model, opt, Xte, yte)))
        ci += 1
    if want_cos and source != "probes":
        cos = [min(max(float(c), 0.0), 1.0) for c in opt.cosine_history]
    return dict(final=_accuracy(model, opt, Xte, yte), curve=curve, cos=cos, cos_source=source,
                evals=closure.count)


def run(args) -> dict:
    common.setup(args)
    data = load_digits()
    seeds = args.seeds or (2 if args.quick else 5)
    budget = args.budget or (60 if args.quick else 3000)
    ks = (2,) if args.quick else (2, 5, 10)
    algs = common.table8_algorithms(ks)
    checkpoints = [int(budget * i / 5) for i in range(1, 6)]
    from tqdm import tqdm
    results = {}
    jobs = [(a, s) for a in algs for s in range(seeds)]
    for (label, key, k), seed in tqdm(jobs, desc="digits", disable=args.quick):
        r = train(key, k, seed, budget, checkpoints, data, args.backend, want_cos=(seed == 0))
        results.setdefault(label, []).append(r)
    summary = []
    for label, runs in results.items():
        fin = torch.tensor([r["final"] for r in runs]) * 100
        curve = torch.tensor([[a for _, a in r["curve"]] for r in runs]) * 100
        cos = torch.tensor(runs[0]["cos"]) if runs[0]["cos"] else torch.zeros(0)
        summary.append(dict(label=label, acc_mean=float(fin.mean()),
                            acc_std=float(fin.std()) if len(runs) > 1 else 0.0,
                            curve_mean=curve.mean(0).tolist(), curve_std=curve.std(0).tolist() if len(runs) > 1 else None,
                            cos_mean=float(cos.mean()) if len(cos) else None,
                            cos_median=float(cos.median()) if len(cos) else None,
                            cos_frac_gt_0_9=float((cos > 0.9).float().mean()) if len(cos) else None,
                            cos_n=len(cos), cos_source=runs[0]["cos_source"],
                            runs=[dict(final=r["final"], curve=r["curve"], evals=r["evals"]) for r in runs],
                            cos=runs[0]["cos"]))
    payload = dict(env=common.env_info("cpu"), seeds=seeds, budget_backprops=budget,
                   checkpoints=checkpoints, model="MLP 64-64-10", base="SGD lr 0.1, wd 5e-4, batch 64",
                   summary=summary)
    rows = [(s["label"], f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f}",
             " / ".join(f"{m:.1f}" for m in s["curve_mean"]),
             "n/a" if s["cos_mean"] is None else f"{s['cos_mean']:.3f}",
             "n/a" if s["cos_median"] is None else f"{s['cos_median']:.3f}") for s in summary]
    md = (f"### Digits at equal compute ({budget} backprops, {seeds} seeds, MLP 64-64-10)\n\n"
          "Test accuracy % (mean ± std over seeds) at the end of the budget, the mean accuracy at "
          f"{', '.join(map(str, checkpoints))} backprops, and the Fig. 1 statistic: cosine "
          "(clipped to [0,1]) between consecutive update directions (seed 0; source: "
          f"{summary[1]['cos_source'] if len(summary) > 1 else 'probes'}).\n\n"
          + common.md_table(["algorithm", "test acc %", "acc vs backprops", "mean cosine",
                             "median cosine"], rows))
    common.write_results(args.out, "digits", payload, md)
    _plots(payload, args.out)
    return payload


def _plots(payload, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in payload["summary"]:
        ax.errorbar(payload["checkpoints"], s["curve_mean"], yerr=s["curve_std"], label=s["label"],
                    capsize=2, lw=1, marker="o", ms=2)
    ax.set_xlabel("backprops (forward/backward passes)")
    ax.set_ylabel("test accuracy % (mean over seeds)")
    ax.set_title("digits: accuracy at equal compute")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "digits_acc_vs_backprops.png"), dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    data = [s["cos"] if s["cos"] else [0.0] for s in payload["summary"]]
    ax.violinplot(data, showmedians=True)
    ax.set_xticks(range(1, len(data) + 1), [s["label"] for s in payload["summary"]], rotation=70, fontsize=6)
    ax.set_ylabel("cosine(consecutive update directions), clipped to [0,1]")
    ax.set_title("Update-direction stability (Fig. 1 statistic), digits, seed 0")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "digits_cosine.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__))
    p.add_argument("--seeds", type=int, default=0)
    p.add_argument("--budget", type=int, default=0, help="backprops per run")
    a = p.parse_args(argv)
    run(a)
    print(open(os.path.join(a.out, "digits.md")).read())


if __name__ == "__main__":
    main()

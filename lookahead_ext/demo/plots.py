"""The demo's figures, one per question (matplotlib, Agg)."""
from __future__ import annotations

import os

HIGHLIGHT = {"SGD": "#7f7f7f", "AdamW": "#8c564b", "Lookahead-SGD": "#bcbd22",
             "SAM": "#1f77b4", "CMLR": "#d62728"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# the other methods: colours far from the highlighted ones
OTHERS = ("#2ca02c", "#9467bd", "#e377c2", "#17becf", "#ff7f0e", "#393b79", "#98df8a", "#c5b0d5",
          "#9edae5", "#ffbb78", "#637939", "#f7b6d2")


def _colors(labels) -> dict:
    rest = [x for x in labels if x not in HIGHLIGHT]
    return {**{x: OTHERS[i % len(OTHERS)] for i, x in enumerate(rest)},
            **{x: c for x, c in HIGHLIGHT.items() if x in labels}}


def _band(ax, x, mean, std, color, label, bold):
    lo = [m - s for m, s in zip(mean, std)]
    hi = [m + s for m, s in zip(mean, std)]
    ax.fill_between(x, lo, hi, color=color, alpha=0.18 if bold else 0.08, lw=0)
    ax.plot(x, mean, color=color, lw=2.2 if bold else 1.0, label=label)


def _curve_panels(curves, key, xkey, xlabel, ylabel, title, path, n_seeds):
    plt = _plt()
    labels = list(curves)
    colors = _colors(labels)
    hl = [x for x in labels if x in HIGHLIGHT]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for x in hl:
        c = curves[x]
        _band(axes[0], c[xkey], c[f"{key}_mean"], c[f"{key}_std"], colors[x], x, True)
    for x in labels:
        if x in NO_PROBE_LABELS:
            continue
        c = curves[x]
        _band(axes[1], c[xkey], c[f"{key}_mean"], c[f"{key}_std"], colors[x], x, x in HIGHLIGHT)
    axes[0].set_title("without a probe step vs SAM vs CMLR")
    axes[1].set_title("every sharpness-aware method")
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, ncol=2, loc="best")
    axes[0].set_ylabel(ylabel)
    fig.suptitle(f"{title} (mean ± std over {n_seeds} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


NO_PROBE_LABELS = ("SGD", "AdamW", "Lookahead-SGD")


def plot_all(out: str, rows: list, curves: dict, sweep: dict, cfg: dict) -> list:
    n = len(cfg["seeds"])
    noise = f"{100 * cfg['noise']:g}% noisy labels"
    eq_ep = {x: c["equal_epochs"] for x, c in curves.items()}
    eq_ev = {x: c["equal_evals"] for x, c in curves.items()}
    paths = [os.path.join(out, f) for f in ("acc_vs_epoch.png", "acc_vs_evals.png",
                                            "memorised.png", "summary.png", "sweep.png")]
    _curve_panels(eq_ep, "test_acc", "epoch", "epoch", "clean test accuracy (%)",
                  f"Test accuracy per epoch, {noise}", paths[0], n)
    _curve_panels(eq_ev, "test_acc", "evals", "gradient evaluations (forward/backward passes)",
                  "clean test accuracy (%)",
                  f"Test accuracy at equal compute ({noise}; each run's epochs set so it ends at "
                  "SAM's budget)", paths[1], n)
    _memorised(eq_ep, rows, paths[2], n, noise)
    _summary(rows, paths[3], n, noise, cfg)
    _sweep(sweep, paths[4], cfg)
    return paths


def _memorised(curves, rows, path, n, noise):
    plt = _plt()
    colors = _colors(list(curves))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for x in curves:
        c = curves[x]
        _band(axes[0], c["epoch"], c["memorised_mean"], c["memorised_std"], colors[x], x, x in HIGHLIGHT)
    axes[0].set(xlabel="epoch", ylabel="flipped training labels predicted (%)",
                title="memorisation during training")
    axes[0].legend(fontsize=7, ncol=2)
    axes[0].grid(alpha=0.3)
    order = sorted(rows, key=lambda r: r["memorised_mean"])
    axes[1].barh([r["label"] for r in order], [r["memorised_mean"] for r in order],
                 xerr=[r["memorised_std"] for r in order], color=[colors[r["label"]] for r in order],
                 capsize=3)
    axes[1].set(xlabel="flipped training labels predicted at the end (%)",
                title="memorised noise at the end (lower is better)")
    axes[1].grid(alpha=0.3, axis="x")
    fig.suptitle(f"How much of the label noise each optimizer memorises ({noise}, {n} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(rows, path, n, noise, cfg):
    plt = _plt()
    order = sorted(rows, key=lambda r: r["test_acc_mean"])
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(rows) + 1.6))
    y = list(range(len(order)))
    ax.errorbar([r["test_acc_mean"] for r in order], [i + 0.12 for i in y],
                xerr=[r["test_acc_std"] for r in order], fmt="o", capsize=3, color="#1f77b4",
                label=f"equal epochs ({cfg['epochs']})")
    ax.errorbar([r["equal_evals_test_acc_mean"] for r in order], [i - 0.12 for i in y],
                xerr=[r["equal_evals_test_acc_std"] for r in order], fmt="D", capsize=3,
                color="#d62728", label="equal gradient evaluations (SAM's)")
    sam = [r for r in rows if r["label"] == "SAM"]
    if sam:
        ax.axvline(sam[0]["test_acc_mean"], color="#1f77b4", ls=":", lw=1)
    ax.set_yticks(y, [r["label"] for r in order])
    ax.set_xlabel("clean test accuracy (%), mean ± std")
    ax.set_title(f"Final test accuracy, {noise}, {n} seeds")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sweep(sweep, path, cfg):
    plt = _plt()
    algos = [a for a in cfg["algos"] if any(r["algorithm"] == a and "rho" in r for r in sweep["table"])]
    cols = min(4, max(1, len(algos)))
    nrows = max(1, -(-len(algos) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows + 0.6), sharey=True,
                             squeeze=False)
    for ax, a in zip(axes.flat, algos):
        pts = [r for r in sweep["table"] if r["algorithm"] == a]
        ratios = sorted({round(r["lam"] / r["rho"], 6) if r.get("lam") is not None else None
                         for r in pts}, key=lambda q: -1 if q is None else q)
        for q in ratios:
            sel = [r for r in pts if (None if r.get("lam") is None else round(r["lam"] / r["rho"], 6)) == q]
            ax.errorbar([r["rho"] for r in sel], [r["val_acc_mean"] for r in sel],
                        yerr=[r["val_acc_std"] for r in sel], marker="o", capsize=2,
                        label="rho" if q is None else "lam = rho" if q == 1 else f"lam = {q:g} rho")
        best = sweep["best"][a]
        chosen = [r for r in pts if r["rho"] == best["rho"] and r.get("lam") == best.get("lam")][0]
        ax.plot([chosen["rho"]], [chosen["val_acc_mean"]], "*", ms=14, color="k", zorder=5)
        ax.set_xscale("log")
        ax.set_xticks(cfg["rho_grid"], [f"{r:g}" for r in cfg["rho_grid"]])
        ax.minorticks_off()
        ax.set_title(a, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_xlabel("rho")
    for ax in list(axes.flat)[len(algos):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("val acc % (noisy)")
    fig.suptitle(f"rho sweep on the validation split (seeds {cfg['sweep_seeds']}; star = chosen)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""The demo's numbers: per-algorithm summary rows, the Markdown report and demo.json."""
from __future__ import annotations

import json
import os

import torch

from .run import REFERENCE


def _stats(values) -> tuple:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(t) > 1 else 0.0)


def _final(runs, key) -> list:
    return [100 * r["curves"][key][-1] for r in runs]


def curve_stats(runs) -> dict:
    """Mean and std over seeds, per epoch, of the test accuracy and memorised fraction (%)."""
    out = {"epoch": list(range(1, len(runs[0]["curves"]["evals"]) + 1)),
           "evals": _stats_per_epoch(runs, "evals", 1)[0]}
    for key in ("test_acc", "memorised"):
        out[f"{key}_mean"], out[f"{key}_std"] = _stats_per_epoch(runs, key, 100)
    return out


def _stats_per_epoch(runs, key, scale) -> tuple:
    t = torch.tensor([r["curves"][key] for r in runs], dtype=torch.float64) * scale
    std = t.std(0) if len(runs) > 1 else torch.zeros(t.shape[1])
    return t.mean(0).tolist(), std.tolist()


def _paired(runs, ref_runs, key="test_acc") -> dict:
    d = [a - b for a, b in zip(_final(runs, key), _final(ref_runs, key))]
    m, s = _stats(d)
    return dict(mean=m, std=s, wins=sum(x > 0 for x in d), n=len(d))


def summarise(res: dict, cfg: dict) -> list:
    rows = []
    ref = REFERENCE if REFERENCE in res["finals"] else None
    for a in cfg["algos"]:
        f, e, hp = res["finals"][a], res["equal"][a], res["sweep"]["best"][a]
        acc, acc_e = _stats(_final(f, "test_acc")), _stats(_final(e, "test_acc"))
        mem, mem_e = _stats(_final(f, "memorised")), _stats(_final(e, "memorised"))
        row = dict(algorithm=f[0]["algorithm"], label=a, rho=hp.get("rho"), lam=hp.get("lam"),
                   epochs=cfg["epochs"], test_acc_mean=acc[0], test_acc_std=acc[1],
                   test_acc_seeds=_final(f, "test_acc"), memorised_mean=mem[0], memorised_std=mem[1],
                   evals=round(sum(r["evals"] for r in f) / len(f)),
                   evals_per_step=sum(r["evals"] / r["steps"] for r in f) / len(f),
                   wall_s=sum(r["wall_s"] for r in f) / len(f),
                   equal_evals_epochs=res["eq_epochs"][a],
                   equal_evals_evals=round(sum(r["evals"] for r in e) / len(e)),
                   equal_evals_test_acc_mean=acc_e[0], equal_evals_test_acc_std=acc_e[1],
                   equal_evals_memorised_mean=mem_e[0], equal_evals_memorised_std=mem_e[1])
        if ref:
            row["vs_sam"] = _paired(f, res["finals"][ref])
            row["vs_sam_equal_evals"] = _paired(e, res["equal"][ref])
        rows.append(row)
    return rows


def _pm(m, s, digits=1) -> str:
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _paired_str(p) -> str:
    if p["std"] == 0 and p["mean"] == 0:
        return "-"
    return f"{p['mean']:+.1f} ± {p['std']:.1f} ({p['wins']}/{p['n']})"


def results_table(rows: list) -> str:
    ref = "vs_sam" in rows[0]
    head = ["algorithm", "rho", "lam", "test acc % (equal epochs)"] + (["vs SAM, paired"] if ref else []) \
        + ["noise memorised %", "evals / run", "test acc % (equal evals)", "epochs there"] \
        + (["vs SAM, paired "] if ref else []) + ["wall s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], "-" if r["rho"] is None else f"{r['rho']:g}",
                 "-" if r["lam"] is None else f"{r['lam']:g}",
                 _pm(r["test_acc_mean"], r["test_acc_std"])]
        cells += [_paired_str(r["vs_sam"])] if ref else []
        cells += [_pm(r["memorised_mean"], r["memorised_std"]), str(r["evals"]),
                  _pm(r["equal_evals_test_acc_mean"], r["equal_evals_test_acc_std"]),
                  str(r["equal_evals_epochs"])]
        cells += [_paired_str(r["vs_sam_equal_evals"])] if ref else []
        cells += [f"{r['wall_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(sweep: dict) -> str:
    lines = ["| algorithm | rho | lam | validation acc % (noisy labels) | chosen |", "|---|---|---|---|---|"]
    for r in sweep["table"]:
        best = sweep["best"][r["algorithm"]]
        chosen = r.get("rho") == best.get("rho") and r.get("lam") == best.get("lam")
        lines.append(f"| {r['algorithm']} | {r.get('rho', '-')} | {r.get('lam', '-')} | "
                     f"{_pm(r['val_acc_mean'], r['val_acc_std'])} | {'yes' if chosen else ''} |")
    return "\n".join(lines)


def reading(rows: list, cfg: dict) -> str:
    """Sentences computed from the rows (no claim is typed in by hand)."""
    by = {r["label"]: r for r in rows}
    out = []
    best = max(rows, key=lambda r: r["test_acc_mean"])
    out.append(f"Best at equal epochs: {best['label']} ({_pm(best['test_acc_mean'], best['test_acc_std'])}%).")
    if "SGD" in by and "vs_sam" in by["SGD"]:
        p = by["SGD"]["vs_sam"]
        out.append(f"SAM vs SGD: {-p['mean']:+.1f} ± {p['std']:.1f} points paired, SAM ahead on "
                   f"{p['n'] - p['wins']}/{p['n']} seeds; SGD memorises {by['SGD']['memorised_mean']:.0f}% "
                   f"of the flipped training labels, SAM {by['SAM']['memorised_mean']:.0f}%.")
        out.append(f"SGD given SAM's evaluation budget ({by['SGD']['equal_evals_epochs']} epochs): "
                   f"{_pm(by['SGD']['equal_evals_test_acc_mean'], by['SGD']['equal_evals_test_acc_std'])}% "
                   f"(vs {by['SGD']['test_acc_mean']:.1f}% at {cfg['epochs']}).")
    if "CMLR" in by and "vs_sam" in by["CMLR"]:
        p, q = by["CMLR"]["vs_sam"], by["CMLR"]["vs_sam_equal_evals"]
        verdict = lambda x: "ahead of" if x["mean"] - x["std"] > 0 else (  # noqa: E731
            "behind" if x["mean"] + x["std"] < 0 else "level with (within one std of)")
        out.append(f"CMLR vs SAM: {verdict(p)} SAM at equal epochs ({_paired_str(p)}: paired "
                   f"difference in points, seeds where CMLR is ahead), {verdict(q)} SAM at equal "
                   f"gradient evaluations ({_paired_str(q)}).")
    return " ".join(out)


FIGURES = ("acc_vs_epoch.png", "acc_vs_evals.png", "memorised.png", "summary.png", "sweep.png")


def payload(cfg: dict, settings: str, res: dict, rows: list, curves: dict) -> dict:
    """Everything demo.json holds; the Markdown and the figures are rendered from it alone."""
    return dict(settings=dict(cfg, description=settings, budget_evals=res["budget"],
                              steps_per_epoch=res["steps_per_epoch"], torch=torch.__version__),
                rows=rows, sweep=res["sweep"], curves=curves)


def write_json(out: str, data: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "demo.json"), "w") as fh:
        json.dump(data, fh, indent=1)


def write_markdown(out: str, data: dict) -> None:
    """demo.md (with the figures) and table.md (tables and reading only, for inclusion)."""
    cfg, rows = data["settings"], data["rows"]
    table = ["Test accuracy on the clean test set, mean ± std over seeds; \"vs SAM, paired\": "
             "mean ± std of the per-seed difference in points (same split, noise, init and batch "
             "order), with the number of seeds on which the algorithm is ahead. \"noise "
             "memorised\": share of the flipped training labels the final model predicts.",
             "", results_table(rows), "", "**Reading** (generated from the rows): " + reading(rows, cfg),
             "", "rho sweep (validation split with noisy labels, sweep seeds "
             f"{cfg['sweep_seeds']}):", "", sweep_table(data["sweep"]), ""]
    head = [f"# lookahead_ext demo: noisy labels ({100 * cfg['noise']:g}% flipped)", "",
            cfg["description"], ""]
    figs = ["", "## Figures", ""] + [f"![{f[:-4]}]({f})" for f in FIGURES] + [""]
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write("\n".join(table))
    with open(os.path.join(out, "demo.md"), "w") as fh:
        fh.write("\n".join(head + table + figs))

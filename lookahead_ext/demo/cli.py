"""Command line of the demo: noisy-label digits, rho tuned on validation, >= 5 seeds.

    python -m lookahead_ext.demo                 # full run (~7 min on 2 quiet cores), writes results/
    python -m lookahead_ext.demo --quick         # SGD, SAM, CMLR, 3 seeds: about a minute
    python -m lookahead_ext.demo --noise 0       # clean labels
    python -m lookahead_ext.demo --algos SGD SAM CMLR --seeds 0 1 2 --out DIR
    python -m lookahead_ext.demo --render DIR    # redraw DIR's Markdown and figures from its demo.json

What it does (docs/demo.md has the reasoning):

1. Data: scikit-learn's digits; a fixed stratified 40% clean test set; per seed the rest is
   split (stratified) into train (2/3) and validation (1/3), and exactly --noise of the
   labels of each are flipped to another class, uniformly.
2. Sweep: each sharpness-aware method is trained on the sweep seeds for every rho in
   --rho-grid (and lam = ratio * rho for the family members with a lam, --lam-ratios);
   the best mean final validation accuracy wins. The sweep is given no test data.
3. Equal epochs: every algorithm at its chosen setting on each of --seeds, --epochs.
4. Equal gradient evaluations: each algorithm again with its epochs set so that its
   measured evaluations (``opt.num_evals``) match SAM's at --epochs (SGD gets 2x the
   epochs, CLR 2/3); the cosine schedule spans each run.

All runs: MLP 64-H-H-10, SGD momentum 0.9 base (AdamW for AdamW), cosine lr decay to 0,
weight decay, batch 64; lookahead methods measured at their slow weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import plots, report
from .run import ALGORITHMS, run_all

DEFAULT_ALGOS = ["SGD", "AdamW", "Lookahead-SGD", "SAM", "MLSAM", "CR", "LR", "CLR", "CMLR",
                 "LookbehindSAM", "GSAM", "CRSAM"]
QUICK = dict(algos=["SGD", "SAM", "CMLR"], epochs=40, seeds=[0, 1, 2], sweep_seeds=[100],
             rho_grid=[0.05, 0.5], lam_ratios=[1.0, 2.0])


def parse(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m lookahead_ext.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--quick", action="store_true",
                   help=f"about a minute: {', '.join(QUICK['algos'])}; {QUICK['epochs']} epochs, "
                        f"{len(QUICK['seeds'])} seeds, rho grid {QUICK['rho_grid']} (explicit "
                        "options below still apply)")
    p.add_argument("--noise", type=float, default=0.4, help="fraction of flipped labels (0: clean)")
    p.add_argument("--algos", nargs="+", choices=ALGORITHMS, help="default: " + " ".join(DEFAULT_ALGOS))
    p.add_argument("--epochs", type=int)
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 3 4")
    p.add_argument("--sweep-seeds", type=int, nargs="+", help="seeds of the rho sweep (default 100 101)")
    p.add_argument("--rho-grid", type=float, nargs="+", help="default 0.05 0.2 0.5 1.0")
    p.add_argument("--lam-ratios", type=float, nargs="+",
                   help="lam / rho tried for the members with a lam (default 1 2: the paper's "
                        "lam = 0.1 at rho = 0.05 is 2)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--adam-lr", type=float, default=2e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes (default: min(2, cores))")
    a = p.parse_args(argv)
    full = dict(algos=DEFAULT_ALGOS, epochs=40, seeds=[0, 1, 2, 3, 4], sweep_seeds=[100, 101],
                rho_grid=[0.05, 0.2, 0.5, 1.0], lam_ratios=[1.0, 2.0])
    defaults = QUICK if a.quick else full
    cfg = vars(a)
    for k, v in defaults.items():
        if cfg[k] is None:
            cfg[k] = v
    if not 0.0 <= cfg["noise"] <= 1.0:
        p.error(f"--noise must be in [0, 1], got {cfg['noise']}")
    if set(cfg["seeds"]) & set(cfg["sweep_seeds"]):
        p.error("--sweep-seeds must differ from --seeds (tuning and reporting use separate draws)")
    return cfg


def describe(cfg: dict) -> str:
    return (f"scikit-learn digits, fixed clean 40% test set; per seed a stratified train/validation "
            f"split of the rest (2/3 : 1/3) with {100 * cfg['noise']:g}% of the labels flipped. "
            f"MLP 64-{cfg['hidden']}-{cfg['hidden']}-10, {cfg['epochs']} epochs, batch {cfg['batch']}, "
            f"cosine lr decay; SGD lr {cfg['lr']} momentum {cfg['momentum']} as every probe "
            f"method's base, AdamW lr {cfg['adam_lr']}; weight decay {cfg['wd']}. Seeds {cfg['seeds']} "
            f"(split, noise, init, batch order); rho tuned on the validation split over "
            f"{cfg['rho_grid']} (lam = {cfg['lam_ratios']} x rho where there is a lam) with seeds "
            f"{cfg['sweep_seeds']}. Equal evaluations: each run's epochs set so that it uses SAM's "
            f"gradient evaluations at {cfg['epochs']} epochs. Lookahead methods are measured at their "
            f"slow weights. Wall time: training only, mean per run, {cfg['jobs']} worker process(es) "
            f"with 1 torch thread each; torch {torch.__version__}.")


def render(out: str, data: dict) -> None:
    report.write_markdown(out, data)
    plots.plot_all(out, data["rows"], data["curves"], data["sweep"], data["settings"])


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:  # re-render demo.md, table.md and the figures from demo.json
        if len(argv) != 2:
            raise SystemExit("usage: python -m lookahead_ext.demo --render DIR")
        with open(os.path.join(argv[1], "demo.json")) as fh:
            render(argv[1], json.load(fh))
        return 0
    cfg = parse(argv)
    from tqdm import tqdm
    t0 = time.time()
    with tqdm(total=0, desc="demo", unit="epoch", file=sys.stderr, dynamic_ncols=True) as bar:
        res = run_all(cfg, bar)
    rows = report.summarise(res, cfg)
    curves = {a: dict(equal_epochs=report.curve_stats(res["finals"][a]),
                      equal_evals=report.curve_stats(res["equal"][a])) for a in cfg["algos"]}
    data = report.payload(cfg, describe(cfg), res, rows, curves)
    data["settings"]["total_wall_s"] = round(time.time() - t0, 1)
    report.write_json(cfg["out"], data)
    render(cfg["out"], data)
    print(report.results_table(rows))
    print("\n" + report.reading(rows, cfg))
    print(f"\nwrote {cfg['out']}/demo.md, table.md, demo.json, {', '.join(report.FIGURES)} "
          f"({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0

"""The demo's three stages: tune rho on validation, train at equal epochs, train at equal
gradient evaluations; jobs run in worker processes (one torch thread each)."""
from __future__ import annotations

import functools
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from . import data
from .train import NO_PROBE, RHO_ONLY, WITH_LAM, train

ALGORITHMS = NO_PROBE + RHO_ONLY + WITH_LAM
REFERENCE = "SAM"  # equal-evaluation budget: REFERENCE's evaluations per step (2) at `epochs`


def search_space(name: str, rho_grid, lam_ratios) -> list:
    """The hyperparameters tuned for `name`: rho (and lam = ratio * rho) where it has them."""
    if name in NO_PROBE:
        return [{}]
    if name in WITH_LAM:
        return [dict(rho=r, lam=q * r) for r in rho_grid for q in lam_ratios]
    return [dict(rho=r) for r in rho_grid]


@functools.lru_cache(maxsize=8)
def _dev(seed: int, noise: float) -> data.DevSplit:
    return data.dev_split(seed, noise)


def tune_job(spec: dict) -> dict:
    """A sweep run: it is given the development split only and measures on validation."""
    dev = _dev(spec["seed"], spec["noise"])
    return train(spec["name"], spec["hp"], dev, {"val": dev.val}, spec["epochs"], spec["seed"],
                 spec["batch"], spec["hidden"])


def final_job(spec: dict) -> dict:
    """A reported run: hyperparameters already chosen, measured on the clean test set too."""
    dev = _dev(spec["seed"], spec["noise"])
    return train(spec["name"], spec["hp"], dev, {"val": dev.val, "test": data.test_set(dev)},
                 spec["epochs"], spec["seed"], spec["batch"], spec["hidden"])


def _init_worker():
    torch.set_num_threads(1)  # tiny matmuls: one thread per process, processes share cores


class Runner:
    """Runs job lists in-process (jobs=1) or on a process pool, advancing one tqdm bar."""

    def __init__(self, jobs: int, bar):
        self.bar, self.pool = bar, None
        if jobs > 1:
            data.load()  # once, before forking: the workers inherit it
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context(method),
                                            initializer=_init_worker)
        else:
            _init_worker()

    def map(self, fn, specs: list) -> list:
        self.bar.total = (self.bar.total or 0) + sum(s["epochs"] for s in specs)
        self.bar.refresh()
        out = [None] * len(specs)
        if self.pool is None:
            done = ((i, fn(s)) for i, s in enumerate(specs))
        else:
            futs = {self.pool.submit(fn, s): i for i, s in enumerate(specs)}
            done = ((futs[f], f.result()) for f in as_completed(futs))
        for i, r in done:
            out[i] = r
            s = specs[i]
            self.bar.set_postfix_str(f"{s['stage']} {s['name']} seed {s['seed']}", refresh=False)
            self.bar.update(s["epochs"])
        return out

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def _spec(stage, name, hp, seed, epochs, cfg) -> dict:
    return dict(stage=stage, name=name, hp=hp, seed=seed, epochs=epochs, noise=cfg["noise"],
                batch=cfg["batch"], hidden=cfg["hidden"])


def sweep(runner: Runner, cfg: dict) -> dict:
    """Stage 1: every point of each algorithm's search space on the sweep seeds; the best
    mean final validation accuracy wins (ties: the first in grid order)."""
    base = {k: cfg[k] for k in ("lr", "momentum", "wd", "adam_lr")}
    tuned = [a for a in cfg["algos"] if a not in NO_PROBE]
    specs = [_spec("tune", a, dict(base, **point), s, cfg["epochs"], cfg)
             for a in tuned for point in search_space(a, cfg["rho_grid"], cfg["lam_ratios"])
             for s in cfg["sweep_seeds"]]
    results = runner.map(tune_job, specs)
    table, best = [], {a: ({}, None) for a in cfg["algos"] if a in NO_PROBE}
    for a in tuned:
        for point in search_space(a, cfg["rho_grid"], cfg["lam_ratios"]):
            vals = [100 * r["curves"]["val_acc"][-1] for s, r in zip(specs, results)
                    if s["name"] == a and s["hp"] == dict(base, **point)]
            v = torch.tensor(vals, dtype=torch.float64)
            row = dict(algorithm=a, **point, val_acc_mean=float(v.mean()),
                       val_acc_std=float(v.std()) if len(v) > 1 else 0.0)
            table.append(row)
            if a not in best or row["val_acc_mean"] > best[a][1]:  # ties: the first
                best[a] = (point, row["val_acc_mean"])
    return dict(table=table, best={a: dict(base, **p) for a, (p, _) in best.items()})


def equal_eval_epochs(runs: list, budget: int, epochs: int) -> int:
    """Epochs at which an algorithm's measured evaluations per step use `budget`."""
    per_step = sum(r["evals"] / r["steps"] for r in runs) / len(runs)
    steps_per_epoch = runs[0]["steps"] / epochs
    return max(1, round(budget / (per_step * steps_per_epoch)))


def run_all(cfg: dict, bar) -> dict:
    runner = Runner(cfg["jobs"], bar)
    try:
        tuned = sweep(runner, cfg)
        specs = [_spec("final", a, tuned["best"][a], s, cfg["epochs"], cfg)
                 for a in cfg["algos"] for s in cfg["seeds"]]
        finals = {}
        for s, r in zip(specs, runner.map(final_job, specs)):
            finals.setdefault(s["name"], []).append(r)
        steps_per_epoch = next(iter(finals.values()))[0]["steps"] // cfg["epochs"]
        budget = 2 * steps_per_epoch * cfg["epochs"]
        eq_epochs = {a: equal_eval_epochs(finals[a], budget, cfg["epochs"]) for a in cfg["algos"]}
        specs = [_spec("equal-evals", a, tuned["best"][a], s, eq_epochs[a], cfg)
                 for a in cfg["algos"] if eq_epochs[a] != cfg["epochs"] for s in cfg["seeds"]]
        equal = {a: finals[a] for a in cfg["algos"] if eq_epochs[a] == cfg["epochs"]}
        for s, r in zip(specs, runner.map(final_job, specs)):
            equal.setdefault(s["name"], []).append(r)
    finally:
        runner.close()
    print(file=sys.stderr)
    return dict(sweep=tuned, finals=finals, equal=equal, eq_epochs=eq_epochs, budget=budget,
                steps_per_epoch=steps_per_epoch)

"""The demo (the README's main job): end to end on a tiny configuration, exact label noise,
and a rho sweep that cannot read the test set."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from lookahead_ext.demo import cli, data, run  # noqa: E402

TINY = ["--epochs", "2", "--seeds", "0", "1", "--sweep-seeds", "100", "--algos", "SGD", "SAM",
        "CMLR", "--rho-grid", "0.05", "0.5", "--lam-ratios", "2", "--hidden", "32"]
ROW_KEYS = ("algorithm", "test_acc_mean", "test_acc_std", "evals", "wall_s", "rho", "lam",
            "memorised_mean", "equal_evals_test_acc_mean", "equal_evals_epochs")


def test_tiny_run_end_to_end(tmp_path):
    import lookahead_ext  # run the package the tests import (source tree or installed)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(lookahead_ext.__file__))) \
        + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "lookahead_ext.demo", *TINY, "--jobs", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "demo: 100%" in out.stderr  # one tqdm bar for the whole run
    payload = json.loads((tmp_path / "demo.json").read_text())
    rows = {r["algorithm"]: r for r in payload["rows"]}
    assert list(rows) == ["SGD", "SAM", "CMLR"]
    for r in rows.values():
        assert all(k in r for k in ROW_KEYS), r.keys()
        assert 0.0 <= r["test_acc_mean"] <= 100.0 and r["test_acc_std"] >= 0.0
        assert len(r["test_acc_seeds"]) == 2
    s = payload["settings"]
    assert s["noise"] == 0.4 and s["seeds"] == [0, 1] and s["epochs"] == 2
    # evaluation counts are the optimizers' own: SGD 1, SAM 2, CMLR 2K+1 per K steps
    steps = 2 * s["steps_per_epoch"]
    assert rows["SGD"]["evals"] == steps and rows["SAM"]["evals"] == 2 * steps
    assert rows["CMLR"]["evals"] == 2 * steps + math.ceil(steps / 10)
    # equal evaluations: SGD runs twice the epochs, SAM defines the budget
    assert rows["SGD"]["equal_evals_epochs"] == 4 and rows["SGD"]["equal_evals_evals"] == 2 * steps
    assert rows["SAM"]["equal_evals_epochs"] == 2
    assert rows["SAM"]["rho"] in (0.05, 0.5) and rows["CMLR"]["lam"] == 2 * rows["CMLR"]["rho"]
    assert {p["algorithm"] for p in payload["sweep"]["table"]} == {"SAM", "CMLR"}
    md = (tmp_path / "demo.md").read_text()
    assert "| SGD |" in md and "| CMLR |" in md and "rho sweep" in md
    table = (tmp_path / "table.md").read_text()
    assert "| SAM |" in table and "](" not in table  # includable in the docs: no image links
    figures = ("acc_vs_epoch.png", "acc_vs_evals.png", "memorised.png", "summary.png", "sweep.png")
    _check_figures(tmp_path, figures)
    # --render redraws the Markdown and the figures from demo.json alone
    for f in figures + ("demo.md", "table.md"):
        (tmp_path / f).unlink()
    assert cli.main(["--render", str(tmp_path)]) == 0
    assert (tmp_path / "demo.md").read_text() == md and (tmp_path / "table.md").read_text() == table
    _check_figures(tmp_path, figures)


def _check_figures(folder, names):
    import matplotlib.image
    for f in names:
        img = matplotlib.image.imread(str(folder / f))
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.05, f


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.37, 0.4, 1.0])
def test_flip_labels_exact(rate):
    y = torch.arange(1000) % 10
    noisy, flipped = data.flip_labels(y, rate, torch.Generator().manual_seed(0))
    assert int(flipped.sum()) == round(rate * 1000)
    assert torch.equal(noisy[~flipped], y[~flipped])
    assert bool((noisy[flipped] != y[flipped]).all())  # a flip never lands on the same class
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9


def test_flip_labels_uniform_over_other_classes():
    y = torch.zeros(9000, dtype=torch.long)
    noisy, _ = data.flip_labels(y, 1.0, torch.Generator().manual_seed(1))
    counts = torch.bincount(noisy, minlength=10)
    assert counts[0] == 0 and int(counts[1:].min()) > 850 and int(counts[1:].max()) < 1150


def test_flip_labels_rejects_bad_rate():
    with pytest.raises(ValueError, match="noise rate"):
        data.flip_labels(torch.zeros(4, dtype=torch.long), 1.5, torch.Generator())


def test_dev_split_noise_and_disjoint_rows():
    dev = data.dev_split(3, 0.4)
    test = data.test_set(dev)
    for part in (dev.train, dev.val):
        assert int(part.flipped.sum()) == round(0.4 * len(part.y))
        assert bool((part.y[part.flipped] != part.y_true[part.flipped]).all())
        assert torch.equal(part.y[~part.flipped], part.y_true[~part.flipped])
    assert not test.flipped.any() and torch.equal(test.y, test.y_true)
    rows = [set(dev.train.rows), set(dev.val.rows), set(test.rows)]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert sum(map(len, rows)) == 1797 and len(test.rows) == round(0.4 * 1797)
    # the test rows are the same for every seed; train/val differ
    other = data.dev_split(4, 0.4)
    assert np.array_equal(data.test_set(other).rows, test.rows)
    assert not np.array_equal(other.train.rows, dev.train.rows)


def test_sweep_cannot_read_the_test_set(monkeypatch):
    """The sweep runs with the test rows poisoned (NaN inputs, impossible labels) and with
    test_set() raising: its results are finite, so it never touched them."""
    x, y, dev_rows, test_rows = data._digits()
    x, y = x.copy(), y.copy()
    x[test_rows], y[test_rows] = np.nan, -1
    monkeypatch.setattr(data, "_digits", lambda: (x, y, dev_rows, test_rows))

    def forbidden(*a, **k):
        raise AssertionError("the sweep read the test set")
    monkeypatch.setattr(data, "test_set", forbidden)
    run._dev.cache_clear()
    try:
        cfg = cli.parse(["--algos", "SAM", "--epochs", "1", "--seeds", "0", "--sweep-seeds", "7",
                         "--rho-grid", "0.05", "0.5", "--hidden", "16", "--jobs", "1"])
        from tqdm import tqdm
        with tqdm(total=0, disable=True) as bar:
            runner = run.Runner(1, bar)
            result = run.sweep(runner, cfg)
            assert all(math.isfinite(r["val_acc_mean"]) for r in result["table"])
            assert result["best"]["SAM"]["rho"] in (0.05, 0.5)
            with pytest.raises(AssertionError, match="read the test set"):  # the guard works
                runner.map(run.final_job, [run._spec("final", "SAM", result["best"]["SAM"], 0, 1, cfg)])
    finally:
        run._dev.cache_clear()


def test_equal_eval_epochs_from_measured_counts():
    runs = [dict(evals=12 * 40 * 3, steps=12 * 40)]  # 3 evaluations per step (CLR)
    assert run.equal_eval_epochs(runs, budget=2 * 12 * 40, epochs=40) == 27
    runs = [dict(evals=480, steps=480)]  # SGD
    assert run.equal_eval_epochs(runs, budget=960, epochs=40) == 80


def test_cli_rejects_shared_seeds_and_bad_noise():
    with pytest.raises(SystemExit):
        cli.parse(["--seeds", "0", "100", "--sweep-seeds", "100"])
    with pytest.raises(SystemExit):
        cli.parse(["--noise", "1.2"])


def test_search_space():
    assert run.search_space("SGD", [0.1], [1, 2]) == [{}]
    assert run.search_space("SAM", [0.1, 0.5], [1, 2]) == [dict(rho=0.1), dict(rho=0.5)]
    assert run.search_space("CMLR", [0.1], [1, 2]) == [dict(rho=0.1, lam=0.1), dict(rho=0.1, lam=0.2)]


def test_clean_labels_train_finite():
    from lookahead_ext.demo.train import train
    dev = data.dev_split(0, 0.0)
    assert not dev.train.flipped.any() and torch.equal(dev.val.y, dev.val.y_true)
    hp = dict(lr=0.05, momentum=0.9, wd=5e-4, adam_lr=2e-3, rho=0.5, lam=0.5)
    r = train("CMLR", hp, dev, {"val": dev.val}, epochs=1, seed=0, hidden=8)
    assert r["curves"]["memorised"] == [0.0] and math.isfinite(r["curves"]["val_acc"][0])
    assert r["algorithm"] == "CMLR" and r["evals"] == 2 * r["steps"] + math.ceil(r["steps"] / 10)

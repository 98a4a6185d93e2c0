"""Noisy-label digits: a fixed clean test split, and per seed a noisy train/validation split."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

NUM_CLASSES = 10
TEST_FRACTION = 0.4      # of all 1797 digits, fixed (random_state 0), labels never flipped
VAL_FRACTION = 1 / 3     # of the rest (the development pool), drawn per seed


@dataclass(frozen=True)
class Labeled:
    """Inputs, the labels the model sees, the true labels and which of them were flipped."""
    x: torch.Tensor
    y: torch.Tensor
    y_true: torch.Tensor
    flipped: torch.Tensor
    rows: np.ndarray  # indices into sklearn's digits (to check that splits are disjoint)


@dataclass(frozen=True)
class DevSplit:
    """What training and tuning may see: noisy train and validation sets, and the input
    scaling fitted on the train set. It holds no test data."""
    train: Labeled
    val: Labeled
    mean: np.ndarray
    scale: np.ndarray


def flip_labels(y: torch.Tensor, rate: float, gen: torch.Generator):
    """Flip exactly round(rate * n) labels, chosen uniformly, each to one of the other
    classes uniformly. Returns (noisy labels, flipped mask)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    m = int(round(rate * len(y)))
    idx = torch.randperm(len(y), generator=gen)[:m]
    shift = torch.randint(1, NUM_CLASSES, (m,), generator=gen)  # never 0: never the same class
    noisy, flipped = y.clone(), torch.zeros(len(y), dtype=torch.bool)
    noisy[idx] = (y[idx] + shift) % NUM_CLASSES
    flipped[idx] = True
    return noisy, flipped


def load():
    """Load (and cache) the digits and the fixed test rows."""
    _digits()


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    dev_rows, test_rows = train_test_split(np.arange(len(y)), test_size=TEST_FRACTION,
                                           random_state=0, stratify=y)
    return x, y, np.sort(dev_rows), np.sort(test_rows)


def _labeled(rows, mean, scale, y_seen=None, flipped=None) -> Labeled:
    x, y = _digits()[:2]
    xs = torch.tensor((x[rows] - mean) / scale, dtype=torch.float32)
    y_true = torch.tensor(y[rows], dtype=torch.long)
    if y_seen is None:
        y_seen, flipped = y_true, torch.zeros(len(rows), dtype=torch.bool)
    return Labeled(xs, y_seen, y_true, flipped, rows)


def dev_split(seed: int, noise: float) -> DevSplit:
    """Train/validation split of the development pool for one seed (stratified), with
    `noise` of the labels of each flipped exactly (see flip_labels)."""
    from sklearn.model_selection import train_test_split
    x, y, dev_rows, _ = _digits()
    tr, va = train_test_split(dev_rows, test_size=VAL_FRACTION, random_state=seed,
                              stratify=y[dev_rows])
    tr, va = np.sort(tr), np.sort(va)
    mean = x[tr].mean(0)
    scale = x[tr].std(0)
    scale[scale == 0] = 1.0  # pixels constant on the train set (as sklearn's StandardScaler)
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for rows in (tr, va):
        y_true = torch.tensor(y[rows], dtype=torch.long)
        sets.append(_labeled(rows, mean, scale, *flip_labels(y_true, noise, gen)))
    return DevSplit(sets[0], sets[1], mean, scale)


def test_set(dev: DevSplit) -> Labeled:
    """The fixed clean test set, scaled as `dev`'s train set. Only final runs call this."""
    return _labeled(_digits()[3], dev.mean, dev.scale)

"""Live tensor memory of a step (bench/memory.py's tracker): the table in docs/training.md."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.memory import measure, optimizers  # noqa: E402

pytest.importorskip("pytorch_optimizer")
# peak live bytes in units of the parameter bytes (docs/training.md, "Memory"); the rest is
# activations and autograd buffers of this small batch
PEAK = {"torch SGD (momentum)": 3, "SAM (SGD)": 4, "CMLR (SGD)": 8, "CMLR (AdamW)": 9}


@pytest.mark.parametrize("name", list(PEAK))
def test_peak_memory_matches_the_documented_table(name):
    make, style = optimizers()[name]
    r = measure(make, style, width=256, depth=2, batch=4, steps=5)
    assert PEAK[name] <= r["peak"] < PEAK[name] + 0.1

"""The integration examples (examples/*.py) run and train: plain loop, HF Trainer, Lightning
(manual and automatic optimization)."""
import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("fp16", [False, True], ids=["bf16-autocast", "fp16-gradscaler"])
def test_plain_loop(fp16):
    losses, acc, identical = load("plain_loop").main(steps=24, accum=2, fp16=fp16)
    assert identical                          # mid-cycle checkpoint resumes bit-identically
    assert losses[-1] < losses[0] and acc > 0.8


def test_plain_loop_compiled():
    losses, acc, identical = load("plain_loop").main(steps=12, accum=2, compile=True)
    assert identical and losses[-1] < losses[0]


def test_hf_trainer():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    before, after, opt = load("hf_trainer").main(steps=20)
    assert opt.num_evals == 4 * (2 * 5 + 1)   # 20 steps = 4 CMLR cycles of K=5: every step probed
    assert after < 0.5 * before


def test_lightning_manual_optimization():
    pytest.importorskip("pytorch_lightning")
    before, after, opt = load("lightning_manual").main(steps=20)
    assert opt.num_evals == 4 * (2 * 5 + 1)
    assert after < 0.5 * before


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_lightning_automatic_optimization(precision):
    pytest.importorskip("pytorch_lightning")
    before, after, opt = load("lightning_auto").main(steps=20, precision=precision)
    assert opt.num_evals == 4 * (2 * 5 + 1)   # every step probed (skipped fp16 steps included)
    assert after < 0.5 * before

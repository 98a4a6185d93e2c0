"""Validation of the probe optimizers' hyperparameters and parameters (errors name the key, never print a tensor)."""
from __future__ import annotations

import math

from torch import Tensor

from .. import ops
from ..ops.base_step import BASES


def check_range(name, value, lo, hi, lo_open=False, hi_open=False) -> None:
    """ValueError unless ``value`` is a real number in the interval [lo, hi] (open ends
    with ``lo_open``/``hi_open``); NaN is rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    bad = (math.isnan(value) or value < lo or value > hi or (lo_open and value == lo)
           or (hi_open and value == hi))
    if bad:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value}")


def check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def check_backend(backend) -> None:
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")


def validate_group(g: dict) -> None:
    """Every key of a family param group (ProbeOptimizer's keywords)."""
    if g["base"] not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {g['base']!r}")
    check_backend(g["backend"])
    if g.get("beta_schedule", "cycle") not in ("cycle", "training"):
        raise ValueError(f"beta_schedule must be 'cycle' or 'training', got {g['beta_schedule']!r}")
    ts = g.get("total_steps")
    if g.get("beta_schedule") == "training" and (isinstance(ts, bool) or not isinstance(ts, int) or ts < 1):
        raise ValueError(f"beta_schedule='training' needs total_steps, an integer >= 1, got {ts!r}")
    if g["init_v"] not in ("grad", "carry"):
        raise ValueError(f"init_v must be 'grad' or 'carry', got {g['init_v']!r}")
    check_k(g["k"])
    lr = g["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("lr as a Tensor must have one element")
        lr = float(lr)
    check_range("lr", lr, 0.0, math.inf)
    check_range("rho", g["rho"], 0.0, math.inf, lo_open=True)
    check_range("lam", g["lam"], 0.0, math.inf)
    check_range("alpha", g["alpha"], 0.0, 1.0, lo_open=True)
    check_range("beta_start", g["beta_start"], 0.0, 1.0)
    check_range("beta_end", g["beta_end"], 0.0, 1.0)
    check_range("gamma", g["gamma"], 0.0, 1.0)
    check_range("momentum", g["momentum"], 0.0, 1.0, hi_open=True)
    check_range("dampening", g["dampening"], 0.0, 1.0)
    check_range("weight_decay", g["weight_decay"], 0.0, math.inf)
    check_range("eps", g["eps"], 0.0, math.inf, lo_open=True)
    check_range("norm_eps", g["norm_eps"], 0.0, math.inf, lo_open=True)
    if "betas" in g:  # base="sgd" groups carry none (see ProbeOptimizer.__init__)
        if len(tuple(g["betas"])) != 2:
            raise ValueError(f"betas must be a pair, got {g['betas']!r}")
        b1, b2 = g["betas"]
        check_range("betas[0]", b1, 0.0, 1.0, hi_open=True)
        check_range("betas[1]", b2, 0.0, 1.0, hi_open=True)
    if g.get("max_grad_norm") is not None:
        check_range("max_grad_norm", g["max_grad_norm"], 0.0, math.inf, lo_open=True)
    if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def check_real_params(params, owner: str) -> None:
    """TypeError for a complex or integer parameter (named by shape)."""
    for p in params:
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"{owner} supports real floating-point parameters only, got "
                            f"{p.dtype} (parameter of shape {tuple(p.shape)})")

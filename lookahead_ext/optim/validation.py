"""Hyperparameter rules of every optimizer of the package (one table each, checked at construction and at every step) and parameter checks.

A rule says what one key may hold; a table maps keys to rules. The same table is checked
when an optimizer is built (:func:`validate_group` on the defaults and on every param
group), when a group is added, and at the start of every ``step()`` (:func:`check_groups`:
schedulers and users write ``param_groups`` between steps). A refused step raises before
anything is written. Errors name the key and the value, never print a tensor.

Real numbers must be finite (inf and NaN are refused everywhere). ``lr`` may be a tensor
with one element (torch.optim allows it); its value is checked at construction and when a
group is added, at step time only its shape (reading it would be a device sync).
"""
from __future__ import annotations

import math
import numbers

from torch import Tensor

from .. import ops
from ..ops.base_step import BASES


class Real:
    """A finite real number in [lo, hi] (open ends with ``lo_open``/``hi_open``; an infinite
    end is always open). ``tensor``: a one-element tensor is accepted too (lr)."""

    __slots__ = ("lo", "hi", "lo_open", "hi_open", "tensor", "text")

    def __init__(self, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False,
                 hi_open: bool = False, tensor: bool = False):
        self.lo, self.hi = lo, hi
        self.lo_open, self.hi_open = lo_open, hi_open or hi == math.inf
        self.tensor = tensor
        lb, rb = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        self.text = f"a finite number in {lb}{lo}, {hi}{rb}"

    def ok(self, x) -> bool:
        # NaN fails every comparison; inf fails the open upper end
        return ((self.lo < x) if self.lo_open else (self.lo <= x)) and \
               ((x < self.hi) if self.hi_open else (x <= self.hi))

    def __call__(self, name: str, value, step: bool = False) -> None:
        if type(value) is float:  # the hot path at step time
            if self.ok(value):
                return
        elif isinstance(value, Tensor):
            if not self.tensor:
                raise ValueError(f"{name} must be a Python number, got a tensor of shape {tuple(value.shape)}")
            if value.numel() != 1:
                raise ValueError(f"{name} as a Tensor must have one element, got shape {tuple(value.shape)}")
            if step or self.ok(float(value)):
                return
            value = float(value)
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
        elif self.ok(value):
            return
        raise ValueError(f"{name} must be {self.text}, got {value!r}")


class Int:
    """An integer >= lo (bool refused)."""

    __slots__ = ("lo",)

    def __init__(self, lo: int = 1):
        self.lo = lo

    def __call__(self, name: str, value, step: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < self.lo:
            raise ValueError(f"{name} must be an integer >= {self.lo}, got {value!r}")


class OneOf:
    """One of a fixed set of values (``choices`` may be a callable: the backends change
    with ops.register_backend)."""

    __slots__ = ("choices",)

    def __init__(self, choices):
        self.choices = choices

    def __call__(self, name: str, value, step: bool = False) -> None:
        choices = self.choices() if callable(self.choices) else self.choices
        if value not in choices:
            raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


class Pair:
    """A pair of values, each under ``rule`` (reported as name[0], name[1])."""

    __slots__ = ("rule",)

    def __init__(self, rule):
        self.rule = rule

    def __call__(self, name: str, value, step: bool = False) -> None:
        if isinstance(value, Tensor) or len(tuple(value)) != 2:
            raise ValueError(f"{name} must be a pair, got {value!r}")
        for i, x in enumerate(value):
            self.rule(f"{name}[{i}]", x, step)


class Maybe:
    """None, or a value under ``rule``."""

    __slots__ = ("rule",)

    def __init__(self, rule):
        self.rule = rule

    def __call__(self, name: str, value, step: bool = False) -> None:
        if value is not None:
            self.rule(name, value, step)


UNIT = Real(0.0, 1.0)            # [0, 1]
UNIT_OPEN_HI = Real(0.0, 1.0, hi_open=True)
UNIT_OPEN_LO = Real(0.0, 1.0, lo_open=True)
NONNEG = Real(0.0)               # [0, inf)
POSITIVE = Real(0.0, lo_open=True)  # (0, inf)
BACKEND = OneOf(lambda: ops.BACKENDS)

# The CMLR family (ProbeOptimizer): every keyword of its param groups.
FAMILY_RULES = {
    "lr": Real(0.0, tensor=True),
    "momentum": UNIT_OPEN_HI,
    "dampening": UNIT,
    "weight_decay": NONNEG,
    "betas": Pair(UNIT_OPEN_HI),
    "eps": POSITIVE,
    "rho": POSITIVE,
    "lam": NONNEG,
    "alpha": UNIT_OPEN_LO,
    "beta_start": UNIT,
    "beta_end": UNIT,
    "gamma": UNIT,
    "norm_eps": POSITIVE,
    "max_grad_norm": Maybe(POSITIVE),
    "k": Int(1),
    "total_steps": Maybe(Int(1)),
    "base": OneOf(BASES),
    "backend": BACKEND,
    "init_v": OneOf(("grad", "carry")),
    "beta_schedule": OneOf(("cycle", "training")),
    "anchor": OneOf(("g0", "g+")),
}
# The baselines add their own keys (GSAM's beta is a moving-average weight, CR-SAM's a
# non-negative weight of the first-difference term).
GSAM_RULES = {**FAMILY_RULES, "beta": UNIT, "period": Int(1)}
CRSAM_RULES = {**FAMILY_RULES, "beta": NONNEG}
# LookaheadBio's keywords (alpha there is the penalty of ScaleBiO's eq. 2).
BIO_RULES = {
    "k": Int(1), "beta_w": UNIT_OPEN_LO, "beta_lam": UNIT_OPEN_LO, "alpha": POSITIVE,
    "lr_w": NONNEG, "lr_u": Maybe(NONNEG), "lr_lam": NONNEG, "momentum": UNIT_OPEN_HI,
    "weight_decay": NONNEG, "lam_weight_decay": NONNEG, "betas": Pair(UNIT_OPEN_HI),
    "eps": POSITIVE, "backend": BACKEND,
}


def check_values(values: dict, rules: dict, step: bool = False) -> None:
    """ValueError for the first key of ``values`` that breaks its rule (keys without a
    rule, and rules without a key, are skipped)."""
    for name, rule in rules.items():
        if name in values:
            rule(name, values[name], step)


def validate_group(g: dict, rules: dict = FAMILY_RULES, step: bool = False) -> None:
    """A param group (or the defaults) of a probe optimizer: every key under ``rules``, then
    the rules that tie two keys together."""
    check_values(g, rules, step)
    if g.get("beta_schedule") == "training" and g.get("total_steps") is None:
        raise ValueError("beta_schedule='training' needs total_steps, an integer >= 1, got None")
    if g.get("nesterov") and (g["momentum"] <= 0 or g["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def check_groups(groups, rules: dict = FAMILY_RULES) -> None:
    """Step-time check of every param group (host values only: a tensor lr is checked for
    its shape, never read)."""
    for g in groups:
        validate_group(g, rules, step=True)


def check_range(name, value, lo, hi, lo_open=False, hi_open=False) -> None:
    """ValueError unless ``value`` is a finite real number in the interval [lo, hi] (open
    ends with ``lo_open``/``hi_open``)."""
    Real(lo, hi, lo_open, hi_open)(name, value)


def check_k(k) -> None:
    Int(1)("k", k)


def check_backend(backend) -> None:
    BACKEND("backend", backend)


def check_real_params(params, owner: str) -> None:
    """TypeError for a complex or integer parameter (named by shape)."""
    for p in params:
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"{owner} supports real floating-point parameters only, got "
                            f"{p.dtype} (parameter of shape {tuple(p.shape)})")

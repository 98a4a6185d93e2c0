"""``create_optimizer``: every optimizer of the package (and torch's baselines) by name, timm-style."""
from __future__ import annotations

import warnings
from fnmatch import fnmatchcase
from typing import Optional

import torch
from torch import nn

from .optim import CLR, CMLR, CR, CRSAM, FMLR, FR, GSAM, LR, MLSAM, SAM, Lookahead, LookbehindSAM

__all__ = ["create_optimizer", "optimizer_names", "param_groups_weight_decay", "register_timm"]

PROBE = {"cmlr": CMLR, "fmlr": FMLR, "mlsam": MLSAM, "clr": CLR, "lr": LR, "fr": FR, "cr": CR,
         "sam": SAM, "lookbehindsam": LookbehindSAM, "gsam": GSAM, "crsam": CRSAM}
TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
LOOKAHEAD = "lookahead_"


def optimizer_names(lookahead: bool = True) -> list[str]:
    """Every name ``create_optimizer`` accepts (with the ``lookahead_`` forms if asked)."""
    names = sorted(PROBE) + sorted(TORCH)
    if lookahead:
        names += [LOOKAHEAD + n for n in names if not getattr(PROBE.get(n), "lookahead", False)]
    return names


def param_groups_weight_decay(model: nn.Module, weight_decay: float, no_weight_decay=()) -> list[dict]:
    """timm's rule: no weight decay for 1-d parameters (biases, norm weights), names ending
    in ".bias", and names matching a pattern of ``no_weight_decay`` or
    ``model.no_weight_decay()`` (shell-style wildcards, as timm 1.0.31 reads them: xcit's
    ``"pos_embed.*"``); frozen parameters are left out. Returns [no-decay group, decay
    group] (empty ones dropped)."""
    skip = set(no_weight_decay) | set(getattr(model, "no_weight_decay", lambda: ())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = p.ndim <= 1 or name.endswith(".bias") or any(fnmatchcase(name, s) for s in skip)
        (no_decay if excluded else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def create_optimizer(model_or_params, opt: str, lr: Optional[float] = None,
                     weight_decay: Optional[float] = None, lookahead_k: int = 5,
                     lookahead_alpha: float = 0.5, **kwargs):
    """Build an optimizer by name, as timm's ``create_optimizer_v2`` does.

    Args:
        model_or_params: an ``nn.Module`` (weight decay then skips biases and norm weights,
            see :func:`param_groups_weight_decay`) or parameters / param groups (passed as is).
        opt: a name of :func:`optimizer_names`, case-insensitive: the family ("cmlr",
            "fmlr", "mlsam", "clr", "lr", "fr", "cr", "sam"), the baselines
            ("lookbehindsam", "gsam", "crsam") or torch's ("sgd", "adam", "adamw"); a
            ``"lookahead_"`` prefix wraps it in :class:`lookahead_ext.Lookahead`
            (``lookahead_k``, ``lookahead_alpha``), refused for members that already run a
            lookahead cycle.
        lr, weight_decay: None keeps the class's default.
        **kwargs: the class's own keywords (e.g. ``base="adamw"``, ``rho``, ``k``, ``momentum``).
    """
    name = opt.lower()
    wrap = name.startswith(LOOKAHEAD)
    if wrap:
        name = name[len(LOOKAHEAD):]
    cls = PROBE.get(name) or TORCH.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer {opt!r}; known: {', '.join(optimizer_names())}")
    if wrap and getattr(cls, "lookahead", False):
        raise ValueError(f"{opt!r}: {cls.__name__} already runs a lookahead cycle (k, alpha); "
                         f"use {name!r}")
    if isinstance(model_or_params, nn.Module):
        if weight_decay:
            params = param_groups_weight_decay(model_or_params, weight_decay)
        else:
            params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = model_or_params
    if lr is not None:
        kwargs["lr"] = lr
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    optimizer = cls(params, **kwargs)
    return Lookahead(optimizer, k=lookahead_k, alpha=lookahead_alpha) if wrap else optimizer


def register_timm(registry=None) -> list[str]:
    """Register the family and the baselines in timm's optimizer registry, so that
    ``timm.optim.create_optimizer_v2(model, "cmlr", ...)`` builds them (timm's own
    ``lookahead_`` prefix then wraps them in timm's Lookahead). Returns the names added
    (none on a second call). A name timm already uses for another optimizer is left to
    timm, with a warning. timm passes ``momentum=0.9`` by default to optimizers that take
    one, as it does for SGD. The optimizers still need ``step(closure)``: see
    docs/training.md for train.py."""
    from timm.optim._optim_factory import OptimInfo, default_registry

    registry = default_registry if registry is None else registry
    known = set(registry.list_optimizers())
    added = []
    for name, cls in PROBE.items():
        if name in known:
            theirs = registry.get_optimizer_info(name).opt_class
            if theirs is not cls:
                warnings.warn(f"register_timm: timm already has an optimizer {name!r} "
                              f"({theirs}); lookahead_ext.{cls.__name__} is not "
                              f"registered under that name", RuntimeWarning, stacklevel=2)
            continue
        registry.register(OptimInfo(name=name, opt_class=cls, has_momentum=True, has_betas=True,
                                    description=f"lookahead_ext.{cls.__name__} (needs step(closure))"))
        added.append(name)
    return added

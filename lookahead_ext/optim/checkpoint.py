"""Load-time checks of state dicts: what is wrong is said before anything changes (parameters named by index and shape, never printed)."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Callable, Optional

from torch import Tensor

from ._buckets import state_dtype

#: Param-group keys that belong to the running optimizer, not to the checkpoint:
#: ``state_dict`` writes them (a record of the run that saved it), ``load_state_dict``
#: keeps the optimizer's own (a "cuda" checkpoint loads on a CPU machine).
RUNNING_KEYS = ("backend",)


class StateDictError(ValueError):
    """A state dict that cannot be loaded into this optimizer; the optimizer is unchanged."""


def refuse(owner: str, why: str):
    raise StateDictError(f"{owner}.load_state_dict: {why}. Nothing was loaded: the optimizer "
                         "is unchanged.")


def to_param(x, p: Tensor):
    """The optimizer's copy of a saved value of parameter ``p``: a tensor on p's device in
    p's state dtype (fp32 for bf16/fp16 parameters: torch.optim's cast to the parameter
    dtype would lose the fp32 masters; integer tensors keep theirs), anything else as is."""
    if not isinstance(x, Tensor):
        return x
    dt = state_dtype(p.dtype) if x.is_floating_point() else x.dtype
    return x.detach().to(device=p.device, dtype=dt, copy=True)


def describe(p: Tensor, i: int) -> str:
    return f"parameter {i} (shape {tuple(p.shape)})"


def run_hooks(opt, state_dict, post: bool = False):
    """torch.optim's load_state_dict hooks: the pre hooks (each may return a replacement
    dict) on a shallow copy before anything is checked, or the post hooks at the end."""
    if post:
        for hook in opt._optimizer_load_state_dict_post_hooks.values():
            hook(opt)
        return None
    state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        out = hook(opt, state_dict)
        if out is not None:
            state_dict = out
    return state_dict


def _kind(state_dict: Mapping) -> str:
    """A guess at who wrote a state dict, for the messages."""
    keys = set(state_dict)
    if "lookahead" in keys:
        return "lookahead_ext.Lookahead"
    if "lookahead_ext" in keys:
        return f"lookahead_ext.{state_dict['lookahead_ext'].get('optimizer', 'a probe optimizer')}"
    if {"w", "u", "lam", "config"} <= keys:
        return "lookahead_ext.LookaheadBio"
    if {"state", "param_groups"} <= keys:
        return "a plain torch.optim optimizer"
    return f"something else (keys {sorted(map(str, keys))[:8]})"


def check_layout(owner: str, state_dict, groups) -> dict:
    """``state_dict`` has "state" and "param_groups" laid out as ``groups`` (same number
    of groups and parameters per group). Returns {saved id: (position, parameter)}."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        got = type(state_dict).__name__ if not isinstance(state_dict, Mapping) else \
            f"a dict with keys {sorted(map(str, state_dict))[:8]}"
        refuse(owner, f"expected an optimizer state dict (keys 'state' and 'param_groups'), got {got}")
    saved = state_dict["param_groups"]
    if not isinstance(saved, (list, tuple)) or not all(isinstance(g, Mapping) and "params" in g
                                                       for g in saved):
        refuse(owner, "'param_groups' of the state dict must be a list of dicts with 'params'")
    if len(saved) != len(groups):
        refuse(owner, f"the state dict has {len(saved)} param group(s), this optimizer "
                      f"{len(groups)}")
    for i, (s, g) in enumerate(zip(saved, groups)):
        if len(s["params"]) != len(g["params"]):
            refuse(owner, f"param group {i} has {len(s['params'])} parameter(s) in the state "
                          f"dict, {len(g['params'])} in this optimizer")
    params = [p for g in groups for p in g["params"]]
    ids = [i for s in saved for i in s["params"]]
    if len(set(ids)) != len(ids):
        refuse(owner, "the state dict's param_groups list a parameter id twice")
    return {i: (pos, p) for pos, (i, p) in enumerate(zip(ids, params))}


def check_writer(owner: str, state_dict: Mapping, key: str, name: str, hint: str = "") -> Mapping:
    """The state dict's ``key`` entry (the writer's own state), written by an optimizer
    called ``name``. Returns that entry. ``hint``: what to do instead if it is missing."""
    entry = state_dict.get(key) if isinstance(state_dict, Mapping) else None
    if not isinstance(entry, Mapping):
        kind = _kind(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        refuse(owner, f"the state dict has no {key!r} entry: it was written by {kind}, not by "
                      f"{name}" + (f" ({hint})" if hint else ""))
    writer = entry.get("optimizer", name)  # entries written before the name was saved: trusted
    if writer != name:
        refuse(owner, f"the state dict was written by {writer}, not by {name}: their states "
                      f"differ (load it into a {writer})")
    return entry


def _same_shape(owner: str, what: str, p: Tensor, pos: int, value) -> None:
    if not isinstance(value, Tensor):
        refuse(owner, f"{describe(p, pos)}: the state dict's {what} are a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != tuple(p.shape):
        refuse(owner, f"{describe(p, pos)}: the state dict's {what} are of shape "
                      f"{tuple(value.shape)} (a checkpoint of another model?)")
    if not value.is_floating_point():
        refuse(owner, f"{describe(p, pos)}: the state dict's {what} are {value.dtype}, not floating point")


def check_like(owner: str, what: str, like, got) -> None:
    """``got`` is a list of tensors of the shapes of ``like`` (named by index and shape)."""
    if not isinstance(got, (list, tuple)) or len(got) != len(like):
        n = len(got) if isinstance(got, (list, tuple)) else type(got).__name__
        refuse(owner, f"the state dict's {what} are {n}, expected {len(like)} tensors")
    for i, (t, g) in enumerate(zip(like, got)):
        if not isinstance(g, Tensor) or tuple(g.shape) != tuple(t.shape) or not g.is_floating_point():
            desc = f"shape {tuple(g.shape)} {g.dtype}" if isinstance(g, Tensor) else type(g).__name__
            refuse(owner, f"the state dict's {what} entry {i} is {desc}, expected shape "
                          f"{tuple(t.shape)} (floating point)")


def _param_of(owner: str, ids: dict, i, what: str):
    if i not in ids:
        refuse(owner, f"{what} for parameter id {i!r}, which no param group of the state dict lists")
    return ids[i]


def checked_state(owner: str, ids: dict, saved_state, move: Callable = to_param) -> dict:
    """{parameter: its state} from the state dict's "state": every tensor of a parameter's
    state that is not a scalar has the parameter's shape; ``move(value, p)`` makes the
    optimizer's copy."""
    if not isinstance(saved_state, Mapping):
        refuse(owner, "'state' of the state dict must be a dict {parameter id: state}")
    out = {}
    for i, st in saved_state.items():
        pos, p = _param_of(owner, ids, i, "'state' has an entry")
        if not isinstance(st, Mapping):
            refuse(owner, f"{describe(p, pos)}: its state must be a dict, got {type(st).__name__}")
        for key, val in st.items():
            if isinstance(val, Tensor) and val.dim() > 0:
                _same_shape(owner, f"state {key!r} values", p, pos, val)
        out[p] = {key: move(val, p) for key, val in st.items()}
    return out


def checked_tensors(owner: str, ids: dict, saved, what: str, move: Callable = to_param) -> dict:
    """{parameter: tensor} from a {parameter id: tensor} entry (e.g. slow weights), each of
    the parameter's shape."""
    if not isinstance(saved, Mapping):
        refuse(owner, f"the {what} must be a dict {{parameter id: tensor}}")
    out = {}
    for i, t in saved.items():
        pos, p = _param_of(owner, ids, i, f"the {what} have an entry")
        _same_shape(owner, what, p, pos, t)
        out[p] = move(t, p)
    return out


def merged_groups(owner: str, saved_groups, groups, validate: Optional[Callable] = None) -> list:
    """The param groups after the load: the saved hyperparameters (deep copies) with this
    optimizer's parameters and :data:`RUNNING_KEYS`; keys the state dict lacks (written by
    an older version) keep this optimizer's values. Each merged group passes ``validate``."""
    out = []
    for i, (s, g) in enumerate(zip(saved_groups, groups)):
        ng = {k: v for k, v in g.items() if k != "params"}
        ng.update(copy.deepcopy({k: v for k, v in s.items() if k != "params"}))
        ng.update({k: g[k] for k in RUNNING_KEYS if k in g})
        ng["params"] = g["params"]
        if validate is not None:
            try:
                validate(ng)
            except (ValueError, TypeError, KeyError) as e:
                refuse(owner, f"param group {i} of the state dict: {e}")
        out.append(ng)
    return out


def check_counter(owner: str, name: str, value, k) -> None:
    """A cycle position: an integer in [0, k)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < max(k, 1):
        refuse(owner, f"the state dict's {name} is {value!r}, not an integer in [0, {k})")

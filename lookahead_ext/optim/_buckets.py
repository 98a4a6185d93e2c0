"""Grouping of parameters into (param group, device, dtype) buckets for the fused ops.

A bucket holds the model parameters and their "masters": the exact fast weights w that
probes perturb around. For float32/float64 parameters the parameter itself is the source
of truth and the master is a scratch backup refreshed during every step (so user code that edits
p.data between steps is respected; the copy is fused into the first probe's perturbation); for bfloat16/float16 parameters the
master is a persistent float32 copy kept in the optimizer state (mixed-precision master
weights, as apex O2 and torchao do): the parameter is cast(master).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..ops.plan_lists import ADDRESS, OWNER, PlanList, reuse

LOW_PRECISION = (torch.bfloat16, torch.float16)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Optimizer-state dtype for a parameter dtype: fp32 for low precision, else the same."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


@dataclass
class Bucket:
    group: dict
    # PlanLists: the Triton backend keeps their launch-plan columns for the epoch (the
    # bucket's life). The params are re-checked by the engine itself at every step
    # (param_signature: identity, address, requires_grad; a change rebuilds the buckets);
    # the masters are the optimizer's own tensors: bf16/fp16 ones are state["master"]
    # (addresses re-checked), fp32 ones private scratch (re-made with the buckets).
    params: list[Tensor] = field(default_factory=lambda: PlanList(check=OWNER))
    masters: list[Tensor] = field(default_factory=lambda: PlanList(check=ADDRESS))  # fp32: OWNER (make_buckets)
    low_precision: bool = False
    # per-step flags: `synced` = the masters hold the exact fast weights w of this step
    # (always true for low-precision buckets, whose masters persist; for float32/float64
    # buckets the backup is fused into the first perturbation, see ProbeOptimizer._probe);
    # `perturbed` = the params currently hold a probe point other than w.
    synced: bool = False
    perturbed: bool = False
    # low precision: the params' version counters when the optimizer last wrote them (None:
    # unknown, check every value), see ProbeRuntime._adopt_edits; `pending` = some masters
    # are new and join the state only with the first applied step (a skipped one leaves it as it was)
    versions: list | None = None
    pending: bool = False
    # per-step lists of the optimizer's state (v, momentum...), kept while they hold the
    # same tensors so that their launch-plan columns persist (see `kept`)
    lists: dict = field(default_factory=dict)

    def kept(self, name: str, tensors: list) -> list[Tensor]:
        """``tensors`` as the PlanList kept under ``name`` (plan_lists.reuse)."""
        lst = self.lists[name] = reuse(self.lists.get(name), tensors, check=ADDRESS)
        return lst

    @property
    def kind(self) -> tuple:
        """(device, dtype) of the bucket: tensors a single fused-op call can take."""
        return (self.params[0].device, self.params[0].dtype) if self.params else None

    def select(self, keep: list[bool]) -> "Bucket":
        return Bucket(self.group, PlanList([p for p, k in zip(self.params, keep) if k], check=OWNER),
                      PlanList([m for m, k in zip(self.masters, keep) if k], check=self.masters.check),
                      self.low_precision,
                      self.synced, self.perturbed)


def param_signature(groups) -> tuple:
    """What a cached bucket plan depends on: each group's identity and size and each
    parameter's identity, requires_grad and storage (``p.data = ...`` changes the pointer)."""
    return (tuple([(id(g), len(g["params"])) for g in groups]),
            tuple([(id(p), p.requires_grad, p.data_ptr()) for g in groups for p in g["params"]]))


def trainable(groups) -> list[Tensor]:
    return [p for g in groups for p in g["params"] if p.requires_grad]


def make_buckets(groups, state, scratch) -> list[Bucket]:
    """Buckets of trainable params, per param group and (device, dtype) (groups.KindGroups);
    creates low-precision masters (kept out of ``state`` until ProbeRuntime._finish) / fp32
    scratch backups."""
    from .groups import KindGroups  # groups.py imports this module

    buckets = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        kinds = KindGroups(params)
        for (_, dtype), members in zip(kinds.kinds, kinds.split(params)):
            low = dtype in LOW_PRECISION
            b = Bucket(group, masters=PlanList(check=ADDRESS if low else OWNER), low_precision=low, synced=low)
            for p in members:
                b.params.append(p)
                b.masters.append(_low_master(p, state, b) if low else _scratch_backup(p, scratch))
            buckets.append(b)
    return buckets


def _low_master(p: Tensor, state, bucket: Bucket) -> Tensor:
    """The fp32 master of a bf16/fp16 parameter: the state's, or a new one (pending)."""
    m = state[p].get("master") if p in state else None  # `in`: no empty entry
    if m is None:
        m = p.detach().to(torch.float32).clone()
        bucket.pending = True
    return m


def _scratch_backup(p: Tensor, scratch) -> Tensor:
    """The reusable backup buffer of a float32/float64 parameter."""
    m = scratch.get(p)
    if m is None or m.shape != p.shape or m.dtype != p.dtype or m.device != p.device:
        m = torch.empty_like(p, memory_format=torch.contiguous_format)
        scratch[p] = m
    return m

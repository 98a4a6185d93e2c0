"""Lookahead (Zhang et al. 2019) around any torch optimizer, with fused slow/fast sync."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops
from ._buckets import LOW_PRECISION, param_signature, trainable
from ._grad_mode import no_grad as _no_grad
from ._slow import SlowWeightsMixin, init_slow

_KEY = "lookahead"


class Lookahead(SlowWeightsMixin, Optimizer):
    """Lookahead(optimizer, k=5, alpha=0.5): every k steps of `optimizer`,
    slow <- slow + alpha (fast - slow) and fast <- slow.

    - Slow weights start at the weights the model has when Lookahead is built (the
      algorithm's w_0; timm's version starts them at the first sync instead). They are
      float32 for bf16/fp16 parameters and live in ``state_dict()``.
    - ``step(closure=None)`` calls the base optimizer's ``step`` exactly as it would be
      called (closure optional), so Lookahead drops into any existing training loop.
    - ``param_groups`` are the base optimizer's own (lr schedulers work on either).
    - With alpha = 1 it is exactly the base optimizer.
    """

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5,
                 backend: str = "auto"):
        if not isinstance(optimizer, Optimizer):
            raise TypeError("Lookahead wraps a torch.optim.Optimizer instance")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not (0.0 < alpha <= 1.0) or math.isnan(alpha):
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.optimizer = optimizer
        self.k, self.alpha, self.backend = k, alpha, backend
        self._counter = 0
        self._slow: dict = {}
        self._plan = None  # (signature, groups): see _sync_groups
        # Optimizer.__init__ sets up hooks; then share the base's groups and state.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state
        init_slow(trainable(self.param_groups), self._slow)

    def __repr__(self) -> str:
        return f"Lookahead({self.optimizer!r}, k={self.k}, alpha={self.alpha})"

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "optimizer") or any(param_group is g for g in self.optimizer.param_groups):
            return  # called from Optimizer.__init__ with the base's own groups
        self.optimizer.add_param_group(param_group)
        init_slow(trainable([self.optimizer.param_groups[-1]]), self._slow)
        self._plan = None

    def step(self, closure=None):
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self._counter += 1
        if self._counter >= self.k:
            self._sync_now()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def cycle_position(self) -> int:
        return self._counter

    # ------------------------------------------------------------------ sync
    def _slow_map(self) -> dict:
        return self._slow

    def _sync_groups(self) -> list[tuple[list, list]]:
        """(slow weights, params) per (device, dtype), rebuilt only when the parameters
        change (param_signature): regrouping every sync costs more than the fused sync
        itself on a small model."""
        sig = param_signature(self.param_groups)
        plan = self._plan
        if plan is None or plan[0] != sig:
            groups: dict = {}
            for p in trainable(self.param_groups):
                groups.setdefault((p.device, p.dtype), []).append(p)
            plan = self._plan = (sig, [([self._slow[p] for p in ps], ps) for ps in groups.values()])
        return plan[1]

    def _sync_now(self) -> None:
        with _no_grad():
            for slow, params in self._sync_groups():
                ops.lookahead_sync_(slow, params, self.alpha, backend=self.backend)
                # a base optimizer with fp32 master weights of bf16/fp16 params (e.g. SAM on bf16)
                if self.state and params[0].dtype in LOW_PRECISION:
                    for p, s in zip(params, slow):
                        st = self.state.get(p)
                        master = st.get("master") if st else None
                        if isinstance(master, Tensor) and master.shape == p.shape:
                            master.copy_(s)
        self._counter = 0

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict:
        """The base optimizer's state dict (standard "state"/"param_groups" keys, so tools
        that inspect it keep working) plus a "lookahead" entry: k, alpha, cycle position
        and the slow weights."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        sd = dict(self.optimizer.state_dict())
        sd[_KEY] = {"k": self.k, "alpha": self.alpha, "counter": self._counter,
                    "slow": {index[id(p)]: s.clone() for p, s in self._slow.items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        la = state_dict.pop(_KEY)
        self.optimizer.load_state_dict(state_dict.pop("base", state_dict))
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.k, self.alpha, self._counter = la["k"], la["alpha"], la["counter"]
        params = [p for g in self.param_groups for p in g["params"]]
        self._slow = {params[int(i)]: s.detach().clone().to(params[int(i)].device)
                      for i, s in la["slow"].items()}
        self._plan = None

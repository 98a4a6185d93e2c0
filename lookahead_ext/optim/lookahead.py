"""Lookahead (Zhang et al. 2019) around any torch optimizer, with fused slow/fast sync."""
from __future__ import annotations

import contextlib

from torch import Tensor
from torch.optim import Optimizer

from ._buckets import LOW_PRECISION, param_signature, trainable
from ._grad_mode import no_grad as _no_grad
from ._slow import SlowWeightsMixin, init_slow, join_slow
from .checkpoint import (check_counter, check_layout, check_writer, checked_tensors, refuse,
                         run_hooks)
from .groups import KindGroups, sync_slow_
from .validation import check_backend, check_k, check_range

_KEY = "lookahead"


class Lookahead(SlowWeightsMixin, Optimizer):
    r"""Lookahead (Zhang et al., 2019; cmlr.txt Algorithm 1, line 18) around any torch
    optimizer: the wrapped optimizer takes the fast steps, and every ``k`` of them

    .. math::
        \phi \leftarrow \phi + \alpha (w - \phi), \qquad w \leftarrow \phi

    (one fused ``ops.lookahead_sync_`` per (device, dtype)).

    - Slow weights start at the weights the model has when Lookahead is built (the
      algorithm's w_0; timm's version starts them at the first sync instead). They are
      float32 for bf16/fp16 parameters and live in ``state_dict()``; a base optimizer
      with fp32 master weights (e.g. SAM on bf16) has them reset to the slow weights too.
    - ``step(closure=None)`` calls the base optimizer's ``step`` exactly as it would be
      called (closure optional), so Lookahead drops into any existing training loop.
    - ``param_groups`` are the base optimizer's own (lr schedulers work on either).
    - With alpha = 1 it is exactly the base optimizer.
    - The cycle covers the parameters that require grad: one unfrozen later joins it at
      its next step with slow weights = its weights then; a frozen one drops out.
    - A step the base optimizer skips (a probe optimizer's ``num_steps`` does not grow,
      e.g. SAM on a non-finite gradient) is not counted: no sync, nothing changes.

    Args:
        optimizer: the base (fast) optimizer, any ``torch.optim.Optimizer``.
        k: fast steps per sync. Default: 5.
        alpha: slow-weight step size alpha in (0, 1]. Default: 0.5.
        backend: fused-op backend of the sync (``"auto"``, ``"reference"``, ``"cpp"``,
            ``"cuda"``, ``"triton"``). Default: ``"auto"``.
    """

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5,
                 backend: str = "auto"):
        if not isinstance(optimizer, Optimizer):
            raise TypeError("Lookahead wraps a torch.optim.Optimizer instance")
        check_k(k)
        check_range("alpha", alpha, 0.0, 1.0, lo_open=True)
        check_backend(backend)
        self.optimizer = optimizer
        self.k, self.alpha, self.backend = k, alpha, backend
        self._counter = 0
        self._slow: dict = {}
        self._plan = None  # (signature, plan): see _sync_plan
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

    _stepping = False  # a step is in progress (re-entry from the closure is refused)

    def step(self, closure=None):
        with self._inner_step("step()"):
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def probes(self):
        """Call-by-call API of a probe optimizer inside (see its ``probes()``, and
        :func:`lookahead_ext.amp.probes` under a GradScaler): the cycle advances, and syncs
        after the k-th step, when the loop ends with an applied step, as after ``step()``.
        Abandoning the loop, or a skipped update, leaves the cycle as it was."""
        if not hasattr(self.optimizer, "probes"):
            raise TypeError(f"Lookahead.probes() needs a probe optimizer inside (CMLR, SAM, ...), "
                            f"not {type(self.optimizer).__name__}: use step()")
        with self._inner_step("probes()"):
            yield from self.optimizer.probes()

    @contextlib.contextmanager
    def _inner_step(self, what: str):
        """One step of the optimizer inside: re-entry (from its closure or loop body) is
        refused before anything is touched; the cycle advances only if the step completed and
        was applied (probe optimizers count applied steps in ``num_steps``; a skipped update,
        an exception or an abandoned probes() loop leaves the cycle as it was)."""
        if self._stepping:
            raise RuntimeError(f"Lookahead.{what} was called while a step is in progress (from "
                               "inside the closure or a probe's loop body?): the closure must "
                               "only compute the loss and call backward().")
        self._sync_plan()  # a parameter unfrozen since the last step joins the cycle now
        applied = getattr(self.optimizer, "num_steps", None)
        self._stepping = True
        try:
            yield
        finally:
            self._stepping = False
        if applied is None or self.optimizer.num_steps != applied:
            self._advance()

    def _advance(self) -> None:
        self._counter += 1
        if self._counter >= self.k:
            self._sync_now()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def cycle_position(self) -> int:
        return self._counter

    # ------------------------------------------------------------------ sync
    def _slow_map(self) -> dict:
        return self._slow

    def _sync_plan(self) -> tuple:
        """(params, their slow weights, KindGroups), rebuilt only when the parameters change
        (param_signature): regrouping every sync costs more than the fused sync itself on a
        small model."""
        sig = param_signature(self.param_groups)
        plan = self._plan
        if plan is None or plan[0] != sig:
            params = trainable(self.param_groups)
            self._slow = join_slow(params, self._slow)
            plan = self._plan = (sig, (params, [self._slow[p] for p in params], KindGroups(params)))
        return plan[1]

    def _sync_now(self) -> None:
        with _no_grad():
            params, slow, groups = self._sync_plan()
            sync_slow_(slow, params, self.alpha, backend=self.backend, groups=groups)
            # a base optimizer with fp32 master weights of bf16/fp16 params (e.g. SAM on bf16)
            if self.state and any(dt in LOW_PRECISION for _, dt in groups.kinds):
                for p, s in zip(params, slow):
                    st = self.state.get(p) if p.dtype in LOW_PRECISION else None
                    master = st.get("master") if st else None
                    if isinstance(master, Tensor) and master.shape == p.shape:
                        master.copy_(s)
        self._counter = 0

    # ------------------------------------------------------------------ state dict
    def _name(self) -> str:
        return f"Lookahead({type(self.optimizer).__name__})"

    def state_dict(self) -> dict:
        """The base optimizer's state dict (standard "state"/"param_groups" keys, so tools
        that inspect it keep working) plus a "lookahead" entry: the writer's name
        (``Lookahead(SGD)``), k, alpha, cycle position and the slow weights."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        sd = dict(self.optimizer.state_dict())
        sd[_KEY] = {"optimizer": self._name(), "k": self.k, "alpha": self.alpha,
                    "counter": self._counter,
                    "slow": {index[id(p)]: s.clone() for p, s in self._slow.items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict written by ``state_dict()`` of a Lookahead around the same kind
        of optimizer, for the same parameter layout. Checked first (checkpoint.py): a
        refused one raises StateDictError (a ValueError) and changes nothing; the base
        optimizer's own part is then loaded by its ``load_state_dict``. ``backend`` stays
        this wrapper's. A plain checkpoint of the base optimizer (no "lookahead" entry) is
        refused: load it with ``opt.optimizer.load_state_dict(sd)`` to start a new cycle
        from it."""
        owner = name = self._name()
        state_dict = run_hooks(self, state_dict)
        la = check_writer(owner, state_dict, _KEY, name,
                          hint="to start a new Lookahead cycle from a checkpoint of the base "
                               "optimizer alone, load it with `opt.optimizer.load_state_dict(sd)`")
        base = {key: v for key, v in state_dict.items() if key != _KEY}
        base = base.get("base", base)
        ids = check_layout(owner, base, self.param_groups)
        try:
            check_k(la.get("k"))
            check_range("alpha", la.get("alpha"), 0.0, 1.0, lo_open=True)
        except ValueError as e:
            refuse(owner, f"the state dict's {e}")
        check_counter(owner, "cycle position", la.get("counter"), la["k"])
        slow = checked_tensors(owner, ids, la.get("slow", {}), "slow weights")
        self.optimizer.load_state_dict(base)  # checks its own part first, or changes nothing
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.k, self.alpha, self._counter = la["k"], la["alpha"], la["counter"]
        self._slow = slow
        self._plan = None
        run_hooks(self, None, post=True)

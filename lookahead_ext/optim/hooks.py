"""Registered hooks of the probe runtime (torch conventions: each ``register_*`` returns a RemovableHandle)."""
from __future__ import annotations

from collections import OrderedDict
from itertools import chain
from typing import Callable, Optional

from torch import Tensor
from torch.optim import optimizer as _torch_optimizer
from torch.utils.hooks import RemovableHandle


class ProbeHooks:
    """Hooks into the probe loop of a :class:`~lookahead_ext.optim.runtime.ProbeRuntime`.

    ``lookahead_ext.amp``, ``lookahead_ext.distributed`` and ``lookahead_ext.batchnorm``
    are built on them; user code may register its own. Every ``register_*`` returns a
    :class:`torch.utils.hooks.RemovableHandle` (``handle.remove()``; also a context manager).
    """

    def _init_hooks(self) -> None:
        self._probe_pre_hooks: OrderedDict = OrderedDict()
        self._probe_post_hooks: OrderedDict = OrderedDict()
        self._probe_hooks_always_called: OrderedDict = OrderedDict()
        self._norm_reducers: OrderedDict = OrderedDict()
        self._grad_unscalers: OrderedDict = OrderedDict()

    def register_probe_pre_hook(self, hook: Callable) -> RemovableHandle:
        """Register ``hook(optimizer, probe) -> None``, called before each probe is handed
        to the loop body (the parameters already hold the probe point and have no .grad).
        E.g. :mod:`lookahead_ext.batchnorm` freezes running statistics here."""
        handle = RemovableHandle(self._probe_pre_hooks)
        self._probe_pre_hooks[handle.id] = hook
        return handle

    def register_probe_hook(self, hook: Callable, *, always_call: bool = False) -> RemovableHandle:
        """Register ``hook(optimizer, probe, params) -> None``, called after each probe's
        evaluation, before the optimizer reads the gradients: ``params`` are the trainable
        parameters (their ``.grad`` holds the probe's gradient, ``probe.loss`` its loss);
        the hook may replace both (e.g. :mod:`lookahead_ext.distributed` all-reduces them).

        With ``always_call=True`` the hook also runs when the step is abandoned during this
        probe (an exception or ``break`` in the loop body), as for
        ``nn.Module.register_forward_hook(..., always_call=True)``."""
        handle = RemovableHandle(self._probe_post_hooks,
                                 extra_dict=self._probe_hooks_always_called)
        self._probe_post_hooks[handle.id] = hook
        if always_call:
            self._probe_hooks_always_called[handle.id] = True
        return handle

    def register_norm_reducer(self, reducer: Callable) -> RemovableHandle:
        """Register ``reducer(optimizer, sq) -> Tensor``, applied to every global squared norm
        (a float32/float64 tensor of shape []) before the optimizer inverts it: e.g. an
        all-reduce of norms taken on local shards (FSDP2). Reducers chain in registration
        order."""
        handle = RemovableHandle(self._norm_reducers)
        self._norm_reducers[handle.id] = reducer
        return handle

    def register_grad_unscaler(self, unscaler: Callable) -> RemovableHandle:
        """Register ``unscaler(optimizer) -> Optional[Tensor]``: the 0-d float32 factor
        (1/scale of a GradScaler) by which every probe's gradients are multiplied inside the
        fused non-finite check; None = no unscaling this probe. At most one at a time."""
        if self._grad_unscalers:
            raise RuntimeError(f"{type(self).__name__} already has a grad unscaler; remove "
                               "its handle first")
        handle = RemovableHandle(self._grad_unscalers)
        self._grad_unscalers[handle.id] = unscaler
        return handle

    # ------------------------------------------------------------------ callers
    def _grad_inv_scale(self) -> Optional[Tensor]:
        for fn in self._grad_unscalers.values():
            return fn(self)
        return None

    def _reduce_norm(self, sq):
        for fn in self._norm_reducers.values():
            sq = fn(self, sq)
        return sq

    def _run_probe_pre_hooks(self, probe) -> None:
        for hook in tuple(self._probe_pre_hooks.values()):
            hook(self, probe)

    def _run_probe_hooks(self, probe, params, abandoned: bool) -> None:
        for hid, hook in tuple(self._probe_post_hooks.items()):
            if not abandoned or hid in self._probe_hooks_always_called:
                hook(self, probe, params)

    def _run_step_hooks(self, post: bool) -> None:
        """torch's optimizer step pre/post hooks (global ones too, in torch's order) for a
        step driven through ``probes()``: they get ``args = (self,)`` and ``kwargs = {}``;
        a pre hook's returned (args, kwargs) has no step call to go to and is ignored."""
        if post:
            hooks = chain(self._optimizer_step_post_hooks.values(),
                          _torch_optimizer._global_optimizer_post_hooks.values())
        else:
            hooks = chain(_torch_optimizer._global_optimizer_pre_hooks.values(),
                          self._optimizer_step_pre_hooks.values())
        for hook in tuple(hooks):
            hook(self, (self,), {})

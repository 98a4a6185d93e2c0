"""Slow weights shared by every lookahead optimizer: creation, swap-in context, state I/O."""
from __future__ import annotations

import contextlib

import torch

from ._buckets import state_dtype


def init_slow(params, slow: dict) -> None:
    """Slow weights start at the initial weights (Algorithm 1 input w_0), fp32 for low precision."""
    with torch.no_grad():
        for p in params:
            if p not in slow:
                slow[p] = p.detach().to(state_dtype(p.dtype)).clone(memory_format=torch.contiguous_format)


def join_slow(params, slow: dict) -> dict:
    """The slow weights of the cycle's parameters ``params`` (those that require grad now):
    one that joins (unfrozen, or frozen when the optimizer was built) starts at its weights
    now, the w_{t,0} of the cycle it joins (Algorithm 1, line 2); one that left (frozen)
    drops its slow weights and is left as it is. Returns ``slow`` or a new dict."""
    init_slow(params, slow)
    if len(slow) == len(params):
        return slow
    keep = set(map(id, params))
    return {p: s for p, s in slow.items() if id(p) in keep}


class SlowWeightsMixin:
    """Provides `slow_weights()` and `sync()`; the class supplies `_slow_map()` and `_sync_now()`."""

    def _slow_map(self) -> dict:
        raise NotImplementedError

    def _sync_now(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def slow_weights(self):
        """Temporarily load the slow weights into the model (e.g. to evaluate them).

        Inside the block the parameters hold the slow weights; on exit the fast weights
        are restored exactly (bit for bit), even if the block raises.
        """
        slow = self._slow_map()
        params = [p for p in slow]
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p in params:
                p.copy_(slow[p])
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    def sync(self) -> None:
        """Force the Lookahead outer step now (slow += alpha(fast - slow); fast = slow)
        and restart the cycle, e.g. at the end of training before saving the model."""
        self._sync_now()

    @property
    def sync_lookahead(self):
        """timm's name for :meth:`sync`: timm's train.py calls ``optimizer.sync_lookahead()``
        at the end of every epoch where it exists (as for its own ``lookahead_`` optimizers),
        so it exists only where there are slow weights (``hasattr`` is False on SAM & co)."""
        if not getattr(self, "lookahead", True):
            raise AttributeError(f"{type(self).__name__} has no slow weights (no sync_lookahead)")
        return self.sync
